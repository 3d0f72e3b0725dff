"""Library changes while running: reload the index when the table changed (another
process, the API), and match images seen recently against the entries just added."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import threading
import time
from collections.abc import Awaitable, Callable

import numpy as np

from monitor.fingerprints import Fingerprint
from monitor.metrics import Metrics
from monitor.pipeline.recorder import Recorder
from monitor.pipeline.refetch import confirmed_again, fetched_for_look, matched_in_thread
from monitor.records import changes, retention
from monitor.records import work as work_rows
from monitor.records.library import Library, prune_change_log
from monitor.records.matches import MatchRecord
from monitor.records.store import DatabaseError, Store
from monitor.search.first_pass import first_pass
from monitor.search.index import LibraryIndex
from monitor.search.matcher import Match, Matcher
from monitor.search.recent import RecentHashes

log = logging.getLogger("repost_monitor.pipeline")

REFETCHES = 8  # images fetched again at once for a retro-match's confirmations and second looks
PRUNE_EVERY = 3600  # seconds between prunes of the library's change log and of old history
RETRO_LOOKS = 1000  # recent images a retro-match fetches again for a second look, at most (nearest first)
RECENT_BYTES = 256 * 2**20  # the recent images' hashes held for retro-matching, at most (~3.5M images)


class LibraryWatcher:
    def __init__(self, store: Store, library: Library, matcher: Matcher, recorder: Recorder,
                 metrics: Metrics, *, check_seconds: float = 2.0, retro_window: float = 72 * 3600,
                 fetch_image: Callable[[str], Awaitable[bytes]] | None = None, max_pixels: int | None = None,
                 page: int = work_rows.RECENT_PAGE, log_keep: float = 30 * 86400, history_keep: float = 0,
                 recent_bytes: int = RECENT_BYTES, retro_here: bool = True):
        self.store, self.library, self.matcher = store, library, matcher
        # False: :meth:`run` leaves retroactive matching to :meth:`retro_loop`, run elsewhere
        # (a shard's replicas: by the one that holds its lease, so each entry once)
        self.retro_here = retro_here
        self._retro_upto = 0  # the change id up to which this process has seen the entries retro-matched
        self._moved = asyncio.Event()  # the index applied changes: retro_loop looks
        self.page = page  # recent images read and matched at once (memory stays a page's, not the window's)
        # the window's hashes, held between library changes (monitor/search/recent.py); one pass at a time
        self.recent, self._recent_lock = RecentHashes(recent_bytes), threading.Lock()
        self.log_keep = log_keep  # seconds the library's change log keeps
        # seconds finished work and images are kept (0: for ever); never less than the retro window
        self.history_keep = history_keep and max(history_keep, retro_window)
        self._pruned_at = float("-inf")  # the first look prunes (monotonic time starts near 0 at boot)
        self.recorder, self.metrics = recorder, metrics
        self.check_seconds, self.retro_window = check_seconds, retro_window
        # what fetches an image again for its keypoints (an unsure match to confirm); None: keypoints off
        self.fetch_image, self.max_pixels = fetch_image, max_pixels

    async def run(self, stop: asyncio.Event) -> None:
        """Apply the change log as it grows: a NOTIFY wakes this at once (PostgreSQL), and it
        looks every ``check_seconds`` anyway (a notification is lost while the connection
        is; SQLite has none). New entries are retro-matched by id, whatever order their ids
        committed in."""
        listener = changes.listener(self.store)
        self.metrics.library_entries.set(len(self.library.index))
        try:
            while not stop.is_set():
                try:
                    _, read = await asyncio.to_thread(self.library.catch_up)
                    if read:
                        log.info("library changed: %d changes applied, %d entries indexed", read,
                                 len(self.library.index))
                        self.metrics.library_entries.set(len(self.library.index))
                        self._moved.set()
                    if self.retro_here:
                        await self.retro_due()
                    if time.monotonic() - self._pruned_at >= PRUNE_EVERY:
                        self._pruned_at = time.monotonic()
                        await asyncio.to_thread(self._housekeeping)
                except DatabaseError as exc:  # the store is away (a restart): look again next time
                    self.metrics.errors.labels("store").inc()
                    log.warning("library check failed (%s); trying again in %.0fs", exc, self.check_seconds)
                await self._wait_for_change(listener, stop)
        finally:
            await listener.close()

    async def retro_loop(self, stop: asyncio.Event) -> None:
        """:meth:`retro_due` whenever the index applied changes (and every ``check_seconds``),
        until ``stop``: beside :meth:`run` with ``retro_here=False``."""
        while not stop.is_set():
            try:
                await self.retro_due()
            except DatabaseError as exc:  # the store is away: look again next time
                self.metrics.errors.labels("store").inc()
                log.warning("retroactive matching failed (%s); trying again in %.0fs", exc, self.check_seconds)
            # a stop is seen within check_seconds; asyncio.timeout, not wait_for, which can lose
            # the lease's cancel on Python 3.11 (CPython gh-86296; monitor/scaleout/leases.py)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.check_seconds):
                    await self._moved.wait()
            self._moved.clear()

    async def retro_due(self) -> list[MatchRecord]:
        """Retro-match the entries that changes inserted into this part of the library after
        the store's mark, up to what this index has applied, then raise the mark: each entry
        once, whichever replica applied it; one added while no daemon ran, at the next start.
        The first start (no mark yet) retro-matches none of the entries already there."""
        upto = self.library.checkpoint or 0
        if upto <= self._retro_upto:
            return []
        split = self.library.shard or (0, 1)
        mark = await asyncio.to_thread(changes.retro_mark, self.store, split)
        records: list[MatchRecord] = []
        if mark is not None and mark < upto:
            if mark < await asyncio.to_thread(changes.pruned_upto, self.store):
                log.warning("retroactive matching: the library's change log was pruned past the last retro-match "
                            "(change %d): entries added before the pruned mark are not retro-matched", mark)
            ids = await asyncio.to_thread(changes.inserted_between, self.store, mark, upto)
            if ids:
                records = await self.retro_match(entry_ids=ids)
        await asyncio.to_thread(changes.raise_retro_mark, self.store, split, upto)
        self._retro_upto = upto
        return records

    def _housekeeping(self) -> None:
        """Hourly: the library's change log, and the history, pruned (off the event loop)."""
        deleted = prune_change_log(self.library, time.time() - self.log_keep)
        if deleted:
            log.info("library: %d changes older than %.0f days deleted from the change log",
                     deleted, self.log_keep / 86400)
        # the change log: by every process (each keeps its own snapshot past what is deleted);
        # the history: by one process an hour
        if self.history_keep and retention.claim(self.store, time.time(), PRUNE_EVERY * 0.9):
            work, images = retention.prune_history(self.store, time.time() - self.history_keep)
            items = retention.prune_seen_items(self.store, time.time() - self.history_keep)
            if work or images or items:
                log.info("history: %d finished work rows with no match, %d images and %d items no feed has "
                         "listed, older than %.0f days, deleted", work, images, items, self.history_keep / 86400)

    async def _wait_for_change(self, listener: changes.ChangeListener | changes.ChangePoll,
                               stop: asyncio.Event) -> None:
        waits = {asyncio.ensure_future(listener.wait(self.check_seconds)), asyncio.ensure_future(stop.wait())}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None and not stop.is_set():  # the server away: the timeout instead
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.check_seconds)
        finally:
            for task in waits:
                task.cancel()

    async def retro_match(self, after_entry_id: int | None = None, entry_ids: list[int] | None = None
                          ) -> list[MatchRecord]:
        """Match images seen within ``retro_window`` against the entries just added: those
        with an id above ``after_entry_id``, or ``entry_ids``; their matches alert as usual.
        The store keeps fingerprints, not pixels: an image is fetched again for an unsure
        match, and for a second look where its hashes met none of the new entries but lie
        near some (a crop posted before its picture was protected; its first sighting could
        not look at an entry that did not exist), nearest first, at most RETRO_LOOKS."""
        if self.retro_window <= 0:
            return []
        started = time.monotonic()
        try:
            return await self._retro_match(after_entry_id, entry_ids)
        finally:
            self.metrics.retro_seconds.observe(time.monotonic() - started)

    async def _retro_match(self, after_entry_id: int | None, entry_ids: list[int] | None) -> list[MatchRecord]:
        matcher, found, near, beyond = await asyncio.to_thread(self._retro_pairs, after_entry_id, entry_ids)
        if beyond:
            log.warning("retroactive matching: %d recent images lie near the new entries; the nearest %d get a "
                        "second look (their images fetched again); the other %d, which their hashes did not "
                        "match, get none", len(near) + beyond, len(near), beyond)
        fetching = asyncio.Semaphore(REFETCHES)

        async def settled(url: str, fp: Fingerprint, matches: list[Match]) -> list[Match]:
            async with fetching:
                again = matched_in_thread(matcher, fp, self.max_pixels, self.metrics)
                if matches:
                    return await confirmed_again(matches, url, self.fetch_image, again, self.metrics)
                data = await fetched_for_look(url, self.fetch_image, self.metrics)
                return [] if data is None else await again(data)
        todo = [(url, fp, matches) for url, (fp, matches) in found.items()] + \
            [(url, fp, []) for url, (fp, _) in near.items()]
        results = await asyncio.gather(*(settled(*item) for item in todo))
        records = await asyncio.to_thread(self._record, [(url, fp, matches) for (url, fp, _), matches
                                                         in zip(todo, results, strict=True) if matches])
        if records:
            what = f"entries added after id {after_entry_id}" if entry_ids is None else f"{len(entry_ids)} new entries"
            log.info("retroactive matching: %d new matches for %s", len(records), what)
        for rec in records:
            await self.recorder.announce(rec)
        return records

    def _record(self, found: list[tuple[str, Fingerprint, list[Match]]]) -> list[MatchRecord]:
        """Each image's matches recorded against its first work row (a transaction each: off
        the event loop, as a retro-match of many recent images writes many)."""
        records: list[MatchRecord] = []
        for url, fp, matches in found:
            work = work_rows.first_for_url(self.store, url)
            if work is not None:
                records += self.recorder.finish(work, matches, fp, close_work=False)
        return records

    def _retro_pairs(self, after_entry_id: int | None, entry_ids: list[int] | None
                     ) -> tuple[Matcher, dict, dict, int]:
        """The new entries' matcher; {image URL: (its fingerprint, its matches among them by
        the hashes)}; where keypoints are on, {image URL: (its fingerprint, its nearest
        candidate's dHash + pHash)} of the nearest RETRO_LOOKS images the hashes met none of
        them with, but which lie within a second look's limits of some; and how many more
        such images there were. The recent images are read and matched a page at a time."""
        index = LibraryIndex()
        index.keypoints_reader = self.library.index.keypoints_reader  # for a confirmation, a second look
        new = (self.library.entries_after(after_entry_id or 0) if entry_ids is None
               else self.library.fingerprints_of(entry_ids))
        for entry_id, fp in new:
            index.add(entry_id, fp)
        matcher = Matcher(index, self.matcher.tiers)
        found: dict[str, tuple[Fingerprint, list[Match]]] = {}
        near: list[tuple[int, int, str, Fingerprint]] = []  # a heap of (-distance, order, url, fp): the nearest kept
        beyond = order = 0

        def near_any(owners, dhashes, phashes, mirrored, rows):
            """Only an image with a pair in the first pass, within the dHash + pHash bound of
            any match or second look, gets a fingerprint and an answer."""
            pq, pl, pd = first_pass(index, dhashes, mirrored, matcher.radius)
            near = pd.astype(np.int64) + np.bitwise_count(phashes[pq] ^ index.phash_of(pl)) <= matcher.pair_sum_bound
            keep = np.zeros(rows, bool)
            keep[owners[pq[near]]] = True
            return keep
        with self._recent_lock:  # the pages come as they are read: one held at a time
            since = time.time() - self.retro_window
            pages = near_pages(self.store, self.recent, self.page, self.metrics, since, near_any) if len(index) else ()
            for page in pages:
                fps = [fp for _, fp in page]
                looks = dict.fromkeys(range(len(fps)), True) if self.fetch_image else None
                for (url, fp), answer in zip(page, matcher.hash_answers(fps, looks), strict=True):
                    if answer.matches:
                        found[url] = (fp, answer.matches)
                    elif answer.candidates:
                        order += 1
                        item = (-min(d + p for _, d, p, _ in answer.candidates), order, url, fp)
                        if len(near) < RETRO_LOOKS:
                            heapq.heappush(near, item)
                        else:
                            heapq.heappushpop(near, item)
                            beyond += 1
        near.sort(reverse=True)  # nearest first
        return matcher, found, {url: (fp, -distance) for distance, _, url, fp in near}, beyond


def near_pages(store: Store, recent: RecentHashes, page_size: int, metrics: Metrics, since: float, near_any):
    """Pages of (url, fingerprint) of the window's images that meet a new entry in the
    first pass: those held in memory (what was stored since the last pass read first),
    found there and read by their fetch times; then any the memory bound left to the
    store, read and tested a page at a time."""
    if recent.max_bytes:
        recent.forget_before(since)
        start, after = recent.read_from(since), None
        while page := work_rows.recent_hashes(store, start, after, page_size):
            *arrays, after = page
            recent.add(*arrays)
        times, keys, tested = recent.near(near_any, since)
        metrics.retro_images.inc(tested)
        metrics.retro_held_bytes.set(recent.nbytes)
        for at in range(0, times.size, page_size):
            yield work_rows.images_fetched_at(store, times[at:at + page_size], keys[at:at + page_size])
        if recent.held_after <= since:
            return
    upto = recent.held_after if recent.max_bytes else None
    after = None

    def counted(owners, dhashes, phashes, mirrored, rows):
        metrics.retro_images.inc(rows)
        return near_any(owners, dhashes, phashes, mirrored, rows)
    while True:
        page, after = work_rows.recent_images(store, since, after, page_size, counted, upto=upto)
        if after is None:
            return
        yield page
