"""Streaming sources in the intake: a connection held open, a catch-up poll from the stored
cursor before every (re)connection, each event's items recorded as it arrives."""

from __future__ import annotations

import asyncio
import logging
import random
import time

from feeds import FeedError, StreamSource
from feeds.base import ParsedItems
from feeds.sse import EventTooLarge, SSEDecoder
from monitor.fetch import FetchError
from monitor.records import work as work_rows

log = logging.getLogger("repost_monitor.pipeline")

# A stream reconnects after 1 s, doubling per failure; one that stayed up this long was healthy.
STREAM_RECONNECT_BASE = 1.0
STREAM_HEALTHY_SECONDS = 30.0
CATCHUP_PAGES = 10          # at most this many timeline pages per catch-up
CATCHUP_FULL_PAGE = 40      # a page this long may have more behind it


def _skipped(reason: str, detail: str) -> ParsedItems:
    out = ParsedItems()
    out.skipped.append((reason, detail))
    return out


class StreamWatcher:
    """Runs an intake's streaming sources (the intake records, queues and counts for it)."""

    def __init__(self, intake):
        self.intake = intake
        self._cursors: dict[str, str | None] = {}  # the newest item id recorded, per source

    async def run(self, source: StreamSource, cfg, stop: asyncio.Event) -> None:
        """Hold a streaming source open: catch up on what was posted while away, then record
        each event's items as it arrives. A failure or a closed stream reconnects after a
        backoff (1 s doubling to ``max_backoff``; reset by a connection that lasted)."""
        failures = 0
        while not stop.is_set():
            opened = None
            try:
                await self._catch_up(source, dict(cfg.headers))
                self.intake.metrics.stream_connects.labels(source.name).inc()
                decoder = SSEDecoder()
                async for line in self.intake.fetcher.stream_lines(source.url, headers=dict(cfg.headers)):
                    if opened is None:
                        opened = time.monotonic()
                        self.intake.metrics.stream_connected.labels(source.name).set(1)
                        log.info("feed %s: streaming", source.name, extra={"feed": source.name})
                    try:
                        event = decoder.line(line)
                    except EventTooLarge as exc:
                        self.intake.metrics.stream_events.labels(source.name, "skipped").inc()
                        self.intake.count_skipped(source.name, _skipped("malformed_item", str(exc)))
                        continue
                    if event is not None:
                        await self._stream_event(source, *event)
                raise FetchError("stream_closed", "the server closed the stream")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure reconnects; a bug is logged whole
                if opened is not None and time.monotonic() - opened > STREAM_HEALTHY_SECONDS:
                    failures = 0
                failures += 1
                delay = min(cfg.max_backoff, STREAM_RECONNECT_BASE * 2 ** (failures - 1))
                self.intake.feed_failed(source.name, exc, failures)
                if isinstance(exc, (FetchError, FeedError)):
                    log.warning("feed %s: stream ended (%s); reconnecting in %.1fs", source.name, exc, delay,
                                extra={"feed": source.name, "reason": exc.reason})
                else:
                    self.intake.metrics.errors.labels("poll").inc()
                    log.exception("feed %s: stream failed; reconnecting in %.1fs", source.name, delay,
                                  extra={"feed": source.name})
            finally:
                self.intake.metrics.stream_connected.labels(source.name).set(0)
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay * (1 + random.uniform(0, cfg.jitter)))
            except TimeoutError:
                pass

    async def _catch_up(self, source: StreamSource, headers: dict) -> None:
        """Poll what the stream carried while nobody listened, page by page from the cursor."""
        cursor = await asyncio.to_thread(work_rows.feed_cursor, self.intake.store, source.name)
        self._cursors[source.name] = cursor
        for _ in range(CATCHUP_PAGES):
            poller = source.catchup(cursor)
            if poller is None:
                return
            work, items = await self.intake.poll(poller, headers)
            await self.intake.queue_work(work)
            newest = StreamSource.newest([cursor, *(i.id for i in items)])
            if newest and newest != cursor:
                cursor = self._cursors[source.name] = newest
                await asyncio.to_thread(work_rows.set_feed_cursor, self.intake.store, source.name, cursor)
            if len(items) < CATCHUP_FULL_PAGE:
                return

    async def _stream_event(self, source: StreamSource, event: str, data: str) -> None:
        items = source.parse_event(event, data)  # one event, at most MAX_EVENT_BYTES of JSON
        self.intake.count_skipped(source.name, items)
        if not items:
            self.intake.metrics.stream_events.labels(source.name, "skipped" if items.skipped else "ignored").inc()
            return
        self.intake.metrics.stream_events.labels(source.name, "post").inc()
        work = await asyncio.to_thread(self.intake.record_items, source.name, items, time.time())
        known = self._cursors.get(source.name)
        cursor = StreamSource.newest([known, *(i.id for i in items)])
        if cursor and cursor != known:  # after the rows: a crash between repeats some catch-up, loses nothing
            self._cursors[source.name] = cursor
            await asyncio.to_thread(work_rows.set_feed_cursor, self.intake.store, source.name, cursor)
        await self.intake.queue_work(work)
