"""The match decision: dHash kernel pass, pHash verification, tiers.

First pass: the 64-bit dHash of each query view (the whole picture, the
picture inside a detected frame) and of its mirror image against every
library row (each entry whole, at centre crops, inside its own frame) with
the numba kernel, at the loosest tier's radius. Second pass: each candidate's
pHash distance, an independent hash, must be small too, and so must the sum
of both. A pair's tier is the strictest tier whose limits it meets; an
entry's match is its best row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import bitslice
from .fingerprint import Fingerprint
from .library import LibraryIndex


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    dhash_max: int      # bits out of 64
    phash_max: int      # bits out of 64; 64 disables verification
    sum_max: int = 128  # dHash + pHash bits


# From bench/quality.py on the corpus (README "Match tiers"): near is about
# the dHash + pHash threshold where unrelated pairs match at 1e-4 (measured
# 1.2e-4), loose at ~1e-3 (6.5e-4); the per-hash caps keep one hash from
# carrying a match alone.
EXACT = Tier("exact", 4, 8, 10)
NEAR = Tier("near", 16, 20, 24)
LOOSE = Tier("loose", 20, 24, 28)
PRESETS: dict[str, tuple[Tier, ...]] = {
    "exact": (EXACT,),
    "near": (EXACT, NEAR),
    "loose": (EXACT, NEAR, LOOSE),
}


def threshold_tiers(threshold: int) -> tuple[Tier, ...]:
    """The seed's matcher: dHash distance only, no verification."""
    if not 0 <= threshold <= 64:
        raise ValueError(f"threshold must be 0..64 bits, got {threshold}")
    return (Tier("exact", min(threshold, EXACT.dhash_max), 64, 128), Tier("threshold", threshold, 64, 128))


@dataclass(frozen=True, slots=True)
class Match:
    entry_id: int
    tier: str
    dhash_distance: int
    phash_distance: int
    mirrored: bool

    @property
    def decided_by(self) -> str:
        return "dhash+phash" if self.tier != "threshold" else "dhash"


@dataclass(frozen=True, slots=True)
class PairMatches:
    """Batch results as parallel arrays (one row per matching pair)."""
    query: np.ndarray        # index into the query list
    entry_id: np.ndarray
    tier: np.ndarray         # index into Matcher.tiers
    dhash_distance: np.ndarray
    phash_distance: np.ndarray
    mirrored: np.ndarray


def _popcount(a: np.ndarray) -> np.ndarray:
    return np.bitwise_count(a).astype(np.int64)


class Matcher:
    def __init__(self, index: LibraryIndex, tiers: tuple[Tier, ...] = PRESETS["loose"]):
        if not tiers:
            raise ValueError("at least one tier is needed")
        self.index = index
        self.tiers = tiers
        self.radius = max(t.dhash_max for t in tiers)
        self._d_max = np.array([t.dhash_max for t in tiers])
        self._p_max = np.array([t.phash_max for t in tiers])
        self._s_max = np.array([t.sum_max for t in tiers])

    def _tier_of(self, d: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Index of the strictest tier each (d, p) meets; len(tiers) if none."""
        ok = ((d[:, None] <= self._d_max[None, :]) & (p[:, None] <= self._p_max[None, :])
              & ((d + p)[:, None] <= self._s_max[None, :]))
        return np.where(ok.any(axis=1), ok.argmax(axis=1), len(self.tiers))

    def match(self, fp: Fingerprint) -> list[Match]:
        """Every library entry this fingerprint matches, best first.

        A degenerate fingerprint (flat, tiny) matches nothing: it would
        otherwise match every other flat image.
        """
        if fp.degenerate is not None:
            return []
        # Every view, plain and mirrored, in one pass over the library: rows
        # 2k and 2k+1 are view k and its mirror.
        views = (fp, *fp.views)
        qd = np.array([h for v in views for h in (v.dhash, v.dhash_mirror)], np.uint64)
        qp = np.array([h for v in views for h in (v.phash, v.phash_mirror)], np.uint64)
        with self.index.lock:
            lib_d = self.index.hashes("dhash")
            pq, pl, pd = bitslice.pairs_within(qd, lib_d, self.radius, planes=self.index.planes(),
                                               threads=1)
            if not pq.size:
                return []
            phs = _popcount(self.index.hashes("phash")[pl] ^ qp[pq])
            ids = self.index.ids[pl]
        return self._decide(ids, pd.astype(np.int64), phs, pq % 2 == 1)

    def _decide(self, ids, d, p, mirrored) -> list[Match]:
        tier = self._tier_of(d, p)
        keep = tier < len(self.tiers)
        best: dict[int, Match] = {}
        for i in np.flatnonzero(keep):
            m = Match(int(ids[i]), self.tiers[tier[i]].name, int(d[i]), int(p[i]), bool(mirrored[i]))
            old = best.get(m.entry_id)
            if old is None or (tier[i], m.dhash_distance + m.phash_distance) < (
                    self._rank(old), old.dhash_distance + old.phash_distance):
                best[m.entry_id] = m
        return sorted(best.values(), key=lambda m: (self._rank(m), m.dhash_distance, m.entry_id))

    def _rank(self, m: Match) -> int:
        return next(i for i, t in enumerate(self.tiers) if t.name == m.tier)

    def match_batch(self, dhash: np.ndarray, phash: np.ndarray, dhash_mirror: np.ndarray,
                    phash_mirror: np.ndarray, *, best_only: bool = False,
                    threads: int | None = None, owners: np.ndarray | None = None) -> PairMatches:
        """All pairs (query, entry) that meet a tier, for M query rows at once.

        ``owners`` maps each query row to the query it is a view of (see
        :func:`query_rows`); results are per owner, best view kept.
        """
        m = dhash.shape[0]
        with self.index.lock:
            lib_d = self.index.hashes("dhash").copy()
            lib_p = self.index.hashes("phash").copy()
            ids = self.index.ids.copy()
            planes = self.index.planes().copy()
        queries = np.concatenate([dhash, dhash_mirror]).astype(np.uint64)
        qphash = np.concatenate([phash, phash_mirror]).astype(np.uint64)
        pq, pl, pd = bitslice.pairs_within(queries, lib_d, self.radius, planes=planes, threads=threads)
        p = _popcount(qphash[pq] ^ lib_p[pl])
        d = pd.astype(np.int64)
        tier = self._tier_of(d, p)
        keep = tier < len(self.tiers)
        q = pq[keep] % m if m else pq[keep]
        if owners is not None:
            q = np.asarray(owners, np.int64)[q]
        res = PairMatches(q, ids[pl[keep]], tier[keep], d[keep], p[keep], pq[keep] >= m)
        return _best_per_pair(res, best_only)


def query_rows(fps: list[Fingerprint]):
    """(dhash, phash, dhash_mirror, phash_mirror, owners) arrays over every view
    of every fingerprint, for :meth:`Matcher.match_batch`."""
    rows, owners = [], []
    for i, fp in enumerate(fps):
        for view in (fp, *fp.views):
            rows.append((view.dhash, view.phash, view.dhash_mirror, view.phash_mirror))
            owners.append(i)
    table = np.array(rows, np.uint64).reshape(-1, 4)
    return (table[:, 0], table[:, 1], table[:, 2], table[:, 3], np.array(owners, np.int64))


def _best_per_pair(res: PairMatches, best_only: bool) -> PairMatches:
    """One row per (query, entry) (the better of plain/mirrored), or one row
    per query with ``best_only``; sorted by query, tier, distance."""
    order = np.lexsort((res.mirrored, res.dhash_distance + res.phash_distance, res.tier, res.entry_id,
                        res.query))
    res = PairMatches(*(a[order] for a in (res.query, res.entry_id, res.tier,
                                           res.dhash_distance, res.phash_distance, res.mirrored)))
    if res.query.size:
        key_new = np.ones(res.query.size, bool)
        key_new[1:] = (res.query[1:] != res.query[:-1]) | (res.entry_id[1:] != res.entry_id[:-1])
        res = PairMatches(*(a[key_new] for a in (res.query, res.entry_id, res.tier,
                                                 res.dhash_distance, res.phash_distance,
                                                 res.mirrored)))
    order = np.lexsort((res.entry_id, res.dhash_distance, res.tier, res.query))
    res = PairMatches(*(a[order] for a in (res.query, res.entry_id, res.tier,
                                           res.dhash_distance, res.phash_distance, res.mirrored)))
    if best_only and res.query.size:
        first = np.ones(res.query.size, bool)
        first[1:] = res.query[1:] != res.query[:-1]
        res = PairMatches(*(a[first] for a in (res.query, res.entry_id, res.tier,
                                               res.dhash_distance, res.phash_distance,
                                               res.mirrored)))
    return res
