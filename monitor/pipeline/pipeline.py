"""sources -> bounded queue -> download -> fingerprint -> match -> match records.

Every (feed, item, image URL) is written to the ``work`` table before it is
queued, and marked done in the same transaction that records its matches,
so a crash or kill at any moment loses nothing and repeats nothing: a
restart re-queues exactly the pending rows. The queue is bounded, so a burst
of items waits in the watchers (and the table) instead of in memory.

Decoding, hashing and matching run in a thread pool (Pillow and the numba
kernels release the GIL), never on the event loop; with
``limits.fingerprint_processes`` decoding and hashing run in worker processes.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from feeds import FeedError, FeedItem, HttpSource, LocalSource

from monitor.fetch import FetchError, Fetcher
from monitor.fingerprints import Fingerprint, ImageError, fingerprint_bytes
from monitor.records.library import Library, LibraryEntry
from monitor.search.matcher import Match, Matcher, query_rows
from monitor.metrics import Metrics
from monitor.records.verdicts import suppression
from monitor.fingerprints.codec import (pack_fine, pack_views, sql_to_u64, stored_fingerprint, u64_to_sql,
                                        unpack_fine, unpack_views)
from monitor.records.store import Store

log = logging.getLogger("repost_monitor.pipeline")


def fingerprint_query(data: bytes, max_pixels: int | None) -> tuple[Fingerprint, float]:
    """An incoming image's fingerprint (all query views) and the seconds it took;
    runs in a fingerprint worker process."""
    start = time.perf_counter()
    kwargs = {"max_pixels": max_pixels} if max_pixels else {}
    return fingerprint_bytes(data, views="query", **kwargs), time.perf_counter() - start


def _warm_worker() -> None:
    from monitor.warmup import warm_up
    warm_up(None, "fingerprint")  # compiled code loaded before the first image, not on it


def _process_pool(workers: int) -> ProcessPoolExecutor:
    # spawn: forking a process that runs threads (the event loop's helpers) can deadlock
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_warm_worker)


# Failures that will not change on a retry: cached per URL, so the same bad
# image reached through another feed is not fetched again.
PERMANENT_FETCH_ERRORS = {"not_image", "too_large", "http_4xx", "blocked_address", "bad_url",
                          "blocked_path"}


@dataclass(frozen=True, slots=True)
class WorkItem:
    id: int
    feed: str
    item_id: str
    image_url: str
    page_url: str | None
    author: str | None
    published: float | None


@dataclass(frozen=True, slots=True)
class MatchRecord:
    id: int
    work: WorkItem
    entry: LibraryEntry
    match: Match
    detected_at: float
    suppressed: str | None = None  # allow_list | false_positive: recorded, never alerted

    @property
    def lag_seconds(self) -> float | None:
        return self.detected_at - self.work.published if self.work.published else None


@dataclass(frozen=True, slots=True)
class FeedSettings:
    interval: float = 300.0
    jitter: float = 0.1
    max_backoff: float = 3600.0
    headers: tuple[tuple[str, str], ...] = ()  # sent with every poll (API tokens)


OnMatch = Callable[[MatchRecord], Awaitable[None] | None]


class Pipeline:
    def __init__(self, store: Store, library: Library, matcher: Matcher, fetcher: Fetcher,
                 metrics: Metrics, *, queue_size: int = 1000, workers: int = 16,
                 fingerprint_workers: int = 2, fingerprint_processes: int = 0,
                 max_pixels: int | None = None,
                 on_match: OnMatch | None = None, library_check_seconds: float = 2.0,
                 outbox=None, retro_window: float = 72 * 3600):
        self.store = store
        self.library = library
        self.matcher = matcher
        self.fetcher = fetcher
        self.metrics = metrics
        self.queue: asyncio.Queue[WorkItem] = asyncio.Queue(queue_size)
        self.workers = workers
        self.executor = ThreadPoolExecutor(fingerprint_workers, thread_name_prefix="fingerprint")
        self.fingerprint_processes = fingerprint_processes
        self.processes = _process_pool(fingerprint_processes) if fingerprint_processes else None
        self.max_pixels = max_pixels
        self.on_match = on_match
        self.outbox = outbox  # alerts.outbox.Outbox: alerts join the match transaction
        self.retro_window = retro_window
        self.library_check_seconds = library_check_seconds
        self.sources: list[tuple[HttpSource | LocalSource, FeedSettings]] = []
        self._inflight: dict[str, asyncio.Future] = {}
        self._active = 0
        # Downloaded images waiting for a fingerprint thread. No new download
        # starts while this many wait: on a fast network the downloads would
        # otherwise outrun the CPU and every image would queue for it (the
        # downloaded -> recorded latency grows with the backlog, not the work).
        self.backlog_limit = max(4, 3 * max(fingerprint_workers, fingerprint_processes))
        self._backlog = 0
        self._backlog_free = asyncio.Event()
        self._backlog_free.set()
        metrics.queue_capacity.labels("download").set(queue_size)
        metrics.queue_capacity.labels("fingerprint").set(self.backlog_limit)

    def add_source(self, source: HttpSource | LocalSource, settings: FeedSettings) -> None:
        self.sources.append((source, settings))

    # -- the whole thing -------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        if self.processes is not None:  # workers started, compiled code loaded, before any work
            await asyncio.gather(*(asyncio.wrap_future(self.processes.submit(_warm_worker))
                                   for _ in range(self.fingerprint_processes)))
        watchers = [asyncio.create_task(self._watch(s, cfg, stop), name=f"watch:{s.name}")
                    for s, cfg in self.sources]
        workers = [asyncio.create_task(self._work(stop), name=f"worker:{i}")
                   for i in range(self.workers)]
        helpers = [asyncio.create_task(self._resume_pending(stop), name="resume"),
                   asyncio.create_task(self._watch_library(stop), name="library")]
        try:
            await stop.wait()
        finally:
            log.info("stopping: %d watchers, draining %d in-flight images", len(watchers), self._active)
            for t in watchers + helpers:
                t.cancel()
            # Workers finish the image in hand; queued rows stay pending in the
            # store and are resumed at the next start.
            await asyncio.gather(*workers, return_exceptions=True)
            await asyncio.gather(*watchers, *helpers, return_exceptions=True)
            await loop.run_in_executor(None, self.executor.shutdown)
            if self.processes is not None:
                await loop.run_in_executor(None, self.processes.shutdown)

    # -- sources ---------------------------------------------------------------
    async def _watch(self, source, cfg: FeedSettings, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                new = await self.poll_once(source, dict(cfg.headers))
                failures = 0
                for work in new:
                    await self.queue.put(work)
                    self.metrics.queue_depth.labels("download").set(self.queue.qsize())
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
            self._write_feed_error(feed, exc, failures)
        except sqlite3.Error as db_exc:  # the store is failing too: say so, keep watching
            self.metrics.errors.labels("store").inc()
            log.error("feed %s: cannot record its failure in %s: %s", feed, self.store.path, db_exc,
                      extra={"feed": feed})

    def _write_feed_error(self, feed: str, exc: Exception, failures: int) -> None:
        with self.store.transaction() as conn:
            conn.execute("INSERT INTO feed_state (feed, last_poll, consecutive_failures, last_error) "
                         "VALUES (?,?,?,?) ON CONFLICT (feed) DO UPDATE SET last_poll=excluded.last_poll, "
                         "consecutive_failures=excluded.consecutive_failures, "
                         "last_error=excluded.last_error", (feed, time.time(), failures, str(exc)))

    async def poll_once(self, source, headers: dict | None = None) -> list[WorkItem]:
        """Poll one source; returns the work rows it created (already stored)."""
        now = time.time()
        if isinstance(source, LocalSource):
            self.fetcher.add_local_root(source.options["path"])
            items = await asyncio.to_thread(source.scan)
            etag = last_modified = None
        else:
            state = self.store.query("SELECT etag, last_modified FROM feed_state WHERE feed=?",
                                     (source.name,))
            etag, last_modified = state[0] if state else (None, None)
            resp = await self.fetcher.fetch_feed(source.url, etag=etag, last_modified=last_modified,
                                                 accept=source.accept, headers=headers)
            if resp.not_modified:
                self._feed_ok(source.name, now, etag, last_modified, "not_modified")
                return []
            # Parsing can be heavy (feedparser on a 5 MB feed): off the loop.
            items = await asyncio.to_thread(source.parse, resp.body, resp.content_type)
            etag, last_modified = resp.etag, resp.last_modified
            for reason, detail in getattr(items, "skipped", ()):
                self.metrics.feed_items_skipped.labels(source.name, reason).inc()
                log.warning("feed %s: skipped %s", source.name, detail,
                            extra={"feed": source.name, "reason": reason})
        # A poll can bring hundreds of rows: their transaction runs off the loop,
        # which meanwhile keeps the downloads and the matches moving.
        work = await asyncio.to_thread(self.record_items, source.name, items, now)
        self._feed_ok(source.name, now, etag, last_modified, "ok")
        if work:
            log.info("feed %s: %d new images in %d items", source.name, len(work),
                     len({w.item_id for w in work}), extra={"feed": source.name})
        return work

    def _feed_ok(self, feed, now, etag, last_modified, result) -> None:
        self.metrics.feed_polls.labels(feed, result).inc()
        self.metrics.feed_last_success.labels(feed).set(now)
        with self.store.transaction() as conn:
            conn.execute(
                "INSERT INTO feed_state (feed, etag, last_modified, last_poll, last_success, "
                "consecutive_failures, last_error) VALUES (?,?,?,?,?,0,NULL) ON CONFLICT (feed) DO "
                "UPDATE SET etag=excluded.etag, last_modified=excluded.last_modified, "
                "last_poll=excluded.last_poll, last_success=excluded.last_success, "
                "consecutive_failures=0, last_error=NULL", (feed, etag, last_modified, now, now))

    def record_items(self, feed: str, items: list[FeedItem], now: float) -> list[WorkItem]:
        work: list[WorkItem] = []
        with self.store.transaction() as conn:
            for item in items:
                cur = conn.execute("INSERT OR IGNORE INTO seen_items VALUES (?,?,?)",
                                   (feed, item.id, now))
                if cur.rowcount == 0:
                    continue
                self.metrics.items_discovered.labels(feed).inc()
                published = item.published.timestamp() if item.published else None
                for url in item.image_urls:
                    cur = conn.execute(
                        "INSERT OR IGNORE INTO work (feed, item_id, image_url, page_url, author, "
                        "published, discovered_at) VALUES (?,?,?,?,?,?,?)",
                        (feed, item.id, url, item.page_url, item.author, published, now))
                    if cur.rowcount:
                        work.append(WorkItem(cur.lastrowid, feed, item.id, url, item.page_url,
                                             item.author, published))
        return work

    async def submit(self, feed: str, items: list[FeedItem]) -> list[WorkItem]:
        """Queue items pushed to us (the ingest API) like polled ones."""
        work = self.record_items(feed, items, time.time())
        for w in work:
            await self.queue.put(w)
        return work

    async def _resume_pending(self, stop: asyncio.Event) -> None:
        rows = self.store.query("SELECT id, feed, item_id, image_url, page_url, author, published "
                                "FROM work WHERE state='pending' ORDER BY id")
        if rows:
            log.info("resuming %d pending images from the last run", len(rows))
        for row in rows:
            if stop.is_set():
                return
            await self.queue.put(WorkItem(*row))

    def _library_signature(self) -> tuple:
        # (version bumped by triggers on any change, largest id: new entries are above it)
        return self.store.query("SELECT (SELECT value FROM library_meta WHERE key='version'), "
                                "COALESCE(MAX(id), 0) FROM library_entries")[0]

    async def _watch_library(self, stop: asyncio.Event) -> None:
        """Reload the index when the table changed (another process, the API),
        and match recently seen images against the entries that are new."""
        known = await asyncio.to_thread(self._library_signature)
        self.metrics.library_entries.set(len(self.library.index))
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.library_check_seconds)
                return
            except TimeoutError:
                pass
            now = await asyncio.to_thread(self._library_signature)
            if now != known:
                await asyncio.to_thread(self.library.reload)
                log.info("library changed: %d entries indexed", len(self.library.index))
                if now[1] > known[1]:
                    await self.retro_match(after_entry_id=known[1])
                known = now
            self.metrics.library_entries.set(len(self.library.index))

    async def retro_match(self, after_entry_id: int) -> list[MatchRecord]:
        """Match images seen within ``retro_window`` against entries with a
        larger id (the ones just added); matches alert as usual."""
        if self.retro_window <= 0:
            return []
        pairs, fps = await asyncio.to_thread(self._retro_pairs, after_entry_id)
        records: list[MatchRecord] = []
        for url, matches in pairs.items():
            rows = self.store.query("SELECT id, feed, item_id, image_url, page_url, author, published "
                                    "FROM work WHERE image_url=? ORDER BY id LIMIT 1", (url,))
            if rows:
                records += self._finish(WorkItem(*rows[0]), matches, fps[url], close_work=False)
        if records:
            log.info("retroactive matching: %d new matches for entries added after id %d",
                     len(records), after_entry_id)
        for rec in records:
            await self._announce(rec)
        return records

    def _retro_pairs(self, after_entry_id: int):
        from monitor.records.library import LibraryIndex
        index = LibraryIndex()
        for eid, d, p, views, fine in self.store.query(
                "SELECT id, dhash, phash, views, fine FROM library_entries "
                "WHERE id > ? AND degenerate IS NULL", (after_entry_id,)):
            fine, _ = unpack_fine(fine)
            index.add(eid, Fingerprint(sql_to_u64(d), sql_to_u64(p), 0, 0, 0, 0,
                                       views=unpack_views(views, with_fine=bool(fine)), fine=fine))
        rows = self.store.query(
            "SELECT url, dhash, phash, dhash_mirror, phash_mirror, width, height, fine, views FROM images "
            "WHERE state='ok' AND degenerate IS NULL AND fetched_at > ?", (time.time() - self.retro_window,))
        if not rows or not len(index):
            return {}, {}
        fps = {r[0]: stored_fingerprint(*r[1:7], None, r[7], r[8]) for r in rows}
        urls = list(fps)
        found = Matcher(index, self.matcher.tiers).match_rows(query_rows([fps[u] for u in urls]), threads=1)
        pairs: dict[str, list[Match]] = {}
        for i in range(found.query.size):
            url = urls[int(found.query[i])]
            fine = int(found.fine_distance[i])
            pairs.setdefault(url, []).append(Match(
                int(found.entry_id[i]), self.matcher.tiers[int(found.tier[i])].name,
                int(found.dhash_distance[i]), int(found.phash_distance[i]), bool(found.mirrored[i]),
                fine if fine >= 0 else None, int(found.query_dhash[i]), int(found.library_dhash[i])))
        return pairs, fps

    # -- per image -----------------------------------------------------------
    async def _work(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            get = asyncio.ensure_future(self.queue.get())
            stopping = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({get, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                stopping.cancel()
                return
            stopping.cancel()
            work = get.result()
            self.metrics.queue_depth.labels("download").set(self.queue.qsize())
            self._active += 1
            try:
                # Shielded: a stop while downloading still finishes this image.
                await asyncio.shield(self.process(work))
            except Exception as exc:  # noqa: BLE001 - one bad image never stops a worker
                self.metrics.errors.labels("process").inc()
                log.exception("processing %s failed", work.image_url,
                              extra={"feed": work.feed, "item_id": work.item_id, "url": work.image_url})
                # A row left pending would wait for the next restart and fail the same way:
                # it ends now, failed, with its reason.
                try:
                    self._finish(work, [], None, error=f"internal: {type(exc).__name__}: {exc}"[:500])
                except Exception:  # noqa: BLE001 - the store itself is failing; logged above
                    log.exception("could not record the failure of work %d", work.id)
            finally:
                self._active -= 1
                self.queue.task_done()

    async def process(self, work: WorkItem) -> list[MatchRecord]:
        ctx = {"feed": work.feed, "item_id": work.item_id, "url": work.image_url, "work_id": work.id}
        try:
            fp, matches, downloaded_at, fetched = await self._fingerprint_and_match(work)
        except (FetchError, ImageError) as exc:
            self._finish(work, [], None, error=str(exc))
            log.warning("image skipped: %s: %s", work.image_url, exc, extra={**ctx, "reason": exc.reason})
            return []
        records = self._finish(work, matches, fp, new_image=fetched)
        self.metrics.pipeline_seconds.observe(time.perf_counter() - downloaded_at)
        for rec in records:
            await self._announce(rec)
        return records

    async def _announce(self, rec: MatchRecord) -> None:
        """Metrics, the log line and the on_match callback of a new match."""
        ctx = {"feed": rec.work.feed, "item_id": rec.work.item_id, "url": rec.work.image_url,
               "work_id": rec.work.id}
        self.metrics.matches.labels(rec.match.tier).inc()
        if rec.lag_seconds is not None:
            self.metrics.detection_lag.observe(max(0.0, rec.lag_seconds))
        log.info("match %s: %s dist=%d/64 -> library %d (%s)%s", rec.id, rec.match.tier,
                 rec.match.dhash_distance, rec.entry.id, rec.entry.label,
                 f", no alert ({rec.suppressed})" if rec.suppressed else "",
                 extra={**ctx, "match_id": rec.id, "entry_id": rec.entry.id, "tier": rec.match.tier})
        if self.on_match is not None:
            result = self.on_match(rec)
            if asyncio.iscoroutine(result):
                await result

    async def process_fingerprint(self, work: WorkItem, fp: Fingerprint) -> list[MatchRecord]:
        """Match and record an image fingerprinted elsewhere (an API upload)."""
        loop = asyncio.get_running_loop()
        matches = await loop.run_in_executor(self.executor, self._match_timed, fp)
        records = self._finish(work, matches, fp)
        for rec in records:
            await self._announce(rec)
        return records

    def _match_timed(self, fp: Fingerprint) -> list[Match]:
        start = time.perf_counter()
        matches = self.matcher.match(fp)
        self.metrics.match_seconds.observe(time.perf_counter() - start)
        return matches

    async def _fingerprint_and_match(self, work: WorkItem):
        """(fingerprint, matches, time downloaded, whether this call fetched the image)."""
        loop = asyncio.get_running_loop()
        fp, matches, downloaded_at = await self._fingerprint_url(work)
        fetched = matches is not None
        if not fetched:  # fingerprint from the store or another worker's fetch: match it now
            matches = await loop.run_in_executor(self.executor, self._match_timed, fp)
        return fp, matches, downloaded_at, fetched

    async def _fingerprint_url(self, work: WorkItem):
        """(fingerprint, matches or None, time downloaded) of an image URL: from
        the store if any feed already fetched it, from a concurrent fetch of
        the same URL, or fetched now."""
        cached = self._cached_image(work.image_url)
        if cached is not None:
            return cached, None, time.perf_counter()
        pending = self._inflight.get(work.image_url)
        if pending is not None:
            fp, _, downloaded = await asyncio.shield(pending)
            return fp, None, downloaded
        fut = asyncio.get_running_loop().create_future()
        self._inflight[work.image_url] = fut
        try:
            result = await self._download_and_hash(work)
            fut.set_result(result)
            return result
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._inflight[work.image_url]

    def _cached_image(self, url: str) -> Fingerprint | None:
        rows = self.store.query("SELECT state, dhash, phash, dhash_mirror, phash_mirror, width, "
                                "height, degenerate, error, fine, views FROM images WHERE url=?", (url,))
        if not rows:
            return None
        state, d, p, dm, pm, w, h, degenerate, error, fine, views = rows[0]
        if state != "ok":
            reason, _, message = (error or "failed: earlier failure").partition(": ")
            raise FetchError(reason, f"{message} (cached)")
        return stored_fingerprint(d, p, dm, pm, w, h, degenerate, fine, views)

    def _hash_and_match(self, data: bytes):
        """Decode, hash and match in one worker-thread call (one hop, not two)."""
        fp, seconds = fingerprint_query(data, self.max_pixels)
        self.metrics.fingerprint_seconds.observe(seconds)
        return fp, self._match_timed(fp)

    async def _fingerprint_in_process(self, data: bytes) -> tuple[Fingerprint, float]:
        for _ in range(2):
            pool = self.processes
            try:
                return await asyncio.wrap_future(pool.submit(fingerprint_query, data, self.max_pixels))
            except BrokenProcessPool:
                # A worker died (a decoder crash, the OOM killer) on this image
                # or on one beside it: new workers, and one more try, so only
                # an image that kills a worker twice fails; the rest go on.
                if self.processes is pool:
                    log.error("a fingerprint process died; starting new ones")
                    self.processes = _process_pool(self.fingerprint_processes)
                    pool.shutdown(wait=False)
        raise ImageError("crashed", "the decoder process died on this image twice")

    async def _download_and_hash(self, work: WorkItem):
        while self._backlog >= self.backlog_limit:
            self._backlog_free.clear()
            await self._backlog_free.wait()
        try:
            data = await self.fetcher.fetch_image(work.image_url)
        except FetchError as exc:
            self.metrics.image_failures.labels("download", exc.reason).inc()
            if exc.reason in PERMANENT_FETCH_ERRORS:
                self._store_image_failure(work.image_url, exc)
            raise
        downloaded = time.perf_counter()
        self.metrics.download_bytes.inc(len(data))
        self.metrics.images_downloaded.labels(work.feed).inc()
        loop = asyncio.get_running_loop()
        self._backlog += 1
        self.metrics.queue_depth.labels("fingerprint").set(self._backlog)
        try:
            if self.processes is None:
                fp, matches = await loop.run_in_executor(self.executor, self._hash_and_match, data)
            else:
                fp, seconds = await self._fingerprint_in_process(data)
                self.metrics.fingerprint_seconds.observe(seconds)
                matches = await loop.run_in_executor(self.executor, self._match_timed, fp)
        except ImageError as exc:
            self.metrics.image_failures.labels("decode", exc.reason).inc()
            self._store_image_failure(work.image_url, exc)
            raise
        finally:
            self._backlog -= 1
            self.metrics.queue_depth.labels("fingerprint").set(self._backlog)
            if self._backlog < self.backlog_limit:
                self._backlog_free.set()
        if fp.degenerate:
            self.metrics.image_failures.labels("decode", "degenerate").inc()
        # The images row is written by _finish, in the transaction that records
        # the matches: one commit per image. No await lies between this return
        # and that write, so no other worker can miss both it and _inflight.
        return fp, matches, downloaded

    def _store_image_failure(self, url: str, exc: Exception) -> None:
        with self.store.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO images (url, state, error, fetched_at) "
                         "VALUES (?,?,?,?)", (url, "failed", str(exc), time.time()))

    def _finish(self, work: WorkItem, matches: list[Match], fp: Fingerprint | None = None,
                error: str | None = None, close_work: bool = True,
                new_image: bool = False) -> list[MatchRecord]:
        """Record a new image's fingerprint, the matches, their alerts, and close the
        work row: one transaction."""
        now = time.time()
        entries = self.library.entries_by_id(m.entry_id for m in matches) if matches else {}
        records = []
        with self.store.transaction() as conn:
            if new_image:
                conn.execute("INSERT OR REPLACE INTO images VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                             (work.image_url, "ok", u64_to_sql(fp.dhash), u64_to_sql(fp.phash),
                              u64_to_sql(fp.dhash_mirror), u64_to_sql(fp.phash_mirror), fp.width,
                              fp.height, fp.degenerate, None, now, pack_fine(fp), pack_views(fp.views)))
            for m in matches:
                entry = entries.get(m.entry_id)
                if entry is None:
                    continue  # removed from the library a moment ago
                why = suppression(conn, m.entry_id, fp.dhash, feed=work.feed, author=work.author,
                                  page_url=work.page_url, image_url=work.image_url)
                cur = conn.execute(
                    "INSERT OR IGNORE INTO matches (work_id, image_url, entry_id, tier, "
                    "dhash_distance, phash_distance, mirrored, feed, item_id, page_url, author, "
                    "published, detected_at, repost_dhash, suppressed, fine_distance, "
                    "matched_repost_dhash, matched_library_dhash) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (work.id, work.image_url, m.entry_id, m.tier, m.dhash_distance,
                     m.phash_distance, int(m.mirrored), work.feed, work.item_id, work.page_url,
                     work.author, work.published, now, u64_to_sql(fp.dhash), why, m.fine_distance,
                     None if m.query_dhash is None else u64_to_sql(m.query_dhash),
                     None if m.library_dhash is None else u64_to_sql(m.library_dhash)))
                if cur.rowcount:  # the same image URL via another feed: already recorded
                    record = MatchRecord(cur.lastrowid, work, entry, m, now, why)
                    records.append(record)
                    if self.outbox is not None and why is None:
                        self.outbox.enqueue(conn, record)
            if close_work:
                conn.execute("UPDATE work SET state=?, error=?, finished_at=? WHERE id=?",
                             ("failed" if error else "done", error, now, work.id))
        if records and self.outbox is not None:
            self.outbox.committed()
        return records
