"""Stage 2, fingerprints: encoded image bytes in, a :class:`Fingerprint` out.

Pure functions of bytes, no I/O: decoding and hashing (``core``), the compiled
grids and hashes (``fasthash``), the extra views of a picture (``views``: frames,
tilts, crops; geometry only), local features (``keypoints``) and their packed form
for storage (``codec``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from monitor.fingerprints.core import (
    ALGORITHM_VERSION,
    DEFAULT_MAX_PIXELS,
    QUERY_VIEWS_VERSION,
    Fingerprint,
    ImageError,
    _draft_scale,
    decode_grey,
    degenerate_reason,
    fingerprint_grey,
    from_hex,
    to_hex,
)
from monitor.fingerprints.keypoints import (
    ENTRY_KEYPOINTS,
    KEY_MIN_SIDE,
    QUERY_KEYPOINTS,
    copy_bytes,
    is_packed_picture,
    keypoint_copy,
    keypoints_of_copy,
    pack_picture,
    unpack_picture,
)
from monitor.fingerprints.views import TILT_MIN_SIDE, library_fingerprints, query_fingerprints

__all__ = ["ALGORITHM_VERSION", "QUERY_VIEWS_VERSION", "DEFAULT_MAX_PIXELS", "Fingerprint", "ImageError", "decode_grey",
           "KeypointFinder", "degenerate_reason", "fingerprint_bytes", "fingerprint_grey", "from_hex",
           "to_hex"]


def fingerprint_bytes(data: bytes, *, fast: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
                      views: str | None = None, keypoints: bool | None = None,
                      keypoint_picture: bool = False) -> Fingerprint:
    """Fingerprint an encoded image. Raises ImageError for bad input.

    ``views="query"`` adds the view inside a detected frame, ``views="library"``
    the centre crops and content box of a library entry (monitor/fingerprints/views.py).
    ``keypoints`` (default: for library entries) adds the picture's local features;
    ``keypoint_picture`` the small copy they are found on instead (or ``data`` itself where
    that is shorter), for a matcher elsewhere to find them only if the post needs them
    (:class:`KeypointFinder`).
    """
    grey, size = decode_grey(data, fast=fast, max_pixels=max_pixels)
    larger = _LargerDecodes(data, fast, max_pixels, grey, size)
    fp = _fingerprint_views(grey, size, fast, views, larger)
    wanted = keypoints if keypoints is not None else views == "library"
    if (wanted or keypoint_picture) and fp.degenerate in (None, "low_detail"):
        if not wanted and len(data) <= copy_bytes(*size) and not is_packed_picture(data):
            # the encoded image is the shorter message (a feed's thumbnail), and costs no
            # decode here: decoded where the keypoints are found, only if they are asked for
            # (unless its first bytes could read as a copy's width: an icon, a TGA)
            return dataclasses.replace(fp, keypoint_picture=data)
        copy = keypoint_copy(larger(KEY_MIN_SIDE))
        if wanted:
            fp = dataclasses.replace(fp, keypoints=keypoints_of_copy(
                copy, limit=ENTRY_KEYPOINTS if views == "library" else QUERY_KEYPOINTS))
        else:
            fp = dataclasses.replace(fp, keypoint_picture=pack_picture(copy))
    return fp


def _keypoint_grey(data: bytes, fast: bool, max_pixels: int):
    """The decode keypoints are found on, larger than for the hashes (corners need pixels)."""
    return decode_grey(data, fast=fast, max_pixels=max_pixels, min_side=KEY_MIN_SIDE)[0]


class KeypointFinder:
    """A post's keypoints, or its mirror image's, found when first asked for (the matcher
    calls it with ``mirrored=`` and ``limit=``) from one decode of the image: a post that
    needs no second look costs nothing, one whose candidates met both it and its mirror
    image decodes once.
    ``data``: the encoded image, or what reads it (a file not read until needed); or
    ``picture``: a fingerprint's ``keypoint_picture``, the copy they are found on (or the
    encoded image, where that was shorter)."""

    def __init__(self, data: bytes | Callable[[], bytes] = b"", *, fast: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS, picture: bytes = b""):
        self._data, self._fast, self._max_pixels = data, fast, max_pixels
        self._picture = picture
        self._copy = None
        self._found: dict[bool, tuple[int, bytes]] = {}  # mirrored: (limit, keypoints)
        self.seconds = 0.0  # spent finding them (the decode and ORB), for the daemon's metrics

    @property
    def searched(self) -> int:
        """How many ways (0, 1, or 2 with the mirror image) the keypoints were searched for."""
        return len(self._found)

    @property
    def views(self) -> list[str]:
        """The ways searched: "upright", and "mirrored" where the mirror image's were found."""
        return ["mirrored" if mirrored else "upright" for mirrored in self._found]

    def __call__(self, mirrored: bool = False, limit: int = QUERY_KEYPOINTS) -> bytes:
        """At most ``limit`` keypoints (a second look asks for fewer: ORB keeping 512 costs
        a fifth less than 1,024), or more where more were found already."""
        have = self._found.get(mirrored)
        if have is None or have[0] < limit:
            start = time.perf_counter()
            if self._copy is None and is_packed_picture(self._picture):
                self._copy = unpack_picture(self._picture)  # ValueError: not one (the caller's to handle)
            elif self._copy is None:  # ImageError (a ValueError) where the bytes are no image
                data = self._picture or (self._data() if callable(self._data) else self._data)
                self._copy = keypoint_copy(_keypoint_grey(data, self._fast, self._max_pixels))
            self._found[mirrored] = (limit, keypoints_of_copy(self._copy, mirrored, limit))
            self.seconds += time.perf_counter() - start
        return self._found[mirrored][1]


class _LargerDecodes:
    """Larger decodes of one image than the hashes' (a tilt is measured, keypoints are found
    on more pixels), by the short side wanted: the hashes' own decode where it is large
    enough (PNG and WebP come decoded whole), and each JPEG DCT scale decoded once: the
    sides asked of a feed-sized picture often fall on one scale (a 320 px thumbnail's tilt
    and keypoints both need all its pixels), and a decode costs as much as the hashes."""

    def __init__(self, data: bytes, fast: bool, max_pixels: int, grey, size: tuple[int, int]):
        self.data, self.fast, self.max_pixels, self.grey, self.size = data, fast, max_pixels, grey, size
        self._by_scale: dict[int, object] = {}

    def enough(self, min_side: int) -> bool:
        """Whether the hashes' decode serves for ``min_side``."""
        return min(self.grey.size) >= min_side or self.grey.size == self.size

    def __call__(self, min_side: int):
        if self.enough(min_side):
            return self.grey
        scale = _draft_scale(self.size, min_side)
        if scale not in self._by_scale:
            self._by_scale[scale] = decode_grey(self.data, fast=self.fast, max_pixels=self.max_pixels,
                                                min_side=min_side)[0]
        return self._by_scale[scale]


def _fingerprint_views(grey, size: tuple[int, int], fast: bool, views: str | None,
                       larger: _LargerDecodes) -> Fingerprint:
    if views is None:
        return fingerprint_grey(grey, size, exact=not fast)
    if views == "query":
        # A tilted picture's outline needs more pixels than its hashes: decoded
        # again, larger, only for images whose corners look like a plain fill.
        detail = None if larger.enough(TILT_MIN_SIDE) else (lambda: larger(TILT_MIN_SIDE))
        whole, *extra = query_fingerprints(grey, size, exact=not fast, detail=detail)
    else:
        whole, *extra = library_fingerprints(grey, size, exact=not fast)
    return dataclasses.replace(whole, views=tuple(extra))
