"""Rows whose processing failed because the store did, put back on the queue after a pause.

A full disk, a PostgreSQL failover or a lock held past the busy timeout fails every image being
recorded at that moment. Their rows stay pending in the store, so the next start would resume
them; a long-running daemon would not, and every repost seen while the store was away went
unrecorded until then. Here each such row goes back on the queue after a pause (FIRST seconds,
doubling to LONGEST while the store keeps failing, back to FIRST once a row is recorded), at
most TRIES times (an error that is no outage, a bug, must not cycle forever: the row then waits
for the next start, as before).
"""

from __future__ import annotations

import asyncio
import logging

from monitor.metrics import Metrics
from monitor.pipeline.transport import Transport
from monitor.records.work import WorkItem

log = logging.getLogger("repost_monitor.pipeline")

FIRST, LONGEST = 5.0, 300.0  # seconds
TRIES = 20                   # ~1.5 h of pauses at most


class StoreRetries:
    def __init__(self, transport: Transport, metrics: Metrics):
        self.transport, self.metrics = transport, metrics
        self.pause = FIRST
        self._waiting: list[WorkItem] = []
        self._tries: dict[int, int] = {}  # work id: store failures so far
        self._task: asyncio.Task | None = None

    def failed(self, work: WorkItem, exc: Exception) -> None:
        """``work`` failed because the store did: put back on the queue after the pause."""
        self.metrics.errors.labels("store").inc()
        tries = self._tries[work.id] = self._tries.get(work.id, 0) + 1
        if tries > TRIES:
            self._tries.pop(work.id)
            log.error("work %d (%s): the store failed %d times; left pending until the next start (%s)",
                      work.id, work.image_url, TRIES, exc)
            return
        log.error("work %d (%s): the store failed (%s); tried again in %.0f s", work.id, work.image_url, exc,
                  self.pause, extra={"feed": work.feed, "url": work.image_url})
        self._waiting.append(work)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._put_back(), name="store-retries")

    def recorded(self, work: WorkItem) -> None:
        """``work`` was recorded: the store works."""
        self.pause = FIRST
        self._tries.pop(work.id, None)

    async def _put_back(self) -> None:
        while self._waiting:
            await asyncio.sleep(self.pause)
            self.pause = min(LONGEST, self.pause * 2)
            rows, self._waiting = self._waiting, []
            for work in rows:
                await self.transport.put(work)

    def close(self) -> None:
        """The rows still waiting stay pending in the store, resumed at the next start."""
        if self._task is not None:
            self._task.cancel()
