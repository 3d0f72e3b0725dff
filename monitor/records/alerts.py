"""The alert outbox table: alerts queued in the match's transaction, taken by the
senders in order, marked delivered, retried or dead-lettered."""

from __future__ import annotations

import json
import sqlite3
import time

from monitor.isotime import iso
from monitor.records.store import Store

_RECENT_FOR_ENTRY = ("FROM matches m JOIN alerts a ON a.match_id = m.id AND a.sink = ? "
                     "WHERE m.entry_id = ? AND m.detected_at > ? AND a.created_at > ?")


def recent_for_entry(conn: sqlite3.Connection, sink: str, entry_id: int, since: float, limit: int) -> int:
    """Alerts to ``sink`` for matches of ``entry_id`` since ``since``, counted up to ``limit``
    through the (entry_id, detected_at) index: flat cost however big a storm."""
    window = (sink, entry_id, since, since)
    return conn.execute(f"SELECT COUNT(*) FROM (SELECT 1 {_RECENT_FOR_ENTRY} LIMIT ?) AS recent",
                        (*window, limit)).fetchone()[0]


def flood_summary_queued(conn: sqlite3.Connection, sink: str, entry_id: int, since: float) -> bool:
    return conn.execute(f"SELECT 1 {_RECENT_FOR_ENTRY} AND a.kind = 'flood_summary' LIMIT 1",
                        (sink, entry_id, since, since)).fetchone() is not None


def insert(conn: sqlite3.Connection, *, match_id: int, sink: str, payload: dict, key: str, now: float,
           kind: str) -> None:
    conn.execute("INSERT OR IGNORE INTO alerts (match_id, sink, next_attempt, payload, idempotency_key, "
                 "created_at, kind) VALUES (?,?,?,?,?,?,?)",
                 (match_id, sink, now, json.dumps(payload), key, now, kind))


def state_counts(store: Store, sink: str) -> dict[str, int]:
    return dict(store.query("SELECT state, COUNT(*) FROM alerts WHERE sink=? GROUP BY state", (sink,)))


def queue_head(store: Store, sink: str, limit: int) -> list[tuple]:
    """(id, attempts, next_attempt, payload, created_at) of the sink's pending alerts, in order."""
    return store.query("SELECT id, attempts, next_attempt, payload, created_at FROM alerts "
                       "WHERE sink=? AND state='pending' ORDER BY id LIMIT ?", (sink, limit))


def mark_delivered(store: Store, alert_ids: list[int], now: float) -> None:
    with store.transaction() as conn:
        conn.executemany("UPDATE alerts SET state='delivered', attempts=attempts+1, delivered_at=?, "
                         "last_error=NULL WHERE id=?", [(now, i) for i in alert_ids])


def mark_failed(store: Store, alert_id: int, *, attempts: int, error: str, next_attempt: float,
                dead: bool) -> None:
    with store.transaction() as conn:
        conn.execute("UPDATE alerts SET attempts=?, last_error=?, next_attempt=?, state=? WHERE id=?",
                     (attempts, error[:500], next_attempt, "dead" if dead else "pending", alert_id))


def resend_dead(store: Store, alert_ids: list[int] | None = None) -> int:
    """Put dead alerts back in the queue (all of them, or the given ids)."""
    now = time.time()
    with store.transaction() as conn:
        if alert_ids:
            marks = ",".join("?" * len(alert_ids))
            cur = conn.execute(f"UPDATE alerts SET state='pending', attempts=0, next_attempt=? "
                               f"WHERE state='dead' AND id IN ({marks})", (now, *alert_ids))
        else:
            cur = conn.execute("UPDATE alerts SET state='pending', attempts=0, next_attempt=? "
                               "WHERE state='dead'", (now,))
        return cur.rowcount


def list_alerts(store: Store, state: str | None = None, limit: int = 100) -> list[dict]:
    sql = ("SELECT id, sink, state, attempts, last_error, payload, created_at, delivered_at "
           "FROM alerts")
    params: tuple = ()
    if state:
        sql += " WHERE state=?"
        params = (state,)
    rows = store.query(sql + " ORDER BY id DESC LIMIT ?", (*params, limit))
    return [{"id": r[0], "sink": r[1], "state": r[2], "attempts": r[3], "last_error": r[4],
             "alert": json.loads(r[5]), "created_at": iso(r[6]), "delivered_at": iso(r[7])}
            for r in rows]
