"""Scale-out: each shard's answer for an image (its matches and candidates, as JSON) until
every shard has answered and the image is recorded. The answers and the decision to record
are serialised on the image's work row, so with any number of recorders an image is
recorded once, by whichever completes its set (after the keypoint pass, where it needs one)."""

from __future__ import annotations

from monitor.records.store import Store, in_chunks


def hold_works(conn, work_ids: list[int]) -> dict[int, str]:
    """Lock these work rows for this transaction (PostgreSQL: the rows, by one statement per
    500 ids, which reads them in the table's order rather than the batch's; SQLite: the
    transaction already holds the database); their states by id, rows we do not have left
    out."""
    out: dict[int, str] = {}
    for marks, chunk in in_chunks(sorted(work_ids)):
        out.update(conn.execute(f"UPDATE work SET state=state WHERE id IN ({marks}) RETURNING id, state",
                                chunk).fetchall())
    return out


def add(conn, work_id: int, shard: int, matches: str, now: float) -> dict[int, str]:
    """Store one shard's answer (a repeat is ignored); every answer so far, by shard."""
    conn.execute("INSERT OR IGNORE INTO shard_answers (work_id, shard, matches, added_at) VALUES (?,?,?,?)",
                 (work_id, shard, matches, now))
    return dict(conn.execute("SELECT shard, matches FROM shard_answers WHERE work_id=?", (work_id,)).fetchall())


def clear(conn, work_id: int) -> None:
    conn.execute("DELETE FROM shard_answers WHERE work_id=?", (work_id,))


def waiting(store: Store, now: float) -> tuple[int, float]:
    """(images with some shards' answers but not all, seconds the oldest has waited)."""
    count, oldest = store.query("SELECT COUNT(DISTINCT work_id), MIN(added_at) FROM shard_answers")[0]
    return count, (now - oldest) if oldest is not None else 0.0
