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
import json
import time
import uuid
from collections.abc import Callable

from feeds import FeedItem
from monitor.fingerprints import Fingerprint
from monitor.pipeline.intake import Intake
from monitor.pipeline.refetch import confirmed_again
from monitor.pipeline.transport import MatchUnavailable
from monitor.pipeline.worker import Worker, fingerprint_query
from monitor.records.matches import MatchRecord
from monitor.records.work import WorkItem
from monitor.scaleout.streams import CHECKS, FINGERPRINTS, RedisStreams, with_retry
from monitor.scaleout.wire import answer_from, fingerprint_fields, work_fields
from monitor.search.answers import Match, keypoint_pass, merged_answers, second_look_tier
from monitor.search.matcher import keypoint_source


class ShardsUnavailable(MatchUnavailable):
    def __init__(self, missing: list[int]):
        super().__init__(f"no answer from shard {', '.join(map(str, missing))} in time (no live replica?)")
        self.missing = missing


class ShardedChecks:
    """``/v1/check`` under roles: the fingerprint goes to every shard on ``checks`` and each
    shard's answer comes back on a reply list of this request's own; merged as one library
    would have answered, then the keypoint pass here, once, with the post's own picture
    (``read``: entries' stored keypoints; None: keypoints off)."""

    def __init__(self, streams: RedisStreams, shards: int, tier_names: list[str], timeout: float = 10.0,
                 read: Callable[[list[int]], dict[int, bytes]] | None = None):
        self.streams, self.shards, self.timeout, self.read = streams, shards, timeout, read
        self.tier_names = list(tier_names)

    async def match(self, fp: Fingerprint) -> list[Match]:
        if fp.degenerate not in (None, "low_detail"):  # flat and tiny pictures match nothing
            return []
        reply = f"{self.streams.prefix}:reply:{uuid.uuid4().hex}"
        deadline = time.time() + self.timeout
        await self.streams.add(CHECKS, {**fingerprint_fields(fp, False),
                                        "reply": reply, "deadline": repr(deadline)})
        answers: dict[int, str] = {}
        try:
            while len(answers) < self.shards:
                left = deadline - time.time()
                if left <= 0:
                    raise ShardsUnavailable(sorted(set(range(self.shards)) - set(answers)))
                got = await self.streams.redis.blpop([reply], timeout=min(left, 1.0))
                if got:
                    shard, text = json.loads(got[1])
                    answers[int(shard)] = text
        finally:
            await self.streams.redis.delete(reply)
        merged = merged_answers([answer_from(text) for text in answers.values()], self.tier_names)
        source = keypoint_source(fp, None)
        if self.read is None or source is None or fp.degenerate is not None:
            return merged.matches  # keypoints off, or none at hand (the caller may fetch the image again)
        [matches] = await asyncio.to_thread(keypoint_pass, [merged], {0: source}, self.read,
                                            second_look_tier(self.tier_names))
        return matches


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
        pictures = {work.id: fp.keypoint_picture} if fp.keypoint_picture else None
        await with_retry("queue fingerprint", lambda: self.streams.add_many(FINGERPRINTS, [fields], pictures),
                         self.stop)
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
