"""Blocking store calls from async code, grouped: the calls made while a group runs wait, and
go together in the next group, in one thread hop (and, for the recorder, one transaction).

A store call runs off the event loop (a lock another writer holds, a round trip), but a
thread hop per post cost the one-process daemon about 0.9 ms of CPU per post in hand-offs
between threads (bench/scaleout.py: 323 -> 262 posts/s). Grouped, an idle daemon still
sends each post at once, and a busy one sends fewer, larger groups as the load grows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Grouped(Generic[T, R]):
    """``await grouped(item)``: ``run_many(items)`` in a thread, with every item asked for
    meanwhile; it returns a result or an exception per item, in order (an exception it
    raises goes to every item of its group)."""

    def __init__(self, run_many: Callable[[list[T]], list[R | BaseException]]):
        self._run_many = run_many
        self._waiting: list[tuple[T, asyncio.Future]] = []
        self._running: asyncio.Task | None = None

    async def __call__(self, item: T) -> R:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._running is None:
            self._running = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        group: list[tuple[T, asyncio.Future]] = []
        try:
            while self._waiting:
                group, self._waiting = self._waiting, []
                try:
                    results = await asyncio.to_thread(self._run_many, [item for item, _ in group])
                except Exception as exc:  # noqa: BLE001 - handed to each caller of the group
                    results = [exc] * len(group)
                for (_, future), result in zip(group, results, strict=True):
                    if future.done():  # its caller was cancelled; the call was made all the same
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
                group = []
        finally:
            self._running = None
            for _, future in group + self._waiting:  # cancelled (the loop is closing): nobody waits forever
                future.cancel()
            self._waiting = []
