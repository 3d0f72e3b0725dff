"""The roles of a scaled-out deployment, each a loop over one stream:

- intake: feed polling and streams, each feed under a lease (one live watcher per feed);
  work rows are stored, then added to ``work``;
- worker (monitor/scaleout/fetching.py): ``work`` -> download and fingerprint ->
  ``fingerprints`` (or the row closed failed, with its reason), fair between image hosts;
- shard K of S: ``fingerprints`` -> what the hashes say against the entries whose id is
  K mod S -> ``answers``; it also retro-matches recent images against the new entries it owns;
- recorder (monitor/scaleout/recorder.py): ``answers`` -> each shard's answer stored; the
  answer that completes the set records the image's matches and their alerts in one
  transaction, after the keypoint pass (once per post) where the merged answer needs it;
- sender: the alert outbox, under a lease (one sender: delivery stays ordered).

Every message is acknowledged after its effect is stored, so a role killed at any moment
loses nothing; what is repeated is recorded once (unique keys, the answers' table).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time

from redis.exceptions import RedisError

from monitor.fingerprints import Fingerprint
from monitor.metrics import Metrics
from monitor.records import work as work_rows
from monitor.records.library import Library
from monitor.records.store import DatabaseError
from monitor.records.work import WorkItem
from monitor.scaleout.streams import ANSWERS, CHECKS, FINGERPRINTS, WORK, RedisStreams, being_cancelled, with_retry
from monitor.scaleout.wire import (
    answer_json,
    fingerprint_from,
    work_fields,
    work_from,
)
from monitor.search.matcher import Matcher

log = logging.getLogger("repost_monitor.scaleout")
WORKERS_GROUP, RECORDERS_GROUP = "workers", "recorders"
# A batch not full waits this long for more (Kafka's linger.ms) before it is handled: fewer reads,
# round trips and transactions a post. A shard or recorder keeping up with the posts read one or
# two at a time; bench/scaleout.py at 150 posts/s, alternated with lingering only for batches a
# quarter full: all the roles 8.7-9.5 ms of CPU a post against 9.5-10.7 (shard 1.04-1.18 against
# 1.50-1.79, recorder 1.86-2.02 against 2.26-2.49), p50 81-90 ms against 43-59, p99 alike (median
# 181 ms against 232). A fetch worker's batches fill anyway: its waiting saved nothing.
# It waits only where the stream's recent pace (Arrivals) promises at least one more message
# within it: at a few posts a second nothing more comes, and the wait only added 20 ms a hop.
LINGER = 0.02  # seconds


class Arrivals:
    """Messages read in the last second: a stream's pace as one consumer sees it."""

    def __init__(self, window: float = 1.0):
        self.window, self.reads = window, collections.deque()
        self.total = 0

    def note(self, n: int) -> None:
        now = time.monotonic()
        self.reads.append((now, n))
        self.total += n
        while self.reads and self.reads[0][0] < now - self.window:
            self.total -= self.reads.popleft()[1]

    def per_second(self) -> float:
        return self.total / self.window


def shard_group(k: int) -> str:
    return f"shard-{k}"


class StreamTransport:
    """The intake's side of ``work``: add a row, waiting while the workers are more than
    ``limit`` rows behind (back-pressure across processes, as the in-process queue's bound).
    With a ``store``, the rows added are marked so (``queued_at``): the sweeper leaves them be."""

    def __init__(self, streams: RedisStreams, stop: asyncio.Event, limit: int = 1000, store=None):
        self.streams, self.stop, self.limit, self.store = streams, stop, limit, store
        self._backlog = 0
        self._checked = 0.0

    async def put(self, work: WorkItem) -> None:
        await self.put_many([work])

    async def put_many(self, works: list[WorkItem]) -> None:
        """Add rows in pipelined batches (one round trip per 100), minding the backlog."""
        for start in range(0, len(works), 100):
            await self._room()
            part = works[start:start + 100]
            chunk = [work_fields(w) for w in part]
            await with_retry("queue work", lambda c=chunk: self.streams.add_many(WORK, c), self.stop)
            self._backlog += len(chunk)
            if self.store is not None:
                ids = [w.id for w in part]
                try:
                    await asyncio.to_thread(work_rows.mark_queued, self.store, ids, time.time())
                except DatabaseError as exc:  # the sweeper queues them once more: a repeat, recorded once
                    log.warning("work rows %d..%d queued but not marked so (%s)", ids[0], ids[-1], exc)

    async def _room(self) -> None:
        while time.monotonic() - self._checked > 0.5 or self._backlog > self.limit:
            self._checked = time.monotonic()
            stats = await with_retry("work backlog", lambda: self.streams.group_stats(WORK), self.stop) or []
            self._backlog = sum(g["lag"] + g["pending"] for g in stats if g["group"] == WORKERS_GROUP)
            if self._backlog <= self.limit or self.stop.is_set():
                break
            await asyncio.sleep(0.2)

    async def get(self, stop: asyncio.Event) -> WorkItem | None:
        raise NotImplementedError("workers read the stream themselves")

    def downloaded(self, work: WorkItem) -> None:
        pass

    def done(self, work: WorkItem) -> None:
        pass

    def depth(self) -> int:
        return self._backlog


async def heartbeats(streams: RedisStreams, stream: str, group: str, stop: asyncio.Event) -> None:
    """This consumer of ``stream`` as ``group`` said alive every 1.5 s until ``stop``."""
    while not stop.is_set():
        await with_retry("heartbeat", lambda: streams.heartbeat(stream, group), stop)
        try:
            await asyncio.wait_for(stop.wait(), 1.5)
        except TimeoutError:
            pass


async def _consume(streams: RedisStreams, stream: str, group: str, handle, stop: asyncio.Event,
                   *, count: int = 1, tasks: int = 1, handle_batch=None, linger: float = 0.0) -> None:
    """``tasks`` loops reading ``stream`` as ``group``, up to ``count`` messages at a time;
    ``handle(fields)`` does the work of each (the batch's concurrently), then the batch is
    acknowledged in one call. ``handle_batch(messages)``, where given, does a whole batch at
    once (one transaction) and returns the ids to acknowledge, or None to fall back to one
    by one. A message that cannot be read is dead-lettered at once; one whose handling
    fails is left pending, to be claimed again (and dead-lettered after max_deliveries)."""
    await with_retry(f"group {group}", lambda: streams.ensure_group(stream, group), stop)
    arrivals = Arrivals()

    async def one(mid, fields) -> bool:
        """Handle one message: True to acknowledge it (done; or dead-lettered, acknowledged there)."""
        try:
            await handle(fields)
            return True
        except (ValueError, KeyError, TypeError) as exc:  # not a message we can read
            log.error("%s: unreadable message %s (%s)", stream, mid, exc)
            await with_retry("dead letter", lambda: streams.dead_letter(stream, group, mid, 0), stop)
            return False
        except asyncio.CancelledError:
            raise
        except (*DatabaseError, RedisError, OSError) as exc:  # a server away: the message waits
            log.warning("%s: message %s not handled (%s); it will be retried", stream, mid, exc)
        except Exception:  # noqa: BLE001 - left pending: claimed again later, then dead-lettered
            log.exception("%s: handling message %s failed; it will be retried", stream, mid)
        return False

    async def loop():
        while not stop.is_set():
            if being_cancelled():  # a cancel some handler's library lost or turned into an error
                raise asyncio.CancelledError()
            batch = await with_retry(f"read {stream}", lambda: streams.read(stream, group, count, 1.0), stop) or []
            arrivals.note(len(batch))
            if linger and 0 < len(batch) < count and arrivals.per_second() * linger >= 1:
                await asyncio.sleep(linger)
                more = await with_retry("read", lambda m=count - len(batch): streams.read(stream, group, m, 0),
                                        stop) or []
                arrivals.note(len(more))
                batch += more
            done = await handle_batch(batch) if handle_batch is not None and len(batch) > 1 else None
            if done is None:  # one by one (or the batch failed as a whole): each message on its own
                done = [mid for (mid, fields), ok in zip(batch, await asyncio.gather(
                    *(one(mid, fields) for mid, fields in batch)), strict=True) if ok]
            if done:
                await with_retry("ack", lambda d=done: streams.ack(stream, group, *d), stop)

    await asyncio.gather(heartbeats(streams, stream, group, stop), *(loop() for _ in range(tasks)))


class ShardRole:
    """``fingerprints`` -> what the hashes say against this shard's part of the library ->
    ``answers``: the matches, and the nearest entries where no match is sure. The keypoint
    pass (confirmations, second looks) runs once per post, in the recorder, on the shards'
    answers merged: a post's keypoints are not found once per shard that has candidates."""

    def __init__(self, shard: int, shards: int, library: Library, matcher: Matcher, streams: RedisStreams,
                 metrics: Metrics, tasks: int = 2, keypoints: bool = True):
        self.shard, self.shards, self.library, self.matcher = shard, shards, library, matcher
        self.streams, self.metrics, self.tasks = streams, metrics, tasks
        self.keypoints = keypoints  # [match] keypoints: whether to name candidates for a second look

    def _looks(self, fps: list[Fingerprint]) -> dict[int, bool] | None:
        """The posts the keypoint pass may look at, and whether their mirror image's keypoints
        can be found (not where only packed keypoints came): all, unless keypoints are off."""
        return {i: not fp.keypoints for i, fp in enumerate(fps)} if self.keypoints else None

    async def handle(self, fields) -> None:
        work_from(fields)  # checked, passed on as it came
        await self._answer([(fields, fingerprint_from(fields)[0])])

    async def handle_batch(self, batch) -> list | None:
        """The batch matched in one pass over the shard's part of the library, the answers
        added in one round trip; None (one by one, where each failure is handled on its
        own) if any message is unreadable or the batch fails."""
        try:
            parsed = [(fields, fingerprint_from(fields)[0]) for _, fields in batch]
            for fields, _ in parsed:
                work_from(fields)
        except (ValueError, KeyError, TypeError):
            return None
        try:
            await self._answer(parsed)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - retried one by one
            return None
        return [mid for mid, _ in batch]

    async def _answer(self, parsed: list[tuple[dict, Fingerprint]]) -> None:
        start = time.perf_counter()
        fps = [fp for _, fp in parsed]
        answers = await asyncio.to_thread(self.matcher.hash_answers, fps, self._looks(fps))
        each = (time.perf_counter() - start) / len(parsed)
        for _ in parsed:
            self.metrics.match_seconds.observe(each)
        # a picture inside the message (a fetch worker of the version before) is kept where
        # the recorder reads it
        pictures = {work_from(fields).id: fp.keypoint_picture for fields, fp in parsed if fp.keypoint_picture}
        await self.streams.add_many(ANSWERS, [
            {"work": fields[b"work"], "fp": fields[b"fp"], "shard": str(self.shard), "matches": answer_json(a)}
            for (fields, _), a in zip(parsed, answers, strict=True)], pictures)

    async def handle_check(self, fields) -> None:
        """A synchronous check: this shard's answer pushed onto the asker's reply list."""
        reply = (fields.get(b"reply") or b"").decode()
        if not reply.startswith(f"{self.streams.prefix}:reply:"):
            raise ValueError("a check without a reply list of ours")
        if float(fields[b"deadline"]) < time.time():
            return  # the asker has given up (this shard was away): nobody to answer
        fp, _ = fingerprint_from(fields)
        [answer] = await asyncio.to_thread(self.matcher.hash_answers, [fp], self._looks([fp]))
        async with self.streams.redis.pipeline(transaction=False) as pipe:
            pipe.rpush(reply, json.dumps([self.shard, answer_json(answer)]))
            pipe.expire(reply, 60)
            await pipe.execute()

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(
            _consume(self.streams, FINGERPRINTS, shard_group(self.shard), self.handle, stop, count=32,
                     tasks=self.tasks, handle_batch=self.handle_batch, linger=LINGER),
            _consume(self.streams, CHECKS, shard_group(self.shard), self.handle_check, stop, count=8))
