"""Extra fingerprints that make matching robust to what reposters do.

Pure functions of decoded greyscale images (no I/O):

- :func:`content_box` finds the picture inside borders, letterbox bars, padding,
  caption bands and screenshot frames: the longest run of "busy" rows, then of
  busy columns within it. A query is fingerprinted whole and inside that box
  (or, on a long image with no plain frame, inside a blurred fill: blurfill.py).
- :func:`tilt` finds a picture pasted at a small angle on a plain background
  (what "rotate" in an editor or a meme app makes); the query is then also
  fingerprinted turned back upright and cut to the picture.
- :func:`library_crops` are the library-side views that a cropped repost lands
  near: an entry is indexed whole, at centre crops of 10, 20 and 30%, with 15%
  cut off its left or its right side, and cut to the feeds' shapes (square, 4:5, 16:9)
  where its own shape differs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import njit
from PIL import Image

from monitor.fingerprints import fasthash, turns
from monitor.fingerprints.blurfill import FIRST_LOOK, blurred_fill_box, is_long
from monitor.fingerprints.core import Fingerprint, fingerprint_grey, grey_pixels
from monitor.fingerprints.crops import library_crops

WORK_SIDE = 256            # analyse the layout on a small copy: fast and noise-tolerant
BUSY_STD = 6.0             # a row/column with a grey-level std above this carries picture
FRAME_TOLERANCE = 24.0     # ... and so does a plain one whose mean grey is further than this from the frame's
GAP_SHARE = 0.02           # quiet gaps shorter than this (share of the side) do not split a run
MIN_KEEP = 0.15            # a box smaller than this share of a side is not trusted
MIN_CHANGE = 0.03          # a box within 3% of the whole image is the whole image
SIDE_CROP = 0.15           # library side crops: this share cut off one side
TRIM_SHARE = 0.25          # a band this short at a box's top or bottom, split off by a quiet row, is not picture
ASPECT_CLOSE = 0.12        # an entry this close to a crop's aspect ratio gets no such crop
TILT_MIN_SIDE = 192        # px: the decode a tilt is measured on (angles to ~0.3 degrees)
TILT_MIN, TILT_MAX = 0.8, 12.0   # degrees: below, hashes are already close; above, rare
TURN_BACK_SIDE = 160       # px: a tilted picture is turned back upright at this size (its
                           # hashes need no more; turning costs as the pixel count)
TURN_ANGLES = (-5.0, -2.5, 2.5, 5.0)  # library copies of a figure on a plain fill (library_turns)
TILT_BACKGROUND = 14       # grey levels: corners this close to each other are a plain background
TILT_AGREE = 60.0          # degrees x px: the straight edges' angles agree within 60/side degrees
                           # (at least 1): a small decode measures angles coarsely
TILT_STRAIGHT = 1.2        # px (work copy): an edge must fit a line this well (RMS)
TILT_INLIERS = 0.6         # share of an outline's points that must lie on its line
TILT_FILL_SHARE = 0.4      # a picture turned <= 12 degrees leaves < 35% of its canvas to the fill
TILT_FILL_MIDDLE = 0.2     # ... and little of the middle quarter (a bright picture's own whites)


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
def _trim_ends(activity, start, end):
    """[start, end) less a short band at either end that a quiet row separates from
    the rest (within TRIM_SHARE of the run): a screenshot's account row above the
    picture, its buttons below, joined to the picture by a gap short enough to bridge."""
    reach = int(TRIM_SHARE * (end - start))
    cut = -1
    for i in range(start, start + reach):
        if activity[i] <= BUSY_STD:
            cut = i
    if cut >= 0:
        start = cut + 1
    cut = -1
    for i in range(end - 1, end - 1 - reach, -1):
        if activity[i] <= BUSY_STD:
            cut = i
    if cut >= 0:
        end = cut
    return start, end


@njit(cache=True, nogil=True)
def _row_stats(a, top, bottom, axis):
    """Grey-level (std, mean) of each row (axis 1) or column (axis 0) of a[top:bottom]."""
    n = a.shape[0] if axis == 1 else a.shape[1]
    std = np.zeros(n)
    mean = np.zeros(n)
    squares = np.zeros(n)
    for y in range(top, bottom):
        for x in range(a.shape[1]):
            v = float(a[y, x])
            k = y if axis == 1 else x
            mean[k] += v
            squares[k] += v * v
    count = a.shape[1] if axis == 1 else bottom - top
    for k in range(n):
        mean[k] /= count
        std[k] = np.sqrt(max(squares[k] / count - mean[k] * mean[k], 0.0))
    return std, mean


@njit(cache=True, nogil=True)
def _frame_colour(std, mean):
    """Median mean grey of the quiet rows in the outer quarters (where a frame
    lies), or -1 when there are none."""
    n = std.size
    picked = np.empty(n)
    k = 0
    for i in range(n):
        if std[i] <= BUSY_STD and (4 * i < n or 4 * i >= 3 * n):
            picked[k] = mean[i]
            k += 1
    if k == 0:
        return -1.0
    return fasthash.median(picked[:k])


@njit(cache=True, nogil=True)
def _activity(std, mean, frame):
    """std, raised above BUSY_STD where a plain row is far from the frame's
    colour: a uniform dark row of a night sky pasted on a light page is picture."""
    out = std.copy()
    if frame >= 0:
        for i in range(out.size):
            if abs(mean[i] - frame) > FRAME_TOLERANCE:
                out[i] = max(out[i], BUSY_STD + 1.0)
    return out


@njit(cache=True, nogil=True)
def _busy_box(a, row_gap, col_gap):
    """(top, bottom, left, right) of the busy rows' longest run and the busy
    columns' longest run within it; all -1 when there is none."""
    std, mean = _row_stats(a, 0, a.shape[0], 1)
    frame = _frame_colour(std, mean)
    activity = _activity(std, mean, frame)
    top, bottom = _longest_busy_run(activity, row_gap)
    if top < 0:
        return -1, -1, -1, -1
    top, bottom = _trim_ends(activity, top, bottom)
    std, mean = _row_stats(a, top, bottom, 0)
    left, right = _longest_busy_run(_activity(std, mean, frame), col_gap)
    if left < 0:
        return -1, -1, -1, -1
    return top, bottom, left, right


def _work_copy(grey: Image.Image, side: int = WORK_SIDE) -> tuple[Image.Image, float]:
    """The picture at most ``side`` px on a side (for layout analysis), and its scale."""
    w, h = grey.size
    scale = min(1.0, side / max(w, h))
    if scale == 1.0:
        return grey, scale
    return grey.resize((max(8, int(w * scale)), max(8, int(h * scale))), Image.BILINEAR), scale


def content_box(grey: Image.Image, pixels: np.ndarray | None = None) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the picture inside a frame, or None when
    the picture fills the image (or nothing trustworthy was found).
    ``pixels``: ``np.asarray(grey)`` when the caller has it already."""
    w, h = grey.size
    small, scale = _work_copy(grey)
    a = pixels if pixels is not None and scale == 1.0 else np.asarray(small)
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


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares slope and intercept (closed form: np.polyfit's SVD costs 10x)."""
    mx, my = x.mean(), y.mean()
    dx = x - mx
    slope = float((dx * (y - my)).sum() / (dx * dx).sum())
    return slope, float(my - slope * mx)


def _edge_angle(profile: np.ndarray, lo: float, hi: float) -> float | None:
    """Slope angle (degrees) of the straight line that most of ``profile`` over
    the [lo, hi) share of its positions follows, or None if it is not straight.

    Where the picture's own colours meet the fill the outline wanders off the
    line, so points more than 2 px off the first fit are dropped and the line
    refitted; at least TILT_INLIERS of the window must stay on it.
    """
    n = profile.size
    x = np.arange(int(lo * n), int(hi * n))
    y = profile[x].astype(np.float64)
    keep = y >= 0
    for _ in range(2):
        if keep.sum() < max(8, TILT_INLIERS * x.size):
            return None
        slope, icept = _line(x[keep], y[keep])
        resid = np.abs(y - (slope * x + icept))
        keep = (y >= 0) & (resid <= 2.0)
    if keep.sum() < max(8, TILT_INLIERS * x.size):
        return None
    if float(np.sqrt(np.mean(resid[keep] ** 2))) > TILT_STRAIGHT:
        return None
    return float(np.degrees(np.arctan(slope)))


def _corners(a: np.ndarray, k: int = 2) -> np.ndarray | None:
    """The four corners' k x k means if they look like one plain fill."""
    corners = np.array([a[:k, :k].mean(), a[:k, -k:].mean(), a[-k:, :k].mean(), a[-k:, -k:].mean()])
    return None if corners.max() - corners.min() > TILT_BACKGROUND else corners


@njit(cache=True, nogil=True)
def _may_be_tilted(a):
    """A cheap look at the hashes' small decode (2-D uint8) before measuring a
    tilt on a larger one: plain corners (single pixels: a slightly turned
    picture leaves corners of a pixel or two here), little of the fill overall
    and almost none in the middle, which a pasted picture covers. Night skies
    and objects on white, whose corners are also plain, fail the last two."""
    h, w = a.shape
    c0, c1, c2, c3 = float(a[0, 0]), float(a[0, w - 1]), float(a[h - 1, 0]), float(a[h - 1, w - 1])
    if max(c0, c1, c2, c3) - min(c0, c1, c2, c3) > TILT_BACKGROUND:
        return False
    fill = (c0 + c1 + c2 + c3) / 4.0
    total = middle = 0
    for y in range(h):
        inner_row = h // 4 <= y < h - h // 4
        for x in range(w):
            if abs(float(a[y, x]) - fill) <= TILT_BACKGROUND:
                total += 1
                if inner_row and w // 4 <= x < w - w // 4:
                    middle += 1
    middle_size = (h - 2 * (h // 4)) * (w - 2 * (w // 4))
    return middle_size > 0 and total <= TILT_FILL_SHARE * h * w and middle <= TILT_FILL_MIDDLE * middle_size


def tilt(grey: Image.Image) -> float | None:
    """The angle (degrees, counter-clockwise like ``Image.rotate``) of a picture
    pasted turned on a plain background, or None.

    The four corners must share one background colour; then at least two of
    the picture's top, bottom, left and right outlines must be straight lines
    that give the same angle. A photo of an object on white fails the
    straightness test, an upright picture gives an angle near 0.
    """
    a = np.asarray(_work_copy(grey)[0], dtype=np.int16)
    sh, sw = a.shape
    if min(sh, sw) < 32:
        return None
    corners = _corners(a)
    if corners is None:
        return None
    mask = np.abs(a - corners.mean()) > TILT_BACKGROUND
    rows, cols = mask.any(axis=1), mask.any(axis=0)
    # Outline positions; -1 where a row or column is all background (an
    # upright frame's margin), which _edge_angle refuses inside its window.
    first_col = np.where(rows, np.argmax(mask, axis=1), -1)
    last_col = np.where(rows, sw - 1 - np.argmax(mask[:, ::-1], axis=1), -1)
    first_row = np.where(cols, np.argmax(mask, axis=0), -1)
    last_row = np.where(cols, sh - 1 - np.argmax(mask[::-1], axis=0), -1)
    # Turned counter-clockwise by t, the top and bottom outlines fall by tan(t)
    # per column and the left and right ones move right by tan(t) per row.
    fits = [_edge_angle(first_row, 0.25, 0.75), _edge_angle(last_row, 0.25, 0.75),
            _edge_angle(first_col, 0.25, 0.75), _edge_angle(last_col, 0.25, 0.75)]
    signs = (-1, -1, 1, 1)
    angles = np.array([sign * f for sign, f in zip(signs, fits, strict=True) if f is not None])
    # Two straight outlines that agree are enough: where the picture's edge has
    # the fill's colour, that side's outline is lost.
    if angles.size < 2 or np.ptp(angles) > max(1.0, TILT_AGREE / min(sh, sw)):
        return None
    angle = float(np.mean(angles))
    return angle if TILT_MIN <= abs(angle) <= TILT_MAX else None


def _upright_box(pixels: np.ndarray, box: tuple[int, int, int, int] | None) -> bool:
    """Whether ``box`` is an upright picture in a plain frame: its four corner
    pixels differ from the frame's fill. A turned picture's bounding box has
    the fill in its corners (the triangles the turn leaves), so it measures a
    tilt instead; this spares the tilt measurement every bordered repost."""
    if box is None:
        return False
    h, w = pixels.shape
    fill = np.mean([float(pixels[0, 0]), float(pixels[0, -1]), float(pixels[-1, 0]), float(pixels[-1, -1])])
    left, top, right, bottom = box
    inside = [pixels[min(h - 1, y), min(w - 1, x)] for y in (top + 1, bottom - 2) for x in (left + 1, right - 2)]
    return all(abs(float(v) - fill) > TILT_BACKGROUND for v in inside)


def query_fingerprints(grey: Image.Image, size: tuple[int, int], *, exact: bool = True,
                       detail: Callable[[], Image.Image] | None = None) -> list[Fingerprint]:
    """The whole image, plus the picture inside its frame, or turned back
    upright, when there is one. ``detail`` returns a larger decode of the same
    picture to measure a tilt on (else ``grey`` itself is used)."""
    pixels = grey_pixels(grey)  # once, for the hashes, the tilt gate and the frame
    views = [fingerprint_grey(grey, size, exact=exact, pixels=pixels)]
    box = content_box(grey, pixels)
    if _may_be_tilted(pixels) and not _upright_box(pixels, box):
        # Before the frame view: a tilted picture's corners look like a frame.
        # The angle is measured at WORK_SIDE px at most; the picture is turned
        # back smaller still (turning costs as the pixel count, the hashes
        # need no more).
        big = _work_copy(detail() if detail is not None else grey)[0]
        # Turned inside its own frame (fill in the corners only; the outline fit below
        # would read the frame's edges as the picture's), else pasted turned on a canvas.
        angle = turns.angle_in_place(np.asarray(big))
        if angle is not None:
            inner = turns.turned_back(_work_copy(big, TURN_BACK_SIDE)[0], angle)
        else:
            angle = tilt(big)
            inner = turns.untilted(_work_copy(big, TURN_BACK_SIDE)[0], angle) if angle is not None else None
            if inner is not None and (box := content_box(inner)) is not None:
                inner = inner.crop(box)  # a border turned with the picture
        if inner is not None:
            views.append(fingerprint_grey(inner, inner.size, exact=exact))
            return views
    # A long image may hold its picture in a plain frame (a screenshot) or in a
    # blurred copy of itself (a story): each finder sees only its own kind, and a
    # busy-run guess can land on a blurred fill's part, so both boxes are hashed.
    for found in dict.fromkeys(b for b in (box, _blurred_fill_box(grey, pixels, detail)) if b is not None):
        views.append(fingerprint_grey(grey.crop(found), (found[2] - found[0], found[3] - found[1]), exact=exact))
    return views


def _blurred_fill_box(grey: Image.Image, pixels: np.ndarray,
                      detail: Callable[[], Image.Image] | None) -> tuple[int, int, int, int] | None:
    """:func:`blurred_fill_box` in ``grey``'s pixels. Measured on the larger decode when ``grey``
    is small (an edge's row known to a pixel of 200, not of 40), if ``grey`` shows likely edges."""
    larger = detail is not None and max(grey.size) < WORK_SIDE
    if not is_long(pixels) or (larger and blurred_fill_box(pixels, FIRST_LOOK) is None):
        return None  # (a small decode with no likely edges, as most long pictures: no larger one)
    if larger:
        small = _work_copy(detail())[0]
        scale = small.size[0] / grey.size[0]  # layout copy px per grey px
        found = blurred_fill_box(np.asarray(small))
    else:
        small, scale = _work_copy(grey)
        found = blurred_fill_box(pixels if scale == 1.0 else np.asarray(small))
    if found is None:
        return None
    w, h = grey.size
    left, top, right, bottom = (int(round(v / scale)) for v in found)
    return left, top, min(w, right), min(h, bottom)


def library_turns(grey: Image.Image) -> list[Image.Image]:
    """An entry whose corners are one plain fill (a figure on white), turned by
    each of TURN_ANGLES on that fill. Turned, such a picture has no outline
    for :func:`tilt` to measure, so the turned copies are indexed instead;
    other entries (most photographs) get none."""
    corners = _corners(np.asarray(grey, dtype=np.int16), 1)
    if corners is None:
        return []
    fill = int(round(corners.mean()))
    return [grey.rotate(angle, resample=Image.BILINEAR, expand=True, fillcolor=fill)
            for angle in TURN_ANGLES]


def library_fingerprints(grey: Image.Image, size: tuple[int, int], *,
                         exact: bool = True) -> list[Fingerprint]:
    """The whole entry, its centre crops, the picture inside its own frame
    (a figure on a white page: a framed repost's box lands on the same
    picture), and turned copies of a figure on a plain fill."""
    views = [fingerprint_grey(grey, size, exact=exact)]
    views += [fingerprint_grey(c, c.size, exact=exact) for c in library_crops(grey)]
    box = content_box(grey)
    if box is not None:
        views.append(fingerprint_grey(grey.crop(box), (box[2] - box[0], box[3] - box[1]), exact=exact))
    views += [fingerprint_grey(t, t.size, exact=exact) for t in library_turns(grey)]
    return views


def warm_up() -> None:
    content_box(Image.effect_noise((40, 30), 40))
    flat = np.zeros((8, 8), np.uint8)
    flat.setflags(write=False)  # read-only, as Pillow's arrays are: one compiled copy
    _may_be_tilted(flat)
