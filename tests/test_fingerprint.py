"""Fingerprints of real images: imagehash parity, formats, degenerate and bad input."""

import io
import struct
import zlib

import imagehash
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from monitor.fingerprints import (
    Fingerprint,
    ImageError,
    decode_grey,
    fasthash,
    fingerprint_bytes,
    fingerprint_grey,
    from_hex,
    to_hex,
)
from tests.conftest import encode


def bits(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def test_full_decode_is_identical_to_imagehash(samples):
    files = sorted(samples.glob("*.jpg"))
    assert len(files) >= 10
    for path in files:
        fp = fingerprint_bytes(path.read_bytes(), fast=False)
        with Image.open(path) as img:
            assert fp.dhash_hex == str(imagehash.dhash(img)), path
            assert fp.phash_hex == str(imagehash.phash(img)), path


def test_hex_round_trips_through_imagehash(samples):
    fp = fingerprint_bytes((samples / "library-chelsea.jpg").read_bytes())
    assert from_hex(fp.dhash_hex) == fp.dhash
    assert str(imagehash.hex_to_hash(fp.dhash_hex)) == fp.dhash_hex
    assert to_hex(1) == "0000000000000001"
    with pytest.raises(ValueError):
        from_hex("abc")


@pytest.mark.slow  # ~1-2 s: the fast tier keeps under its minute
def test_fast_path_drift_is_small(samples):
    def as_png(path):  # PNG (like every non-JPEG) fast path: a box-filtered reduced copy
        with Image.open(path) as img:
            return encode(img.convert("RGB"), "PNG")

    for read in (lambda path: path.read_bytes(), as_png):
        drift = []
        for path in sorted(samples.glob("*.jpg")):
            data = read(path)
            drift.append(bits(fingerprint_bytes(data).dhash, fingerprint_bytes(data, fast=False).dhash))
        assert np.mean(drift) <= 1.0
        assert max(drift) <= 4


def test_mirror_hashes_equal_hashes_of_the_mirrored_picture(library_images):
    for path in library_images:
        with Image.open(path) as img:
            flipped = encode(ImageOps.mirror(img.convert("RGB")), "PNG")
            plain = encode(img.convert("RGB"), "PNG")
        fp, fpm = fingerprint_bytes(plain), fingerprint_bytes(flipped)
        assert bits(fp.dhash_mirror, fpm.dhash) <= 1
        assert bits(fp.phash_mirror, fpm.phash) <= 2
        assert bits(fp.dhash, fpm.dhash) > 16  # without the mirror hash it would be missed


@pytest.fixture(scope="module")
def picture():
    from tests.conftest import SAMPLES
    with Image.open(SAMPLES / "library-astronaut.jpg") as img:
        return img.convert("RGB")


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("WEBP", {"quality": 90}), ("BMP", {}),
                                    ("TIFF", {}), ("GIF", {}), ("JPEG", {"quality": 60})])
def test_every_format_hashes_close_to_the_original(picture, fmt, kw):
    ref = fingerprint_bytes(encode(picture, "PNG"))
    fp = fingerprint_bytes(encode(picture, fmt, **kw))
    assert bits(ref.dhash, fp.dhash) <= 6, fmt
    assert fp.degenerate is None


@pytest.mark.slow  # ~1-2 s: the fast tier keeps under its minute
def test_gif_uses_first_frame(picture):
    other = Image.new("RGB", picture.size, (10, 200, 30))
    buf = io.BytesIO()
    picture.save(buf, "GIF", save_all=True, append_images=[other])
    fp = fingerprint_bytes(buf.getvalue())
    assert bits(fp.dhash, fingerprint_bytes(encode(picture, "GIF")).dhash) == 0


def test_turbo_decode_equals_pillows_draft_decode(samples):
    from monitor.fingerprints import core as fpmod
    for path in sorted(samples.glob("*.jpg")):
        data = path.read_bytes()
        for min_side in (fpmod.DRAFT_MIN_SIDE, 192):  # the hashes' decode, the tilt's decode
            with Image.open(io.BytesIO(data)) as img:
                size = img.size
                img.draft("L", (min_side, min_side))
                pillow = np.asarray(img.convert("L"))
            turbo = np.asarray(fpmod._turbo_grey(data, size, min_side))
            assert turbo.shape == pillow.shape and (turbo == pillow).all(), path.name


_STORE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
          6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


@pytest.mark.parametrize("orientation", sorted(_STORE))
def test_every_exif_orientation_is_made_upright(picture, orientation):
    picture = picture.crop((0, 0, 480, 300))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(picture.transpose(_STORE[orientation]), "JPEG", quality=95, exif=exif.tobytes())
    upright = fingerprint_bytes(encode(picture, "JPEG", quality=95))
    for fast in (True, False):
        fp = fingerprint_bytes(data, fast=fast)
        assert bits(fp.dhash, upright.dhash) <= 4 and bits(fp.phash, upright.phash) <= 6
        assert (fp.width, fp.height) == picture.size


def test_exif_orientation_is_applied(picture):
    picture = picture.crop((0, 0, 480, 300))
    rotated = picture.rotate(90, expand=True)  # stored sideways ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... and tagged "rotate 90 CW to display"
    data = encode(rotated, "JPEG", quality=95, exif=exif.tobytes())
    fp = fingerprint_bytes(data)
    upright = fingerprint_bytes(encode(picture, "JPEG", quality=95))
    assert bits(fp.dhash, upright.dhash) <= 4
    assert (fp.width, fp.height) == picture.size


def test_transparency_is_composited_on_white(picture):
    rgba = picture.convert("RGBA")
    alpha = Image.new("L", picture.size, 0)
    alpha.paste(255, (0, 0, picture.width // 2, picture.height))
    rgba.putalpha(alpha)
    on_white = Image.new("RGB", picture.size, "white")
    on_white.paste(picture.crop((0, 0, picture.width // 2, picture.height)), (0, 0))
    assert bits(fingerprint_bytes(encode(rgba, "PNG")).dhash,
                fingerprint_bytes(encode(on_white, "PNG")).dhash) <= 1


@pytest.mark.parametrize("mode", ["P", "CMYK", "L", "LA", "1"])
def test_other_modes(picture, mode):
    img = picture.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    fp = fingerprint_bytes(encode(img, fmt))
    ref = fingerprint_bytes(encode(picture, "PNG"))
    assert bits(fp.dhash, ref.dhash) <= (20 if mode == "1" else 6), mode


def test_16_bit_greyscale_is_scaled_not_clipped(picture):
    grey = np.asarray(picture.convert("L"), dtype=np.uint16) * 257
    img16 = Image.fromarray(grey)
    assert img16.mode.startswith("I")
    fp = fingerprint_bytes(encode(img16, "PNG"))
    ref = fingerprint_bytes(encode(picture.convert("L"), "PNG"))
    assert fp.degenerate is None
    assert bits(fp.dhash, ref.dhash) <= 2


@pytest.mark.parametrize("make,reason", [
    (lambda: Image.new("RGB", (400, 300), (120, 40, 200)), "flat"),
    (lambda: Image.effect_noise((400, 300), 2).convert("RGB"), "flat"),
    (lambda: Image.new("RGB", (12, 300), (1, 2, 3)), "tiny"),
    (lambda: Image.linear_gradient("L").transpose(Image.ROTATE_90).resize((400, 300)),
     "low_detail"),
])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_degenerate_images_are_flagged(make, reason, fmt):
    data = encode(make(), fmt)
    for fast in (True, False):  # a JPEG under 32 px a side is decoded at full size, not refused
        assert fingerprint_bytes(data, fast=fast).degenerate == reason


def test_real_pictures_are_not_degenerate(samples):
    for path in samples.glob("*.jpg"):
        assert fingerprint_bytes(path.read_bytes()).degenerate is None, path


def _zero_idat(jpeg: bytes) -> bytes:
    png = encode(Image.open(io.BytesIO(jpeg)).convert("RGB"), "PNG")
    at = png.find(b"IDAT") + 4
    return png[:at] + bytes(50) + png[at + 50:]


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("data_fn,reason", [
    (lambda s: b"", "empty"),
    (lambda s: b"<html><body>not found</body></html>", "not_an_image"),
    (lambda s: s[: len(s) // 2], "truncated"),
    (lambda s: _zero_idat(s), "corrupt"),
    (lambda s: _png_header_only(100_000, 100_000), "too_many_pixels"),
    (lambda s: _png_header_only(30_000, 20_000), "too_many_pixels"),
])
def test_bad_input_raises_one_clear_error(samples, data_fn, reason):
    jpeg = (samples / "other-baboon.jpg").read_bytes()
    data = data_fn(jpeg)
    for fast in (False, True):  # Pillow's full decode and the libjpeg-turbo reduced decode
        with pytest.raises(ImageError) as err:
            fingerprint_bytes(data, fast=fast)
        assert err.value.reason == reason
        assert str(err.value).startswith(reason + ":")


def test_truncated_png_is_an_image_error(picture):
    data = encode(picture, "PNG")
    with pytest.raises(ImageError) as err:
        fingerprint_bytes(data[: len(data) // 3])
    assert err.value.reason in ("truncated", "corrupt")


def test_pixel_limit_is_configurable(picture):
    data = encode(picture, "PNG")
    with pytest.raises(ImageError, match="too_many_pixels"):
        fingerprint_bytes(data, max_pixels=1000)
    assert isinstance(fingerprint_bytes(data, max_pixels=10**7), Fingerprint)


def test_image_error_survives_pickling():
    import pickle
    err = pickle.loads(pickle.dumps(ImageError("truncated", "cannot decode: image file is truncated")))
    assert (err.reason, str(err)) == ("truncated", "truncated: cannot decode: image file is truncated")


def test_exif_orientation_reader_handles_both_byte_orders_and_bad_segments(picture):
    import struct as st

    from monitor.fingerprints.core import _exif_orientation
    plain = encode(picture.crop((0, 0, 64, 48)), "JPEG")

    def with_app1(payload: bytes) -> bytes:
        return plain[:2] + b"\xff\xe1" + st.pack(">H", len(payload) + 2) + payload + plain[2:]

    def exif(order: str, value: int) -> bytes:
        e = "<" if order == "II" else ">"
        ifd = st.pack(e + "H", 1) + st.pack(e + "HHI", 0x0112, 3, 1) + st.pack(e + "H", value) + b"\0\0"
        return b"Exif\0\0" + order.encode() + st.pack(e + "HI", 42, 8) + ifd + b"\0\0\0\0"

    assert _exif_orientation(plain) == 1                        # no EXIF at all
    assert _exif_orientation(with_app1(exif("MM", 6))) == 6     # Motorola byte order
    assert _exif_orientation(with_app1(exif("II", 8))) == 8     # Intel byte order
    assert _exif_orientation(with_app1(b"http://ns.adobe.com/xap/1.0/\0<x/>")) == 1  # XMP, not EXIF
    assert _exif_orientation(with_app1(b"Exif\0\0XX" + b"\0" * 8)) is None  # unknown byte order
    # Unsure means Pillow's path decides: still a fingerprint, still upright.
    assert fingerprint_bytes(with_app1(b"Exif\0\0XX" + b"\0" * 8)).width == 64


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 260), st.integers(1, 260), st.integers(1, 40), st.integers(1, 40),
       st.integers(0, 2**32 - 1))
def test_fast_path_lanczos_passes_are_pillows(in_w, in_h, out_w, out_h, seed):
    # Each pass of the compiled resampler equals Pillow's Lanczos bit for bit
    # (Pillow 13 chooses the order of the two passes itself, so 2-D results
    # are compared on real pictures below).
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (in_h, in_w), dtype=np.uint8)
    img = Image.fromarray(a)
    for size in ((out_w, in_h), (in_w, out_h)):
        assert np.array_equal(fasthash.lanczos(a, size), np.asarray(img.resize(size, Image.LANCZOS)))


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(0, 2**32 - 1))
def test_the_hashes_banded_grids_equal_the_dense_lanczos_passes(in_w, in_h, seed):
    # The hashes' grids come from the banded weights in one compiled call; each must
    # equal the dense passes above (so Pillow's, pass by pass) bit for bit, at every
    # size: smaller than a grid, equal to one (a pass Pillow skips), and larger.
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (in_h, in_w), dtype=np.uint8)
    a.setflags(write=False)
    grids = fasthash._grids(a, *fasthash.grid_weights(in_w, in_h))
    sizes = zip(fasthash.GRID_COLUMNS, fasthash.GRID_ROWS, strict=True)
    for grid, size in zip(grids, sizes, strict=True):
        assert np.array_equal(grid, fasthash.lanczos(a, size)), size


def test_fast_path_hashes_match_the_exact_path_on_real_pictures(samples, library_images):
    # Same decoded picture, grids made by the compiled call vs Pillow + scipy:
    # on real photographs the hashes agree (the bench checks the whole corpus).
    files = sorted(samples.glob("*.jpg")) + list(library_images)
    for path in files:
        grey, size = decode_grey(path.read_bytes())
        exact, fast = fingerprint_grey(grey, size), fingerprint_grey(grey, size, exact=False)
        for name in ("dhash", "phash", "dhash_mirror", "phash_mirror"):
            assert bits(getattr(exact, name), getattr(fast, name)) <= 1, (path, name)
        assert exact.degenerate == fast.degenerate
        grid = fasthash.lanczos(np.asarray(grey), (32, 32)).astype(int)
        assert np.abs(grid - np.asarray(grey.resize((32, 32), Image.LANCZOS))).max() <= 1
