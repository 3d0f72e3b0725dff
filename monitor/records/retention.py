"""Old history deleted, so the store does not grow for ever with the feeds: finished work
rows that recorded no match, and the fingerprints of images that no work row names any more,
once older than ``store.history_days``. Matches, their work rows and their alerts are kept,
and so are the items seen (``seen_items``: a feed that lists an old item again adds nothing).
An image URL that a new item names after its fingerprint was deleted is fetched and matched
again (a match it had is not recorded twice: matches are unique per image and entry)."""

from __future__ import annotations

from monitor.records.store import Store

CHUNK = 10_000  # rows looked at per transaction: SQLite's one writer waits for none long


def prune_history(store: Store, before: float, chunk: int | None = None) -> tuple[int, int]:
    """Delete what was finished before ``before`` (epoch seconds): (work rows, images) deleted.
    Work rows are walked by id (their ids follow their discovery), images by fetch time."""
    chunk = chunk or CHUNK
    work = images = 0
    after = 0
    while True:
        with store.transaction() as conn:
            rows = conn.execute("SELECT id, discovered_at FROM work WHERE id > ? ORDER BY id LIMIT ?",
                                (after, chunk)).fetchall()
            if not rows:
                break
            work += conn.execute(
                "DELETE FROM work WHERE id >= ? AND id <= ? AND state <> 'pending' AND finished_at < ? "
                "AND NOT EXISTS (SELECT 1 FROM matches m WHERE m.work_id = work.id)",
                (rows[0][0], rows[-1][0], before)).rowcount
        after = rows[-1][0]
        if rows[-1][1] >= before:  # the rest were discovered later
            break
    position = None
    while True:
        with store.transaction() as conn:
            where, params = "fetched_at < ?", [before]
            if position is not None:
                where += " AND (fetched_at, url) > (?, ?)"
                params += list(position)
            rows = conn.execute(f"SELECT fetched_at, url FROM images WHERE {where} ORDER BY fetched_at, url LIMIT ?",
                                (*params, chunk)).fetchall()
            if not rows:
                break
            images += conn.execute(
                "DELETE FROM images WHERE (fetched_at, url) >= (?, ?) AND (fetched_at, url) <= (?, ?) "
                "AND NOT EXISTS (SELECT 1 FROM work w WHERE w.image_url = images.url)",
                (*rows[0], *rows[-1])).rowcount
        position = tuple(rows[-1])
    return work, images
