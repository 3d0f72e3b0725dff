"""The daemon end to end against real feed hosts on loopback, with a real SQLite store."""

import asyncio
import io
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time

import aiohttp
import pytest
from aiohttp import web
from PIL import Image, ImageOps

from monitor.config import parse_config
from monitor.daemon import run_daemon
from monitor.records.engines import is_url, open_store
from monitor.records.library import Library
from monitor.scan import add_files
from tests.conftest import PAYLOADS
from tests.hosts import cancel_and_list_left, serve


def jpeg(img: Image.Image, quality=85) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class PhotoSite:
    """Feeds of every kind over one set of images; counts every request."""

    def __init__(self, samples):
        self.hits: dict[str, int] = {}
        self.images: dict[str, bytes] = {}
        self.posts: list[dict] = []
        self.feed_status: dict[str, int] = {}
        self.mastodon_token: str | None = None
        lib = {p.stem: Image.open(p).convert("RGB") for p in samples.glob("library-*.jpg")}
        others = sorted(samples.glob("other-*.jpg"))
        self.expected: dict[str, str] = {}  # image name -> library label
        self.add_image("small-chelsea.jpg", jpeg(lib["library-chelsea"].resize((240, 180))),
                       "library-chelsea")
        self.add_image("flip-rocket.jpg", jpeg(ImageOps.mirror(lib["library-rocket"])), "library-rocket")
        self.add_image("q30-coffee.jpg", jpeg(lib["library-coffee"], 30), "library-coffee")
        for p in others[:4]:
            self.add_image(p.name, p.read_bytes())
        good = (samples / "other-home.jpg").read_bytes()
        self.add_image("truncated.jpg", good[: len(good) // 3])
        self.add_image("corrupt.jpg", b"\xff\xd8\xff\xe0" + os.urandom(5000))
        self.add_image("page.jpg", b"<html><body>404 not found</body></html>", ctype="text/html")
        self.add_image("oversized.jpg", b"\xff\xd8\xff" + b"\0" * 3_000_000)

    def add_image(self, name, data, label=None, ctype="image/jpeg"):
        self.images[name] = (data, ctype)
        if label:
            self.expected[name] = label

    def post(self, feed, n, image_names):
        self.posts.append({"feed": feed, "n": n, "images": image_names})

    def app(self):
        app = web.Application()
        site = self

        def count(key):
            site.hits[key] = site.hits.get(key, 0) + 1

        async def image(request):
            name = request.match_info["name"]
            count(name)
            if name not in site.images:
                raise web.HTTPNotFound()
            data, ctype = site.images[name]
            return web.Response(body=data, content_type=ctype)

        def status_or(request, feed):
            count(feed)
            code = site.feed_status.get(feed)
            if code == 429:
                return web.Response(status=429, headers={"Retry-After": "1"})
            if code:
                return web.Response(status=code)
            return None

        def mine(feed):
            return [p for p in site.posts if p["feed"] == feed]

        async def rss(request):
            if (r := status_or(request, "rss")) is not None:
                return r
            base = f"http://{request.host}"
            items = "".join(
                f"<item><guid>rss-{p['n']}</guid><link>{base}/p/{p['n']}</link><title>t</title>"
                + "".join(f'<media:content url="{base}/img/{i}" medium="image"/>' for i in p["images"])
                + "</item>" for p in mine("rss"))
            return web.Response(text='<?xml version="1.0"?><rss version="2.0" xmlns:media='
                                '"http://search.yahoo.com/mrss/"><channel><title>x</title>'
                                f"{items}</channel></rss>", content_type="application/rss+xml")

        async def jsonfeed(request):
            if (r := status_or(request, "json")) is not None:
                return r
            base = f"http://{request.host}"
            return web.json_response({"version": "https://jsonfeed.org/version/1.1", "title": "x",
                                      "items": [{"id": f"j{p['n']}", "url": f"{base}/p/{p['n']}",
                                                 "attachments": [{"url": f"{base}/img/{i}",
                                                                  "mime_type": "image/jpeg"}
                                                                 for i in p["images"]]}
                                                for p in mine("json")]})

        async def reddit(request):
            if (r := status_or(request, "reddit")) is not None:
                return r
            base = f"http://{request.host}"
            children = [{"kind": "t3", "data": {"name": f"t3_{p['n']}", "author": "u",
                                                "permalink": f"/r/x/comments/{p['n']}/",
                                                "created_utc": time.time(),
                                                "url": f"{base}/img/{p['images'][0]}"}}
                        for p in mine("reddit")]
            return web.json_response({"kind": "Listing", "data": {"children": children}})

        async def mastodon(request):
            if (r := status_or(request, "mastodon")) is not None:
                return r
            if site.mastodon_token and request.headers.get("Authorization") != f"Bearer {site.mastodon_token}":
                return web.json_response({"error": "The access token is invalid"}, status=401)
            base = f"http://{request.host}"
            return web.json_response([{"id": str(p["n"]), "url": f"{base}/@a/{p['n']}",
                                       "created_at": "2026-11-22T05:00:00.000Z",
                                       "account": {"acct": "artist@example.social"},
                                       "media_attachments": [{"type": "image",
                                                              "preview_url": f"{base}/img/{i}"}
                                                             for i in p["images"]]}
                                      for p in mine("mastodon")])

        async def broken_xml(request):
            count("broken")  # a real feed cut off mid-channel (feed-rs test suite)
            body = (PAYLOADS / "malformed" / "feed-rs__rss_2.0_invalid_1.xml").read_bytes()
            return web.Response(body=body, content_type="text/xml")

        app.router.add_get("/img/{name}", image)
        app.router.add_get("/rss.xml", rss)
        app.router.add_get("/feed.json", jsonfeed)
        app.router.add_get("/r/x/new.json", reddit)
        app.router.add_get("/api/v1/timelines/public", mastodon)
        app.router.add_get("/broken.xml", broken_xml)
        return app


def config_for(base, db, **extra):
    feeds = [{"name": "rss", "type": "rss", "url": f"{base}/rss.xml"},
             {"name": "json", "type": "jsonfeed", "url": f"{base}/feed.json"},
             {"name": "reddit", "type": "reddit", "url": f"{base}/r/x/new.json"},
             {"name": "mastodon", "type": "mastodon", "url": f"{base}/api/v1/timelines/public"},
             {"name": "broken", "type": "rss", "url": f"{base}/broken.xml"}]
    for f in feeds:
        f.update(interval=0.2, jitter=0.1, max_backoff=1.0)
    store = {"url": db} if is_url(db) else {"path": str(db)}
    return parse_config({"store": store,
                         "limits": {"allowed_networks": ["127.0.0.0/8"], "max_image_bytes": 1_000_000,
                                    "read_timeout": 2, "retries": 1},
                         "library": {"reload_check_seconds": 0.2},
                         "feeds": feeds, "server": {"port": 0}, **extra})


def make_library(db, samples):
    lib = Library(open_store(db))
    add_files(lib, sorted(samples.glob("library-*.jpg")), progress=False)
    lib.store.close()


async def until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


async def daemon_until(base, db, done) -> list:
    """The daemon run against the host at ``base`` until ``done()``: the match records it announced."""
    records = []
    stop = asyncio.Event()
    task = asyncio.create_task(run_daemon(config_for(base, db), stop=stop, on_match=records.append,
                                          install_signals=False))
    await until(done)
    stop.set()
    await asyncio.wait_for(task, 30)
    return records


def query(db, sql):
    s = open_store(db)
    try:
        return s.query(sql)
    finally:
        s.close()


@pytest.mark.slow  # a few seconds: the fast tier stays under a minute
async def test_every_feed_kind_end_to_end_with_bad_input(store_location, tmp_path, samples, caplog):
    caplog.set_level(logging.INFO)
    site = PhotoSite(samples)
    site.post("rss", 1, ["small-chelsea.jpg", "other-apple.jpg"])
    site.post("json", 2, ["flip-rocket.jpg", "truncated.jpg"])
    site.post("reddit", 3, ["q30-coffee.jpg"])
    site.post("mastodon", 4, ["corrupt.jpg", "page.jpg", "oversized.jpg", "other-baboon.jpg"])
    site.post("mastodon", 5, ["small-chelsea.jpg"])  # the same URL again, through another feed
    db = store_location
    make_library(db, samples)
    records, running = [], {}
    async with serve(site.app()) as base:
        stop = asyncio.Event()
        task = asyncio.create_task(run_daemon(config_for(base, db), stop=stop,
                                              on_match=records.append,
                                              on_ready=lambda r: running.update(r=r),
                                              install_signals=False))
        await until(lambda: "r" in running)
        r = running["r"]
        await until(lambda: r.store.query("SELECT COUNT(*) FROM work WHERE state='pending'")[0][0] == 0
                    and r.store.query("SELECT COUNT(*) FROM work")[0][0] == 10)
        metrics = r.metrics.render().decode()
        async with __import__("aiohttp").ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{r.port}/healthz") as resp:
                assert resp.status == 200
            async with http.get(f"http://127.0.0.1:{r.port}/metrics") as resp:
                assert "repost_monitor_matches_total" in await resp.text()
        stop.set()
        await asyncio.wait_for(task, 30)
    found = {rec.work.image_url.rsplit("/", 1)[-1]: rec.entry.label for rec in records}
    assert found == site.expected
    assert len(records) == 3  # small-chelsea.jpg came through rss and mastodon: one match
    assert {"json", "reddit"} <= {rec.work.feed for rec in records}
    assert next(rec for rec in records if "flip" in rec.work.image_url).match.mirrored
    # Fetched once although two feeds carry it; the repeat recorded no second match.
    assert site.hits["small-chelsea.jpg"] == 1
    errors = dict(query(db, "SELECT image_url, error FROM work WHERE state='failed'"))
    by_name = {k.rsplit("/", 1)[-1]: v for k, v in errors.items()}
    assert by_name["truncated.jpg"].startswith("truncated")
    assert by_name["corrupt.jpg"].startswith(("corrupt", "truncated", "not_an_image"))
    assert by_name["page.jpg"].startswith("not_image")
    assert by_name["oversized.jpg"].startswith("too_large")
    for reason in ("truncated", "not_image", "too_large"):
        assert f'reason="{reason}"' in metrics
    assert 'repost_monitor_feed_polls_total{feed="broken",result="error"}' in metrics
    assert any("feed broken failed (malformed_xml" in m for m in caplog.messages)
    # the text log of a failed image names its URL
    assert any(m.startswith("image skipped: http://") and "page.jpg" in m and "not_image" in m
               for m in caplog.messages)
    state = dict(query(db, "SELECT feed, consecutive_failures FROM feed_state"))
    assert state["broken"] >= 1 and state["rss"] == 0


@pytest.mark.slow  # waits through backoffs
async def test_failing_feeds_back_off_and_recover(tmp_path, samples):
    site = PhotoSite(samples)
    site.feed_status.update(rss=500, json=429)
    site.post("rss", 1, ["small-chelsea.jpg"])
    db = tmp_path / "m.sqlite"
    make_library(db, samples)
    records = []
    async with serve(site.app()) as base:
        stop = asyncio.Event()
        task = asyncio.create_task(run_daemon(config_for(base, db), stop=stop,
                                              on_match=records.append, install_signals=False))
        await until(lambda: site.hits.get("rss", 0) >= 4 and site.hits.get("json", 0) >= 2)
        assert not records
        site.feed_status.clear()  # the host recovers
        await until(lambda: len(records) == 1, timeout=20)
        stop.set()
        await asyncio.wait_for(task, 30)
    assert query(db, "SELECT consecutive_failures FROM feed_state WHERE feed='rss'") == [(0,)]


async def test_feed_headers_from_config_reach_the_host(tmp_path, samples, monkeypatch):
    site = PhotoSite(samples)
    site.mastodon_token = "s3cret"
    site.post("mastodon", 1, ["small-chelsea.jpg"])
    db = tmp_path / "m.sqlite"
    make_library(db, samples)
    monkeypatch.setenv("MASTODON_TOKEN", "s3cret")
    records = []
    async with serve(site.app()) as base:
        cfg = config_for(base, db)
        feeds = [f.model_dump() for f in cfg.feeds if f.name != "mastodon"] + [{
            "name": "mastodon", "type": "mastodon", "url": f"{base}/api/v1/timelines/public",
            "interval": 0.2, "headers": {"Authorization": "Bearer ${MASTODON_TOKEN}"}}]
        cfg = parse_config({**cfg.model_dump(), "feeds": feeds})
        stop = asyncio.Event()
        task = asyncio.create_task(run_daemon(cfg, stop=stop, on_match=records.append, install_signals=False))
        await until(lambda: len(records) == 1)
        stop.set()
        await asyncio.wait_for(task, 30)
    assert records[0].work.feed == "mastodon"
    assert query(db, "SELECT consecutive_failures FROM feed_state WHERE feed='mastodon'") == [(0,)]


@pytest.mark.slow  # a daemon run end to end: ~1-3 s (the fast tier keeps under its minute)
async def test_restart_repeats_nothing_and_skips_nothing(store_location, tmp_path, samples):
    site = PhotoSite(samples)
    names = ["small-chelsea.jpg", "flip-rocket.jpg", "q30-coffee.jpg", "other-apple.jpg",
             "other-baboon.jpg", "other-building.jpg", "other-coins.jpg"]
    for n, name in enumerate(names):
        site.post("rss", n, [name])
    db = store_location
    make_library(db, samples)
    first, second = [], []
    async with serve(site.app()) as base:
        config = config_for(base, db)
        stop = asyncio.Event()
        task = asyncio.create_task(run_daemon(config, stop=stop, on_match=first.append,
                                              install_signals=False))
        await until(lambda: sum(site.hits.get(n, 0) for n in names) >= 2)
        stop.set()  # mid-way
        await asyncio.wait_for(task, 30)
        done_first = query(db, "SELECT COUNT(*) FROM work WHERE state!='pending'")[0][0]
        site.post("json", 99, ["small-chelsea.jpg"])  # arrives while we are down
        stop = asyncio.Event()
        task = asyncio.create_task(run_daemon(config, stop=stop, on_match=second.append,
                                              install_signals=False))
        await until(lambda: query(db, "SELECT COUNT(*) FROM work WHERE state='pending'")[0][0] == 0
                    and query(db, "SELECT COUNT(*) FROM work")[0][0] == len(names) + 1)
        stop.set()
        await asyncio.wait_for(task, 30)
    assert done_first >= 1
    assert all(site.hits.get(n, 0) == 1 for n in names), site.hits
    labels = sorted(r.entry.label for r in first + second)
    assert labels == sorted(site.expected.values())
    assert query(db, "SELECT COUNT(*) FROM matches")[0][0] == 3


async def test_a_daemon_cancelled_ends_and_leaves_its_unfinished_work_pending(tmp_path, samples):
    """run_daemon cancelled (not stopped: asyncio.run on Ctrl-C, an embedding program's
    shutdown) ends promptly with no task of its own left running, and its work stays in the
    store for the next start."""
    site = PhotoSite(samples)
    for n, name in enumerate(["small-chelsea.jpg", "flip-rocket.jpg", "q30-coffee.jpg", "other-apple.jpg"]):
        site.post("rss", n, [name])
    db = tmp_path / "m.sqlite"
    make_library(db, samples)
    async with serve(site.app()) as base:
        before = asyncio.all_tasks()
        task = asyncio.create_task(run_daemon(config_for(base, db), install_signals=False))
        await until(lambda: query(db, "SELECT COUNT(*) FROM work")[0][0] >= 4)
        assert await cancel_and_list_left(task, before) == []
    assert query(db, "SELECT COUNT(*) FROM work")[0][0] == 4  # done or pending: none lost


@pytest.mark.slow  # a daemon run end to end: ~1-3 s (the fast tier keeps under its minute)
async def test_library_changes_take_effect_without_restart(store_location, tmp_path, samples):
    site = PhotoSite(samples)
    db = store_location
    open_store(db).close()  # an empty library
    records = []
    async with serve(site.app()) as base:
        stop = asyncio.Event()
        task = asyncio.create_task(run_daemon(config_for(base, db), stop=stop,
                                              on_match=records.append, install_signals=False))
        site.post("rss", 1, ["small-chelsea.jpg"])
        await until(lambda: query(db, "SELECT COUNT(*) FROM work WHERE state='done'")[0][0] == 1)
        assert records == []
        # Another process adds to the library while the daemon runs.
        other = Library(open_store(db))
        add_files(other, [samples / "library-rocket.jpg"], progress=False)
        other.store.close()
        await asyncio.sleep(0.6)
        site.post("rss", 2, ["flip-rocket.jpg"])
        await until(lambda: len(records) == 1)
        stop.set()
        await asyncio.wait_for(task, 30)
    assert records[0].entry.label == "library-rocket"


@pytest.mark.slow
def test_sigkill_and_restart_lose_nothing(tmp_path, samples):
    """The daemon as a subprocess, killed with SIGKILL mid-way, then restarted."""
    site = PhotoSite(samples)
    names = ["small-chelsea.jpg", "flip-rocket.jpg", "q30-coffee.jpg"] + \
        [p.name for p in sorted(samples.glob("other-*.jpg"))]
    for n, name in enumerate(names):
        site.post("rss", n, [name])
    db = tmp_path / "m.sqlite"
    make_library(db, samples)

    async def scenario():
        async with serve(site.app()) as base:
            cfg = tmp_path / "c.toml"
            cfg.write_text(
                f'[store]\npath = "{db}"\n[limits]\nallowed_networks = ["127.0.0.0/8"]\n'
                "per_host_rate = 3\n[server]\nport = 0\n"
                f'[[feeds]]\nname = "rss"\ntype = "rss"\nurl = "{base}/rss.xml"\ninterval = 0.3\n')
            cmd = [sys.executable, "-m", "monitor", "run", "--config", str(cfg), "--log-format", "json"]
            log = open(tmp_path / "daemon.log", "wb")  # a file: a full pipe would block the daemon
            for kill_after in (2, 5):
                proc = subprocess.Popen(cmd, stderr=log, stdout=subprocess.DEVNULL)
                await until(lambda k=kill_after: sum(site.hits.get(n, 0) for n in names) >= k, 60)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            last = open(tmp_path / "last.log", "wb")
            proc = subprocess.Popen(cmd, stderr=last, stdout=subprocess.DEVNULL)
            await until(lambda: query(db, "SELECT COUNT(*) FROM work WHERE state='pending'")[0][0] == 0
                        and query(db, "SELECT COUNT(*) FROM work")[0][0] == len(names), 90)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            log.close()
            last.close()
            err = (tmp_path / "last.log").read_text()
            assert proc.returncode == 0, err[-2000:]
            lines = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
            assert any(x["msg"] == "stopped" for x in lines)

    asyncio.run(scenario())
    rows = query(db, "SELECT image_url, entry_id FROM matches")
    assert len(rows) == len(set(rows)) == 3
    got = sorted(u.rsplit("/", 1)[-1] for u, _ in rows)
    assert got == sorted(site.expected)
    # Each image was fetched at most twice (once more only if killed mid-download).
    assert all(1 <= site.hits.get(n, 0) <= 2 for n in names), site.hits


@pytest.mark.slow  # spawns and kills worker processes
async def test_fingerprint_processes_match_and_survive_a_killed_worker(tmp_path, samples):
    """limits.fingerprint_processes: decoding and hashing in worker processes
    give the same matches, and a worker killed mid-run (the OOM killer, a
    decoder crash) costs no image: the pool is replaced and the image retried."""
    import os
    import signal
    site = PhotoSite(samples)
    db = tmp_path / "m.sqlite"
    make_library(db, samples)
    records, running = [], []
    async with serve(site.app()) as base:
        config = config_for(base, db, limits={"allowed_networks": ["127.0.0.0/8"],
                                              "fingerprint_processes": 1, "retries": 1})
        stop = asyncio.Event()
        task = asyncio.create_task(run_daemon(config, stop=stop, on_match=records.append,
                                              on_ready=running.append, install_signals=False))
        await until(lambda: running and running[0].pipeline.processes is not None, 60)
        pipeline = running[0].pipeline
        site.post("rss", 1, ["small-chelsea.jpg"])
        await until(lambda: len(records) == 1, 60)
        first_pool = pipeline.processes
        workers = list(first_pool._processes.values())
        assert workers and all(p.is_alive() for p in workers)
        os.kill(workers[0].pid, signal.SIGKILL)
        site.post("json", 2, ["flip-rocket.jpg", "other-apple.jpg"])
        site.post("reddit", 3, ["q30-coffee.jpg"])
        await until(lambda: query(db, "SELECT COUNT(*) FROM work WHERE state='pending'")[0][0] == 0
                    and query(db, "SELECT COUNT(*) FROM work")[0][0] == 4, 60)
        stop.set()
        await asyncio.wait_for(task, 30)
    assert sorted(r.entry.label for r in records) == ["library-chelsea", "library-coffee", "library-rocket"]
    assert query(db, "SELECT COUNT(*) FROM work WHERE state='failed'")[0][0] == 0
    assert pipeline.processes is not first_pool  # replaced after the kill


@pytest.mark.slow  # a few seconds: the fast tier stays under a minute
async def test_a_store_locked_by_another_writer_never_freezes_the_event_loop(tmp_path, samples):
    """Another process writing the same SQLite file (`repost-monitor library add`, a script)
    holds its write lock for as long as its transaction runs. The daemon's record of a post
    waits for the lock on a thread: the loop (feeds, API, health checks) carries on, and the
    post is recorded once the lock is free. On the loop, the wait froze everything for up
    to the store's 30 s busy timeout."""
    db = tmp_path / "m.sqlite"
    make_library(db, samples)
    picture = jpeg(Image.open(samples / "library-chelsea.jpg").convert("RGB").resize((240, 180)))
    requested, gate = asyncio.Event(), asyncio.Event()

    async def feed(request):
        return web.json_response({"version": "https://jsonfeed.org/version/1.1", "title": "x", "items": [
            {"id": "1", "url": f"http://{request.host}/p/1",
             "attachments": [{"url": f"http://{request.host}/img/a.jpg", "mime_type": "image/jpeg"}]}]})

    async def image(request):
        requested.set()
        await gate.wait()
        return web.Response(body=picture, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/feed.json", feed)
    app.router.add_get("/img/a.jpg", image)
    records, running = [], {}
    async with serve(app) as base:
        config = parse_config({"store": {"path": str(db)},
                               "limits": {"allowed_networks": ["127.0.0.0/8"], "read_timeout": 10},
                               "feeds": [{"name": "f", "type": "jsonfeed", "url": f"{base}/feed.json",
                                          "interval": 0.2}],
                               "server": {"port": 0}})
        stop = asyncio.Event()
        task = asyncio.create_task(run_daemon(config, stop=stop, on_match=records.append,
                                              on_ready=lambda r: running.update(r=r), install_signals=False))
        await asyncio.wait_for(requested.wait(), 30)
        await until(lambda: "r" in running)
        writer = sqlite3.connect(db, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")  # held, as a long transaction of another process holds it
        gate.set()
        worst, held_until = 0.0, time.monotonic() + 2.0
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < held_until:
                t = time.monotonic()
                async with http.get(f"http://127.0.0.1:{running['r'].port}/healthz") as resp:
                    assert resp.status == 200
                await asyncio.sleep(0.05)
                worst = max(worst, time.monotonic() - t)
        assert not records  # the post waits for the lock...
        writer.execute("ROLLBACK")
        writer.close()
        await until(lambda: len(records) == 1)  # ...and is recorded once it is free
        stop.set()
        await asyncio.wait_for(task, 30)
    assert worst < 0.5, worst
    assert records[0].entry.label == "library-chelsea"
