"""Local features of a picture, for the matcher's second look (monitor/search/detective.py).

A crop from one side, a shear, a perspective warp or a crop that also changes the aspect
moves every cell of a 9x8 or 32x32 grid, so the global hashes drift apart; corners and
blobs of the picture stay where the picture is. ORB (OpenCV) finds up to ENTRY_KEYPOINTS
of them (a post: QUERY_KEYPOINTS) on a copy KEY_SIDE px on its long side, each with a
256-bit binary descriptor.

Stored form (bytes, the one place that knows it): per keypoint its x and y in that copy's
pixels as float16, then its 32 descriptor bytes, strongest corner first; the count is the
length / KEY_BYTES.
Pure functions: no I/O.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
from PIL import Image

from monitor.fingerprints.core import grey_pixels

KEY_SIDE = 320          # px, the long side keypoints are found at (finer adds time, not matches)
KEY_MIN_SIDE = 240      # px, the short side of the decode they are found on (then shrunk to KEY_SIDE)
ENTRY_KEYPOINTS = 256   # a library entry's, stored: ~9 KB (500 verified no more of bench/heldout.py's reposts)
# A post's, found only when it needs them: a caption, a watermark or an app's frame draws
# corners of its own, which crowd the picture's out of the strongest 256 (bench/heldout.py's
# tuning half: 1,024 confirm 74 of the 138 reposts that 256 lost)
QUERY_KEYPOINTS = 1024
DESCRIPTOR_BYTES = 32
KEY_BYTES = 4 + DESCRIPTOR_BYTES
# Corner contrast: OpenCV's default 20 finds too few corners in soft pictures; a smooth one
# (wood grain, a sky, stripes) that finds fewer than ENOUGH is searched again, finer, so
# that its keypoints can still tell it from a look-alike (monitor/search/detective.py)
FAST_THRESHOLDS = (10, 4, 1)
ENOUGH = 32

cv2.setNumThreads(1)    # the fingerprint workers are the parallelism; OpenCV's own pool would fight them


@functools.cache
def _orbs(limit: int) -> list:
    """ORB detectors keeping at most ``limit`` keypoints, one per FAST threshold."""
    return [cv2.ORB_create(nfeatures=limit, fastThreshold=t) for t in FAST_THRESHOLDS]


def keypoint_copy(grey: Image.Image) -> np.ndarray:
    """``grey`` at KEY_SIDE px on its long side at most, as a uint8 array."""
    w, h = grey.size
    scale = KEY_SIDE / max(w, h)
    if scale < 1:
        grey = grey.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.BILINEAR)
    return grey_pixels(grey)


def copy_bytes(width: int, height: int) -> int:
    """The length of :func:`pack_picture`'s bytes for a picture of these sides."""
    scale = min(1.0, KEY_SIDE / max(width, height, 1))
    w, h = (max(8, round(width * scale)), max(8, round(height * scale))) if scale < 1 else (width, height)
    return 2 + w * h


def is_packed_picture(blob: bytes) -> bool:
    """Whether ``blob`` is :func:`pack_picture`'s (its width leads, at most KEY_SIDE) rather
    than an encoded image, whose signature never reads as so small a width (JPEG ff d8,
    PNG 89 50, GIF 47 49, WebP 52 49...)."""
    return len(blob) > 2 and int.from_bytes(blob[:2], "little") <= KEY_SIDE


def pack_picture(copy: np.ndarray) -> bytes:
    """A keypoint copy as bytes (what a scaled-out fetch worker sends the shards, which
    find its keypoints only if the post needs them): its width as 2 bytes, then the pixels."""
    return copy.shape[1].to_bytes(2, "little") + np.ascontiguousarray(copy, np.uint8).tobytes()


def unpack_picture(blob: bytes) -> np.ndarray:
    """:func:`pack_picture`'s copy; ValueError for bytes that are not one."""
    width = int.from_bytes(blob[:2], "little")
    pixels = len(blob) - 2
    if not 0 < width <= KEY_SIDE or pixels <= 0 or pixels % width or pixels // width > KEY_SIDE:
        raise ValueError(f"not a keypoint picture ({len(blob)} bytes)")
    return np.frombuffer(blob, np.uint8, offset=2).reshape(-1, width)


def find_keypoints(grey: Image.Image, mirrored: bool = False, limit: int = QUERY_KEYPOINTS) -> bytes:
    """The packed keypoints of a greyscale picture, or of its mirror image (ORB's
    descriptors are not mirror-invariant), at most ``limit`` (ENTRY_KEYPOINTS,
    QUERY_KEYPOINTS, or fewer for a second look); b"" when it has none."""
    return keypoints_of_copy(keypoint_copy(grey), mirrored, limit)


def keypoints_of_copy(copy: np.ndarray, mirrored: bool = False, limit: int = QUERY_KEYPOINTS) -> bytes:
    """:func:`find_keypoints` of a picture's :func:`keypoint_copy`."""
    if mirrored:
        copy = np.ascontiguousarray(copy[:, ::-1])
    for orb in _orbs(limit):
        points, descriptors = orb.detectAndCompute(copy, None)
        if descriptors is not None and len(points) >= ENOUGH:
            break
    if descriptors is None or not points:
        return b""
    # strongest first: the first N of them are (about) the N that ORB would keep
    response = np.fromiter((p.response for p in points), np.float32, len(points))
    order = np.argsort(-response, kind="stable")
    xy = cv2.KeyPoint_convert(points)[order].astype(np.float16).view(np.uint8).reshape(-1, 4)
    return np.hstack([xy, descriptors[order]]).tobytes()


def unpack_keypoints(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(xy as (k, 2) float32, descriptors as (k, 32) uint8) of packed keypoints."""
    rows = np.frombuffer(blob, np.uint8).reshape(-1, KEY_BYTES)
    xy = np.ascontiguousarray(rows[:, :4]).view(np.float16).astype(np.float32).reshape(-1, 2)
    return xy, np.ascontiguousarray(rows[:, 4:])
