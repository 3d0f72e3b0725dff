"""How work moves between the stages. In one process: a bounded asyncio queue. The
scale-out issue puts Redis Streams behind the same two calls."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol
from urllib.parse import urlsplit

from monitor.records.work import WorkItem


class MatchUnavailable(RuntimeError):
    """A synchronous match could not be answered now (a scaled-out shard with no live replica)."""


class Transport(Protocol):
    """Work rows from intake to the workers, in order, with back-pressure."""

    async def put(self, work: WorkItem) -> None: ...

    async def get(self, stop: asyncio.Event) -> WorkItem | None:
        """The next work row, or None once ``stop`` is set."""

    def downloaded(self, work: WorkItem) -> None:
        """The row's download ended: another of its host's may start."""

    def done(self, work: WorkItem) -> None:
        """The row is finished (recorded done or failed)."""

    def depth(self) -> int: ...


class InProcessTransport:
    """A bounded queue, fair between image hosts: rows are handed out host by host in turn, a
    host has at most ``per_host`` downloads in flight and half of ``size`` rows waiting. A host
    that answers slowly (a tarpit, an overloaded CDN) and lists hundreds of images holds that
    many workers, not all of them, and a repost on another host is taken at once rather than
    after the slow host's backlog (one FIFO queue: 10.8 s behind 200 one-second images, hours
    behind a real tarpit's). A row counts against its host until its download ends (its
    decode and match need no host), so a fast host keeps every worker busy. A burst waits in
    the watchers (and the store), not in memory."""

    def __init__(self, size: int = 1000, per_host: int | None = None):
        self.size = size
        self.per_host = per_host or size
        self.host_size = max(1, size // 2)
        self._waiting: dict[str, deque[WorkItem]] = {}  # host: its rows not handed out, oldest first
        self._turns: deque[str] = deque()                # hosts with rows waiting, in turn
        self._fetching: dict[str, int] = {}              # host: its rows handed out, download not ended
        self._counted: dict[int, str] = {}               # id(row): its host, while it counts there
        self._count = 0
        self._startable_idle = 0  # sum over hosts of min(rows waiting, per_host): see wanted()
        self._getters: deque[asyncio.Future] = deque()   # workers waiting for a row, first first
        self._room = asyncio.Event()                     # a row was handed out: room for a put
        self._moved = asyncio.Event()                    # a row was handed out, or a worker found none

    async def put(self, work: WorkItem) -> None:
        while not self.offer(work):
            await self.room()

    def offer(self, work: WorkItem, force: bool = False) -> bool:
        """Queue the row if there is room for it (in all, and beside its host's rows waiting);
        False, and nothing queued, where there is not. ``force``: queued all the same."""
        host = _host(work)
        if not force and (self._count >= self.size or len(self._waiting.get(host, ())) >= self.host_size):
            return False
        if host not in self._waiting:
            self._waiting[host] = deque()
            self._turns.append(host)
        self._startable_idle += len(self._waiting[host]) < self.per_host
        self._waiting[host].append(work)
        self._count += 1
        self._wake_one()
        return True

    async def get(self, stop: asyncio.Event) -> WorkItem | None:
        stopping = None
        try:
            while not stop.is_set():
                work = self._take()
                if work is not None:  # under load, nearly always: no future made and waited on
                    return work
                waiter = asyncio.get_running_loop().create_future()
                self._getters.append(waiter)
                self._moved.set()
                stopping = stopping or asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait({waiter, stopping}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not waiter.done():
                        waiter.cancel()
                        self._getters.remove(waiter)
            return None
        finally:  # also when this worker is cancelled
            if stopping is not None:
                stopping.cancel()

    def _wake_one(self) -> None:
        while self._getters:
            waiter = self._getters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _take(self) -> WorkItem | None:
        """The oldest row of the first host in turn with a download to spare, that host then
        last in turn; None when no host has both."""
        for _ in range(len(self._turns)):
            host = self._turns[0]
            self._turns.rotate(-1)
            if self._fetching.get(host, 0) >= self.per_host:
                continue
            rows = self._waiting[host]
            self._startable_idle -= len(rows) <= self.per_host
            work = rows.popleft()
            if not rows:
                del self._waiting[host]
                self._turns.remove(host)
            if id(work) not in self._counted:  # one row put twice counts once: a count never leaks
                self._fetching[host] = self._fetching.get(host, 0) + 1
                self._counted[id(work)] = host
            self._count -= 1
            self._room.set()
            self._moved.set()
            if self._count:
                self._wake_one()  # another row may suit another worker
            return work
        return None

    def downloaded(self, work: WorkItem) -> None:
        """The row's download ended (or it needed none): its host may start another."""
        host = self._counted.pop(id(work), None)
        if host is None:
            return
        left = self._fetching[host] - 1
        if left:
            self._fetching[host] = left
        else:
            del self._fetching[host]
        if self._count:
            self._wake_one()  # a host at its limit may have a download to spare again

    def done(self, work: WorkItem) -> None:
        self.downloaded(work)

    def depth(self) -> int:
        return self._count

    def wanted(self) -> int:
        """How many more rows the workers could start now: those waiting for one, less the
        rows waiting whose host has a download to spare (a reader of a shared stream takes
        no more than that, so the other readers get the rest)."""
        idle = sum(1 for waiter in self._getters if not waiter.done())
        # Kept as if no host had a download in hand, then corrected for the few that have (at
        # most one per worker): not a sum over every host waiting, at each row handed out
        startable = self._startable_idle
        for host, fetching in self._fetching.items():
            rows = len(self._waiting.get(host, ()))
            startable -= min(rows, self.per_host) - min(rows, self.per_host - fetching)
        return idle - startable

    async def moved(self) -> None:
        """Return when a row is next handed out, or a worker next finds none it can take (what
        :meth:`wanted` says may have changed)."""
        self._moved.clear()
        await self._moved.wait()

    async def room(self) -> None:
        """Return when the next row is handed out (there may be room then)."""
        self._room.clear()
        await self._room.wait()


def host_share(workers: int, per_host: int | None = None) -> int:
    """Downloads of one host at once: ``per_host`` where set (``limits.per_host_workers``),
    else half of the workers, so a slow host holds at most that many."""
    return per_host or max(1, workers // 2)


def _host(work: WorkItem) -> str:
    try:
        return urlsplit(work.image_url).hostname or ""
    except ValueError:
        return ""
