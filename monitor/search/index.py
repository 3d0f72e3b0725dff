"""The library as the kernels see it: contiguous uint64 arrays, one row per view.

Changed in place (amortised O(1) add, swap-with-last remove), so adding an image
to a library of a million never rebuilds anything.
"""

from __future__ import annotations

import threading

import numpy as np

from monitor.fingerprints.fasthash import FINE_WORDS
from monitor.search import bitslice

# The index holds only what the kernel and verification read: queries bring
# their own mirror hashes, so library mirrors stay in the table.
HASH_FIELDS = ("dhash", "phash")


class LibraryIndex:
    """Hashes of every usable entry as uint64 arrays, one row per view.

    An entry has one row for the whole picture and one per extra view (centre
    crops, content box); ``ids`` repeats the entry id on each of its rows and
    the matcher keeps the best row per entry. Degenerate entries (flat, tiny)
    are kept in the store but left out: their hashes would match anything.
    ``fine`` holds each row's 256-bit verification hashes (FINE_WORDS words;
    all zero where unknown, which a real fine hash never is: half its pHash
    bits are set by construction).
    """

    def __init__(self, capacity: int = 1024):
        self.lock = threading.RLock()
        self._n = 0
        self._entries = 0
        self._ids = np.empty(capacity, np.int64)
        self._hashes = {f: np.empty(capacity, np.uint64) for f in HASH_FIELDS}
        self._fine = np.zeros((capacity, FINE_WORDS), np.uint64)
        # dHash rows again in bit-plane layout for the bit-sliced radius search
        # (monitor/bitslice.py); kept in step with every add and remove.
        self._planes = bitslice.to_planes(np.empty(0, np.uint64), capacity)
        self.version = 0  # bumped on every change; lets callers notice them

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
        """Bytes the arrays hold (allocated: capacity grows by doubling)."""
        return (self._ids.nbytes + sum(a.nbytes for a in self._hashes.values()) + self._fine.nbytes
                + self._planes.nbytes)

    def hashes(self, field: str = "dhash") -> np.ndarray:
        return self._hashes[field][:self._n]

    def fine(self) -> np.ndarray:
        """Rows' fine hashes, (rows, FINE_WORDS) (call under ``lock``)."""
        return self._fine[:self._n]

    def planes(self) -> np.ndarray:
        """The dHash rows as bit-planes (call under ``lock``, like :meth:`hashes`)."""
        return self._planes[:bitslice.plane_words(self._n)]

    def _grow(self, need: int) -> None:
        if need <= self._ids.shape[0]:
            return
        size = max(need, 2 * self._ids.shape[0])
        ids = np.empty(size, np.int64)
        ids[:self._n] = self._ids[:self._n]
        self._ids = ids
        for f, arr in self._hashes.items():
            grown = np.empty(size, np.uint64)
            grown[:self._n] = arr[:self._n]
            self._hashes[f] = grown
        fine = np.zeros((size, FINE_WORDS), np.uint64)
        fine[:self._n] = self._fine[:self._n]
        self._fine = fine
        planes = np.zeros(bitslice.plane_words(size), np.uint64)
        planes[:self._planes.shape[0]] = self._planes
        self._planes = planes

    def load(self, ids: np.ndarray, hashes: dict[str, np.ndarray], fine: np.ndarray | None = None) -> None:
        with self.lock:
            self._ids = np.array(ids, np.int64)
            self._hashes = {f: np.array(hashes[f], np.uint64) for f in HASH_FIELDS}
            self._fine = (np.array(fine, np.uint64).reshape(-1, FINE_WORDS) if fine is not None
                          else np.zeros((self._ids.shape[0], FINE_WORDS), np.uint64))
            self._planes = bitslice.to_planes(self._hashes["dhash"])
            self._n = self._ids.shape[0]
            self._entries = int(np.unique(self._ids).size)
            self.version += 1

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
            self._grow(self._n + len(views))
            for view in views:
                row = self._n
                self._ids[row] = entry_id
                for f in HASH_FIELDS:
                    self._hashes[f][row] = getattr(view, f)
                fine = getattr(view, "fine", b"")  # duck-typed callers may have none
                self._fine[row] = np.frombuffer(fine, "<u8") if fine else 0
                bitslice.set_lane(self._planes, row, np.uint64(view.dhash))
                self._n += 1
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
                    self._fine[row] = self._fine[last]
                    bitslice.set_lane(self._planes, row, self._hashes["dhash"][row])
                bitslice.set_lane(self._planes, last, np.uint64(0))
                self._n = last
            self._entries -= 1
            self.version += 1
            return True
