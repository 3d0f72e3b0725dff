"""The match decision: dHash kernel pass, verification, tiers.

First pass (first_pass.py): the 64-bit dHash of each query view (the whole
picture, the picture inside a detected frame) against every library row (each
entry whole, at centre crops, inside its own frame), and of its mirror image
against each entry's whole picture and 10% centre crop, with the numba kernel,
at the loosest tier's radius. Second pass, on the few
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

import functools
from collections.abc import Callable

import numpy as np
from numba import njit

from monitor.fingerprints import Fingerprint, KeypointFinder
from monitor.fingerprints.fasthash import FINE_WORDS
from monitor.search import detective
from monitor.search.answers import HashAnswer, Match, keypoint_pass, second_look_tier
from monitor.search.budget import LookBudget
from monitor.search.first_pass import first_pass
from monitor.search.index import HASH_FIELDS, LibraryIndex
from monitor.search.popcount import popcount64
from monitor.search.rows import PairMatches, QueryRows, best_per_pair, fine_rows, fine_words, query_rows
from monitor.search.tiers import (
    EXACT,
    FINE_CANDIDATE_SUM,
    LOOSE,
    LOW_DETAIL_DHASH_MAX,
    LOW_DETAIL_FINE_MAX,
    LOW_DETAIL_PHASH_MAX,
    NEAR,
    PRESETS,
    Tier,
    threshold_tiers,
)

__all__ = ["EXACT", "FINE_CANDIDATE_SUM", "LOOSE", "NEAR", "PRESETS", "HashAnswer", "Match", "Matcher", "PairMatches",
           "QueryRows", "Tier", "fine_words", "keypoint_source", "query_rows", "threshold_tiers"]


def _score(m: Match) -> int:
    return m.dhash_distance + m.phash_distance + (m.fine_distance or 0)


@njit(cache=True, nogil=True)
def _known(fine, row):
    """A fine-hash row that is set (all zero: unknown)."""
    for w in range(fine.shape[1]):
        if fine[row, w] != 0:
            return True
    return False


@njit(cache=True, nogil=True)
def _verify(pq, pl, pd, q_phash, lib_phash, q_fine, cand_fine, q_low, lib_low, d_max, p_max, s_max,
            score_max, sum_bound):
    """The second pass over the kernel's candidates, in one compiled loop.

    Returns, for the candidates that meet a tier: their positions in the
    input, pHash distance, fine distance (-1 where the tier decided without
    it) and tier (index of the strictest tier met). Only candidates within
    ``sum_bound`` of dHash + pHash pay for the fine hashes: ``cand_fine[i]``
    holds candidate i's library row's (read for those alone: see
    :func:`_past_first_gates`). ``q_fine`` with no rows means the query has
    no fine hashes. A pair with a low-detail side (``q_low``, ``lib_low``;
    ``q_low`` empty: no query is) meets only the low-detail limits, on the
    fine hashes too, and counts as the strictest tier.
    """
    n = pq.size
    tiers = d_max.size
    keep = np.empty(n, np.int64)
    p_out = np.empty(n, np.int64)
    f_out = np.empty(n, np.int64)
    t_out = np.empty(n, np.int64)
    k = 0
    for i in range(n):
        q, e, d = pq[i], pl[i], np.int64(pd[i])
        p = np.int64(popcount64(q_phash[q] ^ lib_phash[e]))
        if d + p > sum_bound:
            continue
        f = np.int64(-1)
        if q_fine.shape[0] > 0 and _known(q_fine, q) and _known(cand_fine, i):
            f = 0
            for w in range(q_fine.shape[1]):
                f += popcount64(q_fine[q, w] ^ cand_fine[i, w])
        if lib_low[e] != 0 or (q_low.shape[0] > 0 and q_low[q] != 0):
            if d <= LOW_DETAIL_DHASH_MAX and p <= LOW_DETAIL_PHASH_MAX and 0 <= f <= LOW_DETAIL_FINE_MAX:
                keep[k] = i
                p_out[k] = p
                f_out[k] = f
                t_out[k] = 0
                k += 1
            continue
        tier = tiers
        for t in range(tiers):
            if d > d_max[t]:
                continue
            if f >= 0 and score_max[t] >= 0:
                ok = d + p <= FINE_CANDIDATE_SUM and d + p + f <= score_max[t]
            else:
                ok = p <= p_max[t] and d + p <= s_max[t]
            if ok:
                tier = t
                break
        if tier == tiers:
            continue
        keep[k] = i
        p_out[k] = p
        f_out[k] = f if score_max[tier] >= 0 else -1
        t_out[k] = tier
        k += 1
    return keep[:k], p_out[:k], f_out[:k], t_out[:k]


_NO_FINE = np.zeros((0, FINE_WORDS), np.uint64)
_NO_FLAGS = np.zeros(0, np.uint8)


def _past_first_gates(pq, pd, q_phash, pair_phash, sum_bound: int) -> np.ndarray:
    """Candidates whose dHash + pHash distance is within ``sum_bound``: the only
    ones whose fine hashes any tier reads (numpy, not compiled: a few hundred).
    ``pair_phash``: each pair's library row's pHash."""
    p = np.bitwise_count(q_phash[pq] ^ pair_phash)
    return np.flatnonzero(pd.astype(np.int64) + p <= sum_bound)


def _candidate_fine(n: int, past: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(n, FINE_WORDS): the fine hashes ``rows`` at candidate positions ``past``, zero elsewhere."""
    out = np.zeros((n, FINE_WORDS), np.uint64)
    out[past] = rows
    return out


def keypoint_source(fp: Fingerprint, finder: Callable[..., bytes] | None) -> bytes | Callable[..., bytes] | None:
    """A post's keypoints (packed), or what finds them: from its keypoint picture (a
    scaled-out fetch worker's, as the api's check has it), or the caller's finder (called once each way, though
    a confirmation and a second look may both ask); None where there is neither."""
    if fp.keypoints:
        return fp.keypoints
    if fp.keypoint_picture:
        return KeypointFinder(picture=fp.keypoint_picture)
    return functools.lru_cache(maxsize=4)(finder) if finder is not None else None


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
        # a post no tier met gets a second look at its nearest entries' keypoints, and a
        # match there counts as near (where near is among the tiers)
        self._second_look_tier = second_look_tier([t.name for t in tiers])
        # no pair of a larger dHash + pHash is a match of any tier or a second look's candidate
        self.pair_sum_bound = max(self._sum_bound, detective.CANDIDATE_SUM if self._second_look_tier is not None else 0)

    def _verify(self, pq, pl, pd, q_phash, q_fine, q_low=None, pair_fine=None, lib_phash=None, lib_low=None):
        """The second pass over the first pass's pairs (under the index's lock): the library
        rows' pHashes and flags are gathered for the pairs, their fine hashes only for the
        candidates past the dHash + pHash gate (``lib_phash``, ``lib_low``: the pHashes and
        flags where the caller has gathered them already). ``pair_fine`` (an int64
        array over the pairs, filled with -1): each such candidate's fine distance is
        written into it where both sides have fine hashes (the second look's candidates
        are held to it)."""
        lib_phash = self.index.phash_of(pl) if lib_phash is None else lib_phash
        lib_low = self.index.low_detail_of(pl) if lib_low is None else lib_low
        past = _past_first_gates(pq, pd, q_phash, lib_phash, self._sum_bound) if q_fine is not None \
            else np.zeros(0, np.int64)
        rows = self.index.fine_of(pl[past])
        if pair_fine is not None and past.size:
            query = q_fine[pq[past]]
            bits = np.bitwise_count(rows ^ query).sum(axis=1, dtype=np.int64)
            pair_fine[past] = np.where(rows.any(axis=1) & query.any(axis=1), bits, -1)
        # the library's arrays here are per pair: pair i's row is i
        return _verify(pq, np.arange(pq.size), pd, q_phash, lib_phash, _NO_FINE if q_fine is None else q_fine,
                       _candidate_fine(pq.size, past, rows), _NO_FLAGS if q_low is None else q_low, lib_low,
                       self._d_max, self._p_max, self._s_max, self._score_max, self._sum_bound)

    def match(self, fp: Fingerprint, keypoints: Callable[..., bytes] | None = None) -> list[Match]:
        """Every library entry this fingerprint matches, best first.

        A degenerate fingerprint (flat, tiny) matches nothing: it would
        otherwise match every other flat image. ``keypoints(mirrored=False, limit=N)``:
        finds the post's keypoints (at most N), or its mirror image's, called only when it
        needs a second look (else those ``fp.keypoint_picture`` gives, or
        ``fp.keypoints``, which serve unmirrored candidates only).
        """
        return self.match_many([fp], None if keypoints is None else [keypoints])[0]

    def match_many(self, fps: list[Fingerprint], keypoints: list[Callable[..., bytes] | None] | None = None,
                   *, exclude_self: bool = False, budget: LookBudget | None = None) -> list[list[Match]]:
        """:meth:`match` of each fingerprint, in one pass over the library per kind of
        query (with fine hashes, without): the hashes' answers, then the keypoints' say.
        ``exclude_self``: the library was indexed from these fingerprints (entry id i is
        ``fps[i]``, a catalog's self-join), and a fingerprint's own entry is no match of it.
        ``budget``: which posts get a second look (a daemon's stream); none: every one that needs it."""
        sources = {i: source for i, fp in enumerate(fps)
                   if fp.degenerate is None and (source := keypoint_source(fp, (keypoints or [None] * len(fps))[i]))}
        answers = self.hash_answers(fps, {i: callable(s) for i, s in sources.items()}, exclude_self=exclude_self)
        return keypoint_pass(answers, sources, self.index.keypoints_of, self._second_look_tier, budget)

    def hash_answers(self, fps: list[Fingerprint], looks: dict[int, bool] | None = None, *,
                     exclude_self: bool = False) -> list[HashAnswer]:
        """What the hashes say of each fingerprint: its matches (the unsure ones not yet
        confirmed) and, for a post in ``looks`` with no sure match, its nearest entries for
        a second look (``looks[i]``: whether its mirror image's keypoints can be found too).
        Scaled out, each shard answers this for its part of the library, and the keypoint
        pass runs once per post on the answers merged (:func:`merged_answers`)."""
        out = [HashAnswer([], []) for _ in fps]
        looks = looks if self._second_look_tier is not None else None
        with_fine, without = [], []
        for i, fp in enumerate(fps):
            if fp.degenerate in (None, "low_detail"):  # flat and tiny pictures match nothing
                views = (fp, *fp.views)
                (with_fine if all(v.fine for v in views) else without).append((i, views))
        for group, fine in ((with_fine, True), (without, False)):
            if group:
                self._match_group(group, fine, out, {i: m for i, m in (looks or {}).items()
                                                     if fps[i].degenerate is None}, exclude_self)
        return out

    def _match_group(self, group: list, fine: bool, out: list[HashAnswer], looks: dict[int, bool],
                     exclude_self: bool = False) -> None:
        # Every view, plain and mirrored, in one pass over the library: rows
        # 2k and 2k+1 are view k and its mirror.
        qd = np.array([h for _, views in group for v in views for h in (v.dhash, v.dhash_mirror)], np.uint64)
        qp = np.array([h for _, views in group for v in views for h in (v.phash, v.phash_mirror)], np.uint64)
        owner = np.array([i for i, views in group for _ in range(2 * len(views))], np.int64)
        low = np.array([views[0].degenerate == "low_detail" for _, views in group for _ in range(2 * len(views))],
                       np.uint8)
        qf = fine_rows([v for _, views in group for v in views]) if fine else None
        looking = any(i in looks for i, _ in group)
        with self.index.lock:
            pq, pl, pd = first_pass(self.index, qd, np.arange(qd.size) % 2 == 1, self.radius)
            if exclude_self:
                other = self.index.ids_of(pl) != owner[pq]
                pq, pl, pd = pq[other], pl[other], pd[other]
            if not pq.size:
                return
            pair_fine = np.full(pq.size, -1, np.int64) if looking else None
            lib_phash, lib_low = self.index.phash_of(pl), self.index.low_detail_of(pl)
            at, p, f, tier = self._verify(pq, pl, pd, qp, qf, low, pair_fine, lib_phash, lib_low)
            lib_ids = self.index.ids_of(pl)
            ids = lib_ids[at]
            lib_views = self.index.dhash_of(pl[at])
            if looking:  # the pairs a second look would pick its candidates from: full-detail entries
                near = np.flatnonzero(lib_low == 0)
                near_ids = lib_ids[near]
                near_p = np.bitwise_count(qp[pq[near]] ^ lib_phash[near]).astype(np.int64)
        best: dict[tuple[int, int], tuple[tuple[int, int], Match]] = {}
        for i in range(at.size):
            row = pq[at[i]]
            m = Match(int(ids[i]), self.tiers[tier[i]].name, int(pd[at[i]]), int(p[i]),
                      bool(row % 2), int(f[i]) if f[i] >= 0 else None, int(qd[row]), int(lib_views[i]))
            rank = (int(tier[i]), _score(m))
            key = (int(owner[row]), m.entry_id)
            old = best.get(key)
            if old is None or rank < old[0]:
                best[key] = (rank, m)
        for (query, _), (_, m) in sorted(best.items(), key=lambda x: (x[0][0], x[1][0][0], x[1][1].dhash_distance,
                                                                         x[1][1].entry_id)):
            out[query].matches.append(m)
        if looking:  # posts with no sure match: their nearest entries, for the keypoints' look
            unsure = {q for q in looks if all(detective.needs_confirmation(m) for m in out[q].matches)}
            candidates = detective.nearest_candidates(
                owner[pq[near]], near_ids, pd[near].astype(np.int64), near_p, pair_fine[near], pq[near] % 2 == 1,
                unsure, {q for q, mirrorable in looks.items() if mirrorable})
            for query, chosen in candidates.items():
                out[query].candidates.extend(chosen)

    def confirmed(self, found: dict[int, list[Match]], sources: dict) -> tuple[dict[int, list[Match]], dict]:
        """:func:`detective.confirmed` against this library's keypoints."""
        return detective.confirmed(found, sources, self.index.keypoints_of)

    def match_batch(self, dhash: np.ndarray, phash: np.ndarray, dhash_mirror: np.ndarray,
                    phash_mirror: np.ndarray, *, best_only: bool = False,
                    threads: int | None = None, owners: np.ndarray | None = None,
                    fine: np.ndarray | None = None, fine_mirror: np.ndarray | None = None,
                    mirrored: bool = True) -> PairMatches:
        """All pairs (query, entry) that meet a tier, for M query rows at once.

        ``owners`` maps each query row to the query it is a view of (see
        :func:`query_rows`); results are per owner, best view kept. ``fine``
        and ``fine_mirror`` are (M, FINE_WORDS) (all-zero rows: unknown).
        """
        m = dhash.shape[0]
        queries = np.concatenate([dhash, dhash_mirror]).astype(np.uint64)
        qphash = np.concatenate([phash, phash_mirror]).astype(np.uint64)
        qfine = (np.ascontiguousarray(np.concatenate([fine, fine_mirror]), np.uint64)
                 if fine is not None and fine_mirror is not None else None)
        with self.index.lock:  # (batch work runs on an index of its own: holding it costs no one)
            pq, pl, pd = first_pass(self.index, queries, np.arange(queries.size) >= m, self.radius, threads=threads)
            at, p, f, tier = self._verify(pq, pl, pd, qphash, qfine)
            pq, pl = pq[at], pl[at]
            ids, lib_d = self.index.ids_of(pl), self.index.dhash_of(pl)
        q = pq % m if m else pq
        if owners is not None:
            q = np.asarray(owners, np.int64)[q]
        res = PairMatches(q, ids, tier, pd[at].astype(np.int64), p, pq >= m, f, queries[pq], lib_d)
        if not mirrored:  # mirrored copies do not count: drop them before the best per pair is kept
            res = res._take(~res.mirrored)
        return best_per_pair(res, best_only)

    def matches_of(self, pairs: PairMatches) -> dict[int, list[Match]]:
        """A batch result as :class:`Match` lists per query index: the one conversion."""
        out: dict[int, list[Match]] = {}
        for i in range(pairs.query.size):
            fine = int(pairs.fine_distance[i])
            out.setdefault(int(pairs.query[i]), []).append(Match(
                int(pairs.entry_id[i]), self.tiers[int(pairs.tier[i])].name, int(pairs.dhash_distance[i]),
                int(pairs.phash_distance[i]), bool(pairs.mirrored[i]), fine if fine >= 0 else None,
                int(pairs.query_dhash[i]), int(pairs.library_dhash[i])))
        return out

    def match_rows(self, rows: QueryRows, **kwargs) -> PairMatches:
        """:meth:`match_batch` over :func:`query_rows`' result."""
        return self.match_batch(rows.dhash, rows.phash, rows.dhash_mirror, rows.phash_mirror,
                                owners=rows.owners, fine=rows.fine, fine_mirror=rows.fine_mirror,
                                **kwargs)


def warm_up() -> None:
    index = LibraryIndex(capacity=4)
    rows = np.ones((1, FINE_WORDS), np.uint64)
    index.load(np.array([1]), {f: np.array([1], np.uint64) for f in HASH_FIELDS}, rows)
    Matcher(index).match_batch(*(np.array([1], np.uint64),) * 4, fine=rows, fine_mirror=rows)
