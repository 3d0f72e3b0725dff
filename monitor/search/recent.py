"""The recent images' hashes, held in memory for retroactive matching (monitor/pipeline/retro.py).

Each library change matches the window's images (72 hours of every feed) against the new
entries. Read from the store each time, that cost 7-11 us an image of one core: at 300 posts
a second, 9-14 minutes a change. Held here, a change reads only what was stored since the last
one, and tests every held image against the new entries in memory (their dHashes in the
first pass, then dHash + pHash against the bound no match or second look passes: ~0.2 us an
image); only the few images left are read whole. Bounded: past ``max_bytes`` the oldest go, and
the caller reads those from the store as before (:attr:`RecentHashes.held_after`).
Plain numpy arrays; no I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# seconds read again before the newest image held: a row committed late (its fetch time taken
# before another's commit) is not missed; the URLs held from that span tell what was read
SLACK = 300.0
BLOCK_HASHES = 50_000  # dHashes per block: what one first pass scans at once (it stays in cache)


@dataclass
class _Block:
    times: np.ndarray     # float64, per image
    keys: np.ndarray      # int64, per image: hash() of its URL (what picks it among those fetched at its time)
    owners: np.ndarray    # int32, per dHash
    dhashes: np.ndarray   # uint64
    phashes: np.ndarray   # uint64: the pHash of the dHash's view and side
    mirrored: np.ndarray  # bool

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.times, self.keys, self.owners, self.dhashes, self.phashes, self.mirrored))

    def only(self, images: np.ndarray) -> _Block:
        """The block with only the images marked (a bool per image), renumbered."""
        rows = images[self.owners]
        renumbered = np.cumsum(images, dtype=np.int64) - 1
        return _Block(self.times[images], self.keys[images], renumbered[self.owners[rows]].astype(np.int32),
                      self.dhashes[rows], self.phashes[rows], self.mirrored[rows])


class RecentHashes:
    """The hashes of the images stored after :attr:`held_after`, block by block in the
    order they were read. Not thread-safe: the caller holds one pass at a time."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.held_after = float("-inf")  # images fetched at or before this are not held (the cap)
        self.newest: float | None = None
        self._blocks: list[_Block] = []
        # URL: fetch time, of the images held from the last SLACK seconds, in the order read
        self._tail: OrderedDict[str, float] = OrderedDict()
        self.nbytes = 0

    @property
    def images(self) -> int:
        return sum(b.times.size for b in self._blocks)

    def read_from(self, since: float) -> float:
        """The fetch time after which the next read starts: SLACK before the newest image
        held (or than the bound let go, where it let all go), or the window's start."""
        newest = self.newest if self.newest is not None else self.held_after
        return max(since, newest - SLACK)

    def add(self, times: np.ndarray, urls: list[str], owners: np.ndarray, dhashes: np.ndarray,
            phashes: np.ndarray, mirrored: np.ndarray) -> None:
        """A page read from the store in fetch order: its images' fetch times and URLs, and
        every dHash they hold with its pHash (``owners``: the image's index in the page), as
        ``work.recent_hashes`` gives them. Images already held (read again within SLACK: the
        same URL at the same time; one fetched again since is new) or fetched at or before
        :attr:`held_after` are left out."""
        fresh = np.fromiter((self._tail.get(url) != t for url, t in zip(urls, times.tolist(), strict=True)), bool,
                            len(urls))
        fresh &= times > self.held_after
        if not fresh.any():
            return
        block = _Block(times, np.fromiter(map(hash, urls), np.int64, len(urls)), owners.astype(np.int32), dhashes,
                       phashes, mirrored)
        if not fresh.all():
            block = block.only(fresh)
        last = self._blocks[-1] if self._blocks else None
        if last is not None and last.dhashes.size + block.dhashes.size <= BLOCK_HASHES:
            self.nbytes -= last.nbytes
            block = _Block(np.concatenate([last.times, block.times]), np.concatenate([last.keys, block.keys]),
                           np.concatenate([last.owners, block.owners + np.int32(last.times.size)]),
                           np.concatenate([last.dhashes, block.dhashes]),
                           np.concatenate([last.phashes, block.phashes]),
                           np.concatenate([last.mirrored, block.mirrored]))
            self._blocks[-1] = block
        else:
            self._blocks.append(block)
        self.nbytes += block.nbytes
        newest = float(times[fresh].max())
        self.newest = newest if self.newest is None else max(self.newest, newest)
        self._tail.update((url, t) for url, t, keep in zip(urls, times.tolist(), fresh, strict=True) if keep)
        while self._tail and next(iter(self._tail.values())) <= self.newest - SLACK:
            self._tail.popitem(last=False)
        self._trim()

    def forget_before(self, since: float) -> None:
        """Let go of the blocks fetched entirely at or before ``since`` (out of the window)."""
        kept = [b for b in self._blocks if b.times.size and b.times.max() > since]
        self.nbytes = sum(b.nbytes for b in kept)
        self._blocks = kept

    def _trim(self) -> None:
        """Past max_bytes: the oldest blocks go, and with them every image held that was
        fetched no later than any of theirs (a block may hold a late row), so that what is
        held is exactly what was fetched after :attr:`held_after`."""
        if self.nbytes <= self.max_bytes:
            return
        while self._blocks and self.nbytes > self.max_bytes:
            gone = self._blocks.pop(0)
            self.nbytes -= gone.nbytes
            if gone.times.size:
                self.held_after = max(self.held_after, float(gone.times.max()))
        blocks = []
        for b in self._blocks:
            keep = b.times > self.held_after
            blocks.append(b if keep.all() else b.only(keep))
        self._blocks = [b for b in blocks if b.times.size]
        self.nbytes = sum(b.nbytes for b in self._blocks)
        if not self._blocks:
            self.newest = None
            self._tail.clear()

    def near(self, test: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int], np.ndarray],
             since: float) -> tuple[np.ndarray, np.ndarray, int]:
        """(the fetch times and URL keys (hash()) of the held images fetched after ``since``
        that ``test`` keeps, how many held images were tested). ``test(owners, dhashes,
        phashes, mirrored, images)`` gives a bool per image, as ``work.recent_images``'
        ``near`` does."""
        times, keys, tested = [], [], 0
        for b in self._blocks:
            inside = b.times > since
            if not inside.any():
                continue
            keep = test(b.owners, b.dhashes, b.phashes, b.mirrored, b.times.size) & inside
            tested += int(inside.sum())
            times.append(b.times[keep])
            keys.append(b.keys[keep])
        if not times:
            return np.zeros(0), np.zeros(0, np.int64), tested
        return np.concatenate(times), np.concatenate(keys), tested
