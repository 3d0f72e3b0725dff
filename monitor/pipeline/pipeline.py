"""sources -> intake -> transport -> worker (fetch -> fingerprint -> match) -> recorder.

Every (feed, item, image URL) is written to the ``work`` table before it is queued,
and closed in the same transaction that records its matches, so a crash or kill at any
moment loses nothing and repeats nothing: a restart re-queues exactly the pending rows.
The transport is bounded, so a burst of items waits in the watchers (and the table)
instead of in memory. This class only wires the stages and runs them.
"""

from __future__ import annotations

import asyncio
import logging

from feeds import FeedItem, HttpSource, LocalSource
from monitor.fetch import Fetcher
from monitor.fingerprints import Fingerprint
from monitor.metrics import Metrics
from monitor.pipeline.intake import FeedSettings, Intake
from monitor.pipeline.recorder import OnMatch, Recorder
from monitor.pipeline.retro import LibraryWatcher
from monitor.pipeline.transport import InProcessTransport, Transport, host_share
from monitor.pipeline.worker import Worker
from monitor.records.library import Library
from monitor.records.matches import MatchRecord
from monitor.records.store import Store
from monitor.records.work import WorkItem
from monitor.search.matcher import Matcher

log = logging.getLogger("repost_monitor.pipeline")


class Pipeline:
    def __init__(self, store: Store, library: Library, matcher: Matcher, fetcher: Fetcher,
                 metrics: Metrics, *, queue_size: int = 1000, workers: int = 16, per_host_workers: int | None = None,
                 fingerprint_workers: int = 2, fingerprint_processes: int = 0,
                 max_pixels: int | None = None, keypoints: bool = True, look_share: float = 1.0,
                 on_match: OnMatch | None = None, library_check_seconds: float = 2.0,
                 outbox=None, retro_window: float = 72 * 3600, transport: Transport | None = None,
                 public_url: str | None = None, change_log_days: float = 30.0, history_days: float = 0,
                 retro_memory_mb: float = 256):
        self.store, self.library, self.matcher = store, library, matcher
        self.transport = transport or InProcessTransport(queue_size, host_share(workers, per_host_workers))
        metrics.queue_capacity.labels("download").set(queue_size)
        self.recorder = Recorder(store, library, metrics, outbox=outbox, on_match=on_match)
        self.intake = Intake(store, fetcher, metrics, self.transport, public_url)
        self.worker = Worker(store, fetcher, matcher, self.recorder, metrics, self.transport,
                             workers=workers, fingerprint_workers=fingerprint_workers,
                             fingerprint_processes=fingerprint_processes, max_pixels=max_pixels,
                             keypoints=keypoints, look_share=look_share)
        self.library_watcher = LibraryWatcher(store, library, matcher, self.recorder, metrics,
                                              check_seconds=library_check_seconds, retro_window=retro_window,
                                              fetch_image=fetcher.fetch_image if keypoints else None,
                                              max_pixels=max_pixels, log_keep=change_log_days * 86400,
                                              history_keep=history_days * 86400,
                                              recent_bytes=int(retro_memory_mb * 2**20))

    # What the API and the daemon use.
    @property
    def outbox(self):
        return self.recorder.outbox

    @property
    def executor(self):
        return self.worker.executor

    @property
    def max_pixels(self) -> int | None:
        return self.worker.max_pixels

    @property
    def processes(self):
        return self.worker.processes

    def add_source(self, source: HttpSource | LocalSource, settings: FeedSettings) -> None:
        self.intake.add_source(source, settings)

    def record_items(self, feed: str, items: list[FeedItem], now: float) -> list[WorkItem]:
        return self.intake.record_items(feed, items, now)

    async def submit(self, feed: str, items: list[FeedItem]) -> list[WorkItem]:
        return await self.intake.submit(feed, items)

    async def poll_once(self, source, headers: dict | None = None) -> list[WorkItem]:
        return await self.intake.poll_once(source, headers)

    async def process(self, work: WorkItem) -> list[MatchRecord]:
        return await self.worker.process(work)

    async def process_fingerprint(self, work: WorkItem, fp: Fingerprint) -> list[MatchRecord]:
        return await self.worker.process_fingerprint(work, fp)

    async def check_url(self, url: str) -> tuple[Fingerprint, list]:
        return await self.worker.check_url(url)

    async def match(self, fp: Fingerprint) -> list:
        """Match now, recording nothing (``/v1/check``)."""
        return await self.worker.match(fp, budgeted=False)

    async def retro_match(self, after_entry_id: int) -> list[MatchRecord]:
        return await self.library_watcher.retro_match(after_entry_id)

    async def run(self, stop: asyncio.Event) -> None:
        await self.worker.start()
        intake = self.intake.tasks(stop)
        workers = self.worker.tasks(stop)
        library = asyncio.create_task(self.library_watcher.run(stop), name="library")
        try:
            await stop.wait()
        finally:
            # Cancelled rather than stopped, the workers are cancelled too: their images' rows
            # stay pending and are resumed at the next start.
            draining = stop.is_set()
            log.info("stopping: %d watchers, %s %d in-flight images", len(self.intake.sources),
                     "draining" if draining else "cancelling", self.worker.active)
            for t in [*intake, library, *([] if draining else workers)]:
                t.cancel()
            # Workers finish the image in hand; queued rows stay pending in the
            # store and are resumed at the next start.
            await asyncio.gather(*workers, return_exceptions=True)
            await asyncio.gather(*intake, library, return_exceptions=True)
            await self.worker.close()
