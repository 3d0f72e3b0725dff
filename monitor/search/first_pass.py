"""The matcher's first pass: every (query hash, library row) pair within the dHash radius.

A post's own views go against every row (each entry whole, its crops, its frame); its
mirror images only against each entry's core rows (monitor/search/core_rows.py). Each of the
index's two row stores is read once, by every query that needs it.
"""

from __future__ import annotations

import numpy as np

from monitor.search.index import LibraryIndex
from monitor.search.radius import pairs_within


def first_pass(index: LibraryIndex, queries: np.ndarray, mirrored: np.ndarray, radius: int, *,
               threads: int | None = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(pair_query, pair_row, pair_distance)`` ordered by query, then row (rows numbered
    across the index's stores); ``mirrored`` marks the queries that are mirror images.
    Call under ``index.lock``."""
    queries = np.ascontiguousarray(queries, np.uint64)
    plain = np.flatnonzero(~np.asarray(mirrored, bool))
    parts = []
    for store, asking, first_row in ((index.core, np.arange(queries.size), 0),
                                     (index.other, plain, index.core.n)):
        if asking.size and store.n:
            pq, pl, pd = pairs_within(queries[asking], store.dhash_array(), radius, planes=store.scan_planes(),
                                      threads=threads, rows=store.n)
            parts.append((asking[pq], first_row + pl.astype(np.int64), pd))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
    pq, pl, pd = (np.concatenate(x) for x in zip(*parts, strict=True))
    order = np.lexsort((pl, pq))
    return pq[order], pl[order], pd[order]
