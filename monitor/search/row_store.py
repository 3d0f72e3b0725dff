"""One set of index rows as the kernels see them: contiguous arrays, one row per view.

Changed in place (amortised O(1) add, swap-with-last remove), so adding an image
to a library of a million never rebuilds anything.

Of a row's 96 bytes, 64 are its fine hashes, read only for the candidates whose
dHash and pHash pass the first gates: a handful per query, where the radius
search alone yields hundreds at a million entries. With a ``spill_dir`` they
live in a file those few are read from (the page cache keeps it near at hand,
and may let it go under memory pressure). The dHash rows live only as
bit-planes (the bit-sliced search reads nothing else; a hit's distance comes
from its lane), or only as a plain array where the tiled kernel runs. So 21
bytes a row stay resident (dHash 8, pHash 8, id 4 while ids fit int32,
low-detail flag 1) instead of 96: ~200 per protected image at its ~9.4 rows
(bench/library_memory.py measures it).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from monitor.fingerprints.fasthash import FINE_WORDS
from monitor.search import bitslice

# What the kernel and verification read: queries bring their own mirror hashes, so
# library mirrors stay in the table.
HASH_FIELDS = ("dhash", "phash")

_ROW_BYTES = FINE_WORDS * 8
_WRITE_ROWS = 1 << 20  # rows of fine hashes written to the file at a time (64 MB)


class _FineRows:
    """The rows' fine hashes: a (capacity, FINE_WORDS) array in RAM, or an unlinked
    file in ``spill_dir`` (gone with the process, even after a kill -9) read and
    written row by row with positional I/O. Not a memory mapping: the few rows a
    query reads would each bring their neighbours into this process's resident
    set (the kernel maps up to 64 KiB around a fault), and after a few thousand
    queries the whole file would count as resident."""

    def __init__(self, capacity: int, spill_dir: str | None, rows: np.ndarray | None = None,
                 mask: np.ndarray | None = None):
        """``rows``: the first rows' fine hashes, those of ``rows`` that ``mask`` selects
        (None: all of them); written to the file a slice at a time (neither a masked copy of
        them all nor one write: Linux cuts a write at ~2 GB, 33M rows)."""
        self.file = None
        if spill_dir is None:
            self.fine = np.zeros((capacity, FINE_WORDS), np.uint64)
            if rows is not None:
                chosen = rows if mask is None else rows[mask]
                self.fine[:chosen.shape[0]] = chosen
            return
        self.fine = None
        self.file = tempfile.TemporaryFile(dir=spill_dir, prefix="repost-monitor-index-")
        at = 0
        for start in range(0, 0 if rows is None else rows.shape[0], _WRITE_ROWS):
            part = rows[start:start + _WRITE_ROWS]
            chosen = part if mask is None else part[mask[start:start + _WRITE_ROWS]]
            self.write_rows(at, chosen)
            at += chosen.shape[0]
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
        return self.read_range(0, n)

    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop's fine hashes (a copy where they are in a file)."""
        if self.file is None:
            return self.fine[start:stop]
        out = np.empty((max(0, stop - start), FINE_WORDS), np.uint64)
        view = memoryview(out.reshape(-1).view(np.uint8))
        done, total = 0, (stop - start) * _ROW_BYTES
        while done < total:  # one pread returns at most ~2 GB on Linux
            got = os.preadv(self.file.fileno(), [view[done:done + (1 << 30)]], start * _ROW_BYTES + done)
            if got <= 0:
                raise OSError(f"fine-hash file ends at row {start + done // _ROW_BYTES}")
            done += got
        return out

    def write_rows(self, start: int, rows: np.ndarray) -> None:
        """Rows start.. set to ``rows`` ((k, FINE_WORDS)), within the capacity."""
        if self.file is None:
            self.fine[start:start + rows.shape[0]] = rows
            return
        data = memoryview(np.ascontiguousarray(rows, "<u8").reshape(-1).view(np.uint8))
        done = 0
        while done < len(data):  # Linux cuts one write at ~2 GB
            done += os.pwrite(self.file.fileno(), data[done:done + (1 << 30)], start * _ROW_BYTES + done)

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


class RowStore:
    """Rows of (entry id, dHash as bit-planes, pHash, low-detail flag, fine hashes).

    ``keep_dhash``: a plain dHash array instead of the bit-planes (the tiled kernel scans
    one; the planes would be 8 more bytes a row that nothing reads); ``spill_dir``: the fine
    hashes in a file there. Not locked: the LibraryIndex that holds it is.
    """

    def __init__(self, capacity: int, spill_dir: str | None, keep_dhash: bool):
        self.n = 0
        self.ids = np.empty(capacity, np.int32)  # int64 once an id needs it (_id_type)
        self.stored = HASH_FIELDS if keep_dhash else ("phash",)
        self.hashes = {f: np.empty(capacity, np.uint64) for f in self.stored}
        # 1 where the row belongs to a low-detail entry, matched only near-identically
        # (monitor.search.tiers.LOW_DETAIL_*)
        self.low_detail = np.zeros(capacity, np.uint8)
        self.spill_dir = spill_dir
        self.fine = _FineRows(capacity, spill_dir)
        self.planes = None if keep_dhash else bitslice.to_planes(np.empty(0, np.uint64), capacity)

    def memory_bytes(self) -> int:
        """Bytes of RAM the arrays hold (allocated: capacity grows by 1.25x); the fine
        hashes count only when they are not in a file."""
        ram = (self.ids.nbytes + sum(a.nbytes for a in self.hashes.values()) + self.low_detail.nbytes
               + (0 if self.planes is None else self.planes.nbytes))
        return ram + (0 if self.fine.in_file else self.fine.fine.nbytes)

    def dhash(self) -> np.ndarray:
        """Every row's dHash: a view of the plain array, or read back from the planes."""
        if "dhash" in self.hashes:
            return self.hashes["dhash"][:self.n]
        return bitslice.from_planes(self.planes, self.n)

    def dhash_array(self) -> np.ndarray | None:
        return self.hashes["dhash"][:self.n] if "dhash" in self.hashes else None

    def dhash_of(self, rows: np.ndarray) -> np.ndarray:
        if "dhash" in self.hashes:
            return self.hashes["dhash"][rows]
        if rows.size > 64:  # many (a batch): all of them back from the planes at once
            return bitslice.from_planes(self.planes, self.n)[rows]
        return np.array([bitslice.lane_value(self.planes, int(r)) for r in rows], np.uint64)

    def scan_planes(self) -> np.ndarray | None:
        """The planes over the rows in use (whole blocks); None where the plain array is kept."""
        return None if self.planes is None else self.planes[:bitslice.plane_words(self.n)]

    def grow(self, need: int) -> None:
        if need <= self.ids.shape[0]:
            return
        # x1.25, not x2: still amortised O(1), and the first add after loading a
        # million entries does not double the index's memory
        size = max(need, self.ids.shape[0] + self.ids.shape[0] // 4, 1024)
        ids = np.empty(size, self.ids.dtype)
        ids[:self.n] = self.ids[:self.n]
        self.ids = ids
        for f, arr in self.hashes.items():
            grown = np.empty(size, np.uint64)
            grown[:self.n] = arr[:self.n]
            self.hashes[f] = grown
        flags = np.zeros(size, np.uint8)
        flags[:self.n] = self.low_detail[:self.n]
        self.low_detail = flags
        self.fine.grow(size)
        if self.planes is not None:
            planes = np.zeros(bitslice.plane_words(size), np.uint64)
            planes[:self.planes.shape[0]] = self.planes
            self.planes = planes

    def load(self, ids: np.ndarray, dhash: np.ndarray, phash: np.ndarray, fine: np.ndarray | None,
             fine_mask: np.ndarray | None = None) -> None:
        """``fine``: these rows' fine hashes, or (``fine_mask``) those of ``fine`` it selects."""
        ids = np.asarray(ids, np.int64)
        extremes = (int(ids.min()), int(ids.max())) if ids.size else (0,)
        self.ids = ids.astype(np.int64 if any(_id_type(i) is np.int64 for i in extremes) else np.int32)
        given = {"dhash": dhash, "phash": phash}
        self.hashes = {f: np.array(given[f], np.uint64) for f in self.stored}
        self.low_detail = np.zeros(self.ids.shape[0], np.uint8)
        self.fine = _FineRows(self.ids.shape[0], self.spill_dir,
                              None if fine is None else np.asarray(fine, np.uint64).reshape(-1, FINE_WORDS), fine_mask)
        self.planes = None if "dhash" in self.stored else bitslice.to_planes(np.asarray(dhash, np.uint64))
        self.n = self.ids.shape[0]

    def widen_ids(self, entry_id: int) -> None:
        if self.ids.dtype == np.int32 and _id_type(entry_id) is np.int64:
            self.ids = self.ids.astype(np.int64)

    def rows_of(self, entry_id: int) -> np.ndarray:
        # A vectorised scan (~0.5 ms per million rows) instead of an id->row
        # dict, which would cost ~100 bytes per entry and 0.4 s per million to load.
        return np.flatnonzero(self.ids[:self.n] == entry_id)

    def append(self, entry_id: int, view, low_detail: bool) -> None:
        self.widen_ids(entry_id)
        self.grow(self.n + 1)
        row = self.n
        self.ids[row] = entry_id
        for f in self.stored:
            self.hashes[f][row] = getattr(view, f)
        self.low_detail[row] = low_detail
        fine = getattr(view, "fine", b"")  # duck-typed callers may have none
        self.fine.write(row, np.frombuffer(fine, "<u8") if fine else 0)
        if self.planes is not None:
            bitslice.set_lane(self.planes, row, np.uint64(view.dhash))
        self.n += 1

    def remove(self, entry_id: int) -> int:
        """Drop the entry's rows; the last rows fill the gaps. Returns how many went."""
        rows = self.rows_of(entry_id)
        for row in rows[::-1]:  # from the end, so earlier row numbers stay valid
            last = self.n - 1
            if row != last:
                self.ids[row] = self.ids[last]
                for arr in self.hashes.values():
                    arr[row] = arr[last]
                self.low_detail[row] = self.low_detail[last]
                self.fine.copy_row(row, last)
                if self.planes is not None:
                    bitslice.set_lane(self.planes, row, np.uint64(bitslice.lane_value(self.planes, last)))
            if self.planes is not None:
                bitslice.set_lane(self.planes, last, np.uint64(0))
            self.n = last
        return rows.size
