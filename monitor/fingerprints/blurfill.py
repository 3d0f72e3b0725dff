"""The picture inside a blurred fill: a story or reel (9:16) shows a post's picture
centred over a blurred, enlarged copy of itself, and a landscape video frame shows a
portrait picture between blurred side bars. The fill is busy (it is the picture's own
colours), so :func:`monitor.fingerprints.views.content_box`, which looks for plain
frames, sees none; what gives the picture away is its edges: two straight steps across
the whole width (or height), placed symmetrically about the middle.

Pure numpy on the small layout copy (256 px): no I/O, a few tens of microseconds.
"""

from __future__ import annotations

import numpy as np

MIN_ELONGATION = 1.5       # only images at least this much longer than wide (or wider than long)
EDGE_OVER_FILL = 3.5       # an edge step at least this many times the fills' median row-to-row step,
EDGE_OVER_ALL = 2.0        # ... this many times the whole image's median step,
EDGE_FLOOR = 4.0           # ... and at least this many grey levels (mean over the row)
BAND = (0.12, 0.45)        # the picture's half-extent along the long side, as a share of it
ACROSS = (0.30, 0.49)      # ... and across (pictures 60-98% as wide as the canvas; else full width)
# A first look on the hashes' own small decode (~45 px across), before a larger one is made
# for the box: edges blur there, so it asks this share of the limits above. Measured on 420
# stories and video frames over blurred copies of 120 corpus pictures (JPEG q60-95): 418 of
# them pass it (the other two reach only 0.3-0.4), and 27 of the 285 corpus pictures that are
# long enough to be looked at (the rest are spared the larger decode: ~1.5 ms each there).
FIRST_LOOK = 0.6


def _symmetric_edges(a: np.ndarray, axis: int, lo: float, hi: float, share: float = 1.0) -> tuple[int, int] | None:
    """[start, end) along ``axis`` of a band centred in ``a`` whose two ends are the
    strongest pair of straight steps (mean absolute difference between neighbouring
    rows or columns), or None when no pair stands out from the steps outside it (by
    ``share`` of the limits)."""
    steps = np.abs(np.diff(a.astype(np.int16), axis=axis)).mean(axis=1 - axis)  # steps[i]: i to i + 1
    n = steps.size + 1
    centre = n / 2
    # a one-row slack either way: a picture's centring rounds, and so does the scaling
    near = np.maximum(np.maximum(steps[:-2], steps[1:-1]), steps[2:])  # near[i]: max of steps[i..i+2]
    best, best_half = 0.0, -1
    for half in range(max(1, int(lo * n)), int(hi * n)):
        before, after = int(centre - half) - 2, int(centre + half) - 2
        if before < 0 or after >= near.size:
            break
        score = min(near[before], near[after])
        if score > best:
            best, best_half = score, half
    if best_half < 0:
        return None
    start, end = int(centre - best_half), int(centre + best_half)
    # The edges stand out from the fills' steps (a blur is smooth) and from the whole
    # image's (a busy picture's steps are all large).
    fill = np.concatenate([steps[:max(0, start - 2)], steps[end + 1:]])
    if fill.size == 0 or best < share * max(EDGE_FLOOR, EDGE_OVER_FILL * _median(fill),
                                            EDGE_OVER_ALL * _median(steps)):
        return None
    return start, end


def _median(x: np.ndarray) -> float:
    """``np.median`` of a non-empty float array, the same value at an eighth of its cost
    (its checks and dispatch are most of the time on a few hundred values)."""
    k = x.size // 2
    if x.size % 2:
        return float(np.partition(x, k)[k])
    part = np.partition(x, (k - 1, k))
    return (float(part[k - 1]) + float(part[k])) / 2


def is_long(pixels: np.ndarray) -> bool:
    """Whether the image is elongated enough to hold a picture between fills."""
    h, w = pixels.shape
    return h >= MIN_ELONGATION * w or w >= MIN_ELONGATION * h


def blurred_fill_box(pixels: np.ndarray, share: float = 1.0) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) in ``pixels`` (a greyscale array) of a picture
    centred on a long canvas between fills, or None when the image is not long
    enough or shows no such edges (``share``: of the limits the edges must pass)."""
    if not is_long(pixels):
        return None
    h, w = pixels.shape
    tall = h >= w
    a = pixels if tall else pixels.T
    band = _symmetric_edges(a, 0, *BAND, share)
    if band is None:
        return None
    top, bottom = band
    across = _symmetric_edges(a[top:bottom], 1, *ACROSS, share)
    left, right = across if across is not None else (0, a.shape[1])
    return (left, top, right, bottom) if tall else (top, left, bottom, right)
