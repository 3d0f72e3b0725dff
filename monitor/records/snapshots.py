"""Packed index snapshots, one per shard split (shards, shard); (1, 0) is the whole library.
A start loads its snapshot (a million entries in a fraction of a second) instead of
reading every row. SQLite uses one only at the library version it was taken at;
PostgreSQL one at any age, replaying the change log after its ``change_id``."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from monitor.records.store import Store
from monitor.search.index import LibraryIndex


class Snapshot(NamedTuple):
    ids: np.ndarray     # int64
    dhash: np.ndarray   # uint64
    phash: np.ndarray
    fine: np.ndarray
    change_id: int | None


def load(store: Store, shard: tuple[int, int], *, version: int | None = None) -> Snapshot | None:
    """The shard's snapshot: at ``version``, or (None) any with a change-log checkpoint."""
    k, shards = shard
    where = "version=?" if version is not None else "change_id IS NOT NULL"
    rows = store.query(f"SELECT ids, dhash, phash, fine, change_id FROM index_snapshots WHERE shards=? AND shard=? "
                       f"AND {where}", (shards, k) + ((version,) if version is not None else ()))
    if not rows:
        return None
    ids, d, p, fine = (np.frombuffer(b, dtype="<u8") for b in rows[0][:4])
    return Snapshot(ids.view(np.int64), d, p, fine, rows[0][4])


def save(store: Store, shard: tuple[int, int], index: LibraryIndex, version: int, change_id: int | None,
         *, only_if_current: bool = False) -> None:
    """``only_if_current``: not if the library changed since ``version`` was read (the rows
    read may be of either side of the change: the next start reads them again)."""
    k, shards = shard
    with store.transaction() as conn:
        if only_if_current and conn.execute("SELECT value FROM library_meta WHERE key='version'").fetchone()[0] \
                != version:
            return
        conn.execute("INSERT INTO index_snapshots (shards, shard, version, ids, dhash, phash, fine, change_id) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (shards, shard) DO UPDATE SET "
                     "version=excluded.version, ids=excluded.ids, dhash=excluded.dhash, "
                     "phash=excluded.phash, fine=excluded.fine, change_id=excluded.change_id",
                     (shards, k, version, index.ids.astype("<i8").tobytes(),
                      index.hashes("dhash").astype("<u8").tobytes(),
                      index.hashes("phash").astype("<u8").tobytes(),
                      index.fine().astype("<u8").tobytes(), change_id))
