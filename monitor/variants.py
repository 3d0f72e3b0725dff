"""Extra fingerprints that make matching robust to what reposters do.

Pure functions of decoded greyscale images (no I/O):

- :func:`content_box` finds the picture inside borders, letterbox bars, padding,
  caption bands and screenshot frames: the longest run of "busy" rows, then of
  busy columns within it. A query is fingerprinted whole and inside that box.
- :func:`center_crops` are the library-side views that a cropped repost lands
  near: an entry is indexed whole and at a few centre crops.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from PIL import Image

from .fingerprint import Fingerprint, fingerprint_grey

WORK_SIDE = 256            # analyse the layout on a small copy: fast and noise-tolerant
BUSY_STD = 6.0             # a row/column with a grey-level std above this carries picture
GAP_SHARE = 0.02           # quiet gaps shorter than this (share of the side) do not split a run
MIN_KEEP = 0.15            # a box smaller than this share of a side is not trusted
MIN_CHANGE = 0.03          # a box within 3% of the whole image is the whole image
CROP_SHARES = (0.1, 0.2)   # library centre crops: share of each side removed in total


@njit(cache=True, nogil=True)
def _longest_busy_run(activity, gap):
    """[start, end) of the longest run of busy positions (activity > BUSY_STD),
    gaps of <= ``gap`` quiet ones bridged; the first such run on ties. (-1, -1)
    when nothing is busy."""
    best_start, best_end = -1, -1
    start = last = -1
    for i in range(activity.size):
        if activity[i] <= BUSY_STD:
            continue
        if start < 0 or i - last > gap:
            start = i
        last = i
        if best_start < 0 or last - start > best_end - 1 - best_start:
            best_start, best_end = start, last + 1
    return best_start, best_end


@njit(cache=True, nogil=True)
def _std_rows(a, top, bottom, axis):
    """Grey-level std of each row (axis 1) or column (axis 0) of a[top:bottom]."""
    n = a.shape[0] if axis == 1 else a.shape[1]
    out = np.zeros(n if axis == 1 else a.shape[1])
    sums = np.zeros(out.size)
    squares = np.zeros(out.size)
    for y in range(top, bottom):
        for x in range(a.shape[1]):
            v = float(a[y, x])
            k = y if axis == 1 else x
            sums[k] += v
            squares[k] += v * v
    count = a.shape[1] if axis == 1 else bottom - top
    for k in range(out.size):
        mean = sums[k] / count
        out[k] = np.sqrt(max(squares[k] / count - mean * mean, 0.0))
    return out


@njit(cache=True, nogil=True)
def _busy_box(a, row_gap, col_gap):
    """(top, bottom, left, right) of the busy rows' longest run and the busy
    columns' longest run within it; all -1 when there is none."""
    top, bottom = _longest_busy_run(_std_rows(a, 0, a.shape[0], 1), row_gap)
    if top < 0:
        return -1, -1, -1, -1
    left, right = _longest_busy_run(_std_rows(a, top, bottom, 0), col_gap)
    if left < 0:
        return -1, -1, -1, -1
    return top, bottom, left, right


def content_box(grey: Image.Image) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the picture inside a frame, or None when
    the picture fills the image (or nothing trustworthy was found)."""
    w, h = grey.size
    scale = min(1.0, WORK_SIDE / max(w, h))
    small = grey.resize((max(8, int(w * scale)), max(8, int(h * scale))), Image.BILINEAR) if scale < 1 else grey
    a = np.asarray(small)
    sh, sw = a.shape
    top, bottom, left, right = _busy_box(a, max(1, int(GAP_SHARE * sh)), max(1, int(GAP_SHARE * sw)))
    if top < 0:
        return None
    if (bottom - top) < MIN_KEEP * sh or (right - left) < MIN_KEEP * sw:
        return None
    if (bottom - top) > (1 - MIN_CHANGE) * sh and (right - left) > (1 - MIN_CHANGE) * sw:
        return None
    inv = 1 / scale
    return (int(left * inv), int(top * inv), min(w, int(round(right * inv))), min(h, int(round(bottom * inv))))


def center_crops(grey: Image.Image) -> list[Image.Image]:
    w, h = grey.size
    out = []
    for share in CROP_SHARES:
        dx, dy = int(w * share / 2), int(h * share / 2)
        out.append(grey.crop((dx, dy, w - dx, h - dy)))
    return out


def query_fingerprints(grey: Image.Image, size: tuple[int, int], *,
                       exact: bool = True) -> list[Fingerprint]:
    """The whole image, plus the picture inside its frame when there is one."""
    whole = fingerprint_grey(grey, size, exact=exact)
    box = content_box(grey)
    if box is None:
        return [whole]
    inner = grey.crop(box)
    return [whole, fingerprint_grey(inner, (box[2] - box[0], box[3] - box[1]), exact=exact)]


def library_fingerprints(grey: Image.Image, size: tuple[int, int], *,
                         exact: bool = True) -> list[Fingerprint]:
    """The whole entry, its centre crops, and the picture inside its own frame
    (a figure on a white page: a framed repost's box lands on the same picture)."""
    views = [fingerprint_grey(grey, size, exact=exact)]
    views += [fingerprint_grey(c, c.size, exact=exact) for c in center_crops(grey)]
    box = content_box(grey)
    if box is not None:
        views.append(fingerprint_grey(grey.crop(box), (box[2] - box[0], box[3] - box[1]), exact=exact))
    return views


def warm_up() -> None:
    content_box(Image.effect_noise((40, 30), 40))
