"""The ``api`` role: ``/v1``, ``/review`` and the WebSub callbacks of a scaled-out
deployment, as many replicas as wanted behind a load balancer.

The handlers are the one-process daemon's; what they ask of the pipeline is done over
the streams here (:class:`RolePipeline`): a pushed post is stored and queued on ``work``
as a feed's items are; an uploaded image's fingerprint goes to ``fingerprints``, so the
shards match it and a recorder records it; ``/v1/check`` asks every shard now
(:class:`ShardedChecks`); a hub's WebSub delivery is checked against the stored
subscription and queued. The library's table is read and written here; its index lives in
the shards, which pick changes up from the table.
"""

from __future__ import annotations

import asyncio

from feeds import FeedItem
from monitor.fingerprints import Fingerprint
from monitor.pipeline.intake import Intake
from monitor.pipeline.refetch import confirmed_again
from monitor.pipeline.worker import Worker, fingerprint_query
from monitor.records.matches import MatchRecord
from monitor.records.work import WorkItem
from monitor.scaleout.roles import ShardedChecks
from monitor.scaleout.streams import FINGERPRINTS, RedisStreams, with_retry
from monitor.scaleout.wire import fingerprint_fields, work_fields
from monitor.search.matcher import Match


class RolePipeline:
    """What the API's handlers ask of ``monitor.pipeline.Pipeline``, over the streams."""

    outbox = None  # the sender role drains the outbox; it looks for new rows twice a second

    def __init__(self, intake: Intake, worker: Worker, checks: ShardedChecks, streams: RedisStreams,
                 stop: asyncio.Event):
        self.intake, self.worker, self.checks, self.streams, self.stop = intake, worker, checks, streams, stop

    @property
    def executor(self):
        return self.worker.executor

    @property
    def max_pixels(self) -> int | None:
        return self.worker.max_pixels

    def record_items(self, feed: str, items: list[FeedItem], now: float) -> list[WorkItem]:
        return self.intake.record_items(feed, items, now)

    async def submit(self, feed: str, items: list[FeedItem]) -> list[WorkItem]:
        return await self.intake.submit(feed, items)

    async def process_fingerprint(self, work: WorkItem, fp: Fingerprint) -> list[MatchRecord]:
        """An upload, fingerprinted here: on to the shards, recorded by a recorder (so no
        record to return now; the work row closes when it is)."""
        fields = {**work_fields(work), **fingerprint_fields(fp, False)}
        await with_retry("queue fingerprint", lambda: self.streams.add(FINGERPRINTS, fields), self.stop)
        return []

    async def match(self, fp: Fingerprint) -> list[Match]:
        return await self.checks.match(fp)

    async def check_url(self, url: str) -> tuple[Fingerprint, list[Match]]:
        """Fingerprinted by the feeds' own path (the stored fingerprint if a feed fetched the
        URL), matched by every shard."""
        fp, _ = await self.worker.fingerprint(WorkItem(0, "check", "", url, None, None, None))
        # a stored fingerprint has no keypoint picture: the image fetched again for an unsure match
        refetch = self.worker.keypoints and not fp.keypoint_picture and self.worker.fetcher.fetch_image
        return fp, await confirmed_again(await self.checks.match(fp), url, refetch, self._matched_with_picture,
                                         self.worker.metrics)

    async def _matched_with_picture(self, data: bytes) -> list[Match]:
        fp, _ = await asyncio.get_running_loop().run_in_executor(self.executor, fingerprint_query, data,
                                                                 self.max_pixels)
        return await self.checks.match(fp)
