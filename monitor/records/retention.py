"""Old history deleted, so the store does not grow for ever with the feeds: finished work
rows that recorded no match, and the fingerprints of images that no work row names any more,
once older than ``store.history_days``; and the items seen that their feed has not listed for
as long. Matches, their work rows and their alerts are kept.
An image URL that a new item names after its fingerprint was deleted is fetched and matched
again (a match it had is not recorded twice: matches are unique per image and entry); so is an
item that its feed lists again after so long an absence."""

from __future__ import annotations

from monitor.records.store import Store
from monitor.records.work import LISTED_REFRESH

CHUNK = 10_000  # rows looked at per transaction: SQLite's one writer waits for none long


def claim(store: Store, now: float, every: float) -> bool:
    """Whether this process prunes the history now: the first to ask in each ``every``
    seconds, however many processes share the store (every shard replica's watcher asks);
    the others would only walk the same rows again."""
    with store.transaction() as conn:
        conn.execute("INSERT OR IGNORE INTO store_meta (key, value) VALUES ('history_pruned_at', '0')")
        return conn.execute("UPDATE store_meta SET value=? WHERE key='history_pruned_at' "
                            "AND CAST(value AS DOUBLE PRECISION) <= ?", (repr(now), now - every)).rowcount == 1


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


def prune_seen_items(store: Store, before: float, chunk: int | None = None) -> int:
    """Delete the items seen that their feed last listed before ``before``: how many.
    An item's seen_at moves on when its feed lists it again (within LISTED_REFRESH), so an
    item listed in its feed's newest listing is never older than that listing's newest item
    by more than LISTED_REFRESH: the items of a feed that has not been read since (a daemon
    stopped for a month, a feed that failed) are kept as its last listing had them. Rows
    stored before seen_at meant "last listed" count as listed at that upgrade."""
    chunk = chunk or CHUNK
    rows = store.query("SELECT value FROM store_meta WHERE key='seen_at_listed_since'")
    since = float(rows[0][0]) if rows else 0.0
    deleted = 0
    feed = None
    while True:  # feed by feed, each found by the index (a loose scan): a few feeds, many items
        [(feed,)] = (store.query("SELECT MIN(feed) FROM seen_items") if feed is None else
                     store.query("SELECT MIN(feed) FROM seen_items WHERE feed > ?", (feed,)))
        if feed is None:
            return deleted
        [(newest,)] = store.query("SELECT MAX(seen_at) FROM seen_items WHERE feed=?", (feed,))
        cut = min(before, max(newest, since) - LISTED_REFRESH)
        if cut <= since:
            continue
        while True:
            with store.transaction() as conn:
                gone = conn.execute(
                    "DELETE FROM seen_items WHERE feed=? AND item_id IN (SELECT item_id FROM seen_items "
                    "WHERE feed=? AND seen_at < ? LIMIT ?)", (feed, feed, cut, chunk)).rowcount
            deleted += gone
            if gone < chunk:
                break
