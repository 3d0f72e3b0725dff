"""The durable alert outbox.

A match and its alerts (one per sink whose filters accept it) are written in
the same SQLite transaction, so an alert exists if and only if its match
does. One sender per sink delivers its pending alerts strictly in order:
exponential backoff with jitter on failure, ``Retry-After`` honoured, and
after ``max_attempts`` the alert is dead-lettered (kept, visible, resendable)
and the sender moves on. An alert is marked delivered only after the sink
said so; a crash in between re-sends it with the same idempotency key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import threading
import time
from dataclasses import dataclass

import aiohttp

from monitor.alerts.sinks import DeliveryError
from monitor.isotime import iso
from monitor.metrics import Metrics
from monitor.records import alerts as alert_rows
from monitor.records.store import DatabaseError, Store

log = logging.getLogger("repost_monitor.alerts")
RETRY_AFTER_MAX = 3600.0  # seconds: the longest Retry-After a sink's receiver is granted
STORE_PAUSE_MAX = 60.0  # seconds: the longest a sink waits for a failing store before reading its queue again


@dataclass(frozen=True)
class SinkRule:
    tiers: frozenset[str] = frozenset()    # empty: every tier
    labels: frozenset[str] = frozenset()   # library labels; empty: all
    sources: frozenset[str] = frozenset()  # feed names; empty: all
    max_attempts: int = 40
    backoff_base: float = 1.0
    backoff_max: float = 15.0

    def accepts(self, tier: str, label: str, source: str) -> bool:
        return ((not self.tiers or tier in self.tiers) and (not self.labels or label in self.labels)
                and (not self.sources or source in self.sources))


def alert_payload(record, key: str) -> dict:
    m, w, e = record.match, record.work, record.entry
    return {
        "idempotency_key": key, "match_id": record.id, "tier": m.tier,
        "distance_bits": m.dhash_distance, "phash_distance_bits": m.phash_distance, "bits": 64,
        "fine_distance_bits": m.fine_distance, "fine_bits": 512,
        "decided_by": m.decided_by, "mirrored": m.mirrored, "keypoint_inliers": m.inliers,
        "library": {"id": e.id, "label": e.label, "source": e.source},
        "repost": {"image_url": w.image_url, "page_url": w.page_url, "source": w.feed,
                   "item_id": w.item_id, "author": w.author, "published": iso(w.published)},
        "detected_at": iso(record.detected_at),
        "lag_seconds": round(record.lag_seconds, 3) if record.lag_seconds is not None else None,
    }


class Outbox:
    def __init__(self, store: Store, sinks: list[tuple[object, SinkRule]], metrics: Metrics, *,
                 flood_max: int = 20, flood_window: float = 600.0, idle_poll: float = 5.0):
        self.store = store
        # An empty queue is read again this often; sooner when this process commits alerts
        # (a sender in another process than the recorders polls at 0.5 s).
        self.idle_poll = idle_poll
        self.sinks = sinks
        self.metrics = metrics
        # Past flood_max alerts for one entry within flood_window seconds, one
        # summary alert replaces the storm until the window has passed.
        self.flood_max = flood_max
        self.flood_window = flood_window
        self._wake = {sink.name: asyncio.Event() for sink, _ in sinks}
        self._loop: asyncio.AbstractEventLoop | None = None  # the senders' (set by run)
        self._gauged: dict[str, float] = {}
        # Alerts held back by flood control in this thread's open transaction, per sink:
        # counted when it commits, as a failed group's posts are recorded again one by one.
        self._held = threading.local()

    # -- producer side: inside the match transaction ---------------------------
    def begin(self) -> None:
        """Before a transaction that enqueues: what a failed one held back is not counted."""
        self._held.sinks = []

    def enqueue(self, conn, record) -> int:
        now = time.time()
        count = 0
        for sink, rule in self.sinks:
            if not rule.accepts(record.match.tier, record.entry.label, record.work.feed):
                continue
            # The random part keeps keys unique across stores and restores of a backup (match
            # ids repeat there); a re-send of this alert reuses the stored key.
            key = f"rm-{record.id}-{sink.name}-{secrets.token_hex(4)}"
            payload = alert_payload(record, key)
            kind = "match"
            # Counted only up to flood_max: the cost per alert stays flat however big the storm
            # (a match and its alerts share a time).
            since = now - self.flood_window
            recent = alert_rows.recent_for_entry(conn, sink.name, record.entry.id, since, self.flood_max)
            if recent >= self.flood_max:
                if alert_rows.flood_summary_queued(conn, sink.name, record.entry.id, since):
                    # the summary for this storm is already queued
                    self._held.__dict__.setdefault("sinks", []).append(sink.name)
                    continue
                payload["flood"] = {"alerts_in_window": recent, "window_seconds": self.flood_window,
                                    "note": "further alerts for this library entry are held back "
                                            "until the window has passed; see the matches API"}
                kind = "flood_summary"
            alert_rows.insert(conn, match_id=record.id, sink=sink.name, payload=payload, key=key, now=now,
                              kind=kind)
            count += 1
        return count

    def committed(self) -> None:
        """Count what flood control held back and wake the senders, after the transaction
        that enqueued committed. Recorders call this from worker threads too; asyncio events
        are set on the senders' loop only."""
        for name in self._held.__dict__.pop("sinks", ()):
            self.metrics.alerts.labels(name, "flood_suppressed").inc()
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if self._loop is not None and here is not self._loop:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody to wake
                self._loop.call_soon_threadsafe(self._wake_senders)
            return
        self._wake_senders()

    def _wake_senders(self) -> None:
        for event in self._wake.values():
            event.set()

    # -- consumer side ---------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        if not self.sinks:
            return
        self._loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as session:
            await asyncio.gather(*(self._send_loop(session, sink, rule, stop)
                                   for sink, rule in self.sinks))

    async def _sleep(self, name: str, seconds: float, stop: asyncio.Event) -> None:
        wake = self._wake[name]
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
        try:
            await asyncio.wait(waiters, timeout=max(0.0, seconds),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        wake.clear()

    async def _update_gauges(self, name: str, force: bool = False) -> None:
        # A GROUP BY over the sink's alerts: at most once a second, not per delivery.
        now = time.monotonic()
        if not force and now - self._gauged.get(name, 0.0) < 1.0:
            return
        self._gauged[name] = now
        counts = await asyncio.to_thread(alert_rows.state_counts, self.store, name)
        for state in ("pending", "delivered", "dead"):
            self.metrics.alerts_in_state.labels(name, state).set(counts.get(state, 0))

    async def _send_loop(self, session, sink, rule: SinkRule, stop: asyncio.Event) -> None:
        """Deliver the sink's queue until ``stop``. A store that fails meanwhile (a full disk, a
        failover) pauses the sink, 1 s doubling to STORE_PAUSE_MAX, and the queue is read again:
        an alert delivered but not marked so is sent again (at least once), none is lost."""
        pause = 1.0
        while not stop.is_set():
            try:
                await self._send_rounds(session, sink, rule, stop)
            except DatabaseError as exc:
                self.metrics.errors.labels("store").inc()
                log.error("sink %s: the store failed (%s); its alerts wait %.0f s (one delivered meanwhile "
                          "may be sent again)", sink.name, exc, pause, extra={"sink": sink.name})
                await self._sleep(sink.name, pause, stop)
                pause = min(STORE_PAUSE_MAX, pause * 2)

    async def _send_rounds(self, session, sink, rule: SinkRule, stop: asyncio.Event) -> None:
        await self._update_gauges(sink.name, force=True)
        batch_size = max(1, getattr(sink, "batch_size", 1))
        while not stop.is_set():
            # The head of this sink's queue; delivered strictly in order. Every store call
            # is off the loop: a round trip, or a wait for a lock another writer holds.
            rows = await asyncio.to_thread(alert_rows.queue_head, self.store, sink.name, max(100, batch_size))
            if not rows:
                await self._update_gauges(sink.name, force=True)
                await self._sleep(sink.name, self.idle_poll, stop)
                continue
            while rows and not stop.is_set():
                wait = rows[0][2] - time.time()
                if wait > 0:
                    await self._sleep(sink.name, wait, stop)
                    break  # re-read: a resend or a newer head may have arrived
                batch = _next_batch(rows, batch_size)
                if not await self._deliver(session, sink, rule, batch):
                    break
                rows = rows[len(batch):]
                await self._update_gauges(sink.name)

    async def _deliver(self, session, sink, rule: SinkRule, batch: list[tuple]) -> bool:
        alerts = [json.loads(payload) | {"alert_id": alert_id}
                  for alert_id, _, _, payload, _ in batch]
        head_id, head_attempts = batch[0][0], batch[0][1]
        start = time.perf_counter()
        try:
            await sink.deliver(session, alerts)
        except DeliveryError as exc:
            await self._failed(sink.name, rule, [row[0] for row in batch], head_attempts + 1, exc)
            return False
        except Exception as exc:  # noqa: BLE001 - a sink bug must not kill the sender
            log.exception("sink %s crashed on alert %d", sink.name, head_id,
                          extra={"sink": sink.name, "alert_id": head_id})
            await self._failed(sink.name, rule, [row[0] for row in batch], head_attempts + 1,
                               DeliveryError(repr(exc)))
            return False
        now = time.time()
        await asyncio.to_thread(alert_rows.mark_delivered, self.store, [row[0] for row in batch], now)
        self.metrics.alerts.labels(sink.name, "delivered").inc(len(batch))
        self.metrics.alert_delivery_seconds.labels(sink.name).observe(time.perf_counter() - start)
        latency = self.metrics.alert_latency_seconds.labels(sink.name)
        for row in batch:
            latency.observe(max(0.0, now - row[4]))
        if len(batch) == 1:
            log.info("alert %d delivered to %s", head_id, sink.name,
                     extra={"alert_id": head_id, "sink": sink.name, "match_id": alerts[0]["match_id"]})
        else:
            log.info("alerts %d..%d (%d) delivered to %s", head_id, batch[-1][0], len(batch), sink.name,
                     extra={"alert_id": head_id, "sink": sink.name})
        return True

    async def _failed(self, name: str, rule: SinkRule, alert_ids: list[int], attempts: int,
                      exc: DeliveryError) -> None:
        # Only the head carries the attempt count; the next try sends it alone
        # (see _next_batch), so one poisoned alert never dead-letters a batch.
        alert_id = alert_ids[0]
        dead = attempts >= rule.max_attempts
        if exc.retry_after is not None:
            # honoured up to RETRY_AFTER_MAX: a receiver's "come back in a year" (a bug, a quota
            # misread) would otherwise stall its sink's whole queue, delivered in order, for a year
            delay = min(exc.retry_after, RETRY_AFTER_MAX)
        else:
            delay = min(rule.backoff_max, rule.backoff_base * 2 ** (attempts - 1))
            delay *= random.uniform(0.5, 1.0)
        await asyncio.to_thread(alert_rows.mark_failed, self.store, alert_id, attempts=attempts, error=str(exc),
                                next_attempt=time.time() + delay, dead=dead)
        self.metrics.alerts.labels(name, "dead" if dead else "failed").inc()
        await self._update_gauges(name, force=dead)
        if dead:
            log.error("alert %d dead-lettered for %s after %d attempts: %s", alert_id, name,
                      attempts, exc, extra={"alert_id": alert_id, "sink": name})
        else:
            log.warning("alert %d to %s failed (attempt %d): %s; retry in %.1fs", alert_id, name,
                        attempts, exc, delay, extra={"alert_id": alert_id, "sink": name})


def _next_batch(rows: list[tuple], batch_size: int) -> list[tuple]:
    """The head alone after a failure, else the head and the fresh alerts behind it.

    Rows are (id, attempts, next_attempt, payload, created_at) in queue order.
    While a sink is down only the head is retried, so a probe is one small
    request; once it succeeds the backlog drains ``batch_size`` at a time.
    """
    if rows[0][1] > 0 or batch_size == 1:
        return rows[:1]
    now = time.time()
    batch = [rows[0]]
    for row in rows[1:batch_size]:
        if row[1] > 0 or row[2] > now:
            break
        batch.append(row)
    return batch
