"""The second look: keypoints verified geometrically, where the global hashes are unsure.

The hashes (the bouncer) decide most posts at once. A repost cut from one side, sheared,
warped in perspective or cropped to another shape drifts past their limits, yet its
nearest library entries by dHash + pHash are still the right picture in most cases
(bench/heldout.py, 3,200 entries: the true entry is first for 88% of such misses, in the
first four for 94%). For a post that met no entry, the matcher hands its few nearest candidates here:
their ORB descriptors are paired by Hamming distance (a compiled XOR + popcount over 256
bits, nearest against second nearest, Lowe's ratio test), and the pairs must agree on one
similarity transform (rotation, scale, shift: OpenCV's RANSAC). Unrelated pictures share
a few chance pairs but not one geometry; a repost shares dozens.

The same check confirms the hashes' own unsure answers: a near or loose match whose score
(dHash + pHash + fine) is above CONFIRM_ABOVE stands only if the two pictures' keypoints
agree on one geometry too. Nearly all false pairs of real unrelated pictures are such
matches (two grass tiles, two cloudy skies: bench/false_alarms.py): their keypoints share
no geometry, while a repost's do.

Pure computation on arrays: no I/O.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from numba import njit

from monitor.fingerprints.keypoints import KEY_BYTES, QUERY_KEYPOINTS, unpack_keypoints
from monitor.search.popcount import popcount64

log = logging.getLogger("repost_monitor.search")

CANDIDATE_SUM = 36      # dHash + pHash bits: the candidates worth a second look
# ... where the post's mirror image met them: a flipped and cut repost is rarer than a cut
# one, and its keypoints cost a second ORB. Against bench/heldout.py's library, 2 in 3
# unrelated posts that got a look needed the mirror image's keypoints at 36, 1 in 6 at 30.
MIRRORED_CANDIDATE_SUM = 30
# ... whose dHash + pHash + fine score (the fine hashes' 512 bits too) is within this: a cut
# repost's nearest view pairs keep some finer likeness, a look-alike's mostly none. Tuning half of
# bench/heldout.py: posts that get a look fall from 66% to 36% of unrelated ones against 4,200
# entries (20% to 11% against 200), and 0.2 points of recall are lost (a dHash + pHash
# limit of 32 instead halves them too, at 0.5 points).
CANDIDATE_SCORE = 240
CANDIDATES = 4          # ... the nearest this many entries per post
MIN_INLIERS = 15        # pairs that agree on one transform (unrelated pictures: ~2% reach 12)
RATIO = 0.8             # nearest descriptor closer than this share of the second nearest
RANSAC_PX = 4.0         # px at KEY_SIDE: how far a pair may land from the transform
MIN_SCALE, MAX_SCALE = 0.25, 4.0  # a repost is not a thumbnail's corner blown up 10x
# Two pictures in one frame agree on the frame alone, within its width of the edges; a
# repost agrees nearer the middle, around a sticker or caption over it too. The middle 60%
# (a frame up to a fifth of each side) rather than half: bench/heldout.py's tuning half
# 97.0% -> 97.5% (a sticker 97% -> 97.5%, a sticker with a crop 89% -> 91%), no false pair more.
MIDDLE = 0.6            # the middle share (each way) of the entry's keypoints' extent...
MIN_MIDDLE_INLIERS = 5  # ... holds at least this many of the pairs that agree
MIN_KEYPOINTS = 8       # fewer on either side: no geometry agrees
# A crop resized to another shape, or a shear, is no similarity: where one finds too few pairs
# agreeing and at least STRETCH_PAIRS passed the ratio test (a look-alike's rarely do), a
# second look also fits an affine transform stretching at most MAX_STRETCH (bench/heldout.py's
# tuning half: shear 89.5% -> 91%, random crop 86.5% -> 87.5%, perspective 95% -> 95.5%, no false
# pair more). Confirmations keep the similarity: a freer fit would help look-alikes through.
STRETCH_PAIRS = 30
MAX_STRETCH = 1.35      # longest / shortest axis: an aspect change of 0.8-1.25, a shear of ~15 degrees
# A second look finds the post's strongest this many (of up to QUERY_KEYPOINTS; where more were
# found already for a confirmation, it takes the strongest this many of them) and pairs them with
# each of its four candidates, most of them wrong: a fifth less ORB and half the pairing, the same
# recall (bench/heldout.py's tuning half; 256: 0.2 points less); a confirmation (one entry the
# hashes met) finds and pairs all QUERY_KEYPOINTS.
SECOND_LOOK_KEYPOINTS = 512
# A hash match scoring above this (dHash + pHash + fine, of 640 bits) needs its keypoints'
# agreement: no false pair of bench/false_alarms.py's 44.8M scores at or below it...
CONFIRM_ABOVE = 40
CONFIRM_INLIERS = 10    # ... and the hashes already agree, so fewer pairs than MIN_INLIERS confirm


@dataclass(frozen=True, slots=True)
class Keypoints:
    xy: np.ndarray           # (k, 2) float32
    words: np.ndarray        # (k, 4) uint64: the 256-bit descriptors

    @classmethod
    def of(cls, blob: bytes) -> Keypoints | None:
        if not blob:
            return None
        xy, descriptors = unpack_keypoints(blob)
        return cls(xy, descriptors.view(np.uint64).reshape(-1, 4))

    def __len__(self) -> int:
        return self.xy.shape[0]


def warm_up() -> None:
    _nearest_two(np.zeros((2, 4), np.uint64), np.zeros((4, 2), np.uint64))


@njit(cache=True, nogil=True)
def _nearest_two(query, columns):
    """For each query descriptor: its nearest entry descriptor, that distance and the
    second nearest's (256-bit Hamming: four XOR + popcount). ``columns``: the entry's
    descriptors as (4, m) words, so that one query's distances to all of them are one
    loop LLVM vectorises (VPOPCNTQ where the CPU has it: 2.4x the loop that kept the
    nearest two as it went, which a branch per pair kept scalar)."""
    n, m = query.shape[0], columns.shape[1]
    nearest = np.empty(n, np.int64)
    first = np.empty(n, np.int64)
    second = np.empty(n, np.int64)
    far = 1 << 20
    d = np.empty(m, np.int64)
    c0, c1, c2, c3 = columns[0], columns[1], columns[2], columns[3]
    for i in range(n):
        q0, q1, q2, q3 = query[i, 0], query[i, 1], query[i, 2], query[i, 3]
        for j in range(m):
            d[j] = (popcount64(q0 ^ c0[j]) + popcount64(q1 ^ c1[j])
                    + popcount64(q2 ^ c2[j]) + popcount64(q3 ^ c3[j]))
        b1 = far
        for j in range(m):
            b1 = min(b1, d[j])
        b2, ties = far, 0  # the second nearest: the nearest's own distance where two share it
        for j in range(m):
            ties += d[j] == b1
            b2 = min(b2, d[j] if d[j] != b1 else far)
        at = -1
        for j in range(m):
            if d[j] == b1:
                at = j
                break
        nearest[i], first[i], second[i] = at, b1, b1 if ties > 1 else b2
    return nearest, first, second


def _pairs(query: Keypoints, entry: Keypoints) -> tuple[np.ndarray, np.ndarray]:
    """Indices (in query, in entry) of descriptor pairs that pass the ratio test."""
    nearest, first, second = _nearest_two(query.words, np.ascontiguousarray(entry.words.T))
    keep = np.flatnonzero(first < RATIO * second)
    return keep, nearest[keep]


def inliers(query: Keypoints, entry: Keypoints, stretched: bool = False) -> int:
    """How many descriptor pairs agree on one similarity transform of ``query`` onto
    ``entry`` (0 when there are too few pairs, or the transform is no repost's).
    ``stretched``: where that finds too few but many pairs passed the ratio test, also
    one affine transform that stretches or shears by at most MAX_STRETCH (a crop
    resized to another shape, a shear), as a second look's candidates are allowed."""
    if len(query) < MIN_KEYPOINTS or len(entry) < MIN_KEYPOINTS:
        return 0
    qi, ei = _pairs(query, entry)
    if qi.size < 6:
        return 0
    found = _agreeing(entry, ei, *cv2.estimateAffinePartial2D(query.xy[qi], entry.xy[ei], method=cv2.RANSAC,
                                                              ransacReprojThreshold=RANSAC_PX))
    if found >= MIN_INLIERS or not stretched or qi.size < STRETCH_PAIRS:
        return found
    return max(found, _agreeing(entry, ei, *cv2.estimateAffine2D(query.xy[qi], entry.xy[ei], method=cv2.RANSAC,
                                                                 ransacReprojThreshold=RANSAC_PX)))


def _agreeing(entry: Keypoints, ei: np.ndarray, transform: np.ndarray | None, mask: np.ndarray | None) -> int:
    """The pairs (entry side ``ei``) that RANSAC's ``mask`` says agree on ``transform``, or 0
    where it is none, or no repost's: a scale outside MIN_SCALE..MAX_SCALE, a mirror image,
    a stretch past MAX_STRETCH, or agreement on a frame alone."""
    if transform is None or mask is None:
        return 0
    axes = np.linalg.svd(transform[:, :2], compute_uv=False)  # the longest and shortest stretch
    if (axes[1] <= 0 or axes[0] / axes[1] > MAX_STRETCH or np.linalg.det(transform[:, :2]) < 0
            or not MIN_SCALE <= float(np.sqrt(axes[0] * axes[1])) <= MAX_SCALE):
        return 0
    agreed = ei[mask.ravel().astype(bool)]
    # Two pictures in one frame (a museum's gilt frame, an app's template) agree on the
    # frame's corners alone: a repost's pairs reach into the middle of the entry too.
    lo, hi = entry.xy.min(axis=0), entry.xy.max(axis=0)
    margin = (hi - lo) * (1 - MIDDLE) / 2
    inside = np.all((entry.xy[agreed] >= lo + margin) & (entry.xy[agreed] <= hi - margin), axis=1)
    return agreed.size if inside.sum() >= MIN_MIDDLE_INLIERS else 0


def nearest_candidates(owner: np.ndarray, entry: np.ndarray, dhash: np.ndarray, phash: np.ndarray,
                       fine: np.ndarray, mirrored: np.ndarray, unsure: set[int],
                       mirrorable: set[int]) -> dict[int, list[tuple[int, int, int, bool]]]:
    """Per unsure query, its CANDIDATES nearest entries within CANDIDATE_SUM (pairs of
    its mirror image: MIRRORED_CANDIDATE_SUM) and CANDIDATE_SCORE, as
    (entry id, dHash, pHash distance, whether the post's mirror image met it). The
    arguments are parallel arrays over the first pass's candidate pairs (one per view
    pair, plain or mirrored; ``fine``: -1 where unknown, and then the 64-bit limit
    alone decides): an entry's best pair ranks it. Pairs of a post's mirror image count
    only for the posts in ``mirrorable`` (whose mirror's keypoints can be found: the
    image is at hand)."""
    summed = dhash + phash
    keep = np.flatnonzero((summed <= np.where(mirrored, MIRRORED_CANDIDATE_SUM, CANDIDATE_SUM))
                          & ((fine < 0) | (summed + fine <= CANDIDATE_SCORE)))
    order = keep[np.lexsort((entry[keep], summed[keep]))]
    out: dict[int, list[tuple[int, int, int, bool]]] = {}
    for k in order:
        q = int(owner[k])
        if q not in unsure or (mirrored[k] and q not in mirrorable):
            continue
        chosen = out.setdefault(q, [])
        e = int(entry[k])
        if len(chosen) < CANDIDATES and all(e != c[0] for c in chosen):
            chosen.append((e, int(dhash[k]), int(phash[k]), bool(mirrored[k])))
    return out


_NONE_FOUND = Keypoints(np.zeros((0, 2), np.float32), np.zeros((0, 4), np.uint64))


def _query_keypoints(found: bytes | Callable[..., bytes], mirrored: bool, strongest: int | None) -> Keypoints | None:
    """A post's keypoints, or its mirror image's: packed (unmirrored only), or found now;
    the ``strongest`` first of them only where given. None when they are not at hand (a
    smooth picture's none found is no keypoints, not None)."""
    if mirrored and not callable(found):
        return None
    try:
        blob = found(mirrored=mirrored, limit=strongest or QUERY_KEYPOINTS) if callable(found) else found
        return Keypoints.of(blob[:strongest * KEY_BYTES] if strongest else blob) or _NONE_FOUND
    except (ValueError, OSError, cv2.error) as exc:  # a larger decode, a damaged keypoint picture
        log.warning("a post's keypoints could not be found (%s); the hashes' answer stands", exc)
        return None


def _stored_keypoints(entry_id: int, blob: bytes) -> Keypoints | None:
    """An entry's stored keypoints; None (the entry skipped, with a warning) when the blob
    is not keypoints: one damaged row never fails the posts matched beside it."""
    try:
        return Keypoints.of(blob)
    except ValueError:
        log.warning("library entry %d: its stored keypoints are damaged (%d bytes); the second look "
                    "skips it until `library rehash --all`", entry_id, len(blob))
        return None


def _geometries(queries: dict[int, bytes | Callable[..., bytes]], wanted: dict[int, list[tuple[int, bool]]],
                read: Callable[[list[int]], dict[int, bytes]],
                strongest: int | None = None, stretched: bool = False) -> dict[tuple[int, int, bool], int | None]:
    """Per (query, entry id, mirrored) of ``wanted``: the inliers of that pair (0 where
    either side has too few keypoints: a sky, a gradient, stripes), or None where the
    geometry cannot be told (either side's keypoints not at hand). The query's keypoints
    (or its mirror image's) are found once, and only when a pair asks for them."""
    stored = {e: _stored_keypoints(e, blob)
              for e, blob in read(sorted({e for pairs in wanted.values() for e, _ in pairs})).items()}
    out: dict[tuple[int, int, bool], int | None] = {}
    for q, pairs in wanted.items():
        views: dict[bool, Keypoints | None] = {}
        for e, mirrored in pairs:
            entry = stored.get(e)
            if entry is None:  # an entry without keypoints (imported hashes, an older version): not told
                out[q, e, mirrored] = None
                continue
            if mirrored not in views:
                views[mirrored] = _query_keypoints(queries[q], mirrored, strongest)
            query = views[mirrored]
            out[q, e, mirrored] = inliers(query, entry, stretched) if query is not None else None
    return out


def second_look(queries: dict[int, bytes | Callable[..., bytes]],
                candidates: dict[int, list[tuple[int, int, int, bool]]],
                read: Callable[[list[int]], dict[int, bytes]]) -> dict[int, list[tuple[int, int, int, bool, int]]]:
    """Per query, the candidates that pass, as (entry id, dHash, pHash distance, mirrored,
    inliers), most inliers first. ``queries``: packed keypoints by query number, or what
    finds them (``mirrored=`` True: of the mirror image; ``limit=``: at most that many,
    more allowed), called only for a query with
    candidates, and for its mirror image only if a candidate met that: a post far from
    every entry costs nothing. ``read(ids)`` gives entries' stored keypoints."""
    told = _geometries(queries, {q: [(c[0], c[3]) for c in chosen] for q, chosen in candidates.items()}, read,
                       SECOND_LOOK_KEYPOINTS, stretched=True)
    out: dict[int, list[tuple[int, int, int, bool, int]]] = {}
    for q, chosen in candidates.items():
        found = [(e, d, p, mirrored, told[q, e, mirrored] or 0) for e, d, p, mirrored in chosen]
        found = sorted((c for c in found if c[4] >= MIN_INLIERS), key=lambda c: -c[4])
        if found:
            out[q] = found
    return out


def needs_confirmation(match) -> bool:
    """Whether a hash match (a :class:`~monitor.search.matcher.Match`) stands only with its
    keypoints' agreement: not exact, scored with fine hashes, above CONFIRM_ABOVE."""
    if match.tier == "exact" or match.fine_distance is None or match.inliers is not None:
        return False
    return match.dhash_distance + match.phash_distance + match.fine_distance > CONFIRM_ABOVE


def confirmed(found: dict[int, list], sources: dict[int, bytes | Callable[..., bytes]],
              read: Callable[[list[int]], dict[int, bytes]]) -> tuple[dict[int, list], dict[int, set[int]]]:
    """``found`` (hash matches per query: :class:`~monitor.search.matcher.Match` lists) with
    every match that :func:`needs_confirmation` checked: kept with its inliers when the
    geometry agrees, or as it is when that cannot be told; dropped when it does not. Also
    returns the entries dropped per query. ``sources``: each query's keypoints, or what
    finds them; a query without any keeps the hashes' answer."""
    wanted = {q: [(m.entry_id, m.mirrored) for m in matches if needs_confirmation(m)]
              for q, matches in found.items() if q in sources}
    wanted = {q: pairs for q, pairs in wanted.items() if pairs}
    if not wanted:
        return found, {}
    told = _geometries(sources, wanted, read)
    out: dict[int, list] = {}
    rejected: dict[int, set[int]] = {}
    for q, matches in found.items():
        for m in matches:
            n = told.get((q, m.entry_id, m.mirrored))
            if n is not None and n < CONFIRM_INLIERS:
                rejected.setdefault(q, set()).add(m.entry_id)
            else:
                out.setdefault(q, []).append(m if n is None else dataclasses.replace(m, inliers=n))
    return out, rejected
