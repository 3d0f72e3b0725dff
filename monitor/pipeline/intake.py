"""Stage 1, intake: poll the sources (conditional GET, backoff with jitter), take pushed
items (the ingest API), and write every (feed, item, image URL) to the store before it is
handed on, so a crash or kill loses nothing; resume what the last run left pending."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

from feeds import FeedError, FeedItem, HttpSource, LocalSource, StreamSource, json_document
from monitor.fetch import Fetcher, FetchError
from monitor.metrics import Metrics
from monitor.pipeline.parsing import parsed_timed
from monitor.pipeline.streams import StreamWatcher
from monitor.pipeline.transport import Transport
from monitor.pipeline.websub import SAFETY_POLL_SECONDS, WebSub
from monitor.records import work as work_rows
from monitor.records.store import DatabaseError, Store
from monitor.records.work import WorkItem

log = logging.getLogger("repost_monitor.pipeline")
PARSE_SLOW = 1.0    # seconds of CPU: a parse longer than this spaces the feed's polls...
PARSE_SHARE = 0.05  # ... so that its parsing takes at most this share of a core
RESUME_PAGE = 1000  # pending rows read at a time when resuming the last run's work


@dataclass(frozen=True, slots=True)
class FeedSettings:
    interval: float = 300.0
    jitter: float = 0.1
    max_backoff: float = 3600.0
    headers: tuple[tuple[str, str], ...] = ()  # sent with every poll (API tokens)
    max_new_items: int = 1000  # a poll records at most this many new items; the rest wait for the next


class BearerTokens:
    """OAuth client-credentials tokens of the sources behind an API that wants them."""

    def __init__(self, fetcher: Fetcher):
        self.fetcher = fetcher
        self._tokens: dict[str, tuple[str, float]] = {}  # per source: (bearer token, expiry)

    async def header(self, source: HttpSource, fresh: bool = False) -> dict[str, str]:
        """{"Authorization": "bearer TOKEN"} for a source behind OAuth client credentials (the
        token kept until a minute before it expires), else {}."""
        request = source.token_request()
        if request is None:
            return {}
        token, expires = self._tokens.get(source.name, ("", 0.0))
        if fresh or not token or time.time() > expires - 60:
            status, body = await self.fetcher.post_form(request.url, dict(request.form),
                                                        auth=(request.client_id, request.client_secret),
                                                        headers=source.request_headers())
            if status != 200:
                raise FetchError("auth_failed", f"the token request to {request.url} answered HTTP {status}",
                                 status=status)
            try:
                doc = json_document(body)
                token, ttl = str(doc["access_token"]), float(doc.get("expires_in", 3600))
            except (ValueError, KeyError, TypeError):
                raise FetchError("auth_failed", f"{request.url} did not answer with a token") from None
            self._tokens[source.name] = (token, time.time() + ttl)
        return {"Authorization": f"bearer {token}"}


class Intake:
    def __init__(self, store: Store, fetcher: Fetcher, metrics: Metrics, transport: Transport,
                 public_url: str | None = None):
        self.store, self.fetcher, self.metrics, self.transport = store, fetcher, metrics, transport
        self.sources: list[tuple[HttpSource | LocalSource | StreamSource, FeedSettings]] = []
        self.streams = StreamWatcher(self)
        self.websub = WebSub(self, public_url)
        self.tokens = BearerTokens(fetcher)
        self._wait_hints: dict[str, float | None] = {}  # a source's "not before" for its next poll

    async def start(self) -> None:
        """What is read from the store before the feeds are watched: WebSub subscriptions."""
        await self.websub.load()

    def add_source(self, source: HttpSource | LocalSource, settings: FeedSettings) -> None:
        self.sources.append((source, settings))

    def watch(self, source, cfg: FeedSettings, stop: asyncio.Event):
        """The coroutine that watches one source until ``stop``: polls, or a held stream."""
        return (self.streams.run if isinstance(source, StreamSource) else self._watch)(source, cfg, stop)

    def tasks(self, stop: asyncio.Event) -> list[asyncio.Task]:
        return [asyncio.create_task((self.streams.run if isinstance(s, StreamSource) else self._watch)(s, cfg, stop),
                                    name=f"watch:{s.name}") for s, cfg in self.sources] + [
            asyncio.create_task(resume_pending(self.store, self.transport, stop), name="resume")]

    async def queue_work(self, work: list[WorkItem]) -> None:
        put_many = getattr(self.transport, "put_many", None)  # a stream takes a batch in one round trip
        if put_many is not None and work:
            await put_many(work)
            self.metrics.queue_depth.labels("download").set(self.transport.depth())
            return
        for w in work:
            await self.transport.put(w)
            self.metrics.queue_depth.labels("download").set(self.transport.depth())

    async def _watch(self, source, cfg: FeedSettings, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                await self.queue_work(await self.poll_once(source, dict(cfg.headers), cfg.max_new_items))
                failures = 0
                # an API out of requests for its window says when it resets (Reddit's X-Ratelimit-*);
                # a feed its WebSub hub pushes is polled only as a safety net
                delay = max(cfg.interval, self._wait_hints.pop(source.name, None) or 0.0,
                            SAFETY_POLL_SECONDS if self.websub.active(source.name) else 0.0)
                renew = self.websub.renew_in(source.name)  # the lease is renewed by a poll
                delay = min(delay, renew) if renew is not None else delay
            except asyncio.CancelledError:
                raise
            except (FetchError, FeedError) as exc:
                failures += 1
                # a body refused after a long parse spaces the polls as one taken does
                hint = self._wait_hints.pop(source.name, None) or 0.0
                delay = max(min(cfg.max_backoff, cfg.interval * 2 ** failures), hint)
                await self.feed_failed(source.name, exc, failures)
                log.warning("feed %s failed (%s); next poll in %.0fs", source.name, exc, delay,
                            extra={"feed": source.name, "reason": exc.reason})
            except DatabaseError as exc:  # the store is failing (a full disk, a failover): the items wait
                failures += 1
                delay = min(cfg.max_backoff, cfg.interval * 2 ** failures)
                self.metrics.errors.labels("store").inc()
                log.error("feed %s: the store failed (%s); its items are read again at the next poll, in %.0fs",
                          source.name, exc, delay, extra={"feed": source.name})
            except Exception as exc:  # noqa: BLE001 - a bug in one adapter must not stop the rest
                failures += 1
                delay = min(cfg.max_backoff, cfg.interval * 2 ** failures)
                self.metrics.errors.labels("poll").inc()
                await self.feed_failed(source.name, exc, failures)
                log.exception("feed %s: unexpected error; next poll in %.0fs", source.name, delay,
                              extra={"feed": source.name})
            delay *= 1 + random.uniform(-cfg.jitter, cfg.jitter)
            await self._sleep(source.name, delay, stop)

    async def _sleep(self, feed: str, delay: float, stop: asyncio.Event) -> None:
        """Until the next poll. A hub that verifies meanwhile (often just after the poll that
        subscribed) makes the lease known: the sleep is cut to when it is due for renewal."""
        deadline = time.monotonic() + max(0.05, delay)
        wake = self.websub.wakeup(feed)
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            wake.clear()
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
            try:
                await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            renew = self.websub.renew_in(feed) if wake.is_set() else None
            if renew is not None:
                deadline = min(deadline, time.monotonic() + renew)

    def _parsed(self, feed: str, seconds: float, size: int) -> None:
        """A feed whose body took more than PARSE_SLOW seconds of CPU to parse is polled at most
        so often that its parsing keeps to PARSE_SHARE of a core: a feed of megabytes of dense
        markup (18 s a poll at 5 MB), hostile or not, cannot take the daemon's CPU every interval."""
        self.metrics.feed_parse_seconds.observe(seconds)
        if seconds > PARSE_SLOW:
            spacing = seconds / PARSE_SHARE
            self._wait_hints[feed] = max(self._wait_hints.get(feed) or 0.0, spacing)
            log.warning("feed %s: parsing its %.1f MB took %.1f s of CPU; its next poll waits %.0f s at least",
                        feed, size / 1e6, seconds, spacing, extra={"feed": feed})

    async def feed_failed(self, feed: str, exc: Exception, failures: int) -> None:
        self.metrics.feed_polls.labels(feed, "error").inc()
        try:
            await asyncio.to_thread(work_rows.feed_failed, self.store, feed, failures, str(exc), time.time())
        except DatabaseError as db_exc:  # the store is failing too: say so, keep watching
            self.metrics.errors.labels("store").inc()
            log.error("feed %s: cannot record its failure in %s: %s", feed, self.store.path, db_exc,
                      extra={"feed": feed})

    async def poll_once(self, source, headers: dict | None = None, max_new: int | None = None) -> list[WorkItem]:
        """Poll one source; returns the work rows it created (already stored)."""
        return (await self.poll(source, headers, max_new))[0]

    async def poll(self, source, headers: dict | None = None,
                   max_new: int | None = None) -> tuple[list[WorkItem], list[FeedItem]]:
        """(the work rows a poll created, every item it saw). ``max_new``: record at most that
        many new items, the first listed; the rest are listed again by the next poll, which
        then is not conditional (a 304 would hide them)."""
        now = time.time()
        if isinstance(source, LocalSource):
            self.fetcher.add_local_root(source.options["path"])
            items = await asyncio.to_thread(source.scan)
            etag = last_modified = None
        else:
            # every store call off the loop: a round trip, or a wait for another writer's lock
            etag, last_modified = await asyncio.to_thread(work_rows.feed_validators, self.store, source.name)
            resp = await self._fetch_feed(source, {**source.request_headers(), **(headers or {})}, etag,
                                          last_modified)
            self._wait_hints[source.name] = source.wait_hint(resp.headers or {})
            await self.websub.after_poll(source, None if resp.not_modified else resp.body, resp.headers or {})
            if resp.not_modified:
                await self._feed_ok(source.name, now, etag, last_modified, "not_modified")
                return [], []
            try:
                items, seconds = await parsed_timed(source.parse, resp.body, resp.content_type)
            except FeedError as exc:
                self._parsed(source.name, getattr(exc, "parse_seconds", 0.0), len(resp.body))
                raise
            self._parsed(source.name, seconds, len(resp.body))
            etag, last_modified = resp.etag, resp.last_modified
            self.count_skipped(source.name, items)
        # A poll can bring hundreds of rows: their transaction runs off the loop,
        # which meanwhile keeps the downloads and the matches moving.
        work, deferred = await asyncio.to_thread(self.record_items_capped, source.name, items, now, max_new)
        if deferred:
            etag = last_modified = None
        await self._feed_ok(source.name, now, etag, last_modified, "ok")
        if work:
            log.info("feed %s: %d new images in %d items", source.name, len(work),
                     len({w.item_id for w in work}), extra={"feed": source.name})
        return work, list(items)

    async def _fetch_feed(self, source: HttpSource, headers: dict, etag, last_modified):
        """The feed's response, with a bearer token where the source's API wants one (a
        token refused before its time is replaced once)."""
        for attempt in (1, 2):
            auth = await self.tokens.header(source, fresh=attempt == 2)
            try:
                return await self.fetcher.fetch_feed(source.url, etag=etag, last_modified=last_modified,
                                                     accept=source.accept, headers={**headers, **auth})
            except FetchError as exc:
                if not (auth and exc.status == 401 and attempt == 1):
                    raise

    def count_skipped(self, feed: str, items) -> None:
        for reason, detail in getattr(items, "skipped", ()):
            self.metrics.feed_items_skipped.labels(self.metrics.feed(feed), reason).inc()
            log.warning("feed %s: skipped %s", feed, detail, extra={"feed": feed, "reason": reason})

    async def _feed_ok(self, feed, now, etag, last_modified, result) -> None:
        self.metrics.feed_polls.labels(feed, result).inc()
        self.metrics.feed_last_success.labels(feed).set(now)
        await asyncio.to_thread(work_rows.feed_ok, self.store, feed, now, etag, last_modified)

    def record_items(self, feed: str, items: list[FeedItem], now: float) -> list[WorkItem]:
        return self.record_items_capped(feed, items, now, None)[0]

    def record_items_capped(self, feed: str, items: list[FeedItem], now: float,
                            max_new: int | None) -> tuple[list[WorkItem], int]:
        """(the work rows of the new items, at most ``max_new`` of them; how many new items
        were left for a later poll)."""
        work, new_items, deferred = work_rows.record_capped(self.store, feed, items, now, max_new)
        self.metrics.items_discovered.labels(self.metrics.feed(feed)).inc(new_items)
        if deferred:
            self.metrics.feed_items_skipped.labels(self.metrics.feed(feed), "deferred").inc(deferred)
            log.warning("feed %s listed %d new items; %d recorded (max_new_items), the rest wait for its next poll",
                        feed, new_items + deferred, new_items, extra={"feed": feed, "reason": "deferred"})
        return work, deferred

    async def submit(self, feed: str, items: list[FeedItem]) -> list[WorkItem]:
        """Queue items pushed to us (the ingest API) like polled ones."""
        work = await asyncio.to_thread(self.record_items, feed, items, time.time())
        await self.queue_work(work)
        return work


async def resume_pending(store: Store, transport: Transport, stop: asyncio.Event) -> None:
    """Queue again the work the last run left pending, RESUME_PAGE rows at a time (a backlog of
    millions is never read at once; the queue's bound paces the reads): the rows up to the
    last id at the start, as the polls queue the newer ones themselves."""
    top, after, resumed = await _read_pending(store, work_rows.last_id), 0, 0
    while top and not stop.is_set():
        rows = await _read_pending(store, work_rows.pending, after, top, RESUME_PAGE)
        if not rows:
            break
        if not after:
            log.info("resuming the images left pending by the last run")
        for row in rows:
            if stop.is_set():
                return
            await transport.put(row)
        resumed, after = resumed + len(rows), rows[-1].id
    if resumed:
        log.info("resumed %d pending images from the last run", resumed)


async def _read_pending(store: Store, read, *args):
    for pause in (1, 2, 4, 8, 16, 30):  # a store failing at the start (a failover): read again
        try:
            return await asyncio.to_thread(read, store, *args)
        except DatabaseError as exc:
            log.error("the work left pending could not be read (%s); again in %d s", exc, pause)
            await asyncio.sleep(pause)
    log.error("the work left pending is resumed at the next start: the store could not be read")
    return None
