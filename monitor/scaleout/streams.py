"""Redis Streams between the roles: consumer groups, the pending-entries list, XAUTOCLAIM.

Three streams carry the work (names under ``prefix``), a fourth the API's synchronous checks:

- ``work``: work rows, intake -> fetch workers (group ``workers``);
- ``fingerprints``: an image's fingerprint, workers -> every shard (group ``shard-K`` per
  shard: each shard sees every fingerprint; replicas of a shard share its group's load);
- ``answers``: one shard's matches for one image, shards -> recorders (group ``recorders``);
- ``checks``: a fingerprint to match now (``/v1/check``), API -> every shard (group
  ``shard-K``); each shard pushes its answer onto the reply list the request names.

Delivery is at least once: a message is acknowledged after its effect is stored; one held
by a consumer that died is claimed by another after ``claim_idle`` seconds; one delivered
``max_deliveries`` times goes to the ``dead`` stream (with where it came from) and is
acknowledged, so a poison message never stalls the rest. Streams are trimmed below the
oldest entry any group still needs, so Redis memory stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

log = logging.getLogger("repost_monitor.scaleout")

WORK, FINGERPRINTS, ANSWERS, CHECKS, DEAD = "work", "fingerprints", "answers", "checks", "dead"
# A post's keypoint picture is kept beside the fingerprints, under its work row's id, until the
# post is recorded: read by the recorder for the few posts whose answer needs keypoints. The
# expiry bounds what a post never recorded (its row failed for good) leaves behind; one read
# after it has no keypoints at hand (an unsure match is fetched again, as a stored fingerprint's).
PICTURE_SECONDS = 900


def consumer_name() -> str:
    """Unique per process (a replica on another machine, or a restart, is a new consumer)."""
    return f"{socket.gethostname()}-{os.getpid()}-{int(time.time() * 1000) % 100000}"


class CancelSafeRedis(aioredis.Redis):
    """redis.asyncio's client, with a cancel never lost in a command. On Python 3.11,
    ``asyncio.wait_for`` returns the result instead of raising when its task is cancelled in
    the step its inner future completes (CPython gh-86296), and redis-py sends every command
    through one when a socket timeout is set (its default: 5 s): about three in five cancels
    that landed during a command were swallowed, and a role's loop went on after its node was
    cancelled. The cancel is raised here once the command is done, so its connection goes
    back to the pool clean."""

    async def execute_command(self, *args, **options):
        result = await super().execute_command(*args, **options)
        _raise_if_cancelled()
        return result

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> CancelSafePipeline:
        return CancelSafePipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


class CancelSafePipeline(aioredis.client.Pipeline):
    """A pipeline of CancelSafeRedis: its commands are sent in ``execute``."""

    async def execute(self, raise_on_error: bool = True):
        result = await super().execute(raise_on_error)
        _raise_if_cancelled()
        return result


def _raise_if_cancelled() -> None:
    if being_cancelled():
        raise asyncio.CancelledError()


class RedisStreams:
    def __init__(self, url: str, prefix: str = "repost-monitor", *, claim_idle: float = 30.0,
                 max_deliveries: int = 5, dead_max: int = 100_000):
        self.url = url
        self.prefix = prefix
        self.claim_idle_ms = int(claim_idle * 1000)
        self.max_deliveries = max_deliveries
        self.dead_max = dead_max
        self.redis = CancelSafeRedis.from_url(url, socket_connect_timeout=5, health_check_interval=10)
        self.consumer = consumer_name()
        self._claimed_at: dict[tuple[str, str], float] = {}

    def key(self, stream: str) -> str:
        return f"{self.prefix}:{stream}"

    async def close(self) -> None:
        await self.redis.aclose()

    async def ensure_group(self, stream: str, group: str) -> None:
        """The group reads the stream from its start: what was added before it existed too."""
        try:
            await self.redis.xgroup_create(self.key(stream), group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def heartbeat(self, stream: str, group: str, ttl: float = 5.0) -> None:
        """This consumer is alive for ``ttl`` more seconds (Redis 7.0 does not mark a consumer
        that reads an empty stream as seen, so liveness is kept beside the group)."""
        await self.redis.zadd(self.key(f"alive:{stream}:{group}"), {self.consumer: time.time() + ttl})

    async def live_consumers(self, stream: str, group: str) -> int:
        key = self.key(f"alive:{stream}:{group}")
        await self.redis.zremrangebyscore(key, "-inf", time.time())
        return await self.redis.zcard(key)

    async def forget_idle_consumers(self, stream: str, idle: float = 3600.0) -> None:
        """Remove consumers that hold nothing and have not been handed anything for ``idle``
        seconds (processes long gone); one with pending entries stays until they are claimed."""
        key = self.key(stream)
        try:
            groups = await self.redis.xinfo_groups(key)
        except ResponseError:
            return
        for g in groups:
            for c in await self.redis.xinfo_consumers(key, g["name"]):
                if c["pending"] == 0 and c["idle"] > idle * 1000:
                    await self.redis.xgroup_delconsumer(key, g["name"], c["name"])

    async def add(self, stream: str, fields: dict) -> bytes:
        return await self.redis.xadd(self.key(stream), fields)

    async def add_many(self, stream: str, messages: list[dict], pictures: dict[int, bytes] | None = None) -> None:
        """The messages in one round trip; ``pictures`` (keypoint pictures by work id) stored
        first, so whoever reads a message finds its picture."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for work_id, picture in (pictures or {}).items():
                pipe.set(self.picture_key(work_id), picture, ex=PICTURE_SECONDS)
            for fields in messages:
                pipe.xadd(self.key(stream), fields)
            await pipe.execute()

    def picture_key(self, work_id: int) -> str:
        return self.key(f"picture:{work_id}")

    async def pictures(self, work_ids: list[int]) -> dict[int, bytes]:
        """{work id: keypoint picture} of those still kept."""
        if not work_ids:
            return {}
        got = await self.redis.mget([self.picture_key(w) for w in work_ids])
        return {w: bytes(p) for w, p in zip(work_ids, got, strict=True) if p}

    async def drop_pictures(self, work_ids: list[int]) -> None:
        if work_ids:
            await self.redis.unlink(*(self.picture_key(w) for w in work_ids))

    async def read(self, stream: str, group: str, count: int, block: float) -> list[tuple[bytes, dict]]:
        """Messages for this consumer: first those other consumers held too long (claimed),
        then new ones, waiting up to ``block`` seconds (0: not at all)."""
        return (await self.read_claims(stream, group, count, block))[0]

    async def read_claims(self, stream: str, group: str, count: int,
                          block: float) -> tuple[list[tuple[bytes, dict]], bool]:
        """:meth:`read`, and whether the messages were claimed: delivered before, so not to be
        put back at the stream's end (:meth:`requeue`), where their delivery count would start
        again and a message that kills its consumers could outlive ``max_deliveries``."""
        # Claiming is a sweep over the pending list: a few times per claim_idle, not per read.
        last = self._claimed_at.get((stream, group), 0.0)
        if time.monotonic() - last > self.claim_idle_ms / 4000:
            self._claimed_at[(stream, group)] = time.monotonic()
            claimed = await self._claim(stream, group, count)
            if claimed:
                self._claimed_at[(stream, group)] = 0.0  # more may be waiting: look again next read
                return claimed, True
        # No BLOCK for 0: Redis ends a short block only when its event loop next wakes, up to
        # 1/hz (100 ms) later on an idle server, which made a 1 ms look cost ~50 ms a hop.
        got = await self.redis.xreadgroup(group, self.consumer, {self.key(stream): ">"}, count=count,
                                          block=max(1, int(block * 1000)) if block > 0 else None)
        return [(mid, fields) for _, messages in got or [] for mid, fields in messages if fields is not None], False

    async def ack(self, stream: str, group: str, *ids: bytes) -> None:
        if ids:
            await self.redis.xack(self.key(stream), group, *ids)

    async def requeue(self, stream: str, group: str, messages: list[tuple[bytes, dict]]) -> list[bytes]:
        """The messages added again at the stream's end and acknowledged here, in one
        transaction: handled later, by whichever consumer reads them then. Their new ids."""
        if not messages:
            return []
        async with self.redis.pipeline(transaction=True) as pipe:
            for _, fields in messages:
                pipe.xadd(self.key(stream), fields)
            pipe.xack(self.key(stream), group, *(mid for mid, _ in messages))
            return (await pipe.execute())[:-1]

    async def touch(self, stream: str, group: str, ids: list[bytes]) -> None:
        """Messages this consumer still holds (waiting for their turn, or handled slowly) are not
        idle: claimed back by it (their delivery count unchanged), so no other consumer
        takes them over after ``claim_idle``."""
        if ids:
            await self.redis.xclaim(self.key(stream), group, self.consumer, 0, list(ids), justid=True)

    async def _claim(self, stream: str, group: str, count: int) -> list[tuple[bytes, dict]]:
        key = self.key(stream)
        # Too many deliveries: to the dead-letter stream, acknowledged, out of everyone's way.
        stale = await self.redis.xpending_range(key, group, min="-", max="+", count=count * 4,
                                                idle=self.claim_idle_ms)
        for entry in stale:
            if entry["times_delivered"] >= self.max_deliveries:
                await self.dead_letter(stream, group, entry["message_id"], entry["times_delivered"])
        _, messages, _ = await self.redis.xautoclaim(key, group, self.consumer, self.claim_idle_ms,
                                                     start_id="0-0", count=count)
        return [(mid, fields) for mid, fields in messages if fields is not None]

    async def dead_letter(self, stream: str, group: str, message_id: bytes, deliveries: int) -> None:
        rows = await self.redis.xrange(self.key(stream), min=message_id, max=message_id)
        fields = rows[0][1] if rows else {}
        await self.redis.xadd(self.key(DEAD), {**fields, "origin_stream": stream, "origin_group": group,
                                              "origin_id": message_id, "deliveries": str(deliveries),
                                              "dead_at": str(time.time())}, maxlen=self.dead_max)
        await self.redis.xack(self.key(stream), group, message_id)
        log.error("message %s of %s (group %s) delivered %d times: moved to the dead-letter stream",
                  message_id.decode(), stream, group, deliveries)

    async def trim(self, stream: str) -> None:
        """Drop the entries every group of the stream has read and acknowledged."""
        key = self.key(stream)
        try:
            groups = await self.redis.xinfo_groups(key)
        except ResponseError:
            return  # no such stream yet
        if not groups:
            return
        floor = None
        for g in groups:
            pending = await self.redis.xpending(key, g["name"])
            oldest = pending["min"] if pending["pending"] else None
            last = g["last-delivered-id"]
            need = oldest if oldest is not None else _next_id(last)
            floor = need if floor is None or id_key(need) < id_key(floor) else floor
        if floor is not None:
            await self.redis.xtrim(key, minid=floor, approximate=False)

    async def group_stats(self, stream: str) -> list[dict]:
        """Per group: live consumers, pending, lag (entries not yet delivered), oldest pending age."""
        key = self.key(stream)
        try:
            groups = await self.redis.xinfo_groups(key)
        except ResponseError:
            return []
        out = []
        for g in groups:
            oldest_age = 0.0
            if g["pending"]:
                first = await self.redis.xpending_range(key, g["name"], min="-", max="+", count=1)
                oldest_age = first[0]["time_since_delivered"] / 1000 if first else 0.0
            name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
            out.append({"group": name, "consumers": await self.live_consumers(stream, name), "pending": g["pending"],
                        "lag": g.get("lag") or 0, "oldest_pending_seconds": oldest_age})
        return out

    async def length(self, stream: str) -> int:
        return await self.redis.xlen(self.key(stream))

    async def dead(self, count: int = 100) -> list[tuple[bytes, dict]]:
        return await self.redis.xrange(self.key(DEAD), count=count)

    async def replay_dead(self, ids: list[bytes] | None = None) -> int:
        """Put dead letters back on their streams (all, or the given ids); the number replayed."""
        replayed = 0
        for mid, fields in await self.redis.xrange(self.key(DEAD)):
            if ids is not None and mid not in ids:
                continue
            origin = fields.get(b"origin_stream", b"").decode()
            body = {k: v for k, v in fields.items() if not k.startswith((b"origin_", b"deliveries", b"dead_at"))}
            if origin:
                await self.redis.xadd(self.key(origin), body)
                await self.redis.xdel(self.key(DEAD), mid)
                replayed += 1
        return replayed


def id_key(mid) -> tuple[int, int]:
    text = mid.decode() if isinstance(mid, bytes) else mid
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _next_id(mid) -> str:
    ms, seq = id_key(mid)
    return f"{ms}-{seq + 1}"


def being_cancelled() -> bool:
    """Whether the running task is being cancelled, though no CancelledError reached it: a
    library lost the cancel (see CancelSafeRedis) or turned it into an error of its own. A
    loop that retries on errors must not take that for a server away and go on for ever."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def with_retry(what: str, call, stop: asyncio.Event, max_backoff: float = 5.0):
    """Run ``call()`` until it succeeds or ``stop`` is set: Redis away (a restart) is waited
    out with backoff, never a crash of the role."""
    delay = 0.1
    while not stop.is_set():
        try:
            return await call()
        except (RedisError, OSError) as exc:
            if being_cancelled():
                raise asyncio.CancelledError() from exc
            log.warning("%s: Redis unavailable (%s); retrying in %.1fs", what, exc, delay)
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
            delay = min(max_backoff, delay * 2)
    return None
