"""Stages 2-3 per image: fetch -> fingerprint -> match. The same image URL reached
through two feeds is fetched and matched once (the store, or a fetch in flight); no
new download starts while the CPU has a backlog; decoding can run in worker processes.

Decoding, hashing and matching run in a thread pool (Pillow and the numba kernels
release the GIL), never on the event loop; with ``fingerprint_processes`` decoding
and hashing run in spawned worker processes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from monitor.fetch import Fetcher, FetchError
from monitor.fingerprints import Fingerprint, ImageError, KeypointFinder, fingerprint_bytes
from monitor.metrics import Metrics
from monitor.pipeline.grouped import Grouped
from monitor.pipeline.recorder import Recorder
from monitor.pipeline.refetch import confirmed_again
from monitor.pipeline.retries import StoreRetries
from monitor.pipeline.transport import Transport
from monitor.records import work as work_rows
from monitor.records.matches import MatchRecord
from monitor.records.store import DatabaseError, Store
from monitor.records.work import WorkItem
from monitor.search.batcher import MatchBatcher
from monitor.search.budget import LookBudget
from monitor.search.matcher import Match, Matcher
from monitor.warmup import warm_up

log = logging.getLogger("repost_monitor.pipeline")

# Failures that will not change on a retry: cached per URL, so the same bad
# image reached through another feed is not fetched again.
RECENT_FETCHES = 256  # results kept after a fetch, for a worker that read the store just before it was written

CHECK_FEED = "check"  # the feed a checked URL is fetched as: its second look is never the budget's to skip
LOOK_UP = object()  # Worker.fingerprint's ``known`` when the caller has not read the store

PERMANENT_FETCH_ERRORS = {"not_image", "too_large", "http_4xx", "blocked_address", "bad_url",
                          "blocked_path"}


def fingerprint_query(data: bytes, max_pixels: int | None, keypoint_picture: bool = True) -> tuple[Fingerprint, float]:
    """An incoming image's fingerprint (all query views, and when asked the small copy its
    keypoints are found on, for the second look of a matcher elsewhere) and the seconds it
    took; runs in a fingerprint worker process."""
    start = time.perf_counter()
    kwargs = {"max_pixels": max_pixels} if max_pixels else {}
    fp = fingerprint_bytes(data, views="query", keypoint_picture=keypoint_picture, **kwargs)
    return fp, time.perf_counter() - start


def _warm_worker() -> None:
    # compiled code loaded before the first image, not on it; in this process alone,
    # as the pool's other workers are compiling too
    warm_up(None, "fingerprint", processes=1)


def _observe_batch(metrics: Metrics, posts: int, seconds: float) -> None:
    """A match batch's metrics: each post's share of its time, and the batch's size."""
    for _ in range(posts):
        metrics.match_seconds.observe(seconds / posts)
    metrics.match_batch_size.observe(posts)


def _cached_many(store: Store, urls: list[str]) -> list[Fingerprint | work_rows.CachedFailure | None]:
    found = work_rows.cached_images(store, urls)
    return [found.get(url) for url in urls]


async def _stored_fingerprint(lookups: Grouped, url: str, known=LOOK_UP) -> Fingerprint | None:
    """The fingerprint the store holds for an image URL, None if never fetched (raises the
    CachedFailure of a URL that failed for good); ``known``: the store's answer where the
    caller has it already (``work_rows.cached_images``). Looked up off the loop (a round
    trip, or a wait for the store's lock), with the other posts' lookups meanwhile."""
    found = await lookups(url) if known is LOOK_UP else known
    if isinstance(found, work_rows.CachedFailure):
        raise found
    return found


def _process_pool(workers: int) -> ProcessPoolExecutor:
    # spawn: forking a process that runs threads (the event loop's helpers) can deadlock
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_warm_worker)


class Worker:
    def __init__(self, store: Store, fetcher: Fetcher, matcher: Matcher, recorder: Recorder,
                 metrics: Metrics, transport: Transport, *, workers: int = 16, fingerprint_workers: int = 2,
                 fingerprint_processes: int = 0, max_pixels: int | None = None, keypoints: bool = True,
                 look_share: float = 1.0):
        self.store, self.fetcher, self.matcher = store, fetcher, matcher
        self._lookups = Grouped(functools.partial(_cached_many, store))
        self.keypoints = keypoints  # [match] keypoints: the second look, for the posts that need one
        self.recorder, self.metrics, self.transport = recorder, metrics, transport
        self.retries = StoreRetries(transport, metrics)
        self.workers = workers
        self.executor = ThreadPoolExecutor(fingerprint_workers, thread_name_prefix="fingerprint")
        # posts matched on threads of their own, every post waiting in one pass (batcher.py); of them at
        # most ``look_share`` ([match] second_look_share) get a second look, the likeliest reposts first
        self.batcher = (MatchBatcher(matcher, threads=max(1, fingerprint_workers // 2),
                                     on_batch=functools.partial(_observe_batch, metrics),
                                     budget=LookBudget(look_share, metrics.second_looks_skipped.inc))
                        if matcher is not None else None)
        self.fingerprint_processes, self.max_pixels, self.active = fingerprint_processes, max_pixels, 0
        self.processes = _process_pool(fingerprint_processes) if fingerprint_processes else None
        self._inflight: dict[str, asyncio.Future] = {}
        self._recent: OrderedDict[str, tuple] = OrderedDict()  # the last fetches' results, by URL
        # Downloaded images waiting for a fingerprint thread. No new download starts while this many wait:
        # downloads would outrun the CPU, and the downloaded -> recorded latency grow with the backlog.
        self.backlog_limit = max(4, 3 * max(fingerprint_workers, fingerprint_processes))
        self._backlog = 0
        self._backlog_free = asyncio.Event()
        self._backlog_free.set()
        metrics.queue_capacity.labels("fingerprint").set(self.backlog_limit)

    async def start(self) -> None:
        if self.processes is not None:  # workers started, compiled code loaded, before any work
            await asyncio.gather(*(asyncio.wrap_future(self.processes.submit(_warm_worker))
                                   for _ in range(self.fingerprint_processes)))

    def tasks(self, stop: asyncio.Event) -> list[asyncio.Task]:
        return [asyncio.create_task(self._work(stop), name=f"worker:{i}") for i in range(self.workers)]

    async def close(self) -> None:
        self.retries.close()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.executor.shutdown)
        if self.batcher is not None:
            await loop.run_in_executor(None, self.batcher.close)
        if self.processes is not None:
            await loop.run_in_executor(None, self.processes.shutdown)

    async def _work(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            work = await self.transport.get(stop)
            if work is None:
                return
            self.metrics.queue_depth.labels("download").set(self.transport.depth())
            self.active += 1
            try:
                # a stop lets this image finish (workers drain); a cancel leaves its row pending
                await self.process(work)
                self.retries.recorded(work)
            except DatabaseError as exc:  # the store is failing (a full disk, a failover): tried again
                self.retries.failed(work, exc)
            except Exception as exc:  # noqa: BLE001 - one bad image never stops a worker
                self.metrics.errors.labels("process").inc()
                log.exception("processing %s failed", work.image_url,
                              extra={"feed": work.feed, "item_id": work.item_id, "url": work.image_url})
                # Left pending, it would fail the same way at the next start: it ends now, failed, with its reason.
                try:
                    await self.recorder.record(work, [], None,
                                               error=f"internal: {type(exc).__name__}: {exc}"[:500])
                except Exception:  # noqa: BLE001 - the store itself is failing; logged above
                    log.exception("could not record the failure of work %d", work.id)
            finally:
                self.active -= 1
                self.transport.done(work)

    async def process(self, work: WorkItem) -> list[MatchRecord]:
        ctx = {"feed": work.feed, "item_id": work.item_id, "url": work.image_url, "work_id": work.id}
        try:
            fp, matches, downloaded_at, fetched = await self._fingerprint_and_match(work)
        except (FetchError, ImageError, work_rows.CachedFailure) as exc:
            await self.recorder.record(work, [], None, error=str(exc))
            log.warning("image skipped: %s: %s", work.image_url, exc, extra={**ctx, "reason": exc.reason})
            return []
        records = await self.recorder.record(work, matches, fp, new_image=fetched)
        self.metrics.pipeline_seconds.observe(time.perf_counter() - downloaded_at)
        for rec in records:
            await self.recorder.announce(rec)
        return records

    async def process_fingerprint(self, work: WorkItem, fp: Fingerprint) -> list[MatchRecord]:
        """Match and record an image fingerprinted elsewhere (an API upload)."""
        matches = await self.match(fp)
        records = await self.recorder.record(work, matches, fp)
        for rec in records:
            await self.recorder.announce(rec)
        return records

    async def check_url(self, url: str, feed: str = CHECK_FEED) -> tuple[Fingerprint, list[Match]]:
        """An image URL's fingerprint and matches by the feeds' own path, recording nothing
        but the URL's failure when it fails for good (as a feed's image would)."""
        fp, matches, _, _ = await self._fingerprint_and_match(WorkItem(0, feed, "", url, None, None, None))
        return fp, matches

    async def match(self, fp: Fingerprint, data: bytes | None = None, budgeted: bool = True) -> list[Match]:
        """The fingerprint's matches, in the next batch; with the image's ``data`` (keypoints on), found only if
        the post needs them (an unsure match; a second look, the budget's to allow unless ``budgeted`` is false)."""
        keypoints = None
        if data is not None and self.keypoints and not fp.keypoints:
            keypoints = KeypointFinder(data, **({"max_pixels": self.max_pixels} if self.max_pixels else {}))
        matches = await asyncio.wrap_future(self.batcher.submit(fp, keypoints, budgeted))
        self.metrics.observe_keypoint_searches([keypoints] if keypoints is not None else [])
        return matches

    async def _fingerprint_and_match(self, work: WorkItem):
        """(fingerprint, matches, time downloaded, whether this call fetched the image)."""
        fp, matches, downloaded_at = await self._fingerprint_url(work)
        fetched = matches is not None
        if not fetched:  # from the store or another worker's fetch: matched now, the unsure confirmed
            matches = await confirmed_again(await self.match(fp), work.image_url, self.keypoints and
                                            self.fetcher.fetch_image, lambda data: self.match(fp, data), self.metrics)
        return fp, matches, downloaded_at, fetched

    async def _fingerprint_url(self, work: WorkItem, known=LOOK_UP):
        """(fingerprint, matches or None, time downloaded) of an image URL: from the store
        if any feed already fetched it, from a concurrent fetch of the same URL, or fetched
        now (None for matches: this call did not match it). ``known``: what the store holds
        for the URL where the caller has read it already (``work_rows.cached_images``)."""
        cached = await _stored_fingerprint(self._lookups, work.image_url, known)
        if cached is not None:
            return cached, None, time.perf_counter()
        pending = self._inflight.get(work.image_url)
        if pending is not None:
            fp, _, downloaded = await asyncio.shield(pending)
            return fp, None, downloaded
        # Fetched by another worker while the store was read (its row not yet written then,
        # its fetch no longer in flight now): that fetch's fingerprint, not a second download.
        recent = self._recent.get(work.image_url)
        if recent is not None:
            return recent[0], None, recent[2]
        fut = asyncio.get_running_loop().create_future()
        self._inflight[work.image_url] = fut
        try:
            result = await self._download_and_hash(work)
            fut.set_result(result)
            self._recent[work.image_url] = result
            if len(self._recent) > RECENT_FETCHES:
                self._recent.popitem(last=False)
            return result
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            del self._inflight[work.image_url]

    async def fingerprint(self, work: WorkItem, known=LOOK_UP) -> tuple[Fingerprint, bool]:
        """(the image's fingerprint, whether it was fetched now) without matching: a scaled-out fetch
        worker's, whose shards match (``matcher`` None). ``known``: as for :meth:`_fingerprint_url`."""
        fp, matches, _ = await self._fingerprint_url(work, known)
        return fp, matches is not None  # None: from the store or another worker's fetch

    def _hash(self, data: bytes) -> Fingerprint:
        """Decode and hash on a worker thread."""
        # For shards that match elsewhere (no matcher): with the copy keypoints are found on, if a post needs them
        fp, seconds = fingerprint_query(data, self.max_pixels, self.keypoints and self.matcher is None)
        self.metrics.fingerprint_seconds.observe(seconds)
        return fp

    async def _fingerprint_in_process(self, data: bytes) -> tuple[Fingerprint, float]:
        for _ in range(2):
            pool = self.processes
            try:
                return await asyncio.wrap_future(pool.submit(fingerprint_query, data, self.max_pixels,
                                                               self.keypoints and self.matcher is None))
            except BrokenProcessPool:
                # A worker died (a decoder crash, the OOM killer) on this image or on one beside it:
                # new workers, and one more try, so only an image that kills a worker twice fails.
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
        except FetchError as exc:  # its host's download slot is given back when the row is done
            self.metrics.image_failures.labels("download", exc.reason).inc()
            if exc.reason in PERMANENT_FETCH_ERRORS:
                await asyncio.to_thread(work_rows.image_failed, self.store, work.image_url, str(exc), time.time())
            raise
        _download_ended(self.transport, work)
        downloaded = time.perf_counter()
        self.metrics.download_bytes.inc(len(data))
        self.metrics.images_downloaded.labels(self.metrics.feed(work.feed)).inc()
        loop = asyncio.get_running_loop()
        self._backlog += 1
        self.metrics.queue_depth.labels("fingerprint").set(self._backlog)
        try:
            if self.processes is None:
                fp = await loop.run_in_executor(self.executor, self._hash, data)
            else:
                fp, seconds = await self._fingerprint_in_process(data)
                self.metrics.fingerprint_seconds.observe(seconds)
            matches = await self.match(fp, data, work.feed != CHECK_FEED) if self.matcher is not None else []
        except ImageError as exc:
            self.metrics.image_failures.labels("decode", exc.reason).inc()
            await asyncio.to_thread(work_rows.image_failed, self.store, work.image_url, str(exc), time.time())
            raise
        finally:
            self._backlog -= 1
            self.metrics.queue_depth.labels("fingerprint").set(self._backlog)
            if self._backlog < self.backlog_limit:
                self._backlog_free.set()
        if fp.degenerate:
            self.metrics.image_failures.labels("decode", "degenerate").inc()
        # The recorder writes the images row with the matches, one commit per image; no await lies
        # between this return and that write, so no other worker misses both it and _inflight.
        return fp, matches, downloaded


def _download_ended(transport: Transport | None, work: WorkItem) -> None:
    """Tell the transport (none where no queue hands out the rows: the scaled-out api role's
    checks) that the row's download ended: its host may start another while this image is hashed."""
    if transport is not None:
        transport.downloaded(work)
