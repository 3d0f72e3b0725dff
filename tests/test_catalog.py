"""dedupe, group and audit on real image trees built from the shipped samples; their HTML
reports and the daemon's /review page opened in headless Chromium."""

import asyncio
import csv
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image, ImageEnhance, ImageOps

from tests.browser import CHROMIUM, Browser

pytestmark = pytest.mark.slow  # the commands as subprocesses, and Chromium


def run(*args):
    return subprocess.run([sys.executable, "-m", "monitor", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def rows(text):
    return list(csv.DictReader(io.StringIO(text)))


@pytest.fixture
def catalog(tmp_path, samples):
    """A photo catalog with copies, re-encodes, a shoot's edits and unrelated pictures."""
    root = tmp_path / "catalog"
    (root / "2024").mkdir(parents=True)
    (root / "exports").mkdir()
    for p in samples.glob("*.jpg"):
        shutil.copy(p, root / "2024" / p.name)
    with Image.open(samples / "library-chelsea.jpg") as img:
        img = img.convert("RGB")
        img.save(root / "exports" / "chelsea-web.jpg", quality=55)           # re-encode
        img.resize((img.width // 2, img.height // 2)).save(root / "exports" / "chelsea-small.png")
        ImageEnhance.Brightness(img).enhance(1.25).save(root / "exports" / "chelsea-bright.jpg")  # an edit
        ImageOps.mirror(img).save(root / "exports" / "chelsea-mirrored.jpg")
    shutil.copy(samples / "library-rocket.jpg", root / "exports" / "rocket copy.jpg")  # same bytes
    os.utime(root / "exports" / "rocket copy.jpg", (1_700_000_000, 1_700_000_000))
    return root


def test_dedupe_groups_keep_policy_and_deterministic_ids(catalog, tmp_path):
    r = run("dedupe", catalog, "--no-cache")
    assert r.returncode == 0, r.stderr
    groups = {}
    for row in rows(r.stdout):
        groups.setdefault(row["group"], []).append(row)
    by_name = {frozenset(os.path.basename(x["path"]) for x in g): g for g in groups.values()}
    chelsea = next(g for names, g in by_name.items() if "library-chelsea.jpg" in names)
    names = {os.path.basename(x["path"]) for x in chelsea}
    assert {"library-chelsea.jpg", "chelsea-web.jpg", "chelsea-small.png"} <= names
    assert "chelsea-mirrored.jpg" not in names  # a mirror is a variant, not a duplicate
    keep = [x for x in chelsea if x["role"] == "keep"]
    assert len(keep) == 1  # largest resolution kept
    assert int(keep[0]["width"]) * int(keep[0]["height"]) == max(int(x["width"]) * int(x["height"])
                                                                 for x in chelsea)
    assert os.path.basename(keep[0]["path"]) in ("library-chelsea.jpg", "chelsea-web.jpg")
    # Same ids whatever the order the folders are given in.
    r2 = run("dedupe", catalog / "exports", catalog / "2024", "--no-cache")
    assert sorted(map(tuple, (x.values() for x in rows(r2.stdout)))) == \
        sorted(map(tuple, (x.values() for x in rows(r.stdout))))
    # keep policies
    r = run("dedupe", catalog, "--no-cache", "--keep", "oldest", "--format", "jsonl")
    rocket = [json.loads(x) for x in r.stdout.splitlines() if "rocket" in x]
    assert next(x for x in rocket if x["role"] == "keep")["path"].endswith("rocket copy.jpg")
    r = run("dedupe", catalog, "--no-cache", "--keep", "prefer-prefix", "--prefer", catalog / "exports",
            "--format", "jsonl")
    chel = [json.loads(x) for x in r.stdout.splitlines() if "chelsea" in x]
    assert "/exports/" in next(x for x in chel if x["role"] == "keep")["path"]


def test_dedupe_actions_dry_run_then_apply_never_touch_the_kept_file(catalog, tmp_path):
    before = sorted(p.relative_to(catalog) for p in catalog.rglob("*.jpg"))
    r = run("dedupe", catalog, "--no-cache", "--action", "move", "--move-to", tmp_path / "dupes")
    assert "[dry-run] nothing changed" in r.stderr
    assert sorted(p.relative_to(catalog) for p in catalog.rglob("*.jpg")) == before
    kept = [x["path"] for x in rows(r.stdout) if x["role"] == "keep"]
    dupes = [x["path"] for x in rows(r.stdout) if x["role"] == "duplicate"]
    r = run("dedupe", catalog, "--no-cache", "--action", "move", "--move-to", tmp_path / "dupes", "--apply")
    assert r.returncode == 0, r.stderr
    assert all(os.path.exists(k) for k in kept) and not any(os.path.exists(d) for d in dupes)
    assert len(list((tmp_path / "dupes").rglob("*.*"))) == len(dupes)
    r = run("dedupe", catalog, "--no-cache")
    assert rows(r.stdout) == []  # nothing left to dedupe


def test_hardlink_action(catalog):
    r = run("dedupe", catalog, "--no-cache", "--tier", "exact", "--action", "hardlink", "--apply")
    assert r.returncode == 0
    a, b = catalog / "2024" / "library-rocket.jpg", catalog / "exports" / "rocket copy.jpg"
    assert os.path.samefile(a, b)


def test_group_finds_variants_at_the_loose_tier(catalog):
    r = run("group", catalog, "--no-cache", "--format", "jsonl")
    rows_ = [json.loads(x) for x in r.stdout.splitlines()]
    chelsea_group = {x["group"] for x in rows_ if "chelsea-bright" in x["path"]}
    members = {os.path.basename(x["path"]) for x in rows_ if x["group"] in chelsea_group}
    assert {"chelsea-bright.jpg", "chelsea-mirrored.jpg", "library-chelsea.jpg"} <= members


def test_look_alike_textures_are_not_duplicates_but_a_cut_edit_is_a_variant(catalog, samples):
    """As the daemon does: a pair unsure by its hashes stands only where the two pictures'
    keypoints agree. A riveted plate and rusty pipes (tests/images) meet by their hashes
    and must not be grouped (dedupe --apply would move one away); the rocket cut and
    brightened, as unsure, is its variant."""
    from tests.test_detective import IMAGES
    (catalog / "textures").mkdir()
    for name in ("texture-rivets.jpg", "texture-rustpipes.jpg"):
        shutil.copy(IMAGES / name, catalog / "textures" / name)
    with Image.open(samples / "library-rocket.jpg") as img:
        img = img.convert("RGB")
        ImageEnhance.Contrast(img.crop((0, int(img.height * 0.07), img.width, img.height))).enhance(1.5).save(
            catalog / "exports" / "rocket-cut.jpg", quality=80)
    for command in ("dedupe", "group"):
        r = run(command, catalog, "--no-cache", "--format", "jsonl")
        assert r.returncode == 0, r.stderr
        found = [json.loads(x) for x in r.stdout.splitlines()]
        assert not [x for x in found if "texture-" in x["path"]], (command, found)
    groups = {}
    for x in found:  # group's
        groups.setdefault(x["group"], set()).add(os.path.basename(x["path"]))
    assert any({"rocket-cut.jpg", "library-rocket.jpg"} <= g for g in groups.values()), groups


def test_group_finds_a_crop_from_one_side_by_the_second_look_and_dedupe_leaves_it(catalog, samples):
    """group takes the daemon's second look (keypoints, verified geometrically) for a picture
    its hashes meet with no other: a crop from one side and a small rotation join their
    original's group (the rotation already did by its hashes). dedupe does not take the look:
    a crop is a variant, not a duplicate, and --apply would remove it."""
    with Image.open(samples / "library-coffee.jpg") as img:
        img = img.convert("RGB")
        img.crop((0, 0, int(img.width * 0.9), img.height)).save(catalog / "exports" / "coffee-cut.jpg", quality=85)
        img.rotate(6, resample=Image.Resampling.BICUBIC).save(catalog / "exports" / "coffee-turned.jpg", quality=85)
    r = run("group", catalog, "--no-cache", "--format", "jsonl")
    assert r.returncode == 0, r.stderr
    groups = {}
    for x in map(json.loads, r.stdout.splitlines()):
        groups.setdefault(x["group"], set()).add(os.path.basename(x["path"]))
    coffee = [g for g in groups.values() if "library-coffee.jpg" in g]
    assert coffee and coffee[0] == {"library-coffee.jpg", "coffee-cut.jpg", "coffee-turned.jpg"}, groups
    r = run("group", catalog, "--no-cache", "--format", "jsonl", "--hashes-only")
    assert r.returncode == 0 and "coffee-turned" in r.stdout and "coffee-cut" not in r.stdout, r.stdout
    r = run("dedupe", catalog, "--no-cache", "--format", "jsonl")
    assert r.returncode == 0, r.stderr
    assert not [x for x in map(json.loads, r.stdout.splitlines()) if "coffee-cut" in x["path"]], r.stdout


@pytest.fixture
def migration(tmp_path, samples):
    old, new = tmp_path / "old", tmp_path / "new"
    (old / "a").mkdir(parents=True)
    (new / "a").mkdir(parents=True)
    (new / "b").mkdir()
    names = sorted(p.name for p in samples.glob("*.jpg"))
    for n in names:
        shutil.copy(samples / n, old / "a" / n)
    for n in names[:10]:
        shutil.copy(samples / n, new / "a" / n)                               # intact
    with Image.open(samples / names[10]) as img:
        img.convert("RGB").save(new / "a" / names[10], quality=70)             # re-encoded in place
    shutil.copy(samples / names[11], new / "b" / "renamed.jpg")                # moved
    with Image.open(samples / names[12]) as img:
        img.convert("RGB").resize((300, 200)).save(new / "b" / "moved-small.jpg")  # moved + re-encoded
    with Image.open(samples / names[13]) as img:
        ImageOps.flip(img.convert("RGB")).save(new / "a" / names[13])          # altered
    # names[14], names[15]: missing
    Image.new("RGB", (300, 200), (10, 120, 200)).save(new / "b" / "extra.png")  # new (flat, still listed)
    return old, new, names


def test_audit_classifies_every_image_and_gates_with_exit_code(migration, tmp_path):
    old, new, names = migration
    r = run("audit", old, new, "--no-cache", "--output", tmp_path / "audit.csv")
    assert r.returncode == 1  # something is missing or altered
    got = {(x["status"], x["old"], x["new"]) for x in rows((tmp_path / "audit.csv").read_text())}
    a = lambda n: f"a/{n}"  # noqa: E731
    want = {("intact", a(n), a(n)) for n in names[:10]} | {
        ("re-encoded", a(names[10]), a(names[10])), ("moved", a(names[11]), "b/renamed.jpg"),
        ("moved", a(names[12]), "b/moved-small.jpg"), ("altered", a(names[13]), a(names[13])),
        ("missing", a(names[14]), ""), ("missing", a(names[15]), ""), ("new", "", "b/extra.png")}
    assert got == want
    assert "[summary] intact 10, re-encoded 1, moved 2, altered 1, missing 2, new 1" in r.stderr
    shutil.copytree(old, tmp_path / "copy")
    assert run("audit", old, tmp_path / "copy", "--no-cache").returncode == 0


# An inline script that reached the page (as a file name or label left unescaped would bring
# one) is refused by the page's Content-Security-Policy, which names its own script's hash.
INJECTED_SCRIPT_RUNS = ("(() => { const s = document.createElement('script'); s.textContent = 'window.injected = 1';"
                        " document.body.appendChild(s); return window.injected === 1; })()")


@pytest.mark.skipif(not CHROMIUM, reason="LOUD SKIP: chromium not installed (apt-get install chromium); "
                                         ".ci/run installs it")
def test_html_reports_render_every_thumbnail(catalog, migration, tmp_path, samples):
    old, new, _ = migration
    reports = {
        "dedupe": run("dedupe", catalog, "--no-cache", "--report", tmp_path / "dedupe.html"),
        "group": run("group", catalog, "--no-cache", "--report", tmp_path / "group.html"),
        "audit": run("audit", old, new, "--no-cache", "--report", tmp_path / "audit.html"),
        "match": run("match", catalog / "exports", "--library", samples, "--no-cache",
                     "--report", tmp_path / "match.html"),
    }
    assert all(r.returncode in (0, 1) for r in reports.values()), {k: r.stderr for k, r in reports.items()}

    async def check():
        async with Browser() as browser:
            for name in reports:
                page = await browser.open((tmp_path / f"{name}.html").as_uri())
                loaded, total = await page.images_loaded()
                cards = await page.eval("document.querySelectorAll('.card').length")
                missing_side = await page.eval("document.querySelectorAll('.noimg').length")
                assert cards > 0 and total == 2 * cards - missing_side, name
                assert loaded == total, (name, loaded, total)  # every thumbnail rendered
                # Filter by tier/status: unticking one kind hides exactly its cards.
                kind = await page.eval("document.querySelector('.filters input').value")
                n_kind = await page.eval(f"document.querySelectorAll('.card[data-kind=\"{kind}\"]').length")
                await page.click(".filters input")
                hidden = await page.eval("[...document.querySelectorAll('.card')]"
                                         ".filter(c => c.style.display === 'none').length")
                assert hidden == n_kind, name
                assert await page.eval(INJECTED_SCRIPT_RUNS) is False, name  # the page's own script alone
    asyncio.run(check())


@pytest.mark.skipif(not CHROMIUM, reason="LOUD SKIP: chromium not installed (apt-get install chromium); "
                                         ".ci/run installs it")
def test_review_page_renders_and_records_a_verdict_by_click(tmp_path, samples):
    from monitor.daemon import run_daemon
    from monitor.records.store import Store
    from tests.hosts import serve
    from tests.test_daemon import PhotoSite, config_for, make_library, query, until

    site = PhotoSite(samples)
    site.post("rss", 1, ["small-chelsea.jpg", "flip-rocket.jpg", "q30-coffee.jpg"])
    db = tmp_path / "m.sqlite"
    make_library(db, samples)

    async def scenario():
        async with serve(site.app()) as feeds:
            stop, running = asyncio.Event(), {}
            task = asyncio.create_task(run_daemon(config_for(feeds, db), stop=stop,
                                                  on_ready=lambda r: running.update(r=r),
                                                  install_signals=False))
            await until(lambda: "r" in running and query(db, "SELECT COUNT(*) FROM matches")[0][0] == 3)
            try:
                async with Browser() as browser:
                    page = await browser.open(f"http://127.0.0.1:{running['r'].port}/review")
                    loaded, total = await page.images_loaded()
                    # the library side loads from us; the repost is linked, never loaded from its site
                    assert (loaded, total) == (3, 3)
                    links = await page.eval("[...document.querySelectorAll('.card a')].map(a => a.textContent)"
                                            ".join(',')")
                    assert links.count("the image") == 3
                    first = await page.eval("document.querySelector('.card').dataset.match")
                    await page.click(".card button[data-verdict=confirmed]")
                    await page.wait("document.querySelector('.card .verdict').textContent === 'confirmed'")
                    assert await page.eval(INJECTED_SCRIPT_RUNS) is False
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)
            return int(first)

    match_id = asyncio.run(scenario())
    assert Store(db).query("SELECT verdict FROM matches WHERE id=?", (match_id,)) == [("confirmed",)]
