"""The recorder role: ``answers`` -> each shard's answer stored; the answer that completes a
post's set of shards has the post recorded, its matches and their alerts in one transaction.

Where the shards' merged answer is final, that is at once. Where it is not (an unsure hash
match to confirm, or candidates for a second look where no match is sure) the keypoint pass
runs here, once per post (monitor/search/answers.py), between the transaction that completes
the set and the one that records the post, so no row stays locked through its CPU work: the
post's keypoint picture is read from Redis, where the fetch worker left it, and the entries'
keypoints from the store.
A post whose picture is gone (kept 15 minutes; a stored fingerprint never had one) has its
image fetched again if a match is unsure, as the one-process daemon does; else the hashes'
answer stands. The answers stay stored until the post is recorded, so a recorder killed
mid-pass leaves them to the next delivery, which completes the set again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from redis.exceptions import RedisError

from monitor.fingerprints import Fingerprint, KeypointFinder
from monitor.metrics import Metrics
from monitor.pipeline.recorder import Recorder
from monitor.pipeline.refetch import fetched_again
from monitor.records import keypoints as keypoint_rows
from monitor.records import matches as match_rows
from monitor.records import shard_answers
from monitor.records.library import entries_by_id
from monitor.records.store import Store
from monitor.records.work import WorkItem
from monitor.scaleout.roles import LINGER, RECORDERS_GROUP, _consume
from monitor.scaleout.streams import ANSWERS, RedisStreams
from monitor.scaleout.wire import answer_from, fingerprint_from, work_from
from monitor.search.answers import (
    HashAnswer,
    Match,
    keypoint_pass,
    merged_answers,
    needs_keypoints,
    second_look_tier,
)
from monitor.search.budget import LookBudget
from monitor.search.index import RecentKeypoints

log = logging.getLogger("repost_monitor.scaleout")
KEYPOINTS_HELD_SECONDS = 60.0


class RecorderRole:
    """``answers`` -> stored; the last shard's answer records the image (after the keypoint
    pass, where its answer needs one)."""

    def __init__(self, store: Store, shards: int, streams: RedisStreams, recorder: Recorder,
                 tier_names: list[str] | None = None, *, keypoints: bool = True, fetch_image=None,
                 max_pixels: int | None = None, metrics: Metrics | None = None, look_share: float = 1.0):
        self.store, self.shards, self.streams, self.recorder = store, shards, streams, recorder
        self.tier_names = list(tier_names or ["exact", "near"])
        self.second_look_tier = second_look_tier(self.tier_names)
        self.keypoints = keypoints  # [match] keypoints; off: the hashes' answer is final
        # an image fetched again where its picture is gone and a match is unsure; None: never
        self.fetch_image, self.max_pixels = fetch_image, max_pixels
        self.metrics = metrics or recorder.metrics
        # of the posts recorded, at most this share get a second look ([match] second_look_share)
        self.budget = LookBudget(look_share, self.metrics.second_looks_skipped.inc)
        self._keypoints, self._keypoints_since = None, 0.0

    def _entry_keypoints(self) -> RecentKeypoints:
        """Entries' stored keypoints, the recent ones held (the same few look-alikes are near
        many posts, and each read is a round trip); held KEYPOINTS_HELD_SECONDS at most, as no
        change log tells a recorder that `library rehash` found an entry's keypoints again."""
        if self._keypoints is None or time.monotonic() - self._keypoints_since > KEYPOINTS_HELD_SECONDS:
            self._keypoints = RecentKeypoints(functools.partial(keypoint_rows.read, self.store))
            self._keypoints_since = time.monotonic()
        return self._keypoints

    def _parse(self, fields):
        work = work_from(fields)
        fp, fetched = fingerprint_from(fields)
        shard = int(fields[b"shard"])
        if not 0 <= shard < self.shards:
            raise ValueError(f"an answer from shard {shard} of {self.shards}")
        text = fields[b"matches"].decode()
        # parsed once, here: a poison answer is dead-lettered, never stored
        return work, fp, fetched, shard, text, answer_from(text)

    def _record(self, conn, complete: list[tuple[WorkItem, list[Match], Fingerprint, bool]], now: float):
        """Record these posts (their answers cleared) inside the caller's transaction."""
        met = {m.entry_id for _, matches, _, _ in complete for m in matches}
        entries = entries_by_id(self.store, met) if met else {}  # one look-up for the batch
        rows = []
        for work, matches, fp, fetched in complete:
            if self.shards > 1:
                shard_answers.clear(conn, work.id)
            rows.append((work, matches, fp, entries, fetched))
        outbox = self.recorder.outbox
        return match_rows.record_many(conn, rows, now, enqueue=outbox.enqueue if outbox is not None else None)

    def _in_transaction(self, work_ids: list[int], step) -> tuple[list, list[int], list[tuple]]:
        """``step(conn, states, now)`` -> (posts to record, posts to decide), in one
        transaction holding these work rows; then (records, the ids recorded, to decide)."""
        now = time.time()
        outbox = self.recorder.outbox
        if outbox is not None:
            outbox.begin()
        with self.store.transaction() as conn:
            complete, undecided = step(conn, shard_answers.hold_works(conn, work_ids), now)
            records = self._record(conn, complete, now)
        if records and outbox is not None:
            outbox.committed()
        return records, [work.id for work, *_ in complete], undecided

    def _store_answers(self, answers: list[tuple]):
        """Each (work, fp, fetched, shard, text, answer) stored, and every post whose set they
        complete recorded, in one transaction; a post whose merged answer needs the keypoint
        pass is returned to be decided (work, fp, fetched, merged answer), its answers kept:
        the pass runs after this transaction, so no row stays locked through its CPU work
        (another recorder storing a different shard's answer for one of these posts would
        wait that long). Returns (records, the ids of the posts recorded, those to decide)."""
        def step(conn, states, now):
            complete, undecided = [], []
            for work, fp, fetched, shard, text, answer in answers:
                if states.get(work.id) != "pending":
                    continue  # recorded already (a repeated answer), or a row we do not have
                if self.shards == 1:  # the answer is the whole set: nothing to keep until the others come
                    stored = {shard: text}
                else:
                    stored = shard_answers.add(conn, work.id, shard, text, now)
                    if len(stored) < self.shards:
                        continue  # the other shards have not answered yet
                states[work.id] = "complete"  # a repeat of an answer later in this batch changes nothing
                merged = merged_answers([answer if k == shard else answer_from(t) for k, t in stored.items()],
                                        self.tier_names)
                if self.keypoints and needs_keypoints(merged):
                    undecided.append((work, fp, fetched, merged))
                else:
                    complete.append((work, merged.matches, fp, fetched))
            return complete, undecided
        return self._in_transaction([work.id for work, *_ in answers], step)

    def _record_decided(self, decided: list[tuple[WorkItem, list[Match], Fingerprint, bool]]):
        """The posts the keypoint pass decided, recorded in one transaction: those still
        pending (another recorder may have recorded one meanwhile)."""
        records, done, _ = self._in_transaction(
            [work.id for work, *_ in decided],
            lambda conn, states, now: ([d for d in decided if states.get(d[0].id) == "pending"], []))
        return records, done

    def _finder(self, picture: bytes | None = None, data: bytes | None = None) -> KeypointFinder:
        kwargs = {"max_pixels": self.max_pixels} if self.max_pixels else {}
        return KeypointFinder(data or b"", picture=picture or b"", **kwargs)

    def _observe(self, sources: dict) -> None:
        self.metrics.observe_keypoint_searches(s for s in sources.values() if isinstance(s, KeypointFinder))

    async def _source(self, work: WorkItem, fp: Fingerprint, picture: bytes | None, merged: HashAnswer):
        """The post's keypoints, or what finds them; None where there are none at hand."""
        if fp.keypoints:
            return fp.keypoints
        if picture:
            return self._finder(picture=picture)
        data = await fetched_again(merged.matches, work.image_url, self.fetch_image, self.metrics)
        return None if data is None else self._finder(data=data)

    async def _decide(self, undecided: list[tuple], others: int = 0):
        """The keypoint pass over the posts whose answers need it, then their records
        (``others``: the posts recorded beside them without it, which the budget counts)."""
        pictures = await self.streams.pictures([work.id for work, *_ in undecided])
        found = await asyncio.gather(*(self._source(work, fp, pictures.get(work.id), merged)
                                       for work, fp, _, merged in undecided))
        sources = {q: source for q, source in enumerate(found) if source is not None}
        final = await asyncio.to_thread(keypoint_pass, [merged for *_, merged in undecided], sources,
                                        self._entry_keypoints(), self.second_look_tier, self.budget, others)
        self._observe(sources)
        return await asyncio.to_thread(self._record_decided, [
            (work, matches, fp, fetched) for (work, fp, fetched, _), matches in zip(undecided, final, strict=True)])

    async def _handle(self, answers: list[tuple]) -> None:
        records, done, undecided = await asyncio.to_thread(self._store_answers, answers)
        if undecided:
            more, decided = await self._decide(undecided, len(done))
            records, done = records + more, done + decided
        elif done:  # decided by the hashes alone: counted among the posts the look share is of
            self.budget.admit([None] * len(done))
        for rec in records:
            await self.recorder.announce(rec)
        try:
            await self.streams.drop_pictures(done)
        except (RedisError, OSError) as exc:  # they expire anyway
            log.info("keypoint pictures of %d recorded posts not removed (%s); they expire", len(done), exc)

    async def handle(self, fields) -> None:
        await self._handle([self._parse(fields)])

    async def handle_batch(self, batch) -> list | None:
        """The batch in one transaction; None (one by one) if any message is unreadable or the
        transaction fails, so one poison answer never holds back the rest."""
        try:
            await self._handle([self._parse(fields) for _, fields in batch])
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - retried message by message, where the culprit shows
            return None
        return [mid for mid, _ in batch]

    async def run(self, stop: asyncio.Event) -> None:
        # two batches at once: one's keypoint pass (CPU, in a thread) beside the other's transaction
        await _consume(self.streams, ANSWERS, RECORDERS_GROUP, self.handle, stop, count=64, tasks=2,
                       handle_batch=self.handle_batch, linger=LINGER)
