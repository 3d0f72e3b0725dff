"""The matcher's batch forms as arrays: query rows in (every view of every fingerprint),
matching pairs out. Plain numpy, no compiled code."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from monitor.fingerprints import Fingerprint
from monitor.fingerprints.fasthash import FINE_WORDS


@dataclass(frozen=True, slots=True)
class PairMatches:
    """Batch results as parallel arrays (one row per matching pair)."""
    query: np.ndarray        # index into the query list
    entry_id: np.ndarray
    tier: np.ndarray         # index into Matcher.tiers
    dhash_distance: np.ndarray
    phash_distance: np.ndarray
    mirrored: np.ndarray
    fine_distance: np.ndarray  # -1 where the pair was decided without fine hashes
    query_dhash: np.ndarray    # the dHashes of the two views that met
    library_dhash: np.ndarray

    def _take(self, keep) -> PairMatches:
        return PairMatches(*(a[keep] for a in (self.query, self.entry_id, self.tier, self.dhash_distance,
                                               self.phash_distance, self.mirrored, self.fine_distance,
                                               self.query_dhash, self.library_dhash)))


def fine_words(fp) -> np.ndarray | None:
    """(2, FINE_WORDS) uint64: the fine hashes of a fingerprint and its mirror, or None."""
    if not fp.fine:
        return None
    return np.frombuffer(fp.fine + fp.fine_mirror, "<u8").astype(np.uint64).reshape(2, -1)


def fine_rows(views: list) -> np.ndarray:
    """(2 x len(views), FINE_WORDS) uint64: each view's fine hashes, then its mirror's (every
    view has them), in one conversion: per view, it was most of a retro-match's pass over
    100,000 stored fingerprints."""
    data = b"".join(v.fine + v.fine_mirror for v in views)
    if len(data) != len(views) * 2 * FINE_WORDS * 8:
        raise ValueError("fine hashes of another length than FINE_WORDS")
    return np.frombuffer(data, "<u8").astype(np.uint64).reshape(-1, FINE_WORDS)


class QueryRows(NamedTuple):
    dhash: np.ndarray
    phash: np.ndarray
    dhash_mirror: np.ndarray
    phash_mirror: np.ndarray
    owners: np.ndarray
    fine: np.ndarray         # (rows, FINE_WORDS); zero rows where unknown
    fine_mirror: np.ndarray


def query_rows(fps: list[Fingerprint]) -> QueryRows:
    """Arrays over every view of every fingerprint, for :meth:`Matcher.match_rows`."""
    rows, owners, fines = [], [], []
    zero = np.zeros((2, FINE_WORDS), np.uint64)
    for i, fp in enumerate(fps):
        for view in (fp, *fp.views):
            rows.append((view.dhash, view.phash, view.dhash_mirror, view.phash_mirror))
            owners.append(i)
            f = fine_words(view)
            fines.append(zero if f is None else f)
    table = np.array(rows, np.uint64).reshape(-1, 4)
    fine = np.array(fines, np.uint64).reshape(-1, 2, FINE_WORDS)
    return QueryRows(table[:, 0], table[:, 1], table[:, 2], table[:, 3], np.array(owners, np.int64),
                     fine[:, 0], fine[:, 1])


def best_per_pair(res: PairMatches, best_only: bool) -> PairMatches:
    """One row per (query, entry) (the better of plain/mirrored), or one row
    per query with ``best_only``; sorted by query, tier, distance."""
    score = res.dhash_distance + res.phash_distance + np.maximum(res.fine_distance, 0)
    res = res._take(np.lexsort((res.mirrored, score, res.tier, res.entry_id, res.query)))
    if res.query.size:
        key_new = np.ones(res.query.size, bool)
        key_new[1:] = (res.query[1:] != res.query[:-1]) | (res.entry_id[1:] != res.entry_id[:-1])
        res = res._take(key_new)
    score = res.dhash_distance + res.phash_distance + np.maximum(res.fine_distance, 0)
    res = res._take(np.lexsort((res.entry_id, score, res.tier, res.query)))
    if best_only and res.query.size:
        first = np.ones(res.query.size, bool)
        first[1:] = res.query[1:] != res.query[:-1]
        res = res._take(first)
    return res
