"""The scaled-out fetch worker: ``work`` -> download and fingerprint -> ``fingerprints`` (or the
row closed failed, with its reason).

Fair between image hosts, as the one-process daemon is (monitor/pipeline/transport.py): the rows
read wait in a local queue that hands them out host by host, at most ``per_host`` downloads of
one host at once. A host that answers slowly and lists hundreds of images (a tarpit, an
overloaded CDN) holds that many downloads, not all of them. Once its rows fill its share of the
queue, the next ones read are put back at the stream's end (handled later, by whichever worker
reads them then), so the reads go on to the other hosts' rows: a repost behind a tarpit's
backlog is found at once, not after it (two workers reading the stream in FIFO batches found
it 6.5 s behind 300 one-second images; hours behind a real tarpit's).

Per read batch one look in the store for the images it knows; the fingerprints go out and the
rows are acknowledged in batches as the downloads end (per image, those round trips would cost a
worker more CPU than the image's fingerprint). Rows held here (waiting for their turn, or in
hand) are claimed again by this consumer every quarter of ``claim_idle``, so no other worker
takes them over while this one lives: a download may take ``total_timeout`` (60 s), longer than
``claim_idle`` (30 s). A worker killed leaves them pending, to be claimed by the others.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from monitor.fetch import FetchError
from monitor.fingerprints import ImageError
from monitor.pipeline.transport import InProcessTransport, host_share
from monitor.pipeline.worker import LOOK_UP, Worker
from monitor.records import work as work_rows
from monitor.records.store import DatabaseError
from monitor.records.work import WorkItem
from monitor.scaleout.roles import WORKERS_GROUP, heartbeats
from monitor.scaleout.streams import FINGERPRINTS, WORK, RedisStreams, id_key, with_retry
from monitor.scaleout.wire import fingerprint_fields, work_fields, work_from

log = logging.getLogger("repost_monitor.scaleout")
LINGER = 0.02  # seconds a part batch of finished images waits for more before it is sent
HOLD = 512  # rows a worker may hold waiting (a host's share: half), ~0.3 KB each
PAUSE_MAX = 30.0  # seconds


class FetchRole:
    def __init__(self, worker: Worker, streams: RedisStreams, concurrency: int = 16, per_host: int | None = None):
        self.worker, self.streams, self.concurrency = worker, streams, concurrency
        self.batch = max(1, min(8, concurrency // 4))
        self.queue = InProcessTransport(max(HOLD, 2 * concurrency), host_share(concurrency, per_host))
        worker.transport = self.queue  # a download's end gives its host's slot back before the hashing
        self._held: dict[bytes, WorkItem] = {}       # message id: its row, until acknowledged or let go
        self._queued: dict[int, tuple[bytes, object]] = {}  # id(row): its message id, what the store knew
        self._finished: list[tuple[bytes, WorkItem, tuple | None]] = []  # not yet sent and acknowledged
        self._has_finished = asyncio.Event()
        # The id of the first row put back since the reads last came round to the rows put
        # back: reading past it, they have; then, where nothing read has room, they wait
        self._lap: tuple[int, int] | None = None
        self._put_back_in_lap = False
        self._pause = 1.0

    async def run(self, stop: asyncio.Event) -> None:
        await self.worker.start()
        try:
            await with_retry("group workers", lambda: self.streams.ensure_group(WORK, WORKERS_GROUP), stop)
            downloads_over = asyncio.Event()

            async def downloads():
                try:
                    await asyncio.gather(*(self._download(stop) for _ in range(self.concurrency)))
                finally:
                    downloads_over.set()

            await asyncio.gather(self._read(stop), self._keep_held(stop), downloads(),
                                 self._send_finished(downloads_over),
                                 heartbeats(self.streams, WORK, WORKERS_GROUP, stop))
        finally:
            await self.worker.close()

    async def _read(self, stop: asyncio.Event) -> None:
        """Rows from the stream into the local queue as the downloads want them, ``batch`` ahead,
        read a batch at a time once those are taken (one read and one look in the store per
        batch, not per row); a row whose host has its share waiting already goes back to the
        stream's end."""
        while not stop.is_set():
            wanted = self.queue.wanted()
            if wanted < 0 or self.queue.depth() >= self.queue.size:  # rows enough to start: read a batch later
                await _first(self.queue.moved(), stop, 1.0)
                continue
            count = min(wanted + self.batch, self.queue.size - self.queue.depth())
            batch, claimed = await with_retry(
                "read work", lambda n=count: self.streams.read_claims(WORK, WORKERS_GROUP, n, 1.0), stop) or ([], False)
            rows = [(mid, fields, work) for mid, fields in batch
                    if mid not in self._held and (work := await self._readable(mid, fields, stop)) is not None]
            if rows:
                await self._queue(rows, stop, claimed)

    async def _queue(self, rows: list[tuple[bytes, dict, WorkItem]], stop: asyncio.Event, claimed: bool) -> None:
        """Rows into the local queue, or back to the stream's end past their host's share; not
        rows claimed from a consumer that died (delivered before: their count must go on)."""
        known = await self._known([work for *_, work in rows])
        later = []
        for mid, fields, work in rows:
            if self.queue.offer(work, force=claimed):
                self._held[mid] = work
                self._queued[id(work)] = (mid, known.get(work.image_url, LOOK_UP))
            else:
                later.append((mid, fields))
        lapped = self._lap is not None and any(id_key(mid) >= self._lap for mid, *_ in rows)
        if later:
            added = await with_retry("requeue work", lambda: self.streams.requeue(WORK, WORKERS_GROUP, later),
                                     stop) or []
            self._lap = self._lap or (id_key(added[0]) if added else None)
            self._put_back_in_lap = True
            self.worker.metrics.work_put_back.inc(len(added))
        self.worker.metrics.queue_depth.labels("download").set(self.queue.depth())
        if lapped:  # every row in the stream has been read since the first one put back
            self._lap = None
            if self._put_back_in_lap:
                # A host's backlog past its share goes round the stream: once a lap at most, and
                # the laps further apart while it lasts (other hosts' rows wait up to PAUSE_MAX)
                await _first(stop, stop, self._pause)
                self._pause = min(PAUSE_MAX, self._pause * 2)
            else:
                self._pause = 1.0
            self._put_back_in_lap = False

    async def _readable(self, mid: bytes, fields: dict, stop: asyncio.Event) -> WorkItem | None:
        """The message's row; None (the message dead-lettered at once) where it is not one."""
        try:
            return work_from(fields)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("%s: unreadable message %s (%s)", WORK, mid, exc)
            await with_retry("dead letter", lambda: self.streams.dead_letter(WORK, WORKERS_GROUP, mid, 0), stop)
            return None

    async def _known(self, works: list[WorkItem]) -> dict:
        """What the store knows of these images (fingerprints, failures), in one look; nothing
        (each image looked up on its own) where the store cannot be read now."""
        try:
            return await asyncio.to_thread(work_rows.cached_images, self.worker.store, [w.image_url for w in works])
        except DatabaseError as exc:
            log.warning("%s: the images known could not be read (%s); each is looked up alone", WORK, exc)
            return {}

    async def _download(self, stop: asyncio.Event) -> None:
        while (work := await self.queue.get(stop)) is not None:
            mid, known = self._queued.pop(id(work))
            self.worker.metrics.queue_depth.labels("download").set(self.queue.depth())
            try:
                outcome = await self._message(work, known)
            except Exception as exc:  # noqa: BLE001 - left pending: claimed again later, then dead-lettered
                log.error("%s: work %s (%s) not done (%r); it will be retried", WORK, mid, work.image_url, exc,
                          exc_info=exc if not isinstance(exc, (*DatabaseError, RedisError, OSError)) else None)
                self._held.pop(mid, None)  # let go: another worker claims it after claim_idle
                continue
            finally:
                self.queue.done(work)
            self._finished.append((mid, work, outcome))
            self._has_finished.set()

    async def _message(self, work: WorkItem, known=LOOK_UP) -> tuple[dict, bytes] | None:
        """The image's message for ``fingerprints`` and its keypoint picture (b"": none); None
        where it failed for good (its work row closed with the reason)."""
        try:
            fp, fetched = await self.worker.fingerprint(work, known)
        except (FetchError, ImageError, work_rows.CachedFailure) as exc:
            await self.worker.recorder.record(work, [], None, error=str(exc))
            log.warning("image skipped: %s: %s", work.image_url, exc, extra={"url": work.image_url})
            return None
        return {**work_fields(work), **fingerprint_fields(fp, fetched)}, fp.keypoint_picture

    async def _send_finished(self, downloads_over: asyncio.Event) -> None:
        """The finished images' fingerprints out and their rows acknowledged, a batch at a time,
        until the downloads are over and all are sent."""
        while self._finished or not downloads_over.is_set():
            if not self._finished:
                await _first(self._has_finished.wait(), downloads_over)
                continue
            if len(self._finished) < self.batch and not downloads_over.is_set():
                await asyncio.sleep(LINGER)
            finished, self._finished = self._finished, []
            self._has_finished.clear()
            messages = [(work, *outcome) for _, work, outcome in finished if outcome is not None]
            try:
                await self.streams.add_many(FINGERPRINTS, [fields for _, fields, _ in messages],
                                            {work.id: picture for work, _, picture in messages if picture})
                await self.streams.ack(WORK, WORKERS_GROUP, *(mid for mid, _, _ in finished))
            except (RedisError, OSError) as exc:  # left pending: claimed again later
                log.warning("%s: %d fingerprints not added (%s); their work will be retried", FINGERPRINTS,
                            len(finished), exc)
            finally:
                for mid, _, _ in finished:
                    self._held.pop(mid, None)

    async def _keep_held(self, stop: asyncio.Event) -> None:
        """The rows held here claimed again every quarter of claim_idle: never idle while this
        worker lives."""
        while not await _first(stop, stop, self.streams.claim_idle_ms / 4000):
            try:
                await self.streams.touch(WORK, WORKERS_GROUP, list(self._held))
            except (RedisError, OSError) as exc:
                log.warning("%s: the rows held could not be claimed again (%s)", WORK, exc)


async def _first(waited, stop: asyncio.Event, timeout: float | None = None) -> bool:
    """Wait for the awaitable ``waited`` (or an event), ``stop`` or ``timeout``, whichever
    comes first; whether ``stop`` is set."""
    waits = {asyncio.ensure_future(waited.wait() if isinstance(waited, asyncio.Event) else waited),
             asyncio.ensure_future(stop.wait())}
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    return stop.is_set()
