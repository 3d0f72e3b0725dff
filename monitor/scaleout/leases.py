"""Leases in Redis: one live holder of a thing at a time (a feed's watcher, an alert sink's
sender), handed over within seconds when the holder dies (the key expires)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

log = logging.getLogger("repost_monitor.scaleout")

_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

LEASE_SECONDS = 5.0  # a dead holder's lease is free this long after its last renewal


async def hold(redis, key: str, holder: str, work: Callable[[], Awaitable[None]], stop: asyncio.Event,
               ttl: float = LEASE_SECONDS, held=None) -> None:
    """Run ``work()`` whenever this process holds ``key``: try to take it every ttl/3 s, renew
    it as often while working, and cancel the work the moment it is lost. ``held``: a gauge
    set to 1 while it is held, 0 while not."""
    ms = str(int(ttl * 1000))
    if held is not None:
        held.set(0)
    while not stop.is_set():
        try:
            got = await redis.set(key, holder, nx=True, px=int(ms))
        except (RedisError, OSError):
            got = False
        if got:
            log.info("lease %s taken", key)
            if held is not None:
                held.set(1)
            task = asyncio.create_task(work(), name=f"lease:{key}")
            try:
                while not stop.is_set() and not task.done():
                    try:
                        # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancel
                        # that lands as the work ends (CPython gh-86296)
                        async with asyncio.timeout(ttl / 3):
                            await asyncio.shield(task)
                    except TimeoutError:
                        pass
                    except asyncio.CancelledError:
                        # the work was cancelled, not this holder (when both are, as on a
                        # shutdown that cancels every task, the holder ends: no new lease)
                        if task.cancelled() and not stop.is_set() and not asyncio.current_task().cancelling():
                            break
                        raise
                    except Exception as exc:  # noqa: BLE001 - the work failed (a server away): taken up again
                        log.warning("lease %s: its work failed (%s); starting it again", key, exc)
                    if task.done():
                        break
                    try:
                        kept = await redis.eval(_RENEW, 1, key, holder, ms)
                    except (RedisError, OSError):
                        kept = 0  # cannot prove we still hold it: stop working
                    if not kept:
                        log.warning("lease %s lost; its work stops here", key)
                        break
            finally:
                if held is not None:
                    held.set(0)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                with contextlib.suppress(RedisError, OSError):
                    await redis.eval(_RELEASE, 1, key, holder)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), ttl / 3)
