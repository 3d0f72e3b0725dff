"""The match decision: dHash kernel pass, verification, tiers.

First pass: the 64-bit dHash of each query view (the whole picture, the
picture inside a detected frame) and of its mirror image against every
library row (each entry whole, at centre crops, inside its own frame) with
the numba kernel, at the loosest tier's radius. Second pass, on the few
candidates: their pHash distance (an independent 64-bit hash) and the
distance of their 256-bit fine hashes (pHash-256 and dHash-256, finer
detail the first pass never saw). A candidate passes a tier when dHash +
pHash is within FINE_CANDIDATE_SUM and dHash + pHash + fine within the
tier's ``score_max``: unrelated pictures sit near 256 of the fine hashes'
512 bits, so the pair rate of false matches falls ~10x at the same recall
(bench/quality.py). Where either side has no fine hashes (imported
imagehash hashes, rows from older versions), the 64-bit limits decide.
A pair's tier is the strictest tier it meets; an entry's match is its best row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import bitslice
from .fasthash import FINE_WORDS
from .fingerprint import Fingerprint
from .library import LibraryIndex


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    dhash_max: int      # bits out of 64
    phash_max: int      # bits out of 64; 64 disables verification
    sum_max: int = 128  # dHash + pHash bits
    # dHash + pHash + fine bits (of 64 + 64 + 512), for pairs where both sides
    # have fine hashes; None decides on the 64-bit limits only.
    score_max: int | None = None


# dHash + pHash bound on candidates that the fine hashes then verify: looser
# than any 64-bit tier (bench/quality.py: widening it further adds nothing).
FINE_CANDIDATE_SUM = 36


# From bench/quality.py on the corpus (200 library pictures, 7,800 reposts, 300
# distractors; README "Match tiers"). With fine hashes: near is the score where
# unrelated pairs match at <= 2.5e-5 (so <= 0.5% of unrelated posts alarm
# against 200 entries), loose at ~1e-4. Without them (imported hashes): the
# dHash + pHash limits, near at ~1e-4, loose at ~1e-3; the per-hash caps keep
# one hash from carrying a match alone. Exact is decided on the 64-bit hashes
# alone: a few bits apart in both is a copy (no false pair measured).
# Near keeps a 16-bit dHash radius: at 20 the kernel hands back ~70x more
# random candidates and the daemon's match time doubles, for 0.2% of recall.
EXACT = Tier("exact", 4, 8, 10)
NEAR = Tier("near", 16, 20, 24, score_max=139)
LOOSE = Tier("loose", 20, 24, 28, score_max=153)
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
    fine_distance: int | None = None  # bits of 512; None: decided without fine hashes

    @property
    def decided_by(self) -> str:
        if self.tier == "threshold":
            return "dhash"
        return "dhash+phash" if self.fine_distance is None else "dhash+phash+fine"


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

    def _take(self, keep) -> PairMatches:
        return PairMatches(*(a[keep] for a in (self.query, self.entry_id, self.tier, self.dhash_distance,
                                               self.phash_distance, self.mirrored, self.fine_distance)))


def _popcount(a: np.ndarray) -> np.ndarray:
    return np.bitwise_count(a).astype(np.int64)


def _score(m: Match) -> int:
    return m.dhash_distance + m.phash_distance + (m.fine_distance or 0)


def fine_words(fp) -> np.ndarray | None:
    """(2, FINE_WORDS) uint64: the fine hashes of a fingerprint and its mirror, or None."""
    if not fp.fine:
        return None
    return np.frombuffer(fp.fine + fp.fine_mirror, "<u8").astype(np.uint64).reshape(2, -1)


def _fine_distances(q_fine: np.ndarray | None, lib_fine: np.ndarray) -> np.ndarray:
    """Per candidate pair, the fine distance or -1 where either side has none."""
    if q_fine is None:
        return np.full(lib_fine.shape[0], -1, np.int64)
    f = _popcount(q_fine ^ lib_fine).sum(axis=1)
    return np.where(lib_fine.any(axis=1) & q_fine.any(axis=1), f, -1)


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
        # -1: this tier does not use fine hashes (the 64-bit limits decide)
        self._score_max = np.array([-1 if t.score_max is None else t.score_max for t in tiers])
        # no tier accepts a pair whose dHash + pHash exceeds this
        self._sum_bound = max(FINE_CANDIDATE_SUM if (self._score_max >= 0).any() else 0,
                              int(self._s_max.max()), 0)

    def _tier_of(self, d: np.ndarray, p: np.ndarray, f: np.ndarray | None = None) -> np.ndarray:
        """Index of the strictest tier each pair meets; len(tiers) if none.
        ``f`` is the fine distance, -1 where unknown."""
        plain = ((d[:, None] <= self._d_max[None, :]) & (p[:, None] <= self._p_max[None, :])
                 & ((d + p)[:, None] <= self._s_max[None, :]))
        if f is None:
            ok = plain
        else:
            by_fine = (f[:, None] >= 0) & (self._score_max[None, :] >= 0)
            fine_ok = ((d[:, None] <= self._d_max[None, :]) & ((d + p)[:, None] <= FINE_CANDIDATE_SUM)
                       & ((d + p + f)[:, None] <= self._score_max[None, :]))
            ok = np.where(by_fine, fine_ok, plain)
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
        fines = [fine_words(v) for v in views]
        qf = np.concatenate(fines) if all(x is not None for x in fines) else None
        with self.index.lock:
            lib_d = self.index.hashes("dhash")
            pq, pl, pd = bitslice.pairs_within(qd, lib_d, self.radius, planes=self.index.planes(),
                                               threads=1)
            if not pq.size:
                return []
            phs = _popcount(self.index.hashes("phash")[pl] ^ qp[pq])
            # Most kernel candidates fail on dHash + pHash already: only the
            # rest pay for the fine hashes' gather and popcount.
            near = pd + phs <= self._sum_bound
            pq, pl, pd, phs = pq[near], pl[near], pd[near], phs[near]
            f = _fine_distances(qf[pq] if qf is not None else None, self.index.fine()[pl])
            ids = self.index.ids[pl]
        return self._decide(ids, pd.astype(np.int64), phs, f, pq % 2 == 1)

    def _decide(self, ids, d, p, f, mirrored) -> list[Match]:
        tier = self._tier_of(d, p, f)
        keep = tier < len(self.tiers)
        best: dict[int, Match] = {}
        f = self._fine_used(tier, f)
        for i in np.flatnonzero(keep):
            m = Match(int(ids[i]), self.tiers[tier[i]].name, int(d[i]), int(p[i]), bool(mirrored[i]),
                      int(f[i]) if f[i] >= 0 else None)
            old = best.get(m.entry_id)
            if old is None or (tier[i], _score(m)) < (self._rank(old), _score(old)):
                best[m.entry_id] = m
        return sorted(best.values(), key=lambda m: (self._rank(m), m.dhash_distance, m.entry_id))

    def _fine_used(self, tier: np.ndarray, f: np.ndarray) -> np.ndarray:
        """The fine distance where the pair's tier decided on it, else -1."""
        uses = np.append(self._score_max >= 0, False)  # index len(tiers): no tier
        return np.where(uses[tier], f, -1)

    def _rank(self, m: Match) -> int:
        return next(i for i, t in enumerate(self.tiers) if t.name == m.tier)

    def match_batch(self, dhash: np.ndarray, phash: np.ndarray, dhash_mirror: np.ndarray,
                    phash_mirror: np.ndarray, *, best_only: bool = False,
                    threads: int | None = None, owners: np.ndarray | None = None,
                    fine: np.ndarray | None = None, fine_mirror: np.ndarray | None = None
                    ) -> PairMatches:
        """All pairs (query, entry) that meet a tier, for M query rows at once.

        ``owners`` maps each query row to the query it is a view of (see
        :func:`query_rows`); results are per owner, best view kept. ``fine``
        and ``fine_mirror`` are (M, FINE_WORDS) (all-zero rows: unknown).
        """
        m = dhash.shape[0]
        with self.index.lock:
            lib_d = self.index.hashes("dhash").copy()
            lib_p = self.index.hashes("phash").copy()
            lib_f = self.index.fine().copy()
            ids = self.index.ids.copy()
            planes = self.index.planes().copy()
        queries = np.concatenate([dhash, dhash_mirror]).astype(np.uint64)
        qphash = np.concatenate([phash, phash_mirror]).astype(np.uint64)
        qfine = (np.concatenate([fine, fine_mirror]).astype(np.uint64)
                 if fine is not None and fine_mirror is not None else None)
        pq, pl, pd = bitslice.pairs_within(queries, lib_d, self.radius, planes=planes, threads=threads)
        p = _popcount(qphash[pq] ^ lib_p[pl])
        near = pd + p <= self._sum_bound
        pq, pl, pd, p = pq[near], pl[near], pd[near], p[near]
        f = _fine_distances(qfine[pq] if qfine is not None else None, lib_f[pl])
        d = pd.astype(np.int64)
        tier = self._tier_of(d, p, f)
        keep = tier < len(self.tiers)
        q = pq[keep] % m if m else pq[keep]
        if owners is not None:
            q = np.asarray(owners, np.int64)[q]
        f = self._fine_used(tier, f)
        res = PairMatches(q, ids[pl[keep]], tier[keep], d[keep], p[keep], pq[keep] >= m, f[keep])
        return _best_per_pair(res, best_only)

    def match_rows(self, rows: QueryRows, **kwargs) -> PairMatches:
        """:meth:`match_batch` over :func:`query_rows`' result."""
        return self.match_batch(rows.dhash, rows.phash, rows.dhash_mirror, rows.phash_mirror,
                                owners=rows.owners, fine=rows.fine, fine_mirror=rows.fine_mirror,
                                **kwargs)


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


def _best_per_pair(res: PairMatches, best_only: bool) -> PairMatches:
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
