"""Stage 1, intake: poll the sources (conditional GET, backoff with jitter), take pushed
items (the ingest API), and write every (feed, item, image URL) to the store before it is
handed on, so a crash or kill loses nothing; resume what the last run left pending."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

from feeds import FeedError, FeedItem, HttpSource, LocalSource, StreamSource
from feeds.base import ParsedItems
from feeds.sse import EventTooLarge, SSEDecoder
from monitor.fetch import Fetcher, FetchError
from monitor.metrics import Metrics
from monitor.pipeline.transport import Transport
from monitor.records import work as work_rows
from monitor.records.store import DatabaseError, Store
from monitor.records.work import WorkItem

log = logging.getLogger("repost_monitor.pipeline")


@dataclass(frozen=True, slots=True)
class FeedSettings:
    interval: float = 300.0
    jitter: float = 0.1
    max_backoff: float = 3600.0
    headers: tuple[tuple[str, str], ...] = ()  # sent with every poll (API tokens)


# A stream reconnects after 1 s, doubling per failure; one that stayed up this long was healthy.
STREAM_RECONNECT_BASE = 1.0
STREAM_HEALTHY_SECONDS = 30.0
CATCHUP_PAGES = 10          # at most this many timeline pages per catch-up
CATCHUP_FULL_PAGE = 40      # a page this long may have more behind it


def _skipped(reason: str, detail: str) -> ParsedItems:
    out = ParsedItems()
    out.skipped.append((reason, detail))
    return out


class Intake:
    def __init__(self, store: Store, fetcher: Fetcher, metrics: Metrics, transport: Transport):
        self.store, self.fetcher, self.metrics, self.transport = store, fetcher, metrics, transport
        self.sources: list[tuple[HttpSource | LocalSource | StreamSource, FeedSettings]] = []
        self._cursors: dict[str, str | None] = {}  # streaming sources: the newest item id recorded

    def add_source(self, source: HttpSource | LocalSource, settings: FeedSettings) -> None:
        self.sources.append((source, settings))

    def tasks(self, stop: asyncio.Event) -> list[asyncio.Task]:
        return [asyncio.create_task((self._stream if isinstance(s, StreamSource) else self._watch)(s, cfg, stop),
                                    name=f"watch:{s.name}") for s, cfg in self.sources] + [
            asyncio.create_task(self._resume_pending(stop), name="resume")]

    async def _queue(self, work: list[WorkItem]) -> None:
        for w in work:
            await self.transport.put(w)
            self.metrics.queue_depth.labels("download").set(self.transport.depth())

    async def _watch(self, source, cfg: FeedSettings, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                await self._queue(await self.poll_once(source, dict(cfg.headers)))
                failures = 0
                delay = cfg.interval
            except asyncio.CancelledError:
                raise
            except (FetchError, FeedError) as exc:
                failures += 1
                delay = min(cfg.max_backoff, cfg.interval * 2 ** failures)
                self._feed_failed(source.name, exc, failures)
                log.warning("feed %s failed (%s); next poll in %.0fs", source.name, exc, delay,
                            extra={"feed": source.name, "reason": exc.reason})
            except Exception as exc:  # noqa: BLE001 - a bug in one adapter must not stop the rest
                failures += 1
                delay = min(cfg.max_backoff, cfg.interval * 2 ** failures)
                self.metrics.errors.labels("poll").inc()
                self._feed_failed(source.name, exc, failures)
                log.exception("feed %s: unexpected error; next poll in %.0fs", source.name, delay,
                              extra={"feed": source.name})
            delay *= 1 + random.uniform(-cfg.jitter, cfg.jitter)
            try:
                await asyncio.wait_for(stop.wait(), timeout=max(0.05, delay))
            except TimeoutError:
                pass

    def _feed_failed(self, feed: str, exc: Exception, failures: int) -> None:
        self.metrics.feed_polls.labels(feed, "error").inc()
        try:
            work_rows.feed_failed(self.store, feed, failures, str(exc), time.time())
        except DatabaseError as db_exc:  # the store is failing too: say so, keep watching
            self.metrics.errors.labels("store").inc()
            log.error("feed %s: cannot record its failure in %s: %s", feed, self.store.path, db_exc,
                      extra={"feed": feed})

    async def poll_once(self, source, headers: dict | None = None) -> list[WorkItem]:
        """Poll one source; returns the work rows it created (already stored)."""
        return (await self._poll(source, headers))[0]

    async def _poll(self, source, headers: dict | None = None) -> tuple[list[WorkItem], list[FeedItem]]:
        """(the work rows a poll created, every item it saw)."""
        now = time.time()
        if isinstance(source, LocalSource):
            self.fetcher.add_local_root(source.options["path"])
            items = await asyncio.to_thread(source.scan)
            etag = last_modified = None
        else:
            etag, last_modified = work_rows.feed_validators(self.store, source.name)
            resp = await self.fetcher.fetch_feed(source.url, etag=etag, last_modified=last_modified,
                                                 accept=source.accept, headers=headers)
            if resp.not_modified:
                self._feed_ok(source.name, now, etag, last_modified, "not_modified")
                return [], []
            # Parsing can be heavy (feedparser on a 5 MB feed): off the loop.
            items = await asyncio.to_thread(source.parse, resp.body, resp.content_type)
            etag, last_modified = resp.etag, resp.last_modified
            self._count_skipped(source.name, items)
        # A poll can bring hundreds of rows: their transaction runs off the loop,
        # which meanwhile keeps the downloads and the matches moving.
        work = await asyncio.to_thread(self.record_items, source.name, items, now)
        self._feed_ok(source.name, now, etag, last_modified, "ok")
        if work:
            log.info("feed %s: %d new images in %d items", source.name, len(work),
                     len({w.item_id for w in work}), extra={"feed": source.name})
        return work, list(items)

    def _count_skipped(self, feed: str, items) -> None:
        for reason, detail in getattr(items, "skipped", ()):
            self.metrics.feed_items_skipped.labels(feed, reason).inc()
            log.warning("feed %s: skipped %s", feed, detail, extra={"feed": feed, "reason": reason})

    # -- streaming sources ------------------------------------------------------------------
    async def _stream(self, source: StreamSource, cfg: FeedSettings, stop: asyncio.Event) -> None:
        """Hold a streaming source open: catch up on what was posted while away, then record
        each event's items as it arrives. A failure or a closed stream reconnects after a
        backoff (1 s doubling to ``max_backoff``; reset by a connection that lasted)."""
        failures = 0
        while not stop.is_set():
            opened = None
            try:
                await self._catch_up(source, dict(cfg.headers))
                self.metrics.stream_connects.labels(source.name).inc()
                decoder = SSEDecoder()
                async for line in self.fetcher.stream_lines(source.url, headers=dict(cfg.headers)):
                    if opened is None:
                        opened = time.monotonic()
                        self.metrics.stream_connected.labels(source.name).set(1)
                        log.info("feed %s: streaming", source.name, extra={"feed": source.name})
                    try:
                        event = decoder.line(line)
                    except EventTooLarge as exc:
                        self.metrics.stream_events.labels(source.name, "skipped").inc()
                        self._count_skipped(source.name, _skipped("malformed_item", str(exc)))
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
                self._feed_failed(source.name, exc, failures)
                if isinstance(exc, (FetchError, FeedError)):
                    log.warning("feed %s: stream ended (%s); reconnecting in %.1fs", source.name, exc, delay,
                                extra={"feed": source.name, "reason": exc.reason})
                else:
                    self.metrics.errors.labels("poll").inc()
                    log.exception("feed %s: stream failed; reconnecting in %.1fs", source.name, delay,
                                  extra={"feed": source.name})
            finally:
                self.metrics.stream_connected.labels(source.name).set(0)
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay * (1 + random.uniform(0, cfg.jitter)))
            except TimeoutError:
                pass

    async def _catch_up(self, source: StreamSource, headers: dict) -> None:
        """Poll what the stream carried while nobody listened, page by page from the cursor."""
        cursor = await asyncio.to_thread(work_rows.feed_cursor, self.store, source.name)
        self._cursors[source.name] = cursor
        for _ in range(CATCHUP_PAGES):
            poller = source.catchup(cursor)
            if poller is None:
                return
            work, items = await self._poll(poller, headers)
            await self._queue(work)
            newest = StreamSource.newest([cursor, *(i.id for i in items)])
            if newest and newest != cursor:
                cursor = self._cursors[source.name] = newest
                await asyncio.to_thread(work_rows.set_feed_cursor, self.store, source.name, cursor)
            if len(items) < CATCHUP_FULL_PAGE:
                return

    async def _stream_event(self, source: StreamSource, event: str, data: str) -> None:
        items = source.parse_event(event, data)  # one event, at most MAX_EVENT_BYTES of JSON
        self._count_skipped(source.name, items)
        if not items:
            self.metrics.stream_events.labels(source.name, "skipped" if items.skipped else "ignored").inc()
            return
        self.metrics.stream_events.labels(source.name, "post").inc()
        work = await asyncio.to_thread(self.record_items, source.name, items, time.time())
        known = self._cursors.get(source.name)
        cursor = StreamSource.newest([known, *(i.id for i in items)])
        if cursor and cursor != known:  # after the rows: a crash between repeats some catch-up, loses nothing
            self._cursors[source.name] = cursor
            await asyncio.to_thread(work_rows.set_feed_cursor, self.store, source.name, cursor)
        await self._queue(work)

    def _feed_ok(self, feed, now, etag, last_modified, result) -> None:
        self.metrics.feed_polls.labels(feed, result).inc()
        self.metrics.feed_last_success.labels(feed).set(now)
        work_rows.feed_ok(self.store, feed, now, etag, last_modified)

    def record_items(self, feed: str, items: list[FeedItem], now: float) -> list[WorkItem]:
        work, new_items = work_rows.record_items(self.store, feed, items, now)
        self.metrics.items_discovered.labels(feed).inc(new_items)
        return work

    async def submit(self, feed: str, items: list[FeedItem]) -> list[WorkItem]:
        """Queue items pushed to us (the ingest API) like polled ones."""
        work = await asyncio.to_thread(self.record_items, feed, items, time.time())
        await self._queue(work)
        return work

    async def _resume_pending(self, stop: asyncio.Event) -> None:
        rows = await asyncio.to_thread(work_rows.pending, self.store)
        if rows:
            log.info("resuming %d pending images from the last run", len(rows))
        for row in rows:
            if stop.is_set():
                return
            await self.transport.put(row)
