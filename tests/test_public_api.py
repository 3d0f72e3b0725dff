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


def test_the_api_decides_as_the_daemon_a_look_alike_refused_and_a_cut_found_by_keypoints(tmp_path, samples):
    """`matcher.match(monitor.fingerprint_file(...))` decides as the daemon and `match` do: a
    rusty-pipes texture meets a riveted plate by its hashes (an unsure match) and is refused
    because their keypoints agree on no geometry; a picture cut by a fifth on one side, which
    the hashes miss, is found by the second look. Without the keypoint picture (as before)
    the first was a near match and the second none."""
    from tests.test_detective import IMAGES
    library = monitor.open_library(tmp_path / "portfolio.sqlite")
    monitor.add_images(library, [IMAGES / "texture-rivets.jpg", samples / "library-coffee.jpg"])
    with Image.open(samples / "library-coffee.jpg") as img:
        img.convert("RGB").crop((0, 0, int(img.width * 0.8), img.height)).save(tmp_path / "cut.jpg", quality=85)
    matcher = monitor.Matcher(library.index, monitor.PRESETS["near"])
    assert matcher.match(monitor.fingerprint_file(IMAGES / "texture-rustpipes.jpg")) == []
    found = matcher.match(monitor.fingerprint_file(tmp_path / "cut.jpg"))
    assert [library.get(m.entry_id).source.rsplit("/", 1)[-1] for m in found] == ["library-coffee.jpg"]
    assert found[0].decided_by == "keypoints" and found[0].inliers >= 15
    bare = monitor.fingerprint_file(IMAGES / "texture-rustpipes.jpg", keypoint_picture=False)
    assert not bare.keypoint_picture and [m.tier for m in matcher.match(bare)] == ["near"]


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
