"""The roles of a scaled-out deployment, each a loop over one stream:

- intake: feed polling and streams, each feed under a lease (one live watcher per feed);
  work rows are stored, then added to ``work``;
- worker: ``work`` -> download and fingerprint -> ``fingerprints`` (or the row closed
  failed, with its reason);
- shard K of S: ``fingerprints`` -> match against the entries whose id is K mod S ->
  ``answers``; it also retro-matches recent images against the new entries it owns;
- recorder: ``answers`` -> each shard's answer stored; the answer that completes the set
  records the image's matches and their alerts in one transaction;
- sender: the alert outbox, under a lease (one sender: delivery stays ordered).

Every message is acknowledged after its effect is stored, so a role killed at any moment
loses nothing; what is repeated is recorded once (unique keys, the answers' table).
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.exceptions import RedisError

from monitor.fetch import FetchError
from monitor.fingerprints import ImageError
from monitor.metrics import Metrics
from monitor.pipeline.recorder import Recorder
from monitor.pipeline.worker import Worker
from monitor.records import matches as match_rows
from monitor.records import shard_answers
from monitor.records import work as work_rows
from monitor.records.library import Library, entries_by_id
from monitor.records.store import DatabaseError, Store
from monitor.records.work import WorkItem
from monitor.scaleout.streams import ANSWERS, FINGERPRINTS, WORK, RedisStreams, with_retry
from monitor.scaleout.wire import (
    fingerprint_fields,
    fingerprint_from,
    matches_from,
    matches_json,
    work_fields,
    work_from,
)
from monitor.search.matcher import Matcher

log = logging.getLogger("repost_monitor.scaleout")

WORKERS_GROUP, RECORDERS_GROUP = "workers", "recorders"


def shard_group(k: int) -> str:
    return f"shard-{k}"


class StreamTransport:
    """The intake's side of ``work``: add a row, waiting while the workers are more than
    ``limit`` rows behind (back-pressure across processes, as the in-process queue's bound)."""

    def __init__(self, streams: RedisStreams, stop: asyncio.Event, limit: int = 1000):
        self.streams, self.stop, self.limit = streams, stop, limit
        self._backlog = 0
        self._checked = 0.0

    async def put(self, work: WorkItem) -> None:
        while time.monotonic() - self._checked > 0.5 or self._backlog > self.limit:
            self._checked = time.monotonic()
            stats = await with_retry("work backlog", lambda: self.streams.group_stats(WORK), self.stop) or []
            self._backlog = sum(g["lag"] + g["pending"] for g in stats if g["group"] == WORKERS_GROUP)
            if self._backlog <= self.limit or self.stop.is_set():
                break
            await asyncio.sleep(0.2)
        await with_retry("queue work", lambda: self.streams.add(WORK, work_fields(work)), self.stop)
        self._backlog += 1

    async def get(self, stop: asyncio.Event) -> WorkItem | None:
        raise NotImplementedError("workers read the stream themselves")

    def done(self, work: WorkItem) -> None:
        pass

    def depth(self) -> int:
        return self._backlog


async def _consume(streams: RedisStreams, stream: str, group: str, handle, stop: asyncio.Event,
                   *, count: int = 1, tasks: int = 1) -> None:
    """``tasks`` loops reading ``stream`` as ``group``; ``handle(fields)`` does the work, then
    the message is acknowledged. A message that cannot be read is dead-lettered at once; one
    whose handling fails is left pending, to be claimed again (and dead-lettered after
    max_deliveries)."""
    await with_retry(f"group {group}", lambda: streams.ensure_group(stream, group), stop)

    async def alive():
        while not stop.is_set():
            await with_retry("heartbeat", lambda: streams.heartbeat(stream, group), stop)
            try:
                await asyncio.wait_for(stop.wait(), 1.5)
            except TimeoutError:
                pass

    async def loop():
        while not stop.is_set():
            batch = await with_retry(f"read {stream}", lambda: streams.read(stream, group, count, 1.0), stop)
            for mid, fields in batch or []:
                try:
                    await handle(fields)
                except (ValueError, KeyError, TypeError) as exc:  # not a message we can read
                    log.error("%s: unreadable message %s (%s)", stream, mid, exc)
                    await with_retry("dead letter", lambda m=mid: streams.dead_letter(stream, group, m, 0), stop)
                    continue
                except asyncio.CancelledError:
                    raise
                except (*DatabaseError, RedisError, OSError) as exc:  # a server away: the message waits
                    log.warning("%s: message %s not handled (%s); it will be retried", stream, mid, exc)
                    continue
                except Exception:  # noqa: BLE001 - left pending: claimed again later, then dead-lettered
                    log.exception("%s: handling message %s failed; it will be retried", stream, mid)
                    continue
                await with_retry("ack", lambda m=mid: streams.ack(stream, group, m), stop)

    await asyncio.gather(alive(), *(loop() for _ in range(tasks)))


class FetchRole:
    """``work`` -> download, fingerprint -> ``fingerprints``."""

    def __init__(self, worker: Worker, streams: RedisStreams, recorder: Recorder, tasks: int = 16):
        self.worker, self.streams, self.recorder, self.tasks = worker, streams, recorder, tasks

    async def handle(self, fields) -> None:
        work = work_from(fields)
        try:
            fp, fetched = await self.worker.fingerprint(work)
        except (FetchError, ImageError, work_rows.CachedFailure) as exc:
            await asyncio.to_thread(self.recorder.finish, work, [], None, error=str(exc))
            log.warning("image skipped: %s: %s", work.image_url, exc, extra={"url": work.image_url})
            return
        await self.streams.add(FINGERPRINTS, {**work_fields(work), **fingerprint_fields(fp, fetched)})

    async def run(self, stop: asyncio.Event) -> None:
        await self.worker.start()
        try:
            await _consume(self.streams, WORK, WORKERS_GROUP, self.handle, stop, tasks=self.tasks)
        finally:
            await self.worker.close()


class ShardRole:
    """``fingerprints`` -> this shard's matches -> ``answers``."""

    def __init__(self, shard: int, shards: int, library: Library, matcher: Matcher, streams: RedisStreams,
                 metrics: Metrics, tasks: int = 2):
        self.shard, self.shards, self.library, self.matcher = shard, shards, library, matcher
        self.streams, self.metrics, self.tasks = streams, metrics, tasks

    async def handle(self, fields) -> None:
        work = work_from(fields)
        fp, fetched = fingerprint_from(fields)
        start = time.perf_counter()
        matches = await asyncio.to_thread(self.matcher.match, fp)
        self.metrics.match_seconds.observe(time.perf_counter() - start)
        await self.streams.add(ANSWERS, {**work_fields(work), **fingerprint_fields(fp, fetched),
                                         "shard": str(self.shard), "matches": matches_json(matches)})

    async def run(self, stop: asyncio.Event) -> None:
        await _consume(self.streams, FINGERPRINTS, shard_group(self.shard), self.handle, stop, count=8,
                       tasks=self.tasks)


class RecorderRole:
    """``answers`` -> stored; the last shard's answer records the image."""

    def __init__(self, store: Store, shards: int, streams: RedisStreams, recorder: Recorder, metrics: Metrics):
        self.store, self.shards, self.streams = store, shards, streams
        self.recorder, self.metrics = recorder, metrics

    def _store_answer(self, work: WorkItem, fp, fetched: bool, shard: int, matches: str):
        now = time.time()
        outbox = self.recorder.outbox
        with self.store.transaction() as conn:
            if shard_answers.hold_work(conn, work.id) != "pending":
                return []  # recorded already (a repeated answer), or a row we do not have
            answers = shard_answers.add(conn, work.id, shard, matches, now)
            if len(answers) < self.shards:
                return []  # the other shards have not answered yet
            merged = [m for text in answers.values() for m in matches_from(text)]
            entries = entries_by_id(self.store, (m.entry_id for m in merged)) if merged else {}
            records = match_rows.record_in(conn, work, merged, fp, entries, now, new_image=fetched,
                                           enqueue=outbox.enqueue if outbox is not None else None)
            shard_answers.clear(conn, work.id)
        if records and outbox is not None:
            outbox.committed()
        return records

    async def handle(self, fields) -> None:
        work = work_from(fields)
        fp, fetched = fingerprint_from(fields)
        shard = int(fields[b"shard"])
        if not 0 <= shard < self.shards:
            raise ValueError(f"an answer from shard {shard} of {self.shards}")
        records = await asyncio.to_thread(self._store_answer, work, fp, fetched, shard,
                                          fields[b"matches"].decode())
        for rec in records:
            await self.recorder.announce(rec)

    async def run(self, stop: asyncio.Event) -> None:
        await _consume(self.streams, ANSWERS, RECORDERS_GROUP, self.handle, stop, count=16)
