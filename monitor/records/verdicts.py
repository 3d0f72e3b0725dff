"""Noise control: licensed use (allow-lists) and false-positive verdicts.

A suppressed match is still recorded (it is visible in the API with the
reason) but raises no alert. Flood control lives in the outbox, where the
alerts are counted.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

from monitor.fingerprints.codec import u64_to_sql

VERDICTS = ("confirmed", "false_positive", "authorized")
ALLOWANCE_KINDS = ("domain", "author", "source")


def _domain_matches(host: str, domain: str) -> bool:
    host, domain = host.lower().rstrip("."), domain.lower().lstrip(".").rstrip(".")
    return host == domain or host.endswith("." + domain)


def suppression(conn, entry_id: int, repost_dhash: int, *, feed: str, author: str | None,
                page_url: str | None, image_url: str) -> str | None:
    """Why this (repost, entry) pair must not alert, or None."""
    if conn.execute("SELECT 1 FROM suppressions WHERE repost_dhash=? AND entry_id=?",
                    (u64_to_sql(repost_dhash), entry_id)).fetchone():
        return "false_positive"
    rules = conn.execute("SELECT kind, value FROM allowances WHERE entry_id=?", (entry_id,)).fetchall()
    hosts = {urlsplit(u).hostname or "" for u in (page_url, image_url) if u}
    for kind, value in rules:
        if kind == "source" and feed == value:
            return "allow_list"
        if kind == "author" and author and author.lower() == value.lower():
            return "allow_list"
        if kind == "domain" and any(_domain_matches(h, value) for h in hosts if h):
            return "allow_list"
    return None


def set_verdict(store, match_id: int, verdict: str) -> bool:
    """Record a reviewer's verdict; false_positive also suppresses the pair."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}")
    now = time.time()
    with store.transaction() as conn:
        row = conn.execute("SELECT repost_dhash, entry_id FROM matches WHERE id=?",
                           (match_id,)).fetchone()
        if row is None:
            return False
        conn.execute("UPDATE matches SET verdict=?, verdict_at=? WHERE id=?", (verdict, now, match_id))
        if verdict == "false_positive" and row[0] is not None:
            conn.execute("INSERT OR IGNORE INTO suppressions (repost_dhash, entry_id, created_at) VALUES (?,?,?)",
                         (row[0], row[1], now))
    return True


def set_allowances(store, entry_id: int, kind: str, values: list[str]) -> None:
    if kind not in ALLOWANCE_KINDS:
        raise ValueError(f"allowance kind must be one of {', '.join(ALLOWANCE_KINDS)}")
    with store.transaction() as conn:
        conn.executemany("INSERT OR IGNORE INTO allowances (entry_id, kind, value) VALUES (?,?,?)",
                         [(entry_id, kind, v.strip()) for v in values if v.strip()])


def allowances(store, entry_id: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {k: [] for k in ALLOWANCE_KINDS}
    for kind, value in store.query("SELECT kind, value FROM allowances WHERE entry_id=? "
                                   "ORDER BY kind, value", (entry_id,)):
        out[kind].append(value)
    return out
