"""A picture turned in place: rotated inside its own frame, as an editor's rotate that keeps
the canvas size does (and albumentations' Rotate). The turn cuts off the picture's corners
and leaves a triangle of fill in each corner of the frame; on a wide picture those reach a
seventh of its height at 8 degrees, so the whole image's hashes drift past every limit.

The triangles give the angle: each one's long side runs along the frame at the turn's slope
(turned counter-clockwise, the top-left and bottom-right ones lie along the top and bottom
edges, the other two along the sides). Turned back, the picture is whole but for its
corners, and its centre crop that holds none of the fill is one the library indexes
(monitor/fingerprints/crops.py: centre crops of 10, 20 and 30%). The query is also
fingerprinted as that crop. (:func:`untilted` turns back a picture pasted turned on a larger
canvas, whose angle views.tilt measures from its outline.)
Pure functions of decoded greyscale images: no I/O.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from monitor.fingerprints import crops

FILL_TOLERANCE = 14        # grey levels: a pixel this close to the corners' mean is fill
MIN_RUN = 6                # px (work copy): a shorter side of a triangle measures no slope
MIN_ANGLE, MAX_ANGLE = 1.5, 12.0  # degrees: below, the hashes hold; above, rare
AGREE = 1.0                # degrees: the triangles' angles agree within this
TOUCHES = 0.15            # share of each frame edge the picture covers (a canvas: ~0)
MARGIN = 0.01              # share of a side kept off the fill beyond the computed edge


def _run(profile: np.ndarray) -> int:
    """How many leading positions of ``profile`` are > 0 (the fill's extent from a corner)."""
    zero = np.flatnonzero(profile <= 0)
    return int(zero[0]) if zero.size else profile.size


def _slope(profile: np.ndarray) -> float | None:
    """|slope| of the leading run of ``profile`` (px of fill per px along the frame's
    edge), fitted over its first 80% and again without the points 2 px off the first
    line (where the picture's own colours meet the fill); None where the run is too
    short to measure."""
    n = int(0.8 * _run(profile))
    if n < MIN_RUN:
        return None
    x = np.arange(n, dtype=np.float64)
    y = profile[:n].astype(np.float64)
    keep = np.ones(n, bool)
    for _ in range(2):
        if keep.sum() < MIN_RUN:
            return None
        dx = x[keep] - x[keep].mean()
        slope = float((dx * (y[keep] - y[keep].mean())).sum() / (dx * dx).sum())
        keep = np.abs(y - (slope * (x - x[keep].mean()) + y[keep].mean())) <= 2.0
    return abs(slope)


def angle_in_place(a: np.ndarray) -> float | None:
    """The angle (degrees, counter-clockwise like ``Image.rotate``) of a picture turned in
    place in ``a`` (2-D uint8, a work copy), or None. All four corners must be one plain
    fill; at least three of the triangles must lie along the frame the same way (the
    turn's direction) and give the same angle."""
    h, w = a.shape
    if min(h, w) < 32:
        return None
    corners = np.array([a[0, 0], a[0, -1], a[-1, 0], a[-1, -1]], np.float64)
    if np.ptp(corners) > FILL_TOLERANCE:
        return None
    picture = np.abs(a.astype(np.int16) - corners.mean()) > FILL_TOLERANCE
    # fill depth from each frame edge, per column (top, bottom) and per row (left, right)
    top = np.where(picture.any(axis=0), np.argmax(picture, axis=0), h)
    bottom = np.where(picture.any(axis=0), np.argmax(picture[::-1], axis=0), h)
    left = np.where(picture.any(axis=1), np.argmax(picture, axis=1), w)
    right = np.where(picture.any(axis=1), np.argmax(picture[:, ::-1], axis=1), w)
    # In place, the picture reaches every edge of the frame between two triangles; pasted
    # turned on a larger canvas (views.tilt), only at its corners.
    if min(np.mean(top == 0), np.mean(bottom == 0), np.mean(left == 0), np.mean(right == 0)) < TOUCHES:
        return None
    # Per corner: (along the top or bottom edge, along the side), each read from the corner.
    legs = {"top-left": (top, left), "top-right": (top[::-1], right),
            "bottom-left": (bottom, left[::-1]), "bottom-right": (bottom[::-1], right[::-1])}
    # Counter-clockwise, the top-left and bottom-right triangles lie along the top and
    # bottom edges (+1), the other two along the sides (-1); clockwise the other way.
    lies_along = {"top-left": 1, "bottom-right": 1, "top-right": -1, "bottom-left": -1}
    votes = []
    for corner, (edge, side) in legs.items():
        along_edge, along_side = _slope(edge), _slope(side)
        if along_edge is not None and along_edge < math.tan(math.radians(MAX_ANGLE)):
            votes.append(lies_along[corner] * math.degrees(math.atan(along_edge)))
        elif along_side is not None and along_side < math.tan(math.radians(MAX_ANGLE)):
            votes.append(-lies_along[corner] * math.degrees(math.atan(along_side)))
    # One triangle may fall on the picture's own dark (or light) edge: three of the four
    # must say the same direction and lie within AGREE of their median.
    same = [v for v in votes if v > 0] if sum(v > 0 for v in votes) >= 3 else [v for v in votes if v < 0]
    if len(same) < 3:
        return None
    angle = float(np.median(same))
    if sum(abs(v - angle) <= AGREE for v in same) < 3:
        return None
    return angle if MIN_ANGLE <= abs(angle) <= MAX_ANGLE else None


def centre_crop(width: int, height: int, angle: float) -> str | None:
    """The name of the smallest centre crop the library indexes (crops.LIBRARY_CROPS) of a
    ``width`` x ``height`` picture turned in place by ``angle`` and back that holds no fill:
    the crop's corners, turned, must stay inside the frame. None where even the largest
    holds some."""
    t = math.radians(abs(angle))
    c, s = math.cos(t), math.sin(t)
    half = min(width / (2 * (width * c + height * s)), height / (2 * (width * s + height * c)))
    need = 2 * (0.5 - half + MARGIN)  # share of each side, counted as crops.py counts it (both ends)
    indexed = sorted((share, name) for name, share in crops.CENTRE_SHARES.items() if name in crops.LIBRARY_CROPS)
    return next((name for share, name in indexed if share >= need), None)


def turned_back(grey: Image.Image, angle: float) -> Image.Image | None:
    """``grey`` (a picture turned in place by ``angle``) turned back and cut to the library's
    centre crop that holds none of the fill; None where no centre crop is clear of it."""
    name = centre_crop(*grey.size, angle)
    if name is None:
        return None
    upright = grey.rotate(-angle, resample=Image.BILINEAR, expand=False)
    return upright.crop(crops.CROPS[name](*grey.size))  # the very box the library's view has


def untilted(grey: Image.Image, angle: float) -> Image.Image | None:
    """The picture inside a canvas made by ``Image.rotate(angle, expand=True)``:
    turned back and cut to its original size (a 2% margin drops the fill's
    blurred edge)."""
    t = np.radians(abs(angle))
    cos, sin, cos2 = np.cos(t), np.sin(t), np.cos(2 * t)
    big_w, big_h = grey.size
    w = (big_w * cos - big_h * sin) / cos2
    h = (big_h * cos - big_w * sin) / cos2
    if w < 16 or h < 16:
        return None
    upright = grey.rotate(-angle, resample=Image.BILINEAR, expand=False)
    cx, cy, mw, mh = big_w / 2, big_h / 2, 0.49 * w, 0.49 * h
    return upright.crop((int(round(cx - mw)), int(round(cy - mh)), int(round(cx + mw)), int(round(cy + mh))))
