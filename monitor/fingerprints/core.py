"""Decode an image and turn it into 64-bit perceptual fingerprints.

Pure functions of bytes: no file, network or database access here, so the
pipeline can run them in worker threads and tests can feed them anything.

Bit order and hex form are exactly imagehash's: the 8x8 boolean grid is read
row-major and the first cell is the most significant bit, so
``format(fp.dhash, "016x") == str(imagehash.dhash(img))``.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.fftpack
from PIL import Image, ImageFile, features

from monitor.fingerprints import fasthash

try:  # libjpeg-turbo's scaled decode without Pillow's stream plumbing; optional speed-up
    import simplejpeg
except ImportError:  # pragma: no cover - a platform without a wheel falls back to Pillow
    simplejpeg = None

# Bumped whenever a change alters hash values; caches keyed on it go stale.
# v3: frame detection keeps the last busy row; v4: fast-path grids from one compiled call,
# tilted-picture query view, library views at a 30% centre crop and 15% side crops
ALGORITHM_VERSION = "dhash-phash-v7-feed-shapes"
# The query side's views alone (a post's, a `match` input's): bumped when they change and the
# library's do not, so cached inputs are made again and no entry needs a rehash.
# q2: pictures turned in place (monitor/fingerprints/turns.py)
QUERY_VIEWS_VERSION = "q2-turned-in-place"

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000x8000; far above any real thumbnail
# JPEG covers MPO (phone multi-picture JPEGs): its opener returns them.
# AVIF where this Pillow was built with it (the wheels since 11.3 are): feeds offer .avif.
AVIF = features.check("avif")
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF") + (("AVIF",) if AVIF else ())
# Draft decoding asks libjpeg for the smallest DCT scale (down to 1/8) whose
# result is still at least this big on both sides: the hashes only need a
# 32x32 grid. Measured on the corpus: 4x imagehash's speed, mean drift 0.6
# bits of 64 against a full decode (bench/fingerprint.py).
DRAFT_MIN_SIDE = 32
MIN_SIDE = 16          # smaller images carry too little detail to compare
FLAT_STD = 3.0         # grey-level std below this: a (near-)solid image
LOW_DETAIL_SHARE = 0.75  # share of dHash gradients within +-1 grey level
ONE_WAY_BITS = 2         # a dHash with <= this many 1 (or 0) bits is a ramp

ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ValueError):
    """An input that cannot be fingerprinted. ``reason`` is a short code
    (empty, not_an_image, truncated, corrupt, too_many_pixels) fit for a
    metric label; the message says what happened in words."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self):  # crosses process boundaries intact (fingerprint worker processes)
        return (type(self), (self.reason, self.message))


@dataclass(frozen=True, slots=True)
class Fingerprint:
    dhash: int
    phash: int
    # The same hashes of the mirrored picture, so a flipped repost still
    # lands within a few bits of the library entry.
    dhash_mirror: int
    phash_mirror: int
    width: int
    height: int
    # None for a usable fingerprint, else why it would match almost anything
    # (tiny, flat, low_detail).
    degenerate: str | None = None
    # Extra views of the same picture (monitor/variants.py): for a query, the
    # picture inside its frame; for a library entry, centre crops and its own
    # content box. Each is a Fingerprint without views.
    views: tuple[Fingerprint, ...] = ()
    # The 256-bit verification hashes (fasthash.FINE_WORDS little-endian
    # uint64 words: pHash-256, dHash-256) of the picture and of its mirror
    # image; empty where unknown (hashes imported from imagehash, rows stored
    # by an older version), and the matcher then decides on the 64-bit hashes.
    fine: bytes = b""
    fine_mirror: bytes = b""
    # The picture's local features (monitor/fingerprints/keypoints.py) for the
    # matcher's second look; empty where not computed (the query side computes
    # them when [match] keypoints is on, every library entry has them).
    keypoints: bytes = b""
    # Or the small greyscale copy they are found on (keypoints.pack_picture), or the encoded
    # image itself where that is shorter, which a scaled-out fetch worker sends: the shards
    # find keypoints only for posts that need them.
    keypoint_picture: bytes = b""

    @property
    def dhash_hex(self) -> str:
        return to_hex(self.dhash)

    @property
    def phash_hex(self) -> str:
        return to_hex(self.phash)


def to_hex(value: int) -> str:
    return format(value, "016x")


def from_hex(text: str) -> int:
    """Parse a 64-bit hash in imagehash's hex form."""
    text = text.strip().lower()
    if len(text) != 16:
        raise ValueError(f"expected 16 hex digits for a 64-bit hash, got {len(text)}: {text!r}")
    return int(text, 16)


def _phash_low(grid32: np.ndarray) -> np.ndarray:
    """The 16x16 lowest DCT coefficients (imagehash's pHash keeps the 8x8 corner)."""
    dct = scipy.fftpack.dct(scipy.fftpack.dct(grid32, axis=0), axis=1)
    return dct[:16, :16]


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError("empty", "no bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError("too_many_pixels", str(exc)) from None
    except Image.UnidentifiedImageError:
        raise ImageError("not_an_image", f"not a supported image format ({len(data)} bytes, "
                         f"starts {data[:8]!r})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError("corrupt", f"unreadable header: {exc}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError("corrupt", f"invalid size {w}x{h}")
    _check_pixels(w, h, max_pixels)
    return img


def _check_pixels(w: int, h: int, max_pixels: int) -> None:
    """Refuse a decompression bomb from its header, before any pixel is decoded."""
    if w * h > max_pixels:
        raise ImageError("too_many_pixels",
                         f"{w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,}")


def _to_grey(img: Image.Image) -> Image.Image:
    """Any decoded mode -> 8-bit greyscale, transparency composited on white."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("L")
    if mode.startswith("I") or mode == "F":
        # 16/32-bit and float greys: scale to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() if arr.size else 0.0
        if top > 255:
            arr = arr * (255.0 / (65535.0 if top <= 65535 else top))
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
    if mode in ("L", "1", "RGB"):
        return img.convert("L")
    # CMYK, YCbCr, LAB, HSV: go through RGB, which Pillow converts correctly.
    return img.convert("RGB").convert("L")


# EXIF orientation -> the transpose that makes the picture upright (ImageOps.exif_transpose's table).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _draft_scale(size: tuple[int, int], min_side: int = DRAFT_MIN_SIDE) -> int:
    """The DCT scale Pillow's draft picks for ``min_side``: 8, 4, 2 or 1."""
    fit = min(size[0] // min_side, size[1] // min_side)
    return next((s for s in (8, 4, 2, 1) if fit >= s), 1)  # smaller than min_side: full size


def _turbo_grey(data: bytes, size: tuple[int, int], min_side: int) -> Image.Image | None:
    """The reduced-size greyscale decode of a JPEG straight from libjpeg-turbo.

    Pixel-identical to Pillow's draft decode (checked on the whole corpus) and
    ~15% faster on 1024 px JPEGs. None when it cannot decode: the caller falls
    back to Pillow, which then says exactly what is wrong with the file.
    """
    if simplejpeg is None:
        return None
    s = _draft_scale(size, min_side)
    try:
        arr = simplejpeg.decode_jpeg(data, colorspace="GRAY", min_factor=s,
                                     min_height=-(-size[1] // s), min_width=-(-size[0] // s))
    except (ValueError, RuntimeError):
        return None
    pixels = arr.reshape(arr.shape[0], arr.shape[1])
    pixels.setflags(write=False)
    # A read-only image over the array's memory, which comes with it (grey_pixels).
    grey = Image.frombuffer("L", (pixels.shape[1], pixels.shape[0]), pixels, "raw", "L", 0, 1)
    grey._decoded_pixels = pixels
    return grey


def grey_pixels(grey: Image.Image) -> np.ndarray:
    """``np.asarray(grey)``, without its copy where the decoder's array came with the
    image. The image is a read-only view of that array; Pillow copies a read-only image
    before changing it (clearing ``readonly``), so a changed image is read afresh."""
    pixels = getattr(grey, "_decoded_pixels", None)
    return pixels if pixels is not None and grey.readonly else np.asarray(grey)


def _exif_orientation(data: bytes) -> int | None:
    """The EXIF orientation tag of a JPEG (1 when absent), or None if unsure.

    Read straight from the APP1 segment: Pillow's opener parses every marker in
    Python, which costs as much as hashing the reduced image. None sends the
    caller to Pillow's path, which reads (or rejects) the file properly.
    """
    i, end = 2, len(data)
    while i + 4 <= end and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xDA:  # start of scan: no APP1 before the image data
            return 1
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2:
            return None
        if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00":
            tiff = data[i + 10:i + 2 + length]
            order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
            if order is None or len(tiff) < 8:
                return None
            ifd = int.from_bytes(tiff[4:8], order)
            if ifd + 2 > len(tiff):
                return None
            for k in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
                entry = tiff[ifd + 2 + 12 * k:ifd + 14 + 12 * k]
                if len(entry) < 12:
                    return None
                if int.from_bytes(entry[:2], order) == 0x0112:
                    value = int.from_bytes(entry[8:10], order)
                    return value if 1 <= value <= 8 else 1
            return 1
        i += 2 + length
    return None


def _jpeg_fast(data: bytes, max_pixels: int,
               min_side: int) -> tuple[Image.Image, tuple[int, int]] | None:
    """decode_grey's JPEG fast path without Pillow: header, orientation, scaled decode."""
    if simplejpeg is None or data[:3] != b"\xff\xd8\xff":
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "Gray") or w <= 0 or h <= 0:
        return None  # CMYK/YCCK and oddities: Pillow converts them correctly
    _check_pixels(w, h, max_pixels)
    orientation = _exif_orientation(data)
    grey = _turbo_grey(data, (w, h), min_side) if orientation is not None else None
    if grey is None:
        return None
    if orientation in _UPRIGHT:
        grey = grey.transpose(_UPRIGHT[orientation])
    return grey, ((h, w) if orientation in (5, 6, 7, 8) else (w, h))


def decode_grey(data: bytes, *, fast: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS,
                min_side: int = DRAFT_MIN_SIDE) -> tuple[Image.Image, tuple[int, int]]:
    """Decode ``data`` to an upright greyscale image.

    Returns the image (when ``fast``, a JPEG is decoded at the smallest DCT
    scale that keeps both sides >= ``min_side``) and the original (width,
    height) after EXIF orientation.
    """
    if fast:
        decoded = _jpeg_fast(data, max_pixels, min_side)
        if decoded is not None:
            return decoded
    img = _open(data, max_pixels)
    header_size = img.size  # draft decoding shrinks img.size below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fast and img.format in ("JPEG", "MPO"):
                img.draft("L", (min_side, min_side))
            img.seek(0)  # first frame of GIF/WebP/TIFF animations
            img.load()
            orientation = img.getexif().get(0x0112, 1)
            if orientation in _UPRIGHT:
                img = img.transpose(_UPRIGHT[orientation])
            grey = _to_grey(img)
            if fast and img.format not in ("JPEG", "MPO"):
                # What JPEG's DCT scaling does for free: a box-filtered copy
                # a few times the grids' size (hashing a 512 px PNG whole
                # costs 20x more, for the same hashes within the drift).
                # A box resize rather than Image.reduce: its boxes are laid out
                # symmetrically, so the mirror hashes stay exact.
                scale = _draft_scale(grey.size, min_side)
                if scale > 1:
                    grey = grey.resize((-(-grey.width // scale), -(-grey.height // scale)), Image.BOX)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError("too_many_pixels", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        msg = str(exc)
        reason = "truncated" if "truncated" in msg else "corrupt"
        raise ImageError(reason, f"cannot decode: {msg}") from None
    except MemoryError:
        raise ImageError("too_many_pixels", "out of memory while decoding") from None
    w, h = header_size
    # EXIF orientations 5-8 swap the sides.
    return grey, ((h, w) if orientation in (5, 6, 7, 8) else (w, h))


def degenerate_reason(size: tuple[int, int], std32: float, flat_share: float,
                      rising: int) -> str | None:
    """Why these hashes would match almost anything, or None if they won't.

    ``std32`` is the 32x32 grid's grey-level std, ``flat_share`` the share of
    the 64 dHash steps within +-1 grey level, ``rising`` how many steps rise.
    """
    if min(size) < MIN_SIDE:
        return "tiny"
    if std32 < FLAT_STD:
        return "flat"
    # Nearly no gradient, or nearly all gradients one way (a plain ramp):
    # either hash is shared by countless unrelated pictures.
    if flat_share >= LOW_DETAIL_SHARE:
        return "low_detail"
    if rising <= ONE_WAY_BITS or rising >= 64 - ONE_WAY_BITS:
        return "low_detail"
    return None


def fingerprint_grey(grey: Image.Image, size: tuple[int, int], *, exact: bool = True,
                     pixels: np.ndarray | None = None) -> Fingerprint:
    """Hashes of an already-decoded greyscale image (the pure core).

    ``exact`` makes the grids with Pillow and the DCT with scipy, exactly as
    imagehash does (bit-identical hashes); otherwise one compiled call makes
    them (monitor/fasthash.py: a quarter of the time, drift measured) from
    ``pixels`` (``np.asarray(grey)``) when the caller has it already.
    """
    if exact:
        grid32 = np.asarray(grey.resize((32, 32), Image.LANCZOS))
        packed, fine, std32, flat_share, rising = fasthash.hashes_of_grids(
            np.asarray(grey.resize((9, 8), Image.LANCZOS)), _phash_low(grid32), grid32,
            np.asarray(grey.resize((17, 16), Image.LANCZOS)))
    else:
        # Lanczos is symmetric, so mirroring the small grids equals hashing the
        # mirrored picture (checked in tests) at no extra decode cost.
        packed, fine, std32, flat_share, rising = fasthash.hashes(
            pixels if pixels is not None else grey_pixels(grey))
    fine = fine.astype("<u8")
    return Fingerprint(
        dhash=int(packed[0]), phash=int(packed[1]),
        dhash_mirror=int(packed[2]), phash_mirror=int(packed[3]),
        width=size[0], height=size[1],
        degenerate=degenerate_reason(size, std32, flat_share, rising),
        fine=fine[:fasthash.FINE_WORDS].tobytes(), fine_mirror=fine[fasthash.FINE_WORDS:].tobytes(),
    )
