"""The index's rows as the library reads them, and packed index snapshots, one per shard
split (shards, shard); (1, 0) is the whole library. A start loads its snapshot (a million
entries in a fraction of a second) instead of reading every row, then replays the change
log after its ``change_id`` (monitor/records/changes.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from monitor.fingerprints.codec import VIEW_WORDS
from monitor.fingerprints.fasthash import FINE_WORDS
from monitor.records.store import Store
from monitor.search.core_rows import CORE_POSITIONS
from monitor.search.index import HASH_FIELDS, LibraryIndex


class Snapshot(NamedTuple):
    ids: np.ndarray     # int64
    dhash: np.ndarray   # uint64
    phash: np.ndarray
    core: np.ndarray    # bool per row: an entry's core row (monitor/search/core_rows.py), the first rows
    change_id: int
    taken: int          # the library version it was taken at: its parts' mark


class SnapshotChanged(Exception):
    """Another start stored a new snapshot while this one was read: the rows are read instead."""


# Rows a snapshot's stored row holds: its fine hashes 256 MB, far below the 1 GB either engine
# allows in one value (a whole library's past ~15M rows, ~1.5M pictures, was refused: "string
# or blob too big"); a part's fine hashes are read from the index's file alone when saved.
PART_ROWS = 1 << 22


def load(store: Store, shard: tuple[int, int]) -> Snapshot | None:
    """The shard's snapshot (one with a change-log checkpoint), without its fine hashes
    (:func:`fine_parts` reads them after). Its parts are read one at a time into arrays made
    for the whole (held all at once, then joined, a 20M-row snapshot took 3.6 GB to read)."""
    k, shards = shard
    where = "shards=? AND shard=? AND change_id IS NOT NULL"
    (count, size, fewest, most, taken, last, checkpoint, latest), = store.query(
        "SELECT count(*), sum(length(ids)), min(parts), max(parts), min(version), max(version), min(change_id), "
        f"max(change_id) FROM index_snapshots WHERE {where}", (shards, k))
    if not count or not count == fewest == most or taken != last or checkpoint != latest:
        return None  # none, or not whole (saved in one transaction, so never expected)
    n = size // 8
    ids, dhash, phash, core, at = np.empty(n, np.int64), np.empty(n, np.uint64), np.empty(n, np.uint64), \
        np.empty(n, bool), 0
    for expected, [(part, taken_at, *blobs)] in enumerate(store.batches(
            f"SELECT part, version, ids, dhash, phash, core FROM index_snapshots WHERE {where} ORDER BY part",
            (shards, k), 1)):
        rows = len(blobs[0]) // 8
        if part != expected or taken_at != taken or at + rows > n:
            return None  # another start saved a new one meanwhile: the rows are read instead
        for array, blob in ((ids, blobs[0]), (dhash, blobs[1]), (phash, blobs[2])):
            array[at:at + rows] = np.frombuffer(blob, "<u8").view(array.dtype)
        core[at:at + rows] = np.unpackbits(np.frombuffer(blobs[3], np.uint8), count=rows).astype(bool)
        at += rows
    first_other = int(core.argmin()) if not core.all() else n
    if at != n or core[first_other:].any():
        return None  # (an index stores its core rows first, and so saves them)
    return Snapshot(ids, dhash, phash, core, checkpoint, taken)


def fine_parts(store: Store, shard: tuple[int, int], snap: Snapshot) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, (rows, FINE_WORDS) fine hashes) of each part of ``snap``, one part held at
    a time (the index writes them to its file: read whole, they were half a start's peak,
    1.3 GB at 20M rows). SnapshotChanged where another start replaced it meanwhile."""
    k, shards = shard
    at = 0
    for expected, [(part, taken_at, ids, blob)] in enumerate(store.batches(
            "SELECT part, version, ids, fine FROM index_snapshots WHERE shards=? AND shard=? AND change_id=? "
            "ORDER BY part", (shards, k, snap.change_id), 1)):
        rows = len(blob) // (8 * FINE_WORDS)
        if part != expected or taken_at != snap.taken or at + rows > snap.ids.size \
                or not np.array_equal(np.frombuffer(ids, "<u8").view(np.int64), snap.ids[at:at + rows]):
            raise SnapshotChanged  # (another save's rows may be laid out otherwise, at the same change)
        yield at, np.frombuffer(blob, "<u8").astype(np.uint64, copy=False).reshape(rows, FINE_WORDS)
        at += rows
    if at != snap.ids.size:
        raise SnapshotChanged


def drop_below(store: Store, change_id: int) -> int:
    """Delete the snapshots taken before ``change_id`` (any layout's): the changes after them
    were deleted from the log, so no start can use them (a layout no process runs any more,
    a shard count changed, would otherwise keep its parts for ever). How many parts."""
    with store.transaction() as conn:
        return conn.execute("DELETE FROM index_snapshots WHERE change_id < ?", (change_id,)).rowcount


def checkpoint(store: Store, shard: tuple[int, int]) -> int | None:
    """The change id the shard's stored snapshot was taken at (None: it has none)."""
    k, shards = shard
    return store.query("SELECT MIN(change_id) FROM index_snapshots WHERE shards=? AND shard=?", (shards, k))[0][0]


def save(store: Store, shard: tuple[int, int], index: LibraryIndex, version: int, change_id: int) -> None:
    """Stored in parts of PART_ROWS rows, as of change ``change_id`` of the log."""
    k, shards = shard
    ids, dhash, phash, core = index.ids, index.hashes("dhash"), index.hashes("phash"), index.core_flags()
    count = max(1, -(-ids.size // PART_ROWS))
    with store.transaction() as conn:
        conn.execute("DELETE FROM index_snapshots WHERE shards=? AND shard=?", (shards, k))
        for part in range(count):
            rows = slice(part * PART_ROWS, (part + 1) * PART_ROWS)
            conn.execute("INSERT INTO index_snapshots (shards, shard, part, parts, version, change_id, ids, dhash, "
                         "phash, fine, core) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (shards, k, part, count, version, change_id, ids[rows].astype("<i8").tobytes(),
                          dhash[rows].astype("<u8").tobytes(), phash[rows].astype("<u8").tobytes(),
                          index.fine_range(rows.start, min(rows.stop, ids.size)).astype("<u8").tobytes(),
                          np.packbits(core[rows]).tobytes()))


ROWS_READ_AT_ONCE = 20_000  # entries' blobs held at once while the rows are read (a few MB)


def read_rows(store: Store, owned: str, indexed: str) -> tuple[np.ndarray, dict, np.ndarray, np.ndarray]:
    """(ids, hashes, fine, core) of the usable entries' rows and views (``indexed``: which
    entries are, ``owned``: a shard's filter, both SQL conditions); ``core`` marks each
    entry's core rows (monitor/search/core_rows.py). Every entry's whole row comes first.
    One statement, so the rows are of one moment while `library add` writes beside it (in
    three, an entry could come between them); read ROWS_READ_AT_ONCE entries at a time:
    held all at once (and joined), a 2M-picture library's blobs took ~10 GB to read into a
    1.7 GB index."""
    whole = {"ids": [], "fine": [], **{f: [] for f in HASH_FIELDS}}
    views = {"ids": [], "fine": [], "core": [], **{f: [] for f in HASH_FIELDS}}
    for batch in store.batches(f"SELECT id, {', '.join(HASH_FIELDS)}, fine, views FROM library_entries "
                               f"WHERE {indexed}{owned} ORDER BY id", (), ROWS_READ_AT_ONCE):
        _add_entries(batch, whole, views)
    n = sum(len(x) for x in whole["ids"])
    return (np.concatenate(whole["ids"] + views["ids"] or [np.zeros(0, np.int64)]),
            {f: np.concatenate(whole[f] + views[f] or [np.zeros(0, np.uint64)]) for f in HASH_FIELDS},
            np.concatenate(whole["fine"] + views["fine"] or [np.zeros((0, FINE_WORDS), np.uint64)]),
            np.concatenate([np.ones(n, bool), *views["core"]]))


def _add_entries(batch: list, whole: dict, views: dict) -> None:
    """These entries' rows, (id, hashes..., fine, views) each: the whole pictures' to
    ``whole``, their views' to ``views``."""
    width = len(HASH_FIELDS)
    table = np.array([row[:1 + width] for row in batch], np.int64).reshape(-1, 1 + width)
    whole["ids"].append(table[:, 0])
    for i, f in enumerate(HASH_FIELDS):
        whole[f].append(table[:, i + 1].view(np.uint64))
    fine = np.zeros((len(batch), FINE_WORDS), np.uint64)
    for i, row in enumerate(batch):
        if row[-2]:
            fine[i] = np.frombuffer(row[-2], "<u8")[:FINE_WORDS]
    whole["fine"].append(fine)
    for layout, words_per_view in ((False, 4), (True, VIEW_WORDS)):  # views stored with fine hashes or not
        rows = [(row[0], row[-1]) for row in batch if row[-1] and bool(row[-2]) == layout]
        if not rows:
            continue
        blobs = [b for _, b in rows]
        words = np.frombuffer(b"".join(blobs), dtype="<u8").reshape(-1, words_per_view)
        counts = [len(b) // (8 * words_per_view) for b in blobs]
        views["ids"].append(np.repeat(np.array([i for i, _ in rows], np.int64), counts))
        rank = 1 + np.arange(sum(counts)) - np.repeat(np.cumsum([0, *counts[:-1]]), counts)  # 1: first view
        views["core"].append(np.isin(rank, CORE_POSITIONS))
        views["dhash"].append(words[:, 0].astype(np.uint64))
        views["phash"].append(words[:, 1].astype(np.uint64))
        views["fine"].append(words[:, 4:4 + FINE_WORDS].astype(np.uint64) if layout
                             else np.zeros((words.shape[0], FINE_WORDS), np.uint64))
