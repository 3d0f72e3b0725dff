"""The public Python API, used as the README shows it."""

import subprocess
import sys

import imagehash
import pytest
from PIL import Image, ImageOps

import monitor
from tests.conftest import ROOT


def test_the_readme_example(tmp_path, samples):
    library = monitor.open_library(tmp_path / "portfolio.sqlite")
    report = monitor.add_images(library, [samples])
    assert report.new == len(list(samples.glob("*.jpg"))) and len(library.index) >= 6
    with Image.open(samples / "library-rocket.jpg") as img:
        ImageOps.mirror(img.convert("RGB")).resize((300, 300)).save(tmp_path / "suspect.jpg", quality=70)
    matcher = monitor.Matcher(library.index, monitor.PRESETS["near"])
    fp = monitor.fingerprint_file(tmp_path / "suspect.jpg")
    matches = matcher.match(fp)
    assert matches and library.get(matches[0].entry_id).source.endswith("library-rocket.jpg")
    assert matches[0].mirrored and matches[0].tier in ("exact", "near")
    with pytest.raises(monitor.ImageError) as err:
        monitor.fingerprint_file(tmp_path / "portfolio.sqlite")
    assert err.value.reason == "not_an_image"


def test_fingerprints_are_imagehashs_values(samples):
    path = samples / "other-apple.jpg"
    fp = monitor.fingerprint_bytes(path.read_bytes(), fast=False)
    with Image.open(path) as img:
        assert fp.dhash_hex == str(imagehash.dhash(img)) and fp.phash_hex == str(imagehash.phash(img))
    assert isinstance(fp, monitor.Fingerprint) and fp.views == ()


def test_importing_the_package_is_light():
    """`import monitor` loads none of the engine (numba, numpy, Pillow): the CLI starts fast."""
    code = ("import sys, monitor; heavy = [m for m in ('numba', 'numpy', 'PIL', 'aiohttp') if m in sys.modules];"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr
    assert sorted(monitor.__all__) == sorted(set(monitor.__all__))
    for name in monitor.__all__:
        assert getattr(monitor, name) is not None
