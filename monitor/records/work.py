"""What the pipeline has seen and still owes: feed checkpoints, items seen, the work
rows (one per feed, item and image URL), and the images fetched (their fingerprints,
or why they failed)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from feeds import FeedItem
from monitor.fingerprints import Fingerprint
from monitor.fingerprints.codec import pack_fine, pack_views, stored_fingerprint, stored_hashes, u64_to_sql
from monitor.records.store import Store, in_chunks

_WORK_COLUMNS = "id, feed, item_id, image_url, page_url, author, published"


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One image of one feed item, written before it is downloaded."""
    id: int
    feed: str
    item_id: str
    image_url: str
    page_url: str | None
    author: str | None
    published: float | None


# -- feeds ----------------------------------------------------------------------------------
def feed_validators(store: Store, feed: str) -> tuple[str | None, str | None]:
    """(ETag, Last-Modified) of the feed's last successful poll, for a conditional GET."""
    rows = store.query("SELECT etag, last_modified FROM feed_state WHERE feed=?", (feed,))
    return rows[0] if rows else (None, None)


def feed_ok(store: Store, feed: str, now: float, etag: str | None, last_modified: str | None) -> None:
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO feed_state (feed, etag, last_modified, last_poll, last_success, "
            "consecutive_failures, last_error) VALUES (?,?,?,?,?,0,NULL) ON CONFLICT (feed) DO "
            "UPDATE SET etag=excluded.etag, last_modified=excluded.last_modified, "
            "last_poll=excluded.last_poll, last_success=excluded.last_success, "
            "consecutive_failures=0, last_error=NULL", (feed, etag, last_modified, now, now))


def feed_failed(store: Store, feed: str, failures: int, error: str, now: float) -> None:
    with store.transaction() as conn:
        conn.execute("INSERT INTO feed_state (feed, last_poll, consecutive_failures, last_error) "
                     "VALUES (?,?,?,?) ON CONFLICT (feed) DO UPDATE SET last_poll=excluded.last_poll, "
                     "consecutive_failures=excluded.consecutive_failures, "
                     "last_error=excluded.last_error", (feed, now, failures, error))


def feed_cursor(store: Store, feed: str) -> str | None:
    """The newest item id a streaming source has recorded (its catch-up starts after it)."""
    rows = store.query("SELECT cursor FROM feed_state WHERE feed=?", (feed,))
    return rows[0][0] if rows else None


def set_feed_cursor(store: Store, feed: str, cursor: str) -> None:
    with store.transaction() as conn:
        conn.execute("INSERT INTO feed_state (feed, cursor) VALUES (?,?) ON CONFLICT (feed) DO UPDATE SET "
                     "cursor=excluded.cursor", (feed, cursor))


# -- work rows ------------------------------------------------------------------------------
RECORD_CHUNK = 200  # items per statement (x 7 values: within SQLite's 32,766 bound parameters)
LISTED_REFRESH = 86400  # seconds: an item listed again has its seen_at moved on at most this often

def record_items(store: Store, feed: str, items: list[FeedItem], now: float) -> tuple[list[WorkItem], int]:
    """Work rows for the items not seen before, in one transaction: (the new rows, how many
    items were new). An item seen before (by id, per feed) adds nothing but the time it was
    last listed."""
    work: list[WorkItem] = []
    new_items = 0
    # Multi-row statements, RECORD_CHUNK items at a time: a poll of hundreds of items is a
    # few statements, not two per item (a round trip each, on PostgreSQL).
    with store.transaction() as conn:
        for start in range(0, len(items), RECORD_CHUNK):
            firsts: dict[str, FeedItem] = {}  # an id twice in one poll: its first item counts
            for item in items[start:start + RECORD_CHUNK]:
                firsts.setdefault(item.id, item)
            chunk = list(firsts.values())
            fresh = {r[0] for r in conn.execute(
                "INSERT OR IGNORE INTO seen_items (feed, item_id, seen_at) VALUES "
                + ",".join(["(?,?,?)"] * len(chunk)) + " RETURNING item_id",
                [v for item in chunk for v in (feed, item.id, now)]).fetchall()}
            new_items += len(fresh)
            # seen_at is when the item was last listed, to within LISTED_REFRESH (one write a
            # day per item a feed keeps listing): retention deletes the items no longer listed
            relisted = [item.id for item in chunk if item.id not in fresh]
            if relisted:  # by key: "+seen_at" keeps SQLite off the (feed, seen_at) index, a range per chunk
                conn.execute("UPDATE seen_items SET seen_at=? WHERE feed=? AND item_id IN ("
                             + ",".join(["?"] * len(relisted)) + ") AND +seen_at < ?",
                             (now, feed, *relisted, now - LISTED_REFRESH))
            rows = [(feed, item.id, url, item.page_url, item.author,
                     item.published.timestamp() if item.published else None, now)
                    for item in chunk if item.id in fresh for url in dict.fromkeys(item.image_urls)]
            if not rows:
                continue
            got = conn.execute(
                "INSERT OR IGNORE INTO work (feed, item_id, image_url, page_url, author, published, "
                "discovered_at) VALUES " + ",".join(["(?,?,?,?,?,?,?)"] * len(rows)) + " RETURNING id, item_id, "
                "image_url", [v for row in rows for v in row]).fetchall()
            ids = {(item_id, url): work_id for work_id, item_id, url in got}
            work += [WorkItem(ids[(item_id, url)], feed, item_id, url, page, author, published)
                     for _, item_id, url, page, author, published, _ in rows if (item_id, url) in ids]
    return work, new_items


ID_CHUNK = 500  # ids per statement that names them (IN (...)): within every engine's bound on parameters


def record_capped(store: Store, feed: str, items: list[FeedItem], now: float,
                  limit: int | None) -> tuple[list[WorkItem], int, int]:
    """:func:`record_items` of at most ``limit`` new items (None: all; the first listed) and every item
    seen before: (the new rows, how many items were new, how many new ones were left out).
    Those left out are not recorded, so the feed's next poll lists them as new again: a feed
    that suddenly lists 50,000 new items (a misconfigured URL, an archive, rotating ids) is
    taken ``limit`` a poll, and nothing it keeps listing is lost."""
    ids = list(dict.fromkeys(item.id for item in items))
    if limit is None or len(ids) <= limit:
        return (*record_items(store, feed, items, now), 0)
    seen: set[str] = set()
    for start in range(0, len(ids), ID_CHUNK):
        chunk = ids[start:start + ID_CHUNK]
        seen.update(r[0] for r in store.query("SELECT item_id FROM seen_items WHERE feed=? AND item_id IN ("
                                              + ",".join(["?"] * len(chunk)) + ")", (feed, *chunk)))
    fresh = [i for i in ids if i not in seen]
    taken = seen | set(fresh[:limit])
    work, new_items = record_items(store, feed, [item for item in items if item.id in taken], now)
    return work, new_items, max(0, len(fresh) - limit)


def pending(store: Store, after: int = 0, upto: int | None = None, limit: int | None = None) -> list[WorkItem]:
    """Work left unfinished by the last run (a stop, a crash, a kill -9), oldest first: ids
    after ``after`` up to ``upto``, ``limit`` at most (None: no bound)."""
    return [WorkItem(*r) for r in store.query(
        f"SELECT {_WORK_COLUMNS} FROM work WHERE state='pending' AND id > ? AND id <= ? ORDER BY id LIMIT ?",
        (after, 2**62 if upto is None else upto, 2**62 if limit is None else limit))]


def last_id(store: Store) -> int:
    """The newest work row's id (0: none yet)."""
    return store.query("SELECT COALESCE(MAX(id), 0) FROM work")[0][0]


def mark_queued(store: Store, work_ids: list[int], now: float) -> None:
    """Scale-out: these rows were added to the work stream now."""
    with store.transaction() as conn:
        for start in range(0, len(work_ids), ID_CHUNK):
            chunk = work_ids[start:start + ID_CHUNK]
            conn.execute("UPDATE work SET queued_at=? WHERE id IN (" + ",".join(["?"] * len(chunk)) + ")",
                         (now, *chunk))


def unqueued(store: Store, discovered_before: float, queued_before: float, limit: int = 10_000) -> list[WorkItem]:
    """Scale-out: pending rows never added to the work stream though discovered before
    ``discovered_before`` (an intake died between storing and queuing them), or added before
    ``queued_before`` and still pending (a Redis that came back without them), oldest first,
    ``limit`` at most. A row still waiting in the stream behind a slow host is neither."""
    return [WorkItem(*r) for r in store.query(
        f"SELECT {_WORK_COLUMNS} FROM work WHERE state='pending' AND ((queued_at IS NULL AND discovered_at < ?) "
        "OR queued_at < ?) ORDER BY id LIMIT ?", (discovered_before, queued_before, limit))]


def first_for_url(store: Store, url: str) -> WorkItem | None:
    rows = store.query(f"SELECT {_WORK_COLUMNS} FROM work WHERE image_url=? ORDER BY id LIMIT 1", (url,))
    return WorkItem(*rows[0]) if rows else None


_CLOSE = "UPDATE work SET state=?, error=?, finished_at=? WHERE id=?"


def close(conn, work_id: int, error: str | None, now: float) -> None:
    """Inside the recording transaction: the row is done, or failed with its reason."""
    conn.execute(_CLOSE, ("failed" if error else "done", error, now, work_id))


def close_many(conn, work_ids: list[int], now: float) -> None:
    """:func:`close` of many rows, done, in one executemany."""
    if work_ids:
        conn.executemany(_CLOSE, [("done", None, now, work_id) for work_id in work_ids])


def counts(store: Store) -> tuple[int, int]:
    """(work rows in all, still pending)."""
    return store.query("SELECT COUNT(*), COUNT(*) FILTER (WHERE state='pending') FROM work")[0]


# -- images ---------------------------------------------------------------------------------
class CachedFailure(Exception):
    """An image URL that failed before for a reason a retry would not change."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


_CACHED_COLUMNS = "url, state, dhash, phash, dhash_mirror, phash_mirror, width, height, degenerate, error, fine, views"


def _cached(row) -> Fingerprint | CachedFailure:
    _, state, d, p, dm, pm, w, h, degenerate, error, fine, views = row
    if state != "ok":
        reason, _, message = (error or "failed: earlier failure").partition(": ")
        return CachedFailure(reason, f"{message} (cached)")
    return stored_fingerprint(d, p, dm, pm, w, h, degenerate, fine, views)


def cached_image(store: Store, url: str) -> Fingerprint | None:
    """The stored fingerprint of an image URL fetched before (by any feed), None if never
    fetched; raises CachedFailure if it failed for good."""
    rows = store.query(f"SELECT {_CACHED_COLUMNS} FROM images WHERE url=?", (url,), plan_each_run=True)
    if not rows:
        return None
    found = _cached(rows[0])
    if isinstance(found, CachedFailure):
        raise found
    return found


def cached_images(store: Store, urls: list[str]) -> dict[str, Fingerprint | CachedFailure]:
    """:func:`cached_image` of many URLs in one query per 500 (a scaled-out fetch worker's
    batch: one round trip to the store, not one per image): only URLs fetched before
    appear, a failure as its CachedFailure (not raised)."""
    out: dict[str, Fingerprint | CachedFailure] = {}
    for marks, chunk in in_chunks(urls):
        for row in store.query(f"SELECT {_CACHED_COLUMNS} FROM images WHERE url IN ({marks})", chunk,
                               plan_each_run=True):
            out[row[0]] = _cached(row)
    return out


_IMAGE_COLUMNS = ("url, state, dhash, phash, dhash_mirror, phash_mirror, width, height, degenerate, error, "
                  "fetched_at, fine, views")
# A URL fetched again replaces its row whole (either engine).
_IMAGE_UPSERT = "ON CONFLICT (url) DO UPDATE SET " + ", ".join(
    f"{c}=excluded.{c}" for c in _IMAGE_COLUMNS.replace(" ", "").split(",")[1:])


def image_failed(store: Store, url: str, error: str, now: float) -> None:
    with store.transaction() as conn:
        conn.execute(f"INSERT INTO images ({_IMAGE_COLUMNS}) VALUES (?,?,NULL,NULL,NULL,NULL,NULL,NULL,NULL,?,?,"
                     f"NULL,NULL) {_IMAGE_UPSERT}", (url, "failed", error, now))


def _image_row(url: str, fp: Fingerprint, now: float) -> tuple:
    return (url, "ok", u64_to_sql(fp.dhash), u64_to_sql(fp.phash), u64_to_sql(fp.dhash_mirror),
            u64_to_sql(fp.phash_mirror), fp.width, fp.height, fp.degenerate, None, now, pack_fine(fp),
            pack_views(fp.views))


_IMAGE_OK = f"INSERT INTO images ({_IMAGE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) {_IMAGE_UPSERT}"


def image_ok(conn, url: str, fp: Fingerprint, now: float) -> None:
    """Inside the recording transaction: a new image's fingerprint, views and fine hashes."""
    conn.execute(_IMAGE_OK, _image_row(url, fp, now))


def images_ok(conn, images: list[tuple[str, Fingerprint]], now: float) -> None:
    """:func:`image_ok` of many (url, fingerprint) in one executemany (PostgreSQL: one
    pipelined round trip, not one per image)."""
    if images:
        conn.executemany(_IMAGE_OK, [_image_row(url, fp, now) for url, fp in images])


RECENT_PAGE = 5000  # images a retroactive match reads at once: a day of a busy feed is millions


def recent_images(store: Store, since: float, after: tuple[float, str] | None = None,
                  limit: int = RECENT_PAGE, near=None, upto: float | None = None
                  ) -> tuple[list[tuple[str, Fingerprint]], tuple | None]:
    """A page of the usable images fetched since ``since`` (retroactive matching), in fetch
    order from past ``after``: ([(url, fingerprint)], the position the next page starts
    after, None past the last), each page its own short read. ``near(owners, dhashes,
    phashes, mirrored, rows)``, where given, picks the rows worth a fingerprint (a bool per
    row) from every dHash they hold, with its pHash (:func:`~monitor.fingerprints.codec.stored_hashes`). ``upto``:
    only those fetched no later (what monitor/search/recent.py does not hold)."""
    where, params = _recent(since, after, upto)
    rows = store.query(f"SELECT {_RECENT_COLUMNS} FROM images WHERE {_USABLE} AND {where} "
                       "ORDER BY fetched_at, url LIMIT ?", (*params, limit))
    if not rows:
        return [], None
    return _near_fingerprints(rows, near), rows[-1][:2]


_RECENT_COLUMNS = "fetched_at, url, dhash, phash, dhash_mirror, phash_mirror, width, height, fine, views"
_USABLE = "state='ok' AND degenerate IS NULL"  # the images retroactive matching reads


def _recent(since: float, after: tuple[float, str] | None, upto: float | None = None) -> tuple[str, list]:
    where, params = "fetched_at > ?", [since]
    if after is not None:  # the index on (fetched_at, url) finds where the page before ended
        where += " AND (fetched_at, url) > (?, ?)"
        params += list(after)
    if upto is not None:
        where += " AND fetched_at <= ?"
        params.append(upto)
    return where, params


def _near_fingerprints(rows: list[tuple], near) -> list[tuple[str, Fingerprint]]:
    if near is not None:
        keep = near(*stored_hashes([(*r[2:6], r[8], r[9]) for r in rows]), len(rows))
        rows = [r for r, k in zip(rows, keep, strict=True) if k]
    return [(r[1], stored_fingerprint(*r[2:8], None, r[8], r[9])) for r in rows]


def recent_hashes(store: Store, since: float, after: tuple[float, str] | None = None, limit: int = RECENT_PAGE):
    """A page of the usable images fetched since ``since``, in fetch order from past
    ``after``, as monitor/search/recent.py holds them: (fetch times, URLs, owners, dHashes, their
    pHashes, mirrored: every dHash they hold, as :func:`~monitor.fingerprints.codec.stored_hashes`),
    and the position the next page starts after; None past the last. Not their fingerprints."""
    where, params = _recent(since, after)
    rows = store.query("SELECT fetched_at, url, dhash, phash, dhash_mirror, phash_mirror, fine IS NOT NULL, views "
                       f"FROM images WHERE {_USABLE} AND {where} ORDER BY fetched_at, url "
                       "LIMIT ?", (*params, limit))
    if not rows:
        return None
    owners, dhashes, phashes, mirrored = stored_hashes([r[2:] for r in rows])
    return (np.array([r[0] for r in rows], np.float64), [r[1] for r in rows], owners, dhashes, phashes, mirrored,
            rows[-1][:2])


def images_fetched_at(store: Store, times: np.ndarray, keys: np.ndarray) -> list[tuple[str, Fingerprint]]:
    """(url, fingerprint) of the usable images fetched at these times (a stored time reads
    back exactly) whose URL's ``hash()`` is among ``keys``: the URLs first, then the rows of
    those picked (a time is a recorded batch's, shared by the images around the one wanted)."""
    wanted, urls = set(keys.tolist()), []
    for marks, values in in_chunks(times.tolist()):
        urls += [url for (url,) in store.query(f"SELECT url FROM images WHERE fetched_at IN ({marks})", values)
                 if hash(url) in wanted]
    found = []
    for marks, values in in_chunks(urls):
        found += _near_fingerprints(store.query(f"SELECT {_RECENT_COLUMNS} FROM images WHERE {_USABLE} AND "
                                                f"url IN ({marks})", values), None)
    return found


def claim_signature(store: Store, signature: str, now: float, keep: float) -> bool:
    """True the first time a request signature is seen within ``keep`` seconds (replay guard)."""
    with store.transaction() as conn:
        conn.execute("DELETE FROM api_nonces WHERE seen_at < ?", (now - keep,))
        cur = conn.execute("INSERT OR IGNORE INTO api_nonces (signature, seen_at) VALUES (?,?)", (signature, now))
        return bool(cur.rowcount)
