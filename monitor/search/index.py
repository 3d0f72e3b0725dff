"""The library as the kernels see it: each entry's rows (its whole picture and views) in
two row stores (monitor/search/row_store.py).

``core`` holds each entry's core rows (monitor/search/core_rows.py: its whole picture, centre
crop and side crops), ``other`` the rest of its views. Every view of a post is compared
with both, its mirror images with the core rows only; a store is read once per post
either way, so where a large library makes the first pass wait on memory, splitting
costs no extra reads, and where it fits in cache the mirror images scan ~40% of the rows.

Rows are numbered across the two: the core store's rows first, then the other's
(``rows_in_core`` + its row), as :meth:`LibraryIndex.ids` and friends concatenate them.
Those numbers hold while the lock is held; adds and removes renumber.
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from monitor.fingerprints.fasthash import FINE_WORDS
from monitor.search import radius
from monitor.search.core_rows import CORE_POSITIONS, core_rows_of
from monitor.search.row_store import HASH_FIELDS, RowStore

__all__ = ["HASH_FIELDS", "LibraryIndex"]


KEYPOINT_CACHE_ENTRIES = 2048  # entries' keypoints kept after a read: ~9 KB each, ~18 MB in all


class RecentKeypoints:
    """The entries' keypoints read last (``read(ids) -> {id: bytes}``), the last
    KEYPOINT_CACHE_ENTRIES kept: the same few entries are near many posts (a library's
    look-alikes), and a read is a round trip to the store (PostgreSQL: another machine).
    :meth:`forget` drops an entry whose keypoints may have changed."""

    def __init__(self, read: Callable[[list[int]], dict[int, bytes]], size: int = KEYPOINT_CACHE_ENTRIES):
        self.read, self.size = read, size
        self._held: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._generation = 0  # bumped by forget: a read that raced it is not kept

    def __call__(self, entry_ids: list[int]) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        with self._lock:
            for e in entry_ids:
                if e in self._held:
                    self._held.move_to_end(e)
                    out[e] = self._held[e]
            generation = self._generation
        missing = [e for e in entry_ids if e not in out]
        if missing:
            got = self.read(missing)
            with self._lock:
                if generation == self._generation:
                    self._held.update(got)
                    while len(self._held) > self.size:
                        self._held.popitem(last=False)
            out.update(got)
        return out

    def forget(self, entry_id: int | None = None) -> None:
        """Drop one entry's keypoints (None: every entry's)."""
        with self._lock:
            self._generation += 1
            if entry_id is None:
                self._held.clear()
            else:
                self._held.pop(entry_id, None)


def _give_back_freed_memory() -> None:
    """A load's temporaries (hundreds of MB at a million entries) go back to glibc's heap,
    which keeps them: at a million entries the daemon would stay ~150 B per entry larger
    than its index (bench/library_memory.py). Hand them back to the system (glibc only)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # another C library: it keeps what it keeps
        pass


class LibraryIndex:
    """Hashes of every usable entry, one row per view, in two row stores.

    ``ids`` repeats the entry id on each of its rows and the matcher keeps the best row
    per entry. Degenerate entries (flat, tiny) are kept in the store but left out: their
    hashes would match anything. A row's fine hashes are all zero where unknown, which a
    real fine hash never is (half its pHash bits are set by construction). ``spill_dir``:
    keep the fine hashes in files there (see row_store.py).
    """

    def __init__(self, capacity: int = 1024, spill_dir: str | None = None, keep_dhash: bool | None = None):
        self.lock = threading.RLock()
        self.spill_dir = spill_dir
        # a plain dHash array too only for the tiled kernel, which scans one
        self.keep_dhash = radius.active() == "tiled" if keep_dhash is None else keep_dhash
        share = len(CORE_POSITIONS) / 10  # of an entry's ~10 rows
        self.core = RowStore(max(16, int(capacity * share)), spill_dir, self.keep_dhash)
        self.other = RowStore(max(16, capacity - int(capacity * share)), spill_dir, self.keep_dhash)
        self._entries = 0
        self.version = 0  # bumped on every change; lets callers notice them
        # Entries' keypoints, for the matcher's second look at a few candidates: read
        # through ``keypoints_reader(ids) -> {id: bytes}`` where a store keeps them
        # (monitor.records.library sets it), else kept here as added.
        self.keypoints_reader: Callable[[list[int]], dict[int, bytes]] | None = None
        self._keypoints: dict[int, bytes] = {}
        self._recent: RecentKeypoints | None = None  # the reader's last answers

    def __len__(self) -> int:
        """Entries indexed (not rows)."""
        return self._entries

    @property
    def rows(self) -> int:
        return self.core.n + self.other.n

    # -- every row, numbered across both stores (call under ``lock``) ----------
    def _both(self, pick) -> np.ndarray:
        return np.concatenate([pick(self.core), pick(self.other)])

    @property
    def ids(self) -> np.ndarray:
        return self._both(lambda s: s.ids[:s.n].astype(np.int64))

    def hashes(self, field: str = "dhash") -> np.ndarray:
        """Rows' hashes (snapshots, batches, tests): a copy."""
        return self._both(lambda s: s.dhash() if field == "dhash" else s.hashes[field][:s.n])

    def low_detail(self) -> np.ndarray:
        """Rows' low-detail flags, uint8."""
        return self._both(lambda s: s.low_detail[:s.n])

    def fine(self) -> np.ndarray:
        """Every row's fine hashes, (rows, FINE_WORDS): a copy (a batch, tests)."""
        return self._both(lambda s: s.fine.read_all(s.n))

    def fine_range(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop's fine hashes (rows numbered across the stores, as :meth:`ids`):
        a snapshot's part, without a copy of every row's."""
        c = self.core.n
        return np.concatenate([self.core.fine.read_range(min(start, c), min(stop, c)),
                               self.other.fine.read_range(max(start, c) - c, max(stop, c) - c)])

    def write_fine(self, start: int, rows: np.ndarray) -> None:
        """Rows start.. given their fine hashes (rows numbered across the stores, as
        :meth:`ids`): a snapshot's parts, one at a time, into an index loaded without them."""
        c = self.core.n
        k = max(0, min(rows.shape[0], c - start))
        if k:
            self.core.fine.write_rows(start, rows[:k])
        if k < rows.shape[0]:
            self.other.fine.write_rows(start + k - c, rows[k:])

    def core_flags(self) -> np.ndarray:
        """A bool per row: an entry's core row (snapshots keep them)."""
        return np.arange(self.rows) < self.core.n

    # -- the rows a first pass met (call under ``lock``) -----------------------
    def _gather(self, rows: np.ndarray, pick) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        in_core = rows < self.core.n
        a, b = pick(self.core, rows[in_core]), pick(self.other, rows[~in_core] - self.core.n)
        out = np.empty((rows.size, *a.shape[1:]), a.dtype)
        out[in_core], out[~in_core] = a, b
        return out

    def ids_of(self, rows: np.ndarray) -> np.ndarray:
        return self._gather(rows, lambda s, r: s.ids[r].astype(np.int64))

    def phash_of(self, rows: np.ndarray) -> np.ndarray:
        return self._gather(rows, lambda s, r: s.hashes["phash"][r])

    def low_detail_of(self, rows: np.ndarray) -> np.ndarray:
        return self._gather(rows, lambda s, r: s.low_detail[r])

    def dhash_of(self, rows: np.ndarray) -> np.ndarray:
        return self._gather(rows, lambda s, r: s.dhash_of(r))

    def fine_of(self, rows: np.ndarray) -> np.ndarray:
        """The fine hashes of these rows, (len(rows), FINE_WORDS): what a query's few
        candidates past the first gates read."""
        return self._gather(rows, lambda s, r: s.fine.read(r))

    # -- size -------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes of RAM the arrays hold (allocated); fine hashes only when not in files."""
        return self.core.memory_bytes() + self.other.memory_bytes()

    def file_bytes(self) -> int:
        """Bytes of fine hashes kept in files (0 when they are in RAM)."""
        return self.core.fine.size_bytes() + self.other.fine.size_bytes()

    # -- changes ----------------------------------------------------------------
    def mark_low_detail(self, entry_ids) -> None:
        """Flag these entries' rows as low detail (after a load: snapshots do not keep it)."""
        wanted = np.asarray(list(entry_ids), np.int64)
        with self.lock:
            for s in (self.core, self.other):
                s.low_detail[:s.n] = np.isin(s.ids[:s.n], wanted)
            self.version += 1

    def load(self, ids: np.ndarray, hashes: dict[str, np.ndarray], fine: np.ndarray | None = None,
             core: np.ndarray | None = None) -> None:
        """``core``: a bool per row, True on each entry's core rows (core_rows.CORE_POSITIONS);
        None finds them from the rows' order, as :meth:`add` lays an entry out."""
        with self.lock:
            ids = np.asarray(ids, np.int64)
            core = core_rows_of(ids) if core is None else np.asarray(core, bool)
            dhash, phash = (np.asarray(hashes[f], np.uint64) for f in HASH_FIELDS)
            fine = None if fine is None else np.asarray(fine, np.uint64).reshape(ids.size, FINE_WORDS)
            for store, rows in ((self.core, core), (self.other, ~core)):
                store.load(ids[rows], dhash[rows], phash[rows], fine, rows)  # fine: no copy of the masked rows
            self._entries = int(np.unique(ids).size)
            if self._recent is not None:
                self._recent.forget()
            if self._keypoints:  # kept for the entries still indexed
                present = set(np.unique(ids).tolist())
                self._keypoints = {e: k for e, k in self._keypoints.items() if e in present}
            self.version += 1
        _give_back_freed_memory()

    def keypoints_of(self, entry_ids: list[int]) -> dict[int, bytes]:
        """{entry id: packed keypoints} of those of these entries that have them."""
        if self.keypoints_reader is not None:
            recent = self._recent
            if recent is None or recent.read is not self.keypoints_reader:
                recent = self._recent = RecentKeypoints(self.keypoints_reader)
            return recent(entry_ids)
        return {e: self._keypoints[e] for e in entry_ids if e in self._keypoints}

    def add(self, entry_id: int, fp) -> None:
        """Index an entry: its whole-picture hashes plus any ``fp.views``."""
        with self.lock:
            if self.core.rows_of(entry_id).size:  # every entry has its whole picture there
                return
            low = getattr(fp, "degenerate", None) == "low_detail"
            for k, view in enumerate([fp, *getattr(fp, "views", ())]):
                (self.core if k in CORE_POSITIONS else self.other).append(entry_id, view, low)
            if self.keypoints_reader is None and getattr(fp, "keypoints", b""):
                self._keypoints[entry_id] = fp.keypoints
            self._entries += 1
            self.version += 1

    def remove(self, entry_id: int) -> bool:
        with self.lock:
            if not self.core.remove(entry_id):
                return False
            self.other.remove(entry_id)
            self._keypoints.pop(entry_id, None)
            if self._recent is not None:  # re-added after a rehash: its keypoints read again
                self._recent.forget(entry_id)
            self._entries -= 1
            self.version += 1
            return True
