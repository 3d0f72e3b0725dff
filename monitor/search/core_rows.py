"""Each entry's core rows: the rows a post's mirror image is compared with.

A post's mirror image is compared only with each entry's core rows (its whole picture,
its 10% centre crop, and its crops with 15% cut off the left or the right), not with
all of its ~9-11 views. Measured with the whole picture and centre crop alone: the same
recall on bench/heldout.py's tuning half (97.0%) and bench/quality.py (98.5%, its
flipped and cropped reposts included); the side crops keep a flipped repost cut on one
side within the second look's reach (tests/test_detective.py). So the mirror half of
the first pass costs 4 rows per entry instead of ~10. The index keeps them in a row
store of their own (monitor/search/index.py).
"""

from __future__ import annotations

import numpy as np

from monitor.fingerprints.crops import LIBRARY_CROPS

# Positions among an entry's rows (0: whole, then its views in the order library_fingerprints
# makes them, LIBRARY_CROPS first) of its core rows.
CORE_POSITIONS = (0, *(1 + LIBRARY_CROPS.index(name) for name in ("centre-10", "left-15", "right-15")))


def core_rows_of(ids: np.ndarray) -> np.ndarray:
    """A bool per row: True where a row's rank among its id's rows, in row order, is one of
    CORE_POSITIONS (rows laid out as :meth:`LibraryIndex.add` and the library's reader
    lay them out: an entry's whole picture, then its views in order)."""
    ids = np.asarray(ids)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    rank = np.arange(ids.size) - np.repeat(starts, np.diff(np.r_[starts, ids.size]))
    out = np.zeros(ids.size, bool)
    out[order[np.isin(rank, CORE_POSITIONS)]] = True
    return out
