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
from PIL import Image

from .fingerprint import Fingerprint, fingerprint_grey

WORK_SIDE = 256            # analyse the layout on a small copy: fast and noise-tolerant
BUSY_STD = 6.0             # a row/column with a grey-level std above this carries picture
GAP_SHARE = 0.02           # quiet gaps shorter than this (share of the side) do not split a run
MIN_KEEP = 0.15            # a box smaller than this share of a side is not trusted
MIN_CHANGE = 0.03          # a box within 3% of the whole image is the whole image
CROP_SHARES = (0.1, 0.2)   # library centre crops: share of each side removed in total


def _longest_busy_run(activity: np.ndarray, gap: int) -> tuple[int, int] | None:
    """[start, end) of the longest run of busy positions, gaps of <= ``gap`` quiet ones
    bridged; the first such run on ties. None when nothing is busy."""
    busy = np.flatnonzero(activity > BUSY_STD)
    if busy.size == 0:
        return None
    breaks = np.flatnonzero(np.diff(busy) > gap)
    starts = busy[np.concatenate(([0], breaks + 1))]
    ends = busy[np.concatenate((breaks, [busy.size - 1]))]
    i = int(np.argmax(ends - starts))
    return int(starts[i]), int(ends[i]) + 1


def content_box(grey: Image.Image) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the picture inside a frame, or None when
    the picture fills the image (or nothing trustworthy was found)."""
    w, h = grey.size
    scale = min(1.0, WORK_SIDE / max(w, h))
    small = grey.resize((max(8, int(w * scale)), max(8, int(h * scale))), Image.BILINEAR) if scale < 1 else grey
    a = np.asarray(small, dtype=np.float32)
    sh, sw = a.shape
    rows = _longest_busy_run(a.std(axis=1), max(1, int(GAP_SHARE * sh)))
    if rows is None:
        return None
    band = a[rows[0]:rows[1]]
    cols = _longest_busy_run(band.std(axis=0), max(1, int(GAP_SHARE * sw)))
    if cols is None:
        return None
    top, bottom, left, right = rows[0], rows[1], cols[0], cols[1]
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
