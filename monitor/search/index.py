"""The library as the kernels see it: contiguous uint64 arrays, one row per view.

Changed in place (amortised O(1) add, swap-with-last remove), so adding an image
to a library of a million never rebuilds anything.

Of a row's 96 bytes, 64 are its fine hashes, read only for the candidates whose
dHash and pHash pass the first gates: a handful per query, where the radius
search alone yields hundreds at a million entries. With a ``spill_dir`` they
live in a file those few are read from (the page cache keeps it near at hand,
and may let it go under memory pressure). The dHash rows live only as
bit-planes (the bit-sliced search reads nothing else; a hit's distance comes
from its lane). So 21 bytes a row stay resident (planes 8, pHash 8, id 4 while
ids fit int32, low-detail flag 1) instead of 96: ~220 per protected image at
its ~9.4 rows (bench/library_memory.py measures it).
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable

import numpy as np

from monitor.fingerprints.fasthash import FINE_WORDS
from monitor.search import bitslice, radius

# The index holds only what the kernel and verification read: queries bring
# their own mirror hashes, so library mirrors stay in the table.
HASH_FIELDS = ("dhash", "phash")


_ROW_BYTES = FINE_WORDS * 8


class _FineRows:
    """The rows' fine hashes: a (capacity, FINE_WORDS) array in RAM, or an unlinked
    file in ``spill_dir`` (gone with the process, even after a kill -9) read and
    written row by row with positional I/O. Not a memory mapping: the few rows a
    query reads would each bring their neighbours into this process's resident
    set (the kernel maps up to 64 KiB around a fault), and after a few thousand
    queries the whole file would count as resident."""

    def __init__(self, capacity: int, spill_dir: str | None, rows: np.ndarray | None = None):
        self.file = None
        if spill_dir is None:
            self.fine = np.zeros((capacity, FINE_WORDS), np.uint64)
            if rows is not None:
                self.fine[:rows.shape[0]] = rows
            return
        self.fine = None
        self.file = tempfile.TemporaryFile(dir=spill_dir, prefix="repost-monitor-index-")
        if rows is not None and rows.shape[0]:
            os.pwrite(self.file.fileno(), np.ascontiguousarray(rows, "<u8").tobytes(), 0)
        self.grow(capacity)

    @property
    def in_file(self) -> bool:
        return self.file is not None

    def size_bytes(self) -> int:
        return os.fstat(self.file.fileno()).st_size if self.file else 0

    def grow(self, capacity: int) -> None:
        """Room for ``capacity`` rows; a file only lengthens (sparse: all zero, "unknown")."""
        if self.file is None:
            grown = np.zeros((capacity, FINE_WORDS), np.uint64)
            keep = min(capacity, self.fine.shape[0])
            grown[:keep] = self.fine[:keep]
            self.fine = grown
        elif self.size_bytes() < capacity * _ROW_BYTES:
            self.file.truncate(capacity * _ROW_BYTES)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), FINE_WORDS) fine hashes of these rows."""
        if self.file is None:
            return self.fine[rows]
        fd = self.file.fileno()
        data = b"".join(os.pread(fd, _ROW_BYTES, int(r) * _ROW_BYTES) for r in rows)
        return np.frombuffer(data, "<u8").astype(np.uint64).reshape(-1, FINE_WORDS)

    def read_all(self, n: int) -> np.ndarray:
        if self.file is None:
            return self.fine[:n]
        data = os.pread(self.file.fileno(), n * _ROW_BYTES, 0)
        return np.frombuffer(data, "<u8").astype(np.uint64).reshape(n, FINE_WORDS)

    def write(self, row: int, words: np.ndarray | int) -> None:
        if self.file is None:
            self.fine[row] = words
        else:
            data = (np.zeros(FINE_WORDS, "<u8") if isinstance(words, int) else np.asarray(words, "<u8")).tobytes()
            os.pwrite(self.file.fileno(), data, row * _ROW_BYTES)

    def copy_row(self, dst: int, src: int) -> None:
        if self.file is None:
            self.fine[dst] = self.fine[src]
        else:
            os.pwrite(self.file.fileno(), os.pread(self.file.fileno(), _ROW_BYTES, src * _ROW_BYTES),
                      dst * _ROW_BYTES)


def _id_type(largest_id: int) -> type:
    """Row -> entry ids as int32 while they fit (4 bytes a row less), else int64."""
    return np.int32 if -2**31 <= largest_id < 2**31 else np.int64


class LibraryIndex:
    """Hashes of every usable entry as uint64 arrays, one row per view.

    An entry has one row for the whole picture and one per extra view (centre
    crops, content box); ``ids`` repeats the entry id on each of its rows and
    the matcher keeps the best row per entry. Degenerate entries (flat, tiny)
    are kept in the store but left out: their hashes would match anything.
    ``fine`` holds each row's 256-bit verification hashes (FINE_WORDS words;
    all zero where unknown, which a real fine hash never is: half its pHash
    bits are set by construction). ``spill_dir``: keep the fine hashes in a
    file there (see the module's note).
    """

    def __init__(self, capacity: int = 1024, spill_dir: str | None = None, keep_dhash: bool | None = None):
        self.lock = threading.RLock()
        self.spill_dir = spill_dir
        self._n = 0
        self._entries = 0
        self._ids = np.empty(capacity, np.int32)  # int64 once an id needs it (_id_type)
        # The dHash rows live in the bit-planes (the bit-sliced search reads nothing else);
        # a plain array of them too only for the tiled kernel, which scans one.
        if keep_dhash is None:
            keep_dhash = radius.active() == "tiled"
        self._stored = HASH_FIELDS if keep_dhash else ("phash",)
        self._hashes = {f: np.empty(capacity, np.uint64) for f in self._stored}
        # 1 where the row belongs to a low-detail entry, matched only near-identically
        # (monitor.search.tiers.LOW_DETAIL_*)
        self._low_detail = np.zeros(capacity, np.uint8)
        self._fine_rows = _FineRows(capacity, spill_dir)
        # dHash rows again in bit-plane layout for the bit-sliced radius search
        # (monitor/bitslice.py); kept in step with every add and remove.
        self._planes = bitslice.to_planes(np.empty(0, np.uint64), capacity)
        self.version = 0  # bumped on every change; lets callers notice them
        # Entries' keypoints, for the matcher's second look at a few candidates: read
        # through ``keypoints_reader(ids) -> {id: bytes}`` where a store keeps them
        # (monitor.records.library sets it), else kept here as added.
        self.keypoints_reader: Callable[[list[int]], dict[int, bytes]] | None = None
        self._keypoints: dict[int, bytes] = {}

    def __len__(self) -> int:
        """Entries indexed (not rows)."""
        return self._entries

    @property
    def rows(self) -> int:
        return self._n

    @property
    def ids(self) -> np.ndarray:
        return self._ids[:self._n]

    def memory_bytes(self) -> int:
        """Bytes of RAM the arrays hold (allocated: capacity grows by 1.25x); the
        fine hashes count only when they are not in a file."""
        ram = (self._ids.nbytes + sum(a.nbytes for a in self._hashes.values()) + self._planes.nbytes
               + self._low_detail.nbytes)
        return ram + (0 if self._fine_rows.in_file else self._fine_rows.fine.nbytes)

    def file_bytes(self) -> int:
        """Bytes of fine hashes kept in a file (0 when they are in RAM)."""
        return self._fine_rows.size_bytes()

    def hashes(self, field: str = "dhash") -> np.ndarray:
        """Rows' hashes (call under ``lock``): a view, or for dHash without its own
        array a copy read back from the planes (snapshots, batches, tests)."""
        if field in self._hashes:
            return self._hashes[field][:self._n]
        return bitslice.from_planes(self._planes, self._n)

    def dhash_array(self) -> np.ndarray | None:
        """The dHash rows as a plain array when kept (the tiled kernel), else None."""
        return self._hashes["dhash"][:self._n] if "dhash" in self._hashes else None

    def dhash_of(self, rows: np.ndarray) -> np.ndarray:
        """These rows' dHashes (call under ``lock``)."""
        if "dhash" in self._hashes:
            return self._hashes["dhash"][rows]
        return np.array([bitslice.lane_value(self._planes, int(r)) for r in rows], np.uint64)

    def low_detail(self) -> np.ndarray:
        """Rows' low-detail flags, uint8 (call under ``lock``)."""
        return self._low_detail[:self._n]

    def mark_low_detail(self, entry_ids) -> None:
        """Flag these entries' rows as low detail (after a load: snapshots do not keep it)."""
        with self.lock:
            self._low_detail[:self._n] = np.isin(self._ids[:self._n], np.asarray(list(entry_ids), np.int64))
            self.version += 1

    def fine(self) -> np.ndarray:
        """Every row's fine hashes, (rows, FINE_WORDS) (call under ``lock``): a view
        in RAM, a copy read from the file when they are in one (a snapshot, a batch)."""
        return self._fine_rows.read_all(self._n)

    def fine_of(self, rows: np.ndarray) -> np.ndarray:
        """The fine hashes of these rows, (len(rows), FINE_WORDS) (call under ``lock``):
        what a query's few candidates past the first gates read."""
        return self._fine_rows.read(rows)

    def planes(self) -> np.ndarray:
        """The dHash rows as bit-planes (call under ``lock``, like :meth:`hashes`)."""
        return self._planes[:bitslice.plane_words(self._n)]

    def _grow(self, need: int) -> None:
        if need <= self._ids.shape[0]:
            return
        # x1.25, not x2: still amortised O(1), and the first add after loading a
        # million entries does not double the index's memory
        size = max(need, self._ids.shape[0] + self._ids.shape[0] // 4, 1024)
        ids = np.empty(size, self._ids.dtype)
        ids[:self._n] = self._ids[:self._n]
        self._ids = ids
        for f, arr in self._hashes.items():
            grown = np.empty(size, np.uint64)
            grown[:self._n] = arr[:self._n]
            self._hashes[f] = grown
        flags = np.zeros(size, np.uint8)
        flags[:self._n] = self._low_detail[:self._n]
        self._low_detail = flags
        self._fine_rows.grow(size)
        planes = np.zeros(bitslice.plane_words(size), np.uint64)
        planes[:self._planes.shape[0]] = self._planes
        self._planes = planes

    def load(self, ids: np.ndarray, hashes: dict[str, np.ndarray], fine: np.ndarray | None = None) -> None:
        with self.lock:
            ids = np.asarray(ids, np.int64)
            extremes = (int(ids.min()), int(ids.max())) if ids.size else (0,)
            self._ids = ids.astype(np.int64 if any(_id_type(i) is np.int64 for i in extremes) else np.int32)
            self._hashes = {f: np.array(hashes[f], np.uint64) for f in self._stored}
            self._low_detail = np.zeros(self._ids.shape[0], np.uint8)
            self._fine_rows = _FineRows(self._ids.shape[0], self.spill_dir,
                                        None if fine is None else np.asarray(fine, np.uint64).reshape(-1, FINE_WORDS))
            self._planes = bitslice.to_planes(np.asarray(hashes["dhash"], np.uint64))
            self._n = self._ids.shape[0]
            self._entries = int(np.unique(self._ids).size)
            if self._keypoints:  # kept for the entries still indexed
                present = set(np.unique(self._ids).tolist())
                self._keypoints = {e: k for e, k in self._keypoints.items() if e in present}
            self.version += 1

    def _widen_ids(self, entry_id: int) -> None:
        if self._ids.dtype == np.int32 and _id_type(entry_id) is np.int64:
            self._ids = self._ids.astype(np.int64)

    def keypoints_of(self, entry_ids: list[int]) -> dict[int, bytes]:
        """{entry id: packed keypoints} of those of these entries that have them."""
        if self.keypoints_reader is not None:
            return self.keypoints_reader(entry_ids)
        return {e: self._keypoints[e] for e in entry_ids if e in self._keypoints}

    def _rows_of(self, entry_id: int) -> np.ndarray:
        # A vectorised scan (~0.5 ms per million rows) instead of an id->row
        # dict, which would cost ~100 bytes per entry and 0.4 s per million to load.
        return np.flatnonzero(self._ids[:self._n] == entry_id)

    def add(self, entry_id: int, fp) -> None:
        """Index an entry: its whole-picture hashes plus any ``fp.views``."""
        with self.lock:
            if self._rows_of(entry_id).size:
                return
            views = [fp, *getattr(fp, "views", ())]
            self._widen_ids(entry_id)
            self._grow(self._n + len(views))
            for view in views:
                row = self._n
                self._ids[row] = entry_id
                for f in self._stored:
                    self._hashes[f][row] = getattr(view, f)
                self._low_detail[row] = getattr(fp, "degenerate", None) == "low_detail"
                fine = getattr(view, "fine", b"")  # duck-typed callers may have none
                self._fine_rows.write(row, np.frombuffer(fine, "<u8") if fine else 0)
                bitslice.set_lane(self._planes, row, np.uint64(view.dhash))
                self._n += 1
            if self.keypoints_reader is None and getattr(fp, "keypoints", b""):
                self._keypoints[entry_id] = fp.keypoints
            self._entries += 1
            self.version += 1

    def remove(self, entry_id: int) -> bool:
        with self.lock:
            rows = self._rows_of(entry_id)
            if rows.size == 0:
                return False
            for row in rows[::-1]:  # from the end, so earlier row numbers stay valid
                last = self._n - 1
                if row != last:
                    self._ids[row] = self._ids[last]
                    for arr in self._hashes.values():
                        arr[row] = arr[last]
                    self._low_detail[row] = self._low_detail[last]
                    self._fine_rows.copy_row(row, last)
                    bitslice.set_lane(self._planes, row, np.uint64(bitslice.lane_value(self._planes, last)))
                bitslice.set_lane(self._planes, last, np.uint64(0))
                self._n = last
            self._keypoints.pop(entry_id, None)
            self._entries -= 1
            self.version += 1
            return True
