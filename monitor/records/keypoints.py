"""Library entries' keypoints (monitor/fingerprints/keypoints.py): ~9 KB an entry, in a
table of their own, apart from the hashes every index load reads; the matcher reads a
post's few unsure candidates' (monitor/search/detective.py)."""

from __future__ import annotations

from monitor.fingerprints import Fingerprint
from monitor.records.store import in_chunks


def put(conn, entry_id: int, fp: Fingerprint, *, replace: bool = True) -> None:
    """Store an entry's keypoints, inside the caller's transaction (``replace`` False:
    only where the entry has none yet, as for an entry added before keypoints)."""
    if fp.keypoints:
        conn.execute("INSERT INTO entry_keypoints (entry_id, keypoints) VALUES (?, ?) ON CONFLICT (entry_id) DO "
                     + ("UPDATE SET keypoints = excluded.keypoints" if replace else "NOTHING"),
                     (entry_id, fp.keypoints))


def read(store, ids) -> dict[int, bytes]:
    """{id: packed keypoints} of those of these entries that have them."""
    out: dict[int, bytes] = {}
    for marks, chunk in in_chunks(sorted({int(i) for i in ids})):
        out.update((eid, bytes(blob)) for eid, blob in store.query(
            f"SELECT entry_id, keypoints FROM entry_keypoints WHERE entry_id IN ({marks})", chunk))
    return out


def missing(store, indexed: str) -> int:
    """Indexed entries (``indexed``: the SQL condition) with no keypoints stored: added by a
    version before them, or imported as hashes; the second look skips them."""
    return store.query(f"SELECT COUNT(*) FROM library_entries e WHERE {indexed} AND NOT EXISTS "
                       "(SELECT 1 FROM entry_keypoints k WHERE k.entry_id = e.id)")[0][0]
