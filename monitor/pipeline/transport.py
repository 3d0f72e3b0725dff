"""How work moves between the stages. In one process: a bounded asyncio queue. The
scale-out issue puts Redis Streams behind the same two calls."""

from __future__ import annotations

import asyncio
from typing import Protocol

from monitor.records.work import WorkItem


class MatchUnavailable(RuntimeError):
    """A synchronous match could not be answered now (a scaled-out shard with no live replica)."""


class Transport(Protocol):
    """Work rows from intake to the workers, in order, with back-pressure."""

    async def put(self, work: WorkItem) -> None: ...

    async def get(self, stop: asyncio.Event) -> WorkItem | None:
        """The next work row, or None once ``stop`` is set."""

    def done(self, work: WorkItem) -> None:
        """The row is finished (recorded done or failed)."""

    def depth(self) -> int: ...


class InProcessTransport:
    """A bounded queue: a burst of items waits in the watchers (and the store), not in memory."""

    def __init__(self, size: int = 1000):
        self.size = size
        self._queue: asyncio.Queue[WorkItem] = asyncio.Queue(size)

    async def put(self, work: WorkItem) -> None:
        await self._queue.put(work)

    async def get(self, stop: asyncio.Event) -> WorkItem | None:
        if stop.is_set():
            return None
        if not self._queue.empty():  # under load, nearly always: no tasks made and waited on
            return self._queue.get_nowait()
        get = asyncio.ensure_future(self._queue.get())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            done, _ = await asyncio.wait({get, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this waiter is cancelled (a row taken then is resumed from the store)
            stopping.cancel()
            get.cancel()
        return get.result() if get in done else None

    def done(self, work: WorkItem) -> None:
        self._queue.task_done()

    def depth(self) -> int:
        return self._queue.qsize()
