"""The repost-monitor command run as a user would: a subprocess on real files."""

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import imagehash
import pytest
from PIL import Image, ImageEnhance, ImageOps

from monitor.tools.services import free_port

pytestmark = pytest.mark.slow  # every test here starts the command as a subprocess


def run(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "monitor", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def tree(tmp_path_factory, samples):
    root = tmp_path_factory.mktemp("tree")
    lib, inp = root / "library", root / "input"
    lib.mkdir()
    inp.mkdir()
    for p in samples.glob("library-*.jpg"):
        shutil.copy(p, lib / p.name)
    for p in samples.glob("other-*.jpg"):
        shutil.copy(p, inp / p.name)
    with Image.open(samples / "library-chelsea.jpg") as img:
        img = img.convert("RGB")
        img.resize((img.width // 2, img.height // 2)).save(inp / "small.jpg", quality=60)
        ImageOps.mirror(img).save(inp / "flipped.webp", quality=80)
        img.save(inp / "as.png")
    with Image.open(samples / "library-rocket.jpg") as img:
        img = img.convert("RGB")
        w, h = img.size
        img.crop((w // 40, h // 40, w - w // 40, h - h // 40)).save(inp / "crop.jpg", quality=85)
    (inp / "broken.jpg").write_bytes((samples / "other-home.jpg").read_bytes()[:2000])
    return root


def test_match_finds_reposts_and_reports_unreadable(tree):
    r = run("match", tree / "input", "--library", tree / "library", "--no-cache")
    assert r.returncode == 3, r.stderr  # one unreadable input
    found = {line.rsplit("/", 1)[-1] for line in r.stdout.splitlines() if line.startswith("[match]")}
    assert found == {"small.jpg", "flipped.webp", "as.png", "crop.jpg"}
    assert "[ok] fingerprinted 6 library images" in r.stderr
    assert "pair comparisons in" in r.stderr
    assert re.search(r"\[run\] keypoints found for \d+ of 14 inputs", r.stderr), r.stderr
    assert "[skip]" in r.stderr and "broken.jpg: truncated" in r.stderr
    assert "/64 bits" in r.stdout and "mirrored" in r.stdout


def test_exit_codes_and_formats(tree, tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    shutil.copy(tree / "input" / "small.jpg", clean)
    out = tmp_path / "out.jsonl"
    r = run("match", clean, "--library", tree / "library", "--format", "jsonl",
            "--output", out, "--best", "--no-cache")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["library"].endswith("library-chelsea.jpg")
    assert rows[0]["bits"] == 64 and rows[0]["tier"] in ("exact", "near")

    shutil.copy(tree / "input" / "other-baboon.jpg", tmp_path / "alone.jpg")
    r = run("match", tmp_path / "alone.jpg", "--library", tree / "library", "--no-cache")
    assert r.returncode == 1 and r.stdout == ""

    r = run("match", tmp_path / "nope", "--library", tree / "library")
    assert r.returncode == 2 and "no such file" in r.stderr

    r = run("match", clean, "--library", tree / "library", "--format", "csv", "--threshold", "64",
            "--no-cache")
    lines = r.stdout.splitlines()
    assert lines[0].startswith("input,library,label,tier,dhash_distance")
    assert len(lines) == 1 + 6  # threshold 64 without verification: every entry


def test_library_commands_and_store(tree, tmp_path):
    db = tmp_path / "lib.sqlite"
    cache = tmp_path / "cache.sqlite"
    r = run("library", "--db", db, "add", tree / "library", "--cache", cache)
    assert r.returncode == 0 and "6 new, 0 already present" in r.stdout
    # again, with --db after the verb: nothing new, and it says so
    r = run("library", "add", "--db", db, tree / "library", "--cache", cache)
    assert r.returncode == 0 and "0 new, 6 already present" in r.stdout, r.stderr
    r = run("library", "--db", db, "list", "--format", "jsonl")
    entries = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(entries) == 6
    with Image.open(tree / "library" / "library-chelsea.jpg") as img:
        chelsea = next(e for e in entries if e["label"] == "library-chelsea")
        assert chelsea["dhash"] == str(imagehash.dhash(img)) or \
            (int(chelsea["dhash"], 16) ^ int(str(imagehash.dhash(img)), 16)).bit_count() <= 2
    r = run("match", tree / "input" / "small.jpg", "--library", db, "--cache", cache)
    assert r.returncode == 0 and "library-chelsea.jpg" in r.stdout
    r = run("library", "--db", db, "remove", chelsea["id"])
    assert r.returncode == 0
    r = run("match", tree / "input" / "small.jpg", "--library", db, "--cache", cache)
    assert r.returncode == 1
    stats = json.loads(run("library", "--db", db, "stats").stdout)
    assert stats["entries"] == 5
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", stats["first_added"])


def _daemon_start_log(cfg: Path, port: int) -> str:
    """`run --config cfg` until /readyz says ready; then stopped, its log returned."""
    proc = subprocess.Popen([sys.executable, "-m", "monitor", "run", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("the daemon never got ready")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    return out


def test_library_commands_reach_the_store_a_config_names(tree, tmp_path):
    """The README's daemon steps: `library --config FILE add` fills the store the daemon opens
    (its path relative to the config file, wherever the command runs), not a
    ./repost-monitor.sqlite the daemon never reads; a daemon on an empty store says so."""
    etc, elsewhere, cache = tmp_path / "etc", tmp_path / "cwd", tmp_path / "cache.sqlite"
    etc.mkdir()
    elsewhere.mkdir()
    port = free_port()
    cfg = etc / "config.toml"
    cfg.write_text(f'[store]\npath = "state/m.sqlite"\n[server]\nport = {port}\n')
    store = etc / "state" / "m.sqlite"
    out = _daemon_start_log(cfg, port)
    assert f"no protected picture in {store}, so nothing can match" in out, out

    r = run("library", "--config", cfg, "add", tree / "library", "--cache", cache, cwd=elsewhere)
    assert r.returncode == 0 and f"6 new, 0 already present in {store}" in r.stdout, r.stdout + r.stderr
    assert not list(elsewhere.iterdir())
    assert json.loads(run("library", "stats", "--config", cfg, cwd=elsewhere).stdout)["entries"] == 6
    for args in (("alerts", "--config", cfg, "list"), ("matches", "list", "--config", cfg)):
        assert run(*args, cwd=elsewhere).returncode == 0, args
    r = run("library", "--db", tmp_path / "other.sqlite", "--config", cfg, "list")
    assert r.returncode == 2 and "--db and --config both name a store" in r.stderr, r.stderr
    r = run("library", "--config", etc / "missing.toml", "list")
    assert r.returncode == 2 and "missing.toml" in r.stderr, r.stderr

    out = _daemon_start_log(cfg, port)
    assert f"library: 6 entries indexed from {store}" in out and "no protected picture" not in out, out


def test_read_commands_refuse_a_missing_store(tmp_path):
    typo = tmp_path / "lbrary.sqlite"
    for args in (("library", "--db", typo, "list"), ("library", "stats", "--db", typo),
                 ("matches", "--db", typo, "list"), ("alerts", "list", "--db", typo)):
        r = run(*args)
        assert r.returncode == 2 and f"no store at {typo}" in r.stderr, (args, r.stderr)
    assert not typo.exists()


def test_listing_into_head_ends_quietly(tmp_path):
    """`library list | head -1`: the reader closes the pipe; no BrokenPipeError traceback."""
    db, csv = tmp_path / "big.sqlite", tmp_path / "hashes.csv"
    csv.write_text("source,dhash,phash,label\n" + "".join(
        f"https://example.org/{i}.jpg,{i * 2654435761 % 2**64:016x},{i * 40503 % 2**64:016x},"
        f"label-{i}\n" for i in range(1, 6001)))
    assert run("library", "--db", db, "import", csv).returncode == 0
    for command in ("library --db {db} list", "library --db {db} list --format jsonl"):
        r = subprocess.run(f"{shlex.quote(sys.executable)} -m monitor {command.format(db=db)} | head -1",
                           shell=True, capture_output=True, text=True, timeout=120)
        assert len(r.stdout.splitlines()) == 1
        assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


def test_check_config_reports_every_problem_at_once(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[server]\ntoken = "${RM_TEST_UNSET_TOKEN}"\nport = 99999\n'
                   '[[feeds]]\nname = "a b"\ntype = "rss"\nurl = "https://example.org/rss"\n'
                   '[[alerts]]\nname = "s"\ntype = "slack"\nurl = "${RM_TEST_UNSET_SLACK}"\n')
    r = run("check-config", cfg)
    assert r.returncode == 2
    for problem in ("server.token: environment variable RM_TEST_UNSET_TOKEN is not set",
                    "alerts[0].url: environment variable RM_TEST_UNSET_SLACK is not set",
                    "feeds[0] (a b).name", "server.port"):
        assert problem in r.stderr, r.stderr
    # the missing ${VAR} is reported once, not again as an invalid url
    assert "needs an http(s) 'url'" not in r.stderr


def test_hash_prints_imagehash_hex(samples):
    path = samples / "other-home.jpg"
    r = run("hash", path, "--no-cache", "--format", "jsonl")
    row = json.loads(r.stdout)
    with Image.open(path) as img:
        ref = str(imagehash.dhash(img))
    assert (int(row["dhash"], 16) ^ int(ref, 16)).bit_count() <= 2


def test_help_everywhere():
    for args in (["--help"], ["match", "--help"], ["library", "--help"],
                 ["library", "add", "--help"], ["hash", "--help"]):
        r = run(*args)
        assert r.returncode == 0 and "usage:" in r.stdout


def test_batch_demo_runs_and_finds_reposts():
    r = run("demo", "--batch")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("[match]") >= 8
    assert "[done]" in r.stderr


def test_daemon_demo_prints_detections_and_exits():
    r = run("demo", "--posts", "16", "--rate", "8")
    assert r.returncode == 0, r.stderr
    assert "metrics on http://127.0.0.1:" in r.stdout
    detections = [line for line in r.stdout.splitlines() if line.startswith("[detected]")]
    assert len(detections) >= 4
    summary = r.stdout.splitlines()[-1]
    assert summary.startswith("[demo] done: 16 posts") and "0 false alarms" in summary


def test_daemon_demo_on_a_jetstream_replay_detects_every_repost():
    """`demo --source jetstream`: the posts pushed over a WebSocket among events without
    pictures, as Bluesky's firehose is; every repost is detected, nothing else."""
    r = run("demo", "--source", "jetstream", "--posts", "20", "--rate", "10")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Jetstream /subscribe" in r.stdout
    detections = [line for line in r.stdout.splitlines() if line.startswith("[detected]")]
    assert detections and all("(feed bsky, by did:plc:demoartist" in line for line in detections)
    summary = r.stdout.splitlines()[-1]
    reposts = int(summary.split(" reposts, ")[0].rsplit(" ", 1)[1])
    assert f"{reposts} reposts, {reposts} detected" in summary and "0 false alarms" in summary


def test_audit_report_shows_problems_first_and_caps_intact_thumbnails(tmp_path):
    import random
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    rng = random.Random(3)
    for i in range(56):
        img = Image.new("RGB", (48, 48))
        img.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(48 * 48)])
        img.save(old / f"p{i:02d}.png")
        if i:  # p00 goes missing
            shutil.copy(old / f"p{i:02d}.png", new / f"p{i:02d}.png")
    report = tmp_path / "audit.html"
    r = run("audit", old, new, "--report", report, "--no-cache")
    assert r.returncode == 1 and "missing 1" in r.stderr
    page = report.read_text()
    kinds = re.findall(r'<div class="card" data-kind="([a-z-]+)"', page)
    assert kinds[0] == "missing" and kinds.count("intact") == 55
    assert page.count("data:image/jpeg;base64,") == 1 + 2 * 50  # the missing file, then 50 intact pairs
    assert "thumbnails of the first 50 intact files only" in page


def test_match_gives_inputs_no_tier_met_a_second_look(tree, tmp_path):
    """A picture cut from one side and the top: the hashes miss it, its keypoints do not."""
    inputs = tmp_path / "cut"
    inputs.mkdir()
    with Image.open(tree / "library" / "library-chelsea.jpg") as img:
        img = img.convert("RGB")
        img.crop((int(img.width * 0.18), int(img.height * 0.08), img.width, img.height)).save(
            inputs / "cut.jpg", quality=80)
    shutil.copy(tree / "input" / "other-baboon.jpg", inputs / "other.jpg")
    r = run("match", inputs, "--library", tree / "library", "--format", "jsonl", "--no-cache")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [(Path(x["input"]).name, Path(x["library"]).name, x["tier"], x["decided_by"]) for x in rows] == [
        ("cut.jpg", "library-chelsea.jpg", "near", "keypoints")]
    assert rows[0]["keypoint_inliers"] >= 15
    r = run("match", inputs, "--library", tree / "library", "--no-cache")
    assert "keypoints agree, near)" in r.stdout


def test_match_drops_unsure_matches_whose_keypoints_disagree(tree, tmp_path):
    """Batch match confirms as the daemon does: two real unrelated textures that the hashes
    alone meet at near are not reported; a cropped, contrast-changed repost scoring as
    high is, decided by its hashes and keypoints together."""
    images = Path(__file__).resolve().parent / "images"
    lib, inputs = tmp_path / "library", tmp_path / "inputs"
    lib.mkdir()
    inputs.mkdir()
    shutil.copy(images / "texture-rustpipes.jpg", lib / "rustpipes.jpg")
    shutil.copy(tree / "library" / "library-rocket.jpg", lib / "rocket.jpg")
    shutil.copy(images / "texture-rivets.jpg", inputs / "rivets.jpg")
    with Image.open(lib / "rocket.jpg") as img:
        img = img.convert("RGB")
        ImageEnhance.Contrast(img.crop((0, int(img.height * 0.07), img.width, img.height))).enhance(1.5).save(
            inputs / "repost.jpg", quality=80)
    r = run("match", inputs, "--library", lib, "--format", "jsonl", "--no-cache")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [(Path(x["input"]).name, Path(x["library"]).name, x["decided_by"]) for x in rows] == [
        ("repost.jpg", "rocket.jpg", "dhash+phash+fine+keypoints")]
    assert rows[0]["keypoint_inliers"] >= 10 and rows[0]["fine_distance"] is not None
    r = run("match", inputs, "--library", lib, "--threshold", "16", "--format", "jsonl", "--no-cache")
    assert ("rivets.jpg", "rustpipes.jpg") in {(Path(x["input"]).name, Path(x["library"]).name)
                                               for x in map(json.loads, r.stdout.splitlines())}


def test_names_and_labels_that_are_not_ours_reach_no_terminal_or_spreadsheet_raw(samples, tmp_path):
    """File names and labels with terminal escapes, bidirectional overrides and spreadsheet
    formulas: shown escaped by the table outputs and listings, CSV cells made inert, JSON exact."""
    lib, inp = tmp_path / "library", tmp_path / "input"
    lib.mkdir()
    inp.mkdir()
    shutil.copy(samples / "library-chelsea.jpg", lib / "chelsea.jpg")
    names = ["=HYPERLINK(\"evil.example\")\x1b[2J.jpg", "\u202egpj.exe.jpg", "plain.jpg"]
    for name in names:
        shutil.copy(samples / "library-chelsea.jpg", inp / name)
    db = tmp_path / "lib.sqlite"
    label = "@SUM(1+1)\x1b]0;pwned\x07"
    assert run("library", "--db", db, "add", lib, "--label", label, "--no-cache").returncode == 0
    listed = run("library", "--db", db, "list")
    assert "\x1b" not in listed.stdout and "@SUM(1+1)\\x1b]0;pwned\\x07" in listed.stdout
    as_json = json.loads(run("library", "--db", db, "list", "--format", "jsonl").stdout)
    assert as_json["label"] == label

    table = run("match", inp, "--library", db, "--no-cache")
    assert table.returncode == 0, table.stderr
    assert "\x1b" not in table.stdout + table.stderr and "\u202e" not in table.stdout
    assert "=HYPERLINK(\"evil.example\")\\x1b[2J.jpg" in table.stdout and "\\u202egpj.exe.jpg" in table.stdout
    as_csv = run("match", inp, "--library", db, "--no-cache", "--format", "csv", "--output", tmp_path / "m.csv")
    assert as_csv.returncode == 0, as_csv.stderr
    import csv
    rows = list(csv.DictReader((tmp_path / "m.csv").open(newline="")))
    assert len(rows) == 3 and {r["label"] for r in rows} == {"'" + label}
    as_jsonl = run("match", inp, "--library", db, "--no-cache", "--format", "jsonl")
    assert {Path(json.loads(x)["input"]).name for x in as_jsonl.stdout.splitlines()} == set(names)

    dedupe = run("dedupe", inp, "--no-cache", "--output", tmp_path / "d.csv")
    assert dedupe.returncode == 0, dedupe.stderr
    cells = [r["path"] for r in csv.DictReader((tmp_path / "d.csv").open(newline=""))]
    assert sorted(cells) == sorted(str(inp / n) for n in names)  # a path starts with "/": no formula
    dedupe = run("dedupe", ".", "--no-cache", "--output", tmp_path / "d.csv", cwd=inp)
    cells = [r["path"] for r in csv.DictReader((tmp_path / "d.csv").open(newline=""))]
    assert sorted(cells) == sorted(["'" + names[0], names[1], names[2]])
