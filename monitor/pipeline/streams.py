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
from monitor.records.store import DatabaseError

log = logging.getLogger("repost_monitor.pipeline")

# A stream reconnects after 1 s, doubling per failure; one that stayed up this long was healthy.
STREAM_RECONNECT_BASE = 1.0
STREAM_HEALTHY_SECONDS = 30.0
CATCHUP_PAGES = 10          # at most this many timeline pages per catch-up
CATCHUP_FULL_PAGE = 40      # a page this long may have more behind it
CURSOR_SAVE_SECONDS = 1.0   # a firehose's position is stored at most this often


class StreamWatcher:
    """Runs an intake's streaming sources (the intake records, queues and counts for it)."""

    def __init__(self, intake):
        self.intake = intake
        self._cursors: dict[str, str | None] = {}  # where each source resumes (an item id, a time_us)
        self._saved: dict[str, tuple[str | None, float]] = {}  # (cursor in the store, when it was saved)
        self._flushes: dict[str, asyncio.Task] = {}  # a pending store of a quiet stream's position

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
                url = source.connect_url(self._cursors.get(source.name))
                async for event in self._events(source, url, dict(cfg.headers)):
                    if opened is None:
                        opened = time.monotonic()
                        self.intake.metrics.stream_connected.labels(source.name).set(1)
                        log.info("feed %s: streaming", source.name, extra={"feed": source.name})
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
                await self.intake.feed_failed(source.name, exc, failures)
                if isinstance(exc, (FetchError, FeedError)):
                    log.warning("feed %s: stream ended (%s); reconnecting in %.1fs", source.name, exc, delay,
                                extra={"feed": source.name, "reason": exc.reason})
                elif isinstance(exc, DatabaseError):  # a full disk, a failover: caught up once it is back
                    self.intake.metrics.errors.labels("store").inc()
                    log.error("feed %s: the store failed (%s); reconnecting in %.1fs", source.name, exc, delay,
                              extra={"feed": source.name})
                else:
                    self.intake.metrics.errors.labels("poll").inc()
                    log.exception("feed %s: stream failed; reconnecting in %.1fs", source.name, delay,
                                  extra={"feed": source.name})
            finally:
                self.intake.metrics.stream_connected.labels(source.name).set(0)
                await self._save_cursor(source.name, force=True)
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay * (1 + random.uniform(0, cfg.jitter)))
            except TimeoutError:
                pass

    async def _events(self, source: StreamSource, url: str, headers: dict):
        """(event, data) as they arrive, or None for a line that ended no event yet."""
        if source.protocol == "websocket":
            async for text in self.intake.fetcher.websocket_messages(url, headers=headers):
                yield "message", text
            return
        decoder = SSEDecoder()
        async for line in self.intake.fetcher.stream_lines(url, headers=headers):
            try:
                yield decoder.line(line)
            except EventTooLarge as exc:
                self.intake.metrics.stream_events.labels(source.name, "skipped").inc()
                self.intake.count_skipped(source.name, ParsedItems.skip("malformed_item", str(exc)))

    async def _save_cursor(self, feed: str, force: bool = False) -> None:
        """Store where the source resumes: at once for item-id cursors (rare events), at most
        once a second for a firehose's time cursor, and whenever the connection ends. A crash
        replays at most that second; its posts are items seen before, recorded once."""
        cursor = self._cursors.get(feed)
        saved, when = self._saved.get(feed, (None, 0.0))
        if not cursor or cursor == saved:
            return
        if force or time.monotonic() - when >= CURSOR_SAVE_SECONDS:
            try:
                await asyncio.to_thread(work_rows.set_feed_cursor, self.intake.store, feed, cursor)
            except DatabaseError as exc:  # the store is failing: kept here, stored at the next save
                log.error("feed %s: its position could not be stored (%s)", feed, exc, extra={"feed": feed})
                return
            self._saved[feed] = (cursor, time.monotonic())
        elif feed not in self._flushes:  # a stream that goes quiet still gets its position stored
            self._flushes[feed] = asyncio.create_task(self._flush_later(feed))

    async def _flush_later(self, feed: str) -> None:
        try:
            await asyncio.sleep(CURSOR_SAVE_SECONDS)
        finally:
            self._flushes.pop(feed, None)
        await self._save_cursor(feed, force=True)

    async def _catch_up(self, source: StreamSource, headers: dict) -> None:
        """Poll what the stream carried while nobody listened, page by page from the cursor."""
        cursor = await asyncio.to_thread(work_rows.feed_cursor, self.intake.store, source.name)
        self._cursors[source.name] = cursor
        self._saved[source.name] = (cursor, time.monotonic())
        for _ in range(CATCHUP_PAGES):
            poller = source.catchup(cursor)
            if poller is None:
                return
            work, items = await self.intake.poll(poller, headers)
            await self.intake.queue_work(work)
            newest = StreamSource.newest([cursor, *(i.id for i in items)])
            if newest and newest != cursor:
                cursor = self._cursors[source.name] = newest
                await self._save_cursor(source.name, force=True)
            if len(items) < CATCHUP_FULL_PAGE:
                return

    async def _stream_event(self, source: StreamSource, event: str, data: str) -> None:
        try:
            items = source.parse_event(event, data)  # one event, at most a megabyte of JSON
        except Exception:  # noqa: BLE001 - a bug on one event: failing the connection would replay it forever
            self.intake.metrics.errors.labels("poll").inc()
            log.exception("feed %s: an event could not be parsed (a bug); skipped", source.name,
                          extra={"feed": source.name})
            items = ParsedItems.skip("malformed_item", "an event the adapter failed on")
        self.intake.count_skipped(source.name, items)
        work = []
        if items:
            self.intake.metrics.stream_events.labels(source.name, "post").inc()
            work = await asyncio.to_thread(self.intake.record_items, source.name, items, time.time())
        else:
            self.intake.metrics.stream_events.labels(source.name, "skipped" if items.skipped else "ignored").inc()
        # The position moves after the rows are written: a crash between the two repeats a
        # little, never skips. A time cursor moves with every event; an item-id one with posts.
        if items.cursor:
            self._cursors[source.name] = items.cursor
            await self._save_cursor(source.name)
        elif items:
            self._cursors[source.name] = StreamSource.newest([self._cursors.get(source.name), *(i.id for i in items)])
            await self._save_cursor(source.name, force=True)
        await self.intake.queue_work(work)
