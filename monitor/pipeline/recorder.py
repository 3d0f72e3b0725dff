"""Stage 4, records: an image's fingerprint, its matches and their alerts, and the work
row closed, in one transaction; then each new match announced (metrics, log, callback)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from monitor.fingerprints import Fingerprint
from monitor.metrics import Metrics
from monitor.pipeline.grouped import Grouped
from monitor.records import matches as match_rows
from monitor.records.library import Library
from monitor.records.matches import MatchRecord
from monitor.records.store import Store, StoreUnavailable
from monitor.records.work import WorkItem
from monitor.search.matcher import Match

log = logging.getLogger("repost_monitor.pipeline")

OnMatch = Callable[[MatchRecord], Awaitable[None] | None]


class Recorder:
    def __init__(self, store: Store, library: Library, metrics: Metrics, *, outbox=None,
                 on_match: OnMatch | None = None):
        self.store, self.library, self.metrics = store, library, metrics
        self.outbox = outbox  # alerts.outbox.Outbox: alerts join the match transaction
        self.on_match = on_match
        self._grouped = Grouped(self._finish_group)

    def finish(self, work: WorkItem, matches: list[Match], fp: Fingerprint | None = None,
               error: str | None = None, close_work: bool = True, new_image: bool = False) -> list[MatchRecord]:
        """Record a new image's fingerprint, the matches, their alerts, and close the
        work row: one transaction."""
        return self._finish_together([(work, matches, fp, error, close_work, new_image)])[0]

    async def record(self, work: WorkItem, matches: list[Match], fp: Fingerprint | None = None,
                     error: str | None = None, close_work: bool = True,
                     new_image: bool = False) -> list[MatchRecord]:
        """:meth:`finish` off the event loop, with the other posts that finish meanwhile: one
        thread hop and one transaction for them all (monitor/pipeline/grouped.py)."""
        return await self._grouped((work, matches, fp, error, close_work, new_image))

    def _finish_together(self, group: list[tuple]) -> list[list[MatchRecord]]:
        """:meth:`finish` of each (work, matches, fp, error, close_work, new_image), in one
        transaction."""
        now = time.time()
        ids = {m.entry_id for _, matches, *_ in group for m in matches}
        entries = self.library.entries_by_id(ids) if ids else {}
        enqueue = None
        if self.outbox is not None:
            self.outbox.begin()
            enqueue = self.outbox.enqueue
        with self.store.transaction() as conn:
            out = [match_rows.record_in(conn, work, matches, fp, entries, now, error=error, close_work=close,
                                        new_image=new_image, enqueue=enqueue)
                   for work, matches, fp, error, close, new_image in group]
        if any(out) and self.outbox is not None:
            self.outbox.committed()
        return out

    def _finish_group(self, group: list[tuple]) -> list:
        try:
            return self._finish_together(group)
        except StoreUnavailable as exc:  # locked past its timeout, or away: every post alike
            return [exc] * len(group)
        except Exception as exc:  # noqa: BLE001 - each alone, where one bad post fails only itself
            if len(group) == 1:
                return [exc]
        out = []
        for args in group:
            try:
                out.append(self.finish(*args))
            except Exception as exc:  # noqa: BLE001 - handed to that post's caller
                out.append(exc)
        return out

    async def announce(self, rec: MatchRecord) -> None:
        """Metrics, the log line and the on_match callback of a new match."""
        ctx = {"feed": rec.work.feed, "item_id": rec.work.item_id, "url": rec.work.image_url,
               "work_id": rec.work.id}
        self.metrics.matches.labels(rec.match.tier).inc()
        if rec.lag_seconds is not None:
            self.metrics.detection_lag.observe(max(0.0, rec.lag_seconds))
        log.info("match %s: %s dist=%d/64 -> library %d (%s)%s", rec.id, rec.match.tier,
                 rec.match.dhash_distance, rec.entry.id, rec.entry.label,
                 f", no alert ({rec.suppressed})" if rec.suppressed else "",
                 extra={**ctx, "match_id": rec.id, "entry_id": rec.entry.id, "tier": rec.match.tier})
        if self.on_match is not None:
            result = self.on_match(rec)
            if asyncio.iscoroutine(result):
                await result
