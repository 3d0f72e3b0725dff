"""Matches: recorded with the image and its alerts in one transaction, listed for the
API, the review page and the command line."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from monitor.fingerprints import Fingerprint
from monitor.fingerprints.codec import sql_to_u64, u64_to_sql
from monitor.records import work as work_rows
from monitor.records.library import LibraryEntry, entries_by_id
from monitor.records.store import Store
from monitor.records.verdicts import suppression
from monitor.records.work import WorkItem
from monitor.search.matcher import Match


@dataclass(frozen=True, slots=True)
class MatchRecord:
    id: int
    work: WorkItem
    entry: LibraryEntry
    match: Match
    detected_at: float
    suppressed: str | None = None  # allow_list | false_positive: recorded, never alerted

    @property
    def lag_seconds(self) -> float | None:
        return self.detected_at - self.work.published if self.work.published else None


def record_in(conn, work: WorkItem, matches: list[Match], fp: Fingerprint | None,
              entries: dict[int, LibraryEntry], now: float, *, error: str | None = None,
              close_work: bool = True, new_image: bool = False,
              enqueue: Callable[[object, MatchRecord], object] | None = None) -> list[MatchRecord]:
    """In the caller's transaction: a new image's fingerprint, each match (once per image
    URL and entry), the alerts ``enqueue(conn, record)`` queues for it, and the work row
    closed."""
    records = []
    if new_image:
        work_rows.image_ok(conn, work.image_url, fp, now)
    for m in matches:
        entry = entries.get(m.entry_id)
        if entry is None:
            continue  # removed from the library a moment ago
        why = suppression(conn, m.entry_id, fp.dhash, feed=work.feed, author=work.author,
                          page_url=work.page_url, image_url=work.image_url)
        row = conn.execute(
            "INSERT OR IGNORE INTO matches (work_id, image_url, entry_id, tier, dhash_distance, "
            "phash_distance, mirrored, feed, item_id, page_url, author, published, detected_at, "
            "repost_dhash, suppressed, fine_distance, matched_repost_dhash, matched_library_dhash, "
            "keypoint_inliers) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
            (work.id, work.image_url, m.entry_id, m.tier, m.dhash_distance, m.phash_distance,
             int(m.mirrored), work.feed, work.item_id, work.page_url, work.author, work.published, now,
             u64_to_sql(fp.dhash), why, m.fine_distance,
             None if m.query_dhash is None else u64_to_sql(m.query_dhash),
             None if m.library_dhash is None else u64_to_sql(m.library_dhash), m.inliers)).fetchone()
        if row:  # none: the same image URL via another feed, already recorded
            rec = MatchRecord(row[0], work, entry, m, now, why)
            records.append(rec)
            if enqueue is not None and why is None:
                enqueue(conn, rec)
    if close_work:
        work_rows.close(conn, work.id, error, now)
    return records


def record_many(conn, images: list[tuple[WorkItem, list[Match], Fingerprint, dict[int, LibraryEntry], bool]],
                now: float, enqueue: Callable[[object, MatchRecord], object] | None = None) -> list[MatchRecord]:
    """:func:`record_in` of many images (work, matches, fingerprint, entries, whether the
    image is new) in the caller's transaction: the new images' rows and the work rows closed
    in one executemany each, so a scaled-out recorder's batch costs a few round trips, not
    three per image."""
    work_rows.images_ok(conn, [(work.image_url, fp) for work, _, fp, _, new in images if new], now)
    records = []
    for work, matches, fp, entries, _ in images:
        if matches:
            records += record_in(conn, work, matches, fp, entries, now, close_work=False, enqueue=enqueue)
    work_rows.close_many(conn, [work.id for work, *_ in images], now)
    return records


LIST_COLUMNS = ("id", "image_url", "entry_id", "tier", "dhash_distance", "phash_distance", "mirrored", "feed",
                "item_id", "page_url", "author", "published", "detected_at", "verdict", "suppressed",
                "fine_distance", "keypoint_inliers")
FILTERS = ("tier", "feed", "verdict", "entry_id")


def list_matches(store: Store, filters: dict, limit: int, offset: int) -> tuple[list[dict], int]:
    """(matches newest first as dicts of LIST_COLUMNS, the total under ``filters``: a
    subset of FILTERS mapped to the value to equal)."""
    where = [f"{key}=?" for key in FILTERS if key in filters]
    params = [filters[key] for key in FILTERS if key in filters]
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    rows = store.query(f"SELECT {', '.join(LIST_COLUMNS)} FROM matches{clause} ORDER BY id DESC "
                       "LIMIT ? OFFSET ?", (*params, limit, offset))
    total = store.query(f"SELECT COUNT(*) FROM matches{clause}", params)[0][0]
    return [dict(zip(LIST_COLUMNS, r, strict=True)) for r in rows], total


@dataclass(frozen=True, slots=True)
class ReviewRow:
    id: int
    image_url: str
    entry_id: int
    tier: str
    dhash_distance: int
    phash_distance: int
    mirrored: bool
    feed: str
    author: str | None
    verdict: str | None
    suppressed: str | None
    page_url: str | None
    repost_view_dhash: int | None    # the two views that met (None for matches older than that)
    library_view_dhash: int | None
    keypoint_inliers: int | None = None  # a match by the second look


def review_rows(store: Store, limit: int, offset: int) -> list[ReviewRow]:
    rows = store.query("SELECT id, image_url, entry_id, tier, dhash_distance, phash_distance, mirrored, feed, "
                       "author, verdict, suppressed, page_url, matched_repost_dhash, matched_library_dhash, "
                       "keypoint_inliers FROM matches ORDER BY id DESC LIMIT ? OFFSET ?", (limit, offset))
    return [ReviewRow(*r[:6], bool(r[6]), *r[7:12], None if r[12] is None else sql_to_u64(r[12]),
                      None if r[13] is None else sql_to_u64(r[13]), r[14]) for r in rows]


def latest(store: Store, limit: int) -> list[tuple]:
    """(id, detected_at, tier, dhash_distance, image_url, entry_id, feed, verdict, suppressed),
    newest first: the command line's list."""
    return store.query("SELECT id, detected_at, tier, dhash_distance, image_url, entry_id, feed, verdict, "
                       "suppressed FROM matches ORDER BY id DESC LIMIT ?", (limit,))


def records_after(store: Store, after_id: int, limit: int = 500) -> list[MatchRecord]:
    """Matches recorded after ``after_id``, oldest first, as the recorder announced them
    (a process watching another's recording: the scaled-out demo)."""
    rows = store.query("SELECT id, work_id, feed, item_id, image_url, page_url, author, published, entry_id, "
                       "tier, dhash_distance, phash_distance, mirrored, fine_distance, detected_at, suppressed, "
                       "keypoint_inliers FROM matches WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit))
    entries = entries_by_id(store, (r[8] for r in rows))
    return [MatchRecord(r[0], WorkItem(*r[1:8]), entries[r[8]],
                        Match(r[8], r[9], r[10], r[11], bool(r[12]), r[13], inliers=r[16]), r[14], r[15])
            for r in rows if r[8] in entries]
