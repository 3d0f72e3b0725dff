"""The protected library: entries in SQLite, contiguous arrays for the kernel.

:class:`LibraryIndex` holds the hashes as numpy arrays and changes them in
place (amortised O(1) add, swap-with-last remove), so adding an image to a
library of a million never rebuilds anything. :class:`Library` keeps the
index and the ``library_entries`` table in step.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitor.fingerprints import ALGORITHM_VERSION, Fingerprint
from monitor.fingerprints.codec import (
    pack_fine,
    pack_views,
    sql_to_u64,
    u64_to_sql,
    unpack_fine,
    unpack_views,
)
from monitor.records import changes, snapshots
from monitor.records import keypoints as keypoint_rows
from monitor.records.store import Store, in_chunks
from monitor.search.index import LibraryIndex
from monitor.search.tiers import protection_of

log = logging.getLogger("repost_monitor.library")


@dataclass(frozen=True, slots=True)
class LibraryEntry:
    id: int
    source: str
    label: str
    width: int
    height: int
    dhash: int
    phash: int
    dhash_mirror: int
    phash_mirror: int
    degenerate: str | None
    added_at: float


def _entry(row: tuple) -> LibraryEntry:
    (eid, source, label, w, h, d, p, dm, pm, degenerate, added) = row
    return LibraryEntry(eid, source, label, w, h, sql_to_u64(d), sql_to_u64(p),
                        sql_to_u64(dm), sql_to_u64(pm), degenerate, added)


IMPORTED = "imported"  # library_entries.algorithm of hashes imported from a CSV

SNAPSHOT_AFTER_CHANGES = 10_000  # more changes than this after a snapshot: a start reads the rows
RESNAPSHOT_AFTER_CHANGES = 1_000  # a start that replayed this many stores a new snapshot

_COLUMNS = ("id, source, label, width, height, dhash, phash, dhash_mirror, phash_mirror, "
            "degenerate, added_at")


@dataclass(frozen=True, slots=True)
class AddReport:
    added: list[LibraryEntry]            # every entry the files now have, new or already present
    skipped: list[tuple[str, str]]  # (source, why)
    new: int = 0                         # of ``added``, entries that did not exist before


class Library:
    def __init__(self, store: Store, shard: tuple[int, int] | None = None, *, indexed: bool = True,
                 spill_dir: str | None = None):
        """``shard`` (k, S): index only the entries whose id is k modulo S (a shard process
        of a library split S ways); the table stays whole. ``indexed`` False: the table
        alone, no index (the API role). ``spill_dir``: see LibraryIndex."""
        self.store = store
        self.shard = shard
        self.indexed = indexed
        self._owned = "" if shard is None else f" AND id % {int(shard[1])} = {int(shard[0])}"
        self.index = LibraryIndex(spill_dir=spill_dir)
        self.index.keypoints_reader = functools.partial(keypoint_rows.read, store)  # read for candidates
        # the change-log id this index reflects (None: not indexed)
        self.checkpoint: int | None = None
        if indexed:
            self.reload()

    def owns(self, entry_id: int) -> bool:
        return self.indexed and (self.shard is None or entry_id % self.shard[1] == self.shard[0])

    def version(self) -> int:
        """Bumped by triggers on every change to the table, by any process."""
        return self.store.query("SELECT value FROM library_meta WHERE key='version'")[0][0]

    def entries_after(self, entry_id: int) -> list[tuple[int, Fingerprint]]:
        """(id, fingerprint with its views and fine hashes) of usable entries above ``entry_id``."""
        return self._fingerprints("id > ?", (entry_id,))

    def fingerprints_of(self, ids: Iterable[int]) -> list[tuple[int, Fingerprint]]:
        """(id, fingerprint) of those of these entries that exist, are usable and are this shard's."""
        return [row for marks, chunk in in_chunks(sorted(set(ids)))
                for row in self._fingerprints(f"id IN ({marks})", chunk)]

    def _fingerprints(self, where: str, params) -> list[tuple[int, Fingerprint]]:
        out = []
        for eid, d, p, views, fine, degenerate in self.store.query(
                f"SELECT id, dhash, phash, views, fine, degenerate FROM library_entries WHERE {where} "
                f"AND {_INDEXED}" + self._owned, params):
            fine, _ = unpack_fine(fine)
            out.append((eid, Fingerprint(sql_to_u64(d), sql_to_u64(p), 0, 0, 0, 0, degenerate=degenerate,
                                         views=unpack_views(views, with_fine=bool(fine)), fine=fine)))
        return out

    def catch_up(self) -> tuple[list[int], int]:
        """Apply the change log after the checkpoint: each entry touched is indexed again as
        its row is now, or dropped. (ids inserted that this index holds, changes read)."""
        inserted, read = [], 0
        while True:
            rows = changes.changes_after(self.store, self.checkpoint or 0)
            # read after the changes: a prune committed before them shows here (it deletes
            # and raises the mark in one transaction); one after them deleted none we missed
            if changes.pruned_upto(self.store) > (self.checkpoint or 0):
                log.warning("library: the change log was pruned past this index's checkpoint (%d): "
                            "reading the rows", self.checkpoint or 0)
                self._reread_rows()
                read += 1
                continue
            if not rows:
                return inserted, read
            read += len(rows)
            if len(rows) > SNAPSHOT_AFTER_CHANGES:  # a bulk import: the rows read, the index swapped at once
                ids, hashes, fine, core = snapshots.read_rows(self.store, self._owned, _INDEXED)  # (+later: replayed)
                self._load(ids, hashes, fine, core)
                held = set(ids.tolist())
                inserted += [eid for _, eid, op in rows if op == "INSERT" and eid in held]
                self.checkpoint = rows[-1][0]
                continue
            touched = {eid for _, eid, _ in rows if self.owns(eid)}
            current = dict(self.fingerprints_of(touched))
            with self.index.lock:  # matchers never see an entry missing between the two
                for eid in sorted(touched):
                    self.index.remove(eid)
                    if eid in current:
                        self.index.add(eid, current[eid])
            inserted += [eid for _, eid, op in rows if op == "INSERT" and eid in current]
            self.checkpoint = rows[-1][0]

    def reload(self) -> None:
        """(Re)build the index: the packed snapshot (a shard has one of its own part) and the
        change log after it; the rows where there is no snapshot or the log after it is long
        (a bulk import since: reading rows is much faster than replaying them one by one),
        then a new snapshot. One is also stored after a replay of many changes, so that the
        next start does not replay them again."""
        split = self.shard if self.shard is not None else (0, 1)
        if self._load_snapshot(split):
            if self.catch_up()[1] < RESNAPSHOT_AFTER_CHANGES:
                return
        else:
            self._reread_rows()
            self.catch_up()
        snapshots.save(self.store, split, self.index, self.version(), self.checkpoint)

    def _load_snapshot(self, split: tuple[int, int]) -> bool:
        """The index from the snapshot, its fine hashes written part by part; False without a
        usable one (none, a long log after it, or one replaced while it was read: then the
        rows the caller reads replace what was loaded)."""
        snap = snapshots.load(self.store, split)
        if not snap or changes.count_after(self.store, snap.change_id) > SNAPSHOT_AFTER_CHANGES \
                or snap.change_id < changes.pruned_upto(self.store):  # changes after it were deleted
            return False
        self._load(snap.ids, {"dhash": snap.dhash, "phash": snap.phash}, None, snap.core)
        snap = snap._replace(dhash=None, phash=None, core=None)  # the index holds its own: let these go
        try:
            for start, rows in snapshots.fine_parts(self.store, split, snap):
                self.index.write_fine(start, rows)
        except snapshots.SnapshotChanged:
            return False
        self.checkpoint = snap.change_id
        return True

    def _reread_rows(self) -> None:
        """The index from the rows, its checkpoint the change log's end read before them
        (what follows is replayed)."""
        start = changes.last_change(self.store)
        self._reload_rows()
        self.checkpoint = start

    def _reload_rows(self) -> None:
        self._load(*snapshots.read_rows(self.store, self._owned, _INDEXED))

    def _load(self, ids, hashes, fine, core) -> None:
        """The index loaded whole; low-detail entries flagged (snapshots keep no flags)."""
        low = [eid for (eid,) in self.store.query(
            f"SELECT id FROM library_entries WHERE degenerate = 'low_detail'{self._owned}")]
        with self.index.lock:
            self.index.load(ids, hashes, fine, core)
            self.index.mark_low_detail(low)

    # -- writes ---------------------------------------------------------------
    def add_fingerprint(self, source: str, fp: Fingerprint, label: str | None = None, *,
                        algorithm: str = ALGORITHM_VERSION) -> LibraryEntry:
        """Insert one entry, or update the one with the same source.

        The same picture added again (a folder re-added, the daemon's library
        paths at every start) keeps its entry and id, so matches and alerts
        stay linked and nothing is matched again as new; if it was
        fingerprinted by an older version it is updated in place. A different
        picture under the same source is a new entry.
        """
        label = label if label is not None else Path(source).stem or source
        now = time.time()
        hashes = (fp.width, fp.height, u64_to_sql(fp.dhash), u64_to_sql(fp.phash),
                  u64_to_sql(fp.dhash_mirror), u64_to_sql(fp.phash_mirror), fp.degenerate,
                  pack_views(fp.views), pack_fine(fp), algorithm)
        with self.store.transaction() as conn:
            old = conn.execute("SELECT id, width, height, dhash, phash, dhash_mirror, phash_mirror, "
                               "degenerate, views, fine, algorithm FROM library_entries WHERE source=?",
                               (source,)).fetchone()
            same_picture = old is not None and tuple(old[3:5]) == hashes[2:4]
            if same_picture:
                conn.execute("UPDATE library_entries SET label=? WHERE id=? AND label IS DISTINCT FROM ?",
                             (label, old[0], label))
                if tuple(old[1:]) == hashes:
                    keypoint_rows.put(conn, old[0], fp, replace=False)  # an entry from before keypoints
                    return self.get(old[0])
            elif old:
                conn.execute("DELETE FROM library_entries WHERE id=?", old[:1])
            if not same_picture:
                entry_id = conn.execute(
                    "INSERT INTO library_entries (source, label, added_at, width, height, dhash, phash, "
                    "dhash_mirror, phash_mirror, degenerate, views, fine, algorithm) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id", (source, label, now, *hashes)).fetchone()[0]
                keypoint_rows.put(conn, entry_id, fp)
        if same_picture:
            return self.replace_hashes(old[0], fp, algorithm)
        if old:
            self.index.remove(old[0])
        if indexed_entry(fp.degenerate) and self.owns(entry_id):
            self.index.add(entry_id, fp)
        return LibraryEntry(entry_id, source, label, fp.width, fp.height, fp.dhash, fp.phash,
                            fp.dhash_mirror, fp.phash_mirror, fp.degenerate, now)

    def stale_count(self) -> int:
        return self.store.query("SELECT COUNT(*) FROM library_entries WHERE algorithm IS NULL "
                                "OR algorithm != ?", (ALGORITHM_VERSION,))[0][0]

    def sources(self, *, every: bool = False) -> list[tuple[int, str]]:
        """(id, source) of every entry, or of the stale ones (what `rehash` redoes): fingerprinted
        by another algorithm than this version's, they match on fewer views until rehashed."""
        return self.store.query("SELECT id, source FROM library_entries " + ("" if every else
                                "WHERE algorithm IS NULL OR algorithm != ? ") + "ORDER BY id",
                                () if every else (ALGORITHM_VERSION,))

    def replace_hashes(self, entry_id: int, fp: Fingerprint,
                        algorithm: str = ALGORITHM_VERSION) -> LibraryEntry:
        with self.store.transaction() as conn:
            conn.execute(
                "UPDATE library_entries SET width=?, height=?, dhash=?, phash=?, dhash_mirror=?, "
                "phash_mirror=?, degenerate=?, views=?, fine=?, algorithm=? WHERE id=?",
                (fp.width, fp.height, u64_to_sql(fp.dhash), u64_to_sql(fp.phash),
                 u64_to_sql(fp.dhash_mirror), u64_to_sql(fp.phash_mirror), fp.degenerate,
                 pack_views(fp.views), pack_fine(fp), algorithm, entry_id))
            keypoint_rows.put(conn, entry_id, fp)
        with self.index.lock:  # matchers never see the entry missing between the two
            self.index.remove(entry_id)
            if indexed_entry(fp.degenerate) and self.owns(entry_id):
                self.index.add(entry_id, fp)
        return self.get(entry_id)

    def remove(self, entry_id: int) -> bool:
        with self.store.transaction() as conn:
            gone = conn.execute("DELETE FROM library_entries WHERE id=?", (entry_id,)).rowcount
        self.index.remove(entry_id)
        return bool(gone)

    # -- reads ----------------------------------------------------------------
    def get(self, entry_id: int) -> LibraryEntry | None:
        rows = self.store.query(f"SELECT {_COLUMNS} FROM library_entries WHERE id=?", (entry_id,))
        return _entry(rows[0]) if rows else None

    def entries(self, *, limit: int = -1, offset: int = 0) -> list[LibraryEntry]:
        # no limit: LIMIT -1 is SQLite's alone, LIMIT ALL PostgreSQL's alone
        rows = self.store.query(f"SELECT {_COLUMNS} FROM library_entries ORDER BY id LIMIT ? OFFSET ?",
                                (limit if limit >= 0 else 2**62, offset))
        return [_entry(r) for r in rows]

    def entries_by_id(self, ids: Iterable[int]) -> dict[int, LibraryEntry]:
        return entries_by_id(self.store, ids)

    def stats(self) -> dict:
        return library_stats(self)


def prune_change_log(library: Library, before: float) -> int:
    """Delete the changes made before ``before`` (epoch seconds) from the log, storing this
    library's snapshot again first where its checkpoint lies among them (its next start
    would read the rows otherwise), or where another process (another shard's) deleted
    changes after it; the snapshots left below them (other layouts', other shards' that
    store theirs again at their own next prune) are deleted, as no start can use them.
    Call after :meth:`Library.catch_up`. How many changes were deleted."""
    mark = changes.pruned_upto(library.store)
    upto = max(changes.prunable(library.store, before), mark)
    if (library.checkpoint or 0) < upto:
        return 0  # this index is behind them (it catches up first)
    split = library.shard if library.shard is not None else (0, 1)
    if (snapshots.checkpoint(library.store, split) or 0) < upto:
        snapshots.save(library.store, split, library.index, library.version(), library.checkpoint)
    if upto <= mark:
        return 0
    deleted = changes.prune(library.store, upto)
    snapshots.drop_below(library.store, upto)  # those no start can use any more
    return deleted


def library_stats(library: Library) -> dict:
    """Counts and index sizes for `library stats` and the API."""
    total, degenerate, weak, first, last = library.store.query(
        "SELECT COUNT(*), COUNT(degenerate), SUM(CASE WHEN degenerate = 'low_detail' THEN 1 ELSE 0 END), "
        "MIN(added_at), MAX(added_at) FROM library_entries")[0]
    labels = library.store.query("SELECT label, COUNT(*) FROM library_entries GROUP BY label "
                                  "ORDER BY COUNT(*) DESC LIMIT 20")
    return {"entries": total, "indexed": len(library.index), "degenerate": degenerate,
            "weak_protection": weak or 0,  # low detail: near-identical copies only
            "stale": library.stale_count(),
            # no keypoints for the second look (`library rehash --all` finds them)
            "without_keypoints": keypoints_missing(library),
            "hash_algorithm": ALGORITHM_VERSION,
            "first_added": first, "last_added": last,
            "index_rows": library.index.rows,
            "index_bytes": library.index.memory_bytes(),
            "index_file_bytes": library.index.file_bytes(),
            "top_labels": dict(labels)}


def keypoints_missing(library: Library) -> int:
    """Indexed entries with no keypoints stored (added before them, or imported as hashes)."""
    return keypoint_rows.missing(library.store, _INDEXED)


# Entries the index holds: all but flat and tiny ones (low-detail ones, flagged, match
# only near-identical copies: monitor.search.tiers.LOW_DETAIL_*).
_INDEXED = "(degenerate IS NULL OR degenerate = 'low_detail')"


def indexed_entry(degenerate: str | None) -> bool:
    return protection_of(degenerate) != "none"


def mirror_dhash(value: int) -> int:
    """dHash of the mirrored picture: each 8-bit row reversed and inverted."""
    out = 0
    for r in range(8):
        row = (value >> (56 - 8 * r)) & 0xFF
        rev = int(f"{row:08b}"[::-1], 2) ^ 0xFF
        out |= rev << (56 - 8 * r)
    return out


def mirror_phash(value: int) -> int:
    """pHash of the mirrored picture, from the hash alone.

    Mirroring negates DCT coefficients of odd columns; the median of the
    8x8 block moves too, so this is close but not always exact.
    """
    bits = np.unpackbits(np.frombuffer(value.to_bytes(8, "big"), np.uint8)).reshape(8, 8)
    bits[:, 1::2] ^= 1
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def entries_by_id(store: Store, ids: Iterable[int]) -> dict[int, LibraryEntry]:
    """The entries with these ids (no index needed: a recorder of a scaled-out deployment)."""
    out: dict[int, LibraryEntry] = {}
    for marks, chunk in in_chunks(sorted({int(i) for i in ids})):
        for r in store.query(f"SELECT {_COLUMNS} FROM library_entries WHERE id IN ({marks})", chunk):
            out[r[0]] = _entry(r)
    return out
