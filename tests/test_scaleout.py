"""Scale-out: the roles over a real Redis (redis-server, appendonly) and a real PostgreSQL
(initdb), both started by the tests on free loopback ports; the same posts through the
one-process daemon (SQLite) and through the roles give the same matches and alerts."""

import asyncio
import contextlib
import dataclasses
import json
import random
import re
import time
import uuid

import aiohttp
import pytest
from aiohttp import web
from PIL import Image, ImageOps

from monitor.config import parse_config
from monitor.daemon import run_daemon
from monitor.records.engines import open_store
from monitor.scaleout.node import parse_roles, run_node
from monitor.tools.services import free_port
from tests.conftest import encode
from tests.hosts import cancel_and_list_left, serve
from tests.test_daemon import PhotoSite, config_for, make_library, query, until

pytestmark = pytest.mark.slow  # starts PostgreSQL and Redis

REPOSTS = ["small-chelsea.jpg", "flip-rocket.jpg", "q30-coffee.jpg"]
OTHERS = ["other-apple.jpg", "other-baboon.jpg", "other-building.jpg", "other-coins.jpg"]


@pytest.fixture(scope="module")
def services():
    from monitor.tools.services import throwaway
    with throwaway() as services:  # (pg, rd), and adopt: role processes stopped with them
        yield services


class Hooks:
    """A webhook receiver keeping every delivery, repeats included (to count duplicates)."""

    def __init__(self):
        self.deliveries: list[dict] = []

    def app(self):
        app = web.Application()

        async def hook(request):
            self.deliveries.append(json.loads(await request.read()))
            return web.Response(text="ok")
        app.router.add_post("/hook", hook)
        return app

    def labels(self) -> list[str]:
        return sorted(a["library"]["label"] for a in self.deliveries)


def names(rows):
    """(image file name, entry id, tier) of match rows: the hosts' ports differ between runs."""
    return [(u.rsplit("/", 1)[-1], e, t) for u, e, t in rows]


def post_everything(site: PhotoSite) -> None:
    for n, name in enumerate(REPOSTS + OTHERS + ["truncated.jpg"]):
        site.post("rss" if n % 2 else "json", n, [name])


def post_cut_and_flipped(site: PhotoSite, samples) -> None:
    """A repost cut from two sides and mirrored: only the second look, on the post's mirror
    image, finds it (a shard finds those keypoints from the picture the worker sent)."""
    img = Image.open(samples / "library-astronaut.jpg")
    cut = ImageOps.mirror(img.crop((int(img.width * 0.18), int(img.height * 0.08), img.width, img.height)))
    site.add_image("cutflip-astronaut.jpg", encode(cut, quality=80), "library-astronaut")
    site.post("json", 99, ["cutflip-astronaut.jpg"])


def scaled_config(base, hooks, pg_url, redis_url, shards, **extra):
    cfg = config_for(base, pg_url)
    feeds = [f.model_dump() for f in cfg.feeds if f.name in ("rss", "json")]
    return parse_config({**cfg.model_dump(), "feeds": feeds, "server": {"enabled": False},
                         "alerts": [{"name": "hook", "type": "webhook", "url": f"{hooks}/hook"}],
                         "transport": {"url": redis_url, "prefix": f"t-{uuid.uuid4().hex[:8]}", "shards": shards,
                                       "claim_idle_seconds": 2.0, **extra}})


def test_roles_are_parsed_and_checked():
    assert parse_roles("intake,worker,shard:1,recorder,sender,api", 2) == [
        ("intake", None), ("worker", None), ("shard", 1), ("recorder", None), ("sender", None), ("api", None)]
    assert parse_roles("shard", 3) == [("shard", 0), ("shard", 1), ("shard", 2)]
    for bad in ("shard:2", "bogus", "worker:1", ""):
        with pytest.raises(ValueError):
            parse_roles(bad, 2)


async def test_roles_in_one_process_give_what_the_daemon_gives(services, tmp_path, samples):
    pg, rd = services
    # The embedded default: one process, SQLite.
    site, hooks = PhotoSite(samples), Hooks()
    post_everything(site)
    post_cut_and_flipped(site, samples)
    db = tmp_path / "m.sqlite"
    make_library(db, samples)
    async with serve(site.app()) as base, serve(hooks.app()) as recv:
        cfg = config_for(base, db)
        cfg = parse_config({**cfg.model_dump(), "feeds": [f.model_dump() for f in cfg.feeds
                                                          if f.name in ("rss", "json")],
                            "alerts": [{"name": "hook", "type": "webhook", "url": f"{recv}/hook"}]})
        stop = asyncio.Event()
        task = asyncio.create_task(run_daemon(cfg, stop=stop, install_signals=False))
        await until(lambda: len(hooks.deliveries) == 4 and query(db, "SELECT COUNT(*) FROM work WHERE "
                                                                      "state='pending'")[0][0] == 0)
        stop.set()
        await asyncio.wait_for(task, 30)
    one_process = sorted(query(db, "SELECT image_url, entry_id, tier FROM matches"))
    # The roles, all in this process, over Redis and PostgreSQL, the library in 2 shards.
    site2, hooks2 = PhotoSite(samples), Hooks()
    post_everything(site2)
    post_cut_and_flipped(site2, samples)
    url = pg.create_database(f"s_{uuid.uuid4().hex[:12]}")
    make_library(url, samples)
    records = []
    async with serve(site2.app()) as base, serve(hooks2.app()) as recv:
        port = free_port()
        cfg = scaled_config(base, recv, url, rd.url, shards=2)
        cfg = parse_config({**cfg.model_dump(), "server": {"port": port}})
        stop = asyncio.Event()
        task = asyncio.create_task(run_node(cfg, parse_roles("intake,worker,shard,recorder,sender", 2),
                                            stop=stop, on_match=records.append, install_signals=False))
        await until(lambda: len(hooks2.deliveries) == 4 and query(url, "SELECT COUNT(*) FROM work WHERE "
                                                                       "state='pending'")[0][0] == 0, 60)
        await asyncio.sleep(0.5)
        # the recorder found the cut and flipped repost's keypoints (its mirror image's alone:
        # the candidates met that), and the metrics say so
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as r:
            exposed = await r.text()
        searches = {view: float(n) for view, n in
                    re.findall(r'^repost_monitor_keypoint_searches_total\{view="(\w+)"\} (\S+)$', exposed, re.M)}
        assert searches["upright"] == 0 and searches["mirrored"] >= 1, searches
        # the series a rule's rate() needs are there before their first event
        assert 'repost_monitor_alert_deliveries_total{outcome="failed",sink="hook"} 0.0' in exposed
        assert 'repost_monitor_feed_polls_total{feed="json",result="error"} 0.0' in exposed
        assert re.search(r"^repost_monitor_keypoint_search_duration_seconds_count [1-9]", exposed, re.M)
        stop.set()
        await asyncio.wait_for(task, 30)
    scaled = sorted(query(url, "SELECT image_url, entry_id, tier FROM matches"))
    assert names(scaled) == names(one_process) and len(scaled) == 4
    assert hooks2.labels() == hooks.labels() == ["library-astronaut", "library-chelsea", "library-coffee",
                                                 "library-rocket"]
    flipped = [a for a in hooks2.deliveries if a["repost"]["image_url"].endswith("/cutflip-astronaut.jpg")]
    assert [a["decided_by"] for a in flipped] == ["keypoints"], flipped
    assert sorted(r.entry.label for r in records) == hooks.labels()
    failed = query(url, "SELECT image_url, error FROM work WHERE state='failed'")
    assert [u.rsplit("/", 1)[-1] for u, _ in failed] == ["truncated.jpg"]
    assert query(url, "SELECT COUNT(*) FROM shard_answers") == [(0,)]
    # the keypoint pictures kept beside the stream went with their posts' records
    import redis
    client = redis.Redis.from_url(rd.url)
    assert client.keys(f"{cfg.transport.prefix}:picture:*") == [] and client.keys(f"{cfg.transport.prefix}:*")
    client.close()
    store = open_store(url)
    assert store.query("SELECT COUNT(*) FROM alerts WHERE state='delivered'") == [(4,)]
    store.close()


async def test_a_poison_answer_is_dead_lettered_and_nothing_else_stalls(services, tmp_path, samples):
    """An answer the recorder cannot store (its fingerprint's width is not a number) fails on
    every delivery: after max_deliveries it is in the dead-letter stream, with where it came
    from; the good answer behind it was recorded at once. `streams dead` shows it and
    `streams replay` puts it back."""
    import subprocess
    import sys

    from feeds import FeedItem
    from monitor.fingerprints import fingerprint_bytes
    from monitor.records import work as work_rows
    from monitor.scaleout.streams import ANSWERS, RedisStreams
    from monitor.scaleout.wire import answer_json, fingerprint_fields, work_fields
    from monitor.search.answers import HashAnswer, Match
    from tests.conftest import SAMPLES
    pg, rd = services
    url = pg.create_database(f"p_{uuid.uuid4().hex[:12]}")
    make_library(url, samples)
    store = open_store(url)
    items = [FeedItem("feed", f"i{n}", (f"http://x/{n}.jpg",)) for n in (1, 2)]
    (bad, good), _ = work_rows.record_items(store, "feed", items, 0.0)
    store.close()
    fp = fingerprint_bytes((SAMPLES / "library-chelsea.jpg").read_bytes(), views="query")
    cfg = scaled_config("http://127.0.0.1:9", "http://127.0.0.1:9", url, rd.url, shards=1, max_deliveries=3,
                        claim_idle_seconds=0.5)
    streams = RedisStreams(rd.url, cfg.transport.prefix)
    poison = {**work_fields(bad), **fingerprint_fields(fp, True), "shard": "0",
              "matches": answer_json(HashAnswer([Match(1, "exact", 0, 0, False)], []))}
    poison["fp"] = poison["fp"].replace(f", {fp.width}, {fp.height},", ', "wide", 1,', 1)
    poison["picture"] = b"\x00\xff" * 100  # a keypoint picture's raw bytes: shown by its size
    await streams.add(ANSWERS, poison)
    # (an answer as a shard of the version before sent it: its matches as a list)
    await streams.add(ANSWERS, {**work_fields(good), **fingerprint_fields(fp, True), "shard": "0",
                                "matches": json.dumps([dataclasses.asdict(Match(1, "exact", 0, 0, False))])})
    stop = asyncio.Event()
    task = asyncio.create_task(run_node(cfg, [("recorder", None)], stop=stop, install_signals=False))
    await until(lambda: query(url, "SELECT work_id FROM matches") == [(good.id,)], 20)
    dead = []
    for _ in range(100):
        dead = await streams.dead()
        if dead:
            break
        await asyncio.sleep(0.2)
    stop.set()
    await asyncio.wait_for(task, 30)
    assert len(dead) == 1 and dead[0][1][b"origin_stream"] == b"answers"
    assert int(dead[0][1][b"deliveries"]) >= 3
    assert query(url, "SELECT state FROM work ORDER BY id") == [("pending",), ("done",)]
    conf = tmp_path / "c.toml"
    conf.write_text(f'[store]\nurl = "{url}"\n[transport]\nurl = "{rd.url}"\nprefix = "{cfg.transport.prefix}"\n')
    shown = subprocess.run([sys.executable, "-m", "monitor", "streams", "--config", str(conf), "dead"],
                           capture_output=True, text=True, timeout=60)
    [letter] = json.loads(shown.stdout)
    assert letter["stream"] == "answers" and letter["group"] == "recorders" and letter["deliveries"] >= 3
    assert json.loads(letter["fields"]["work"])[0] == bad.id
    assert letter["fields"]["picture"] == "<200 bytes: the post's keypoint picture>"
    replayed = subprocess.run([sys.executable, "-m", "monitor", "streams", "--config", str(conf), "replay"],
                              capture_output=True, text=True, timeout=60)
    assert "replayed 1 dead letters" in replayed.stdout, replayed.stderr
    assert await streams.dead() == [] and await streams.length(ANSWERS) >= 1
    await streams.close()


class OrderedHooks:
    """A webhook receiver that honours Idempotency-Key (a repeat is acknowledged, not kept)
    and keeps the order of first deliveries."""

    def __init__(self):
        self.keys: list[str] = []
        self.alerts: list[dict] = []
        self.repeats = 0

    def app(self):
        app = web.Application()

        async def hook(request):
            key = request.headers["Idempotency-Key"]
            if key in self.keys:
                self.repeats += 1
            else:
                self.keys.append(key)
                self.alerts.append(json.loads(await request.read()))
            return web.Response(text="ok")
        app.router.add_post("/hook", hook)
        return app


def many_posts(pg, samples):
    """A fresh database with the library; 35 posts (5 copies, by URL, of 3 reposts and 4
    others) on a photo site; the receiver of their alerts."""
    url = pg.create_database(f"m_{uuid.uuid4().hex[:12]}")
    make_library(url, samples)
    site, hooks = PhotoSite(samples), OrderedHooks()
    names = [f"{name}?v={n}" for n in range(5) for name in REPOSTS + OTHERS]
    for n, name in enumerate(names):
        site.post("rss" if n % 2 else "json", n, [name])
    return url, site, hooks, names


def test_roles_as_processes_survive_a_kill_9_of_each_kind(services, tmp_path, samples):
    """intake, 2 workers, 2 shards x 2 replicas, a recorder and a sender as separate
    processes; mid-stream one of each kind is SIGKILLed (intake, recorder and sender are
    started again; a worker and a shard replica are not: their peers claim what they held).
    Every image is recorded, every repost matched once, every alert delivered once, in
    match order."""
    from tests.hosts import DaemonProcess
    pg, rd = services
    url, site, hooks, names = many_posts(pg, samples)
    prefix = f"k-{uuid.uuid4().hex[:8]}"

    async def scenario():
        async with serve(site.app()) as base, serve(hooks.app()) as recv:
            conf = tmp_path / "c.toml"
            conf.write_text(
                f'[store]\nurl = "{url}"\n[limits]\nallowed_networks = ["127.0.0.0/8"]\nper_host_rate = 6\n'
                f'[server]\nenabled = false\n[transport]\nurl = "{rd.url}"\nprefix = "{prefix}"\nshards = 2\n'
                "claim_idle_seconds = 3\n"
                f'[[feeds]]\nname = "rss"\ntype = "rss"\nurl = "{base}/rss.xml"\ninterval = 0.5\n'
                f'[[feeds]]\nname = "json"\ntype = "jsonfeed"\nurl = "{base}/feed.json"\ninterval = 0.5\n'
                f'[[alerts]]\nname = "hook"\ntype = "webhook"\nurl = "{recv}/hook"\nbackoff_base = 0.2\n')
            procs = {}

            def start(key, role):
                proc = DaemonProcess(conf, tmp_path / f"{key}.log", adopt=services.adopt)
                proc.cmd += ["--role", role]
                proc.start()
                procs[key] = proc
                return proc

            for key, role in (("intake", "intake"), ("worker-a", "worker"), ("worker-b", "worker"),
                              ("s0-a", "shard:0"), ("s0-b", "shard:0"), ("s1-a", "shard:1"), ("s1-b", "shard:1"),
                              ("recorder", "recorder"), ("sender", "sender")):
                start(key, role)

            def done():
                return query(url, "SELECT COUNT(*) FROM work WHERE state != 'pending'")[0][0]
            await until(lambda: done() >= 6, 120)
            for key in ("worker-a", "s0-a", "recorder", "sender", "intake"):
                procs[key].kill()
                if key in ("recorder", "sender", "intake"):
                    start(key, key)
                await asyncio.sleep(0.7)
            await until(lambda: query(url, "SELECT COUNT(*) FROM work") == [(len(names),)]
                        and done() == len(names) and len(hooks.alerts) == 15, 180)
            await asyncio.sleep(1.0)  # a repeat delivery would land now
            for proc in procs.values():
                if proc.proc.poll() is None:
                    assert proc.stop() == 0, proc.log()[-3000:]

    asyncio.run(scenario())
    rows = query(url, "SELECT image_url, entry_id FROM matches ORDER BY id")
    assert len(rows) == len(set(rows)) == 15  # 5 copies of 3 reposts, each once
    assert query(url, "SELECT state, COUNT(*) FROM work GROUP BY state") == [("done", len(names))]
    alerts = query(url, "SELECT match_id, idempotency_key FROM alerts WHERE sink='hook' ORDER BY match_id")
    assert len(alerts) == 15 and hooks.keys == [k for _, k in alerts]  # once each, in match order
    assert query(url, "SELECT COUNT(*) FROM shard_answers") == [(0,)]


async def test_redis_and_postgresql_restarted_mid_stream_lose_nothing(services, tmp_path, samples):
    """Redis (appendonly) and then PostgreSQL restarted while the roles work: they wait,
    reconnect with backoff and resume; every image is recorded, every alert delivered once."""
    pg, rd = services
    url, site, hooks, names = many_posts(pg, samples)
    async with serve(site.app()) as base, serve(hooks.app()) as recv:
        cfg = scaled_config(base, recv, url, rd.url, shards=2)
        cfg = parse_config({**cfg.model_dump(), "limits": {**cfg.limits.model_dump(), "per_host_rate": 5},
                            "alerts": [{"name": "hook", "type": "webhook", "url": f"{recv}/hook",
                                        "backoff_base": 0.2}]})
        stop = asyncio.Event()
        task = asyncio.create_task(run_node(cfg, parse_roles("intake,worker,shard,recorder,sender", 2),
                                            stop=stop, install_signals=False))

        def done():
            return query(url, "SELECT COUNT(*) FROM work WHERE state != 'pending'")[0][0]
        await until(lambda: done() >= 8, 60)
        await asyncio.to_thread(rd.restart)
        await until(lambda: done() >= 18, 60)
        await asyncio.to_thread(pg.restart)
        await until(lambda: query(url, "SELECT COUNT(*) FROM work") == [(len(names),)]
                    and done() == len(names) and len(hooks.alerts) == 15, 120)
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.wait_for(task, 30)
    rows = query(url, "SELECT image_url, entry_id FROM matches")
    assert len(rows) == len(set(rows)) == 15
    assert query(url, "SELECT state, COUNT(*) FROM work GROUP BY state") == [("done", len(names))]
    alerts = query(url, "SELECT idempotency_key FROM alerts WHERE sink='hook' ORDER BY match_id")
    assert hooks.keys == [k for (k,) in alerts]


def test_the_scaled_demo_detects_every_repost_with_a_shard_replica_killed():
    """`repost-monitor demo --shards 2`: its own PostgreSQL and Redis, the roles as processes,
    one shard replica SIGKILLed half-way; every repost detected, the usual summary line."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "monitor", "demo", "--shards", "2", "--posts", "24", "--rate", "8"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "killed one replica of shard 0 (SIGKILL)" in r.stdout
    summary = r.stdout.splitlines()[-1]
    reposts = int(summary.split(" reposts, ")[0].rsplit(" ", 1)[1])
    assert summary.startswith("[demo] done: 24 posts") and f"{reposts} reposts, {reposts} detected" in summary
    assert "0 false alarms" in summary


async def test_an_entry_added_is_matchable_on_its_shard_within_2_s(services, tmp_path, samples):
    """`library add` while the shards run: 2 s later a repost of the new picture is matched as
    it arrives (retro-matching off, so nothing but the live shard could have matched it)."""
    import subprocess
    import sys

    from monitor.records.library import Library
    from monitor.scan import add_files
    pg, rd = services
    url = pg.create_database(f"a_{uuid.uuid4().hex[:12]}")
    lib = Library(open_store(url))
    add_files(lib, [p for p in sorted(samples.glob("library-*.jpg")) if "rocket" not in p.name], progress=False)
    lib.store.close()
    site, hooks = PhotoSite(samples), Hooks()
    async with serve(site.app()) as base, serve(hooks.app()) as recv:
        cfg = scaled_config(base, recv, url, rd.url, shards=2)
        cfg = parse_config({**cfg.model_dump(), "alert_policy": {"retro_window_hours": 0}})
        stop = asyncio.Event()
        task = asyncio.create_task(run_node(cfg, parse_roles("intake,worker,shard,recorder", 2), stop=stop,
                                            install_signals=False))
        site.post("rss", 1, ["other-apple.jpg"])
        await until(lambda: query(url, "SELECT COUNT(*) FROM work WHERE state='done'")[0][0] == 1, 60)
        added = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "monitor", "library", "--db", url,
                                                         "add", str(samples / "library-rocket.jpg")],
                                        capture_output=True, text=True, timeout=120)
        assert added.returncode == 0, added.stderr
        await asyncio.sleep(2.0)
        site.post("json", 2, ["flip-rocket.jpg"])
        await until(lambda: query(url, "SELECT COUNT(*) FROM work WHERE state='done'")[0][0] == 2, 60)
        stop.set()
        await asyncio.wait_for(task, 30)
    rows = query(url, "SELECT m.image_url, e.label FROM matches m JOIN library_entries e ON e.id = m.entry_id")
    assert [(u.rsplit("/", 1)[-1], label) for u, label in rows] == [("flip-rocket.jpg", "library-rocket")]


async def test_the_shards_confirm_unsure_matches_of_stored_fingerprints_and_retro_matches(services, samples):
    """An image seen before its look-alike entry existed (retro-matching, on the shard that
    owns the entry) and a URL another feed posted already (the worker sends the stored
    fingerprint, without the picture) are fetched again where a match is unsure: two
    unrelated textures that meet by their hashes (tests/images) are rejected both times, a
    cut and brightened repost is confirmed and recorded once."""
    from PIL import ImageEnhance

    from monitor.records.library import Library
    from monitor.scan import add_files
    from tests.test_detective import IMAGES, _jpeg
    pg, rd = services
    url = pg.create_database(f"c_{uuid.uuid4().hex[:12]}")
    lib = Library(open_store(url))
    add_files(lib, [p for p in sorted(samples.glob("library-*.jpg")) if "rocket" not in p.name], progress=False)
    site, hooks = PhotoSite(samples), Hooks()
    site.add_image("rivets.jpg", (IMAGES / "texture-rivets.jpg").read_bytes())
    rocket = Image.open(samples / "library-rocket.jpg").convert("RGB")
    site.add_image("cut-rocket.jpg", _jpeg(ImageEnhance.Contrast(
        rocket.crop((0, int(rocket.height * 0.07), rocket.width, rocket.height))).enhance(1.5)))
    matched = "SELECT m.image_url, e.label FROM matches m JOIN library_entries e ON e.id = m.entry_id"
    async with serve(site.app()) as base, serve(hooks.app()) as recv:
        cfg = scaled_config(base, recv, url, rd.url, shards=2)
        stop = asyncio.Event()
        task = asyncio.create_task(run_node(cfg, parse_roles("intake,worker,shard,recorder", 2), stop=stop,
                                            install_signals=False))
        site.post("rss", 1, ["rivets.jpg", "cut-rocket.jpg"])
        await until(lambda: query(url, "SELECT COUNT(*) FROM work WHERE state='done'")[0][0] == 2, 60)
        await asyncio.to_thread(add_files, lib, [IMAGES / "texture-rustpipes.jpg", samples / "library-rocket.jpg"],
                                progress=False)
        await until(lambda: query(url, matched) and site.hits["rivets.jpg"] == 2, 60)  # both retro-matched
        site.post("json", 2, ["rivets.jpg", "cut-rocket.jpg"])
        await until(lambda: query(url, "SELECT COUNT(*) FROM work WHERE state='done'")[0][0] == 4, 60)
        await until(lambda: site.hits["rivets.jpg"] == 3, 30)
        stop.set()
        await asyncio.wait_for(task, 30)
    lib.store.close()
    assert [(u.rsplit("/", 1)[-1], label) for u, label in query(url, matched)] == [("cut-rocket.jpg", "library-rocket")]
    assert site.hits["cut-rocket.jpg"] == 3  # fetched, fetched again by the retro-match, and for the second feed


async def test_a_folder_source_is_matched_by_the_roles(services, tmp_path, samples):
    """A folder source's images are file:// URLs read only under the watched folders: the
    worker roles read them too (they were refused as outside every folder)."""
    pg, rd = services
    url = pg.create_database(f"f_{uuid.uuid4().hex[:12]}")
    make_library(url, samples)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "flip-rocket.jpg").write_bytes(PhotoSite(samples).images["flip-rocket.jpg"][0])
    hooks = Hooks()
    async with serve(hooks.app()) as recv:
        cfg = scaled_config("http://127.0.0.1:9", recv, url, rd.url, shards=1)
        cfg = parse_config({**cfg.model_dump(), "feeds": [{"name": "inbox", "type": "folder", "path": str(inbox)}]})
        stop = asyncio.Event()
        task = asyncio.create_task(run_node(cfg, parse_roles("intake,worker,shard,recorder", 1), stop=stop,
                                            install_signals=False))
        await until(lambda: query(url, "SELECT COUNT(*) FROM work WHERE state<>'pending'")[0][0] == 1, 60)
        stop.set()
        await asyncio.wait_for(task, 30)
    rows = query(url, "SELECT w.state, w.error, e.label FROM work w LEFT JOIN matches m ON m.work_id = w.id "
                      "LEFT JOIN library_entries e ON e.id = m.entry_id")
    assert rows == [("done", None, "library-rocket")], rows


@pytest.mark.parametrize("workers, images, within", [(2, 300, 4.0), (1, 700, 12.0)])
async def test_a_slow_image_host_holds_a_few_downloads_of_each_worker_not_the_stream(services, samples, workers,
                                                                                    images, within):
    """Fetch workers and a tarpit listing hundreds of images that each take 1 s (read in batches
    off one FIFO stream, they held every download: 300 / 32 = 9 s, 700 / 16 = 44 s of backlog).
    Each worker downloads at most per_host_workers of its images at once and holds up to 256
    more waiting: a repost on another host is found at once. Past that share (700 images, one
    worker) the rows go back to the stream's end, once a lap at most, the laps further apart
    while it lasts: the repost waits a lap's pause at most. The rows a worker holds waiting
    stay its own past claim_idle (2 s here): no other worker takes them over, and no image is
    downloaded twice."""
    from tests.hosts import Tarpit
    from tests.test_daemon import jpeg
    pg, rd = services
    url = pg.create_database(f"t_{uuid.uuid4().hex[:12]}")
    make_library(url, samples)
    site, hooks = PhotoSite(samples), Hooks()
    tarpit = Tarpit(jpeg(Image.open(samples / "other-apple.jpg")), images)
    records = []
    async with serve(site.app()) as base, serve(hooks.app()) as recv, tarpit.serve() as tarpit_base:
        cfg = scaled_config(base, recv, url, rd.url, shards=1)
        feeds = [{"name": "tarpit", "type": "jsonfeed", "url": f"{tarpit_base}/feed.json", "interval": 600},
                 {"name": "json", "type": "jsonfeed", "url": f"{base}/feed.json", "interval": 0.2}]
        cfg = parse_config({**cfg.model_dump(), "feeds": feeds,
                            "limits": {**cfg.limits.model_dump(), "per_host_rate": 1000.0, "read_timeout": 5,
                                       "per_host_workers": 4, "concurrency": 16}})
        stop, port = asyncio.Event(), free_port()
        nodes = [asyncio.create_task(run_node(parse_config({**cfg.model_dump(), "server": {"port": port}}),
                                              parse_roles("intake,worker,shard,recorder,sender", 1), stop=stop,
                                              on_match=records.append, install_signals=False))]
        for _ in range(workers - 1):
            await asyncio.sleep(0.05)  # another consumer name (a process's, to the millisecond)
            nodes.append(asyncio.create_task(run_node(cfg, parse_roles("worker", 1), stop=stop,
                                                      install_signals=False)))
        await until(lambda: tarpit.now >= 4 * workers, 30)
        await asyncio.sleep(3.0)  # rows wait in the workers' queues past claim_idle
        site.post("json", 1, ["small-chelsea.jpg"])
        posted = time.monotonic()
        await until(lambda: records, 30)
        found_after = time.monotonic() - posted
        await asyncio.sleep(1.0)
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as r:
            put_back = float(re.search(r"^repost_monitor_work_put_back_total (\S+)$", await r.text(), re.M)[1])
        stop.set()
        await asyncio.wait_for(asyncio.gather(*nodes), 30)
    # 300 images fit the two workers' shares (256 each); past one's, the rest went round
    assert (put_back > 0) == (images > 256 * workers), put_back
    assert [r.entry.label for r in records] == ["library-chelsea"]
    assert found_after < within, f"the repost waited {found_after:.1f} s behind the tarpit's images"
    assert tarpit.most == 4 * workers, tarpit.most  # each worker at its per-host limit
    assert max(tarpit.requests.values()) == 1, {k: n for k, n in tarpit.requests.items() if n > 1}
    assert len(tarpit.requests) >= 20


async def test_rows_claimed_from_a_dead_worker_keep_their_delivery_count_past_a_full_share(services, samples):
    """A worker that died held 20 of a tarpit's rows; the live worker's share of that host is
    full, so the rows it reads fresh go back to the stream's end. The dead one's, claimed, are
    kept instead: put back, they would be new messages whose delivery count starts again (a row
    that kills its workers could outlive max_deliveries); kept, they stay pending, counted on."""
    from monitor.scaleout.roles import WORKERS_GROUP
    from monitor.scaleout.streams import WORK, RedisStreams
    from tests.hosts import Tarpit
    from tests.test_daemon import jpeg
    pg, rd = services
    url = pg.create_database(f"c_{uuid.uuid4().hex[:12]}")
    make_library(url, samples)
    tarpit = Tarpit(jpeg(Image.open(samples / "other-apple.jpg")), 400)
    async with tarpit.serve() as tarpit_base:
        cfg = scaled_config("http://127.0.0.1:9", "http://127.0.0.1:9", url, rd.url, shards=1)
        cfg = parse_config({**cfg.model_dump(),
                            "feeds": [{"name": "tarpit", "type": "jsonfeed", "url": f"{tarpit_base}/feed.json",
                                       "interval": 600}],
                            "limits": {**cfg.limits.model_dump(), "per_host_rate": 1000.0, "read_timeout": 5,
                                       "per_host_workers": 1, "concurrency": 2}})
        streams = RedisStreams(rd.url, cfg.transport.prefix, claim_idle=2.0)
        streams.consumer = "dead"
        stop = asyncio.Event()
        intake = asyncio.create_task(run_node(cfg, parse_roles("intake", 1), stop=stop, install_signals=False))
        await until(lambda: query(url, "SELECT COUNT(*) FROM work")[0][0] == 400, 30)
        await streams.ensure_group(WORK, WORKERS_GROUP)
        held = [mid for mid, _ in await streams.read(WORK, WORKERS_GROUP, 20, 0)]  # and dies
        worker = asyncio.create_task(run_node(cfg, parse_roles("worker", 1), stop=stop, install_signals=False))

        async def pending():
            return {e["message_id"]: e for e in await streams.redis.xpending_range(
                streams.key(WORK), WORKERS_GROUP, min="-", max="+", count=1000)}
        await asyncio.sleep(2.5)  # the worker's share filled; the dead one's rows idle past claim_idle
        for _ in range(50):  # claimed a batch at a time, between the laps' pauses: some of them
            now = await pending()
            if sum(now.get(mid, {}).get("consumer") not in (None, b"dead") for mid in held) >= 8:
                break
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(asyncio.gather(intake, worker), 30)
        await streams.close()
    assert len(held) == 20
    assert all(mid in now for mid in held), "a claimed row was put back: a new message, counted from 1"
    claimed = [now[mid] for mid in held if now[mid]["consumer"] != b"dead"]
    assert len(claimed) >= 8 and all(e["times_delivered"] >= 2 for e in claimed), claimed


async def test_the_sweeper_queues_again_only_rows_never_queued_or_lost(services, samples):
    """Three rows pending for 400 s: one never queued (its intake died between storing and queuing
    it), one queued just now (waiting in the stream behind a slow host), one queued two hours ago
    (a Redis that came back without it). The sweeper queues the first and the last again, marked
    queued now; the one waiting in the stream it leaves be (it queued such rows again every 5 min:
    their copies filled the workers' backlog, and every feed's polls waited behind it)."""
    from feeds import FeedItem
    from monitor.records import work as work_rows
    from monitor.scaleout.streams import WORK, RedisStreams
    from monitor.scaleout.wire import work_from
    pg, rd = services
    url = pg.create_database(f"s_{uuid.uuid4().hex[:12]}")
    make_library(url, samples)
    store = open_store(url)
    now = time.time()
    rows, _ = work_rows.record_items(store, "f", [FeedItem("f", n, (f"http://127.0.0.1:9/{n}.jpg",))
                                                  for n in ("died", "waiting", "lost")], now - 400)
    died, waiting, lost = (w.id for w in rows)
    work_rows.mark_queued(store, [waiting], now)
    work_rows.mark_queued(store, [lost], now - 7200)
    cfg = scaled_config("http://127.0.0.1:9", "http://127.0.0.1:9", url, rd.url, shards=1)
    cfg = parse_config({**cfg.model_dump(), "feeds": []})
    streams = RedisStreams(rd.url, cfg.transport.prefix)
    stop = asyncio.Event()
    task = asyncio.create_task(run_node(cfg, parse_roles("intake", 1), stop=stop, install_signals=False))

    async def queued():
        return sorted(work_from(fields).id for _, fields in await streams.redis.xrange(streams.key(WORK)))
    for _ in range(100):
        if len(await queued()) >= 2:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.wait_for(task, 30)
    assert await queued() == [died, lost]
    marks = dict(store.query("SELECT id, queued_at FROM work"))
    assert marks[died] >= now and marks[lost] >= now and marks[waiting] == pytest.approx(now)
    store.close()
    await streams.close()


async def test_a_second_intake_takes_over_the_feeds_of_one_killed(services, tmp_path, samples):
    """Two intake processes: each feed is watched by one (a lease). The holder is SIGKILLed;
    within a few seconds the other polls its feeds, and the posts made meanwhile are recorded,
    each once."""
    from tests.hosts import DaemonProcess
    pg, rd = services
    url = pg.create_database(f"f_{uuid.uuid4().hex[:12]}")
    make_library(url, samples)
    site, hooks = PhotoSite(samples), Hooks()
    async with serve(site.app()) as base, serve(hooks.app()) as recv:
        cfg = scaled_config(base, recv, url, rd.url, shards=1)
        conf = tmp_path / "c.toml"
        conf.write_text(
            f'[store]\nurl = "{url}"\n[limits]\nallowed_networks = ["127.0.0.0/8"]\n[server]\nenabled = false\n'
            f'[transport]\nurl = "{rd.url}"\nprefix = "{cfg.transport.prefix}"\n'
            f'[[feeds]]\nname = "rss"\ntype = "rss"\nurl = "{base}/rss.xml"\ninterval = 0.3\n')
        intakes = {name: DaemonProcess(conf, tmp_path / f"{name}.log", adopt=services.adopt) for name in ("a", "b")}
        for proc in intakes.values():
            proc.cmd += ["--role", "intake"]
            proc.start()
        stop = asyncio.Event()
        rest = asyncio.create_task(run_node(cfg, parse_roles("worker,shard,recorder", 1), stop=stop,
                                            install_signals=False))
        site.post("rss", 1, ["small-chelsea.jpg"])
        await until(lambda: query(url, "SELECT COUNT(*) FROM work WHERE state='done'")[0][0] == 1, 90)
        holder = next(n for n, p in intakes.items() if "lease" in p.log() and "feed:rss taken" in p.log())
        intakes[holder].kill()
        killed_at = asyncio.get_running_loop().time()
        site.post("rss", 2, ["flip-rocket.jpg"])
        await until(lambda: query(url, "SELECT COUNT(*) FROM work WHERE state='done'")[0][0] == 2, 30)
        took_over = asyncio.get_running_loop().time() - killed_at
        other = intakes["b" if holder == "a" else "a"]
        assert "feed:rss taken" in other.log()
        assert other.stop() == 0
        stop.set()
        await asyncio.wait_for(rest, 30)
    assert took_over < 10  # the lease lasts 5 s after the last renewal
    rows = query(url, "SELECT image_url FROM matches")
    assert sorted(u.rsplit("/", 1)[-1] for (u,) in rows) == ["flip-rocket.jpg", "small-chelsea.jpg"]
    assert query(url, "SELECT COUNT(*) FROM seen_items") == [(2,)]


@contextlib.asynccontextmanager
async def roles_running(cfg, roles: str, ready_url: str):
    """run_node with these roles until the block ends (failing or not), once ``ready_url`` answers 200."""
    import aiohttp
    stop = asyncio.Event()
    task = asyncio.create_task(run_node(cfg, parse_roles(roles, cfg.transport.shards), stop=stop,
                                        install_signals=False))
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                assert not task.done(), task.result()
                try:
                    async with http.get(ready_url) as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_the_api_role_checks_ingests_and_takes_the_hubs_pushes(services, tmp_path, samples):
    """`--role api` over 2 shards: /v1/check asks every shard (an upload and a URL), a post
    pushed to /v1/ingest and an uploaded image are recorded by the roles and alert, a new
    library entry added through the API is matched by its shard, and the WebSub hub's
    verification and push, sent to the API's public URL for a feed the intake subscribed,
    are taken there. With a shard missing, /v1/check answers 503, not a short list."""
    from tests.test_api import upload
    from tests.test_websub import Hub, rss
    pg, rd = services
    url = pg.create_database(f"api_{uuid.uuid4().hex[:12]}")
    from monitor.records.library import Library
    from monitor.scan import add_files
    from tests.test_detective import IMAGES
    lib = Library(open_store(url))  # the fruits picture is added later, through the API
    add_files(lib, [p for p in sorted(samples.glob("library-*.jpg")) if "fruits" not in p.name]
              + [IMAGES / "texture-rustpipes.jpg"], progress=False)
    lib.store.close()
    site, hooks, hub = PhotoSite(samples), Hooks(), Hub(lease=3600)
    site.add_image("rivets.jpg", (IMAGES / "texture-rivets.jpg").read_bytes())  # meets the pipes by its hashes
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    async with serve(site.app()) as images, serve(hooks.app()) as recv, serve(hub.app()) as hub_base, \
            aiohttp.ClientSession() as http:
        topic = f"{images}/websub-feed.xml"
        feed_app = web.Application()

        async def feed(request):
            return web.Response(body=rss(images, [("p1", "other-apple.jpg")]), content_type="application/rss+xml",
                                headers={"Link": f'<{hub_base}/hub>; rel="hub", <{topic}>; rel="self"'})
        feed_app.router.add_get("/websub-feed.xml", feed)
        async with serve(feed_app) as feeds_base:
            cfg = scaled_config(images, recv, url, rd.url, shards=2)
            cfg = parse_config({**cfg.model_dump(), "server": {"port": port, "public_url": api},
                                "feeds": [{"name": "blog", "type": "rss", "url": f"{feeds_base}/websub-feed.xml",
                                           "interval": 3600}]})
            async with roles_running(cfg, "intake,worker,shard,recorder,sender,api", f"{api}/v1/openapi.json"):
                from monitor.search import radius
                async with http.get(f"{api}/metrics") as r:  # [match] kernel applied, as in one process
                    assert f'kernel="{radius.choose(cfg.match.kernel)}"' in await r.text()
                # checks: every shard asked, nothing recorded
                async with http.post(f"{api}/v1/check", data=upload(site.images["small-chelsea.jpg"][0])) as r:
                    out = await r.json()
                    assert r.status == 200 and [m["label"] for m in out["matches"]] == ["library-chelsea"], out
                async with http.post(f"{api}/v1/check", json={"url": f"{images}/img/flip-rocket.jpg"}) as r:
                    out = await r.json()
                    assert r.status == 200 and [m["label"] for m in out["matches"]] == ["library-rocket"], out
                async with http.post(f"{api}/v1/check", data=upload((samples / "other-apple.jpg").read_bytes())) as r:
                    assert r.status == 200 and (await r.json())["matches"] == []
                assert query(url, "SELECT COUNT(*) FROM matches") == [(0,)]
                # a pushed post and an upload: recorded by the roles, alerted by the sender
                async with http.post(f"{api}/v1/ingest", json={"image_urls": [f"{images}/img/q30-coffee.jpg"],
                                                               "id": "post-1"}) as r:
                    assert r.status == 202 and (await r.json())["status"] == "queued"
                async with http.post(f"{api}/v1/ingest", data=upload(site.images["flip-rocket.jpg"][0],
                                                                     id="post-2")) as r:
                    assert r.status == 202
                await until(lambda: sorted(hooks.labels()) == ["library-coffee", "library-rocket"], 60)
                # a URL a post brought already: its stored fingerprint, its unsure match confirmed (rejected)
                async with http.post(f"{api}/v1/ingest", json={"image_urls": [f"{images}/img/rivets.jpg"],
                                                               "id": "post-3"}) as r:
                    assert r.status == 202
                await until(lambda: query(url, "SELECT state FROM work WHERE image_url LIKE '%rivets%'")
                            == [("done",)], 60)
                async with http.post(f"{api}/v1/check", json={"url": f"{images}/img/rivets.jpg"}) as r:
                    assert r.status == 200 and (await r.json())["matches"] == [] and site.hits["rivets.jpg"] == 2
                # a library entry added through the API: its shard matches it within 2 s
                fruits = (samples / "library-fruits.jpg").read_bytes()
                async with http.post(f"{api}/v1/library", data=upload(fruits, name="fruits.jpg", label="fruits")) as r:
                    assert r.status == 201, await r.text()
                    fruits_id = (await r.json())["added"][0]["id"]
                await asyncio.sleep(2.0)
                async with http.post(f"{api}/v1/check", data=upload(fruits)) as r:
                    assert [m["entry_id"] for m in (await r.json())["matches"]] == [fruits_id]
                # WebSub: the intake subscribed with the API's URL; the API verified and takes pushes
                await until(lambda: hub.verified == [True], 30)
                assert hub.subscriptions[0]["hub.callback"] == f"{api}/websub/blog"
                assert await hub.publish(rss(images, [("p2", "small-chelsea.jpg")])) == "recorded"
                assert await hub.publish(rss(images, [("p3", "flip-rocket.jpg")]), secret="wrong") == "bad_signature"
                await until(lambda: "library-chelsea" in hooks.labels(), 60)
        # one shard of two, nobody serving the other: a check is refused, not answered in part
        cfg = parse_config({**cfg.model_dump(), "feeds": [],
                            "transport": {**cfg.transport.model_dump(), "check_timeout_seconds": 1.0}})
        async with roles_running(cfg, "api,shard:0", f"{api}/v1/openapi.json"):
            async with http.post(f"{api}/v1/check", data=upload(site.images["small-chelsea.jpg"][0])) as r:
                out = await r.json()
                assert r.status == 503 and out["error"]["code"] == "match_unavailable" and "shard 1" in \
                    out["error"]["message"], out
    assert sorted(hooks.labels()) == ["library-chelsea", "library-coffee", "library-rocket"]
    assert query(url, "SELECT COUNT(*) FROM alerts") == [(3,)]


async def test_a_lease_holder_whose_work_fails_takes_it_up_again(services):
    """The sender's outbox (the work under a lease) failing, as on a PostgreSQL restart, must
    not end the holder: the work starts again, and stops with the holder."""
    import redis.asyncio as aioredis

    from monitor.scaleout import leases
    _, rd = services
    client = aioredis.Redis.from_url(rd.url)
    runs, stop = [], asyncio.Event()

    async def work():
        runs.append(len(runs))
        if len(runs) == 1:
            raise OSError("the store went away")
        await stop.wait()
    task = asyncio.create_task(leases.hold(client, f"t-{uuid.uuid4().hex[:8]}:lease:sender", "me", work, stop,
                                           ttl=0.6))
    await until(lambda: len(runs) == 2, 10)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 5)
    await client.aclose()


async def test_a_lease_held_is_shown_by_its_gauge_in_one_process_only(services):
    """Two processes wait for one lease: the holder's gauge says 1, the other's 0; when the
    holder ends, the other takes it and the gauges swap (summed over processes: 1, what the
    RepostMonitorLeaseUnheld rule watches)."""
    import redis.asyncio as aioredis

    from monitor.metrics import Metrics
    from monitor.scaleout import leases
    _, rd = services
    client = aioredis.Redis.from_url(rd.url)
    key = f"t-{uuid.uuid4().hex[:8]}:lease:sender"
    gauges = [Metrics().lease_held.labels("sender") for _ in range(2)]
    stops = [asyncio.Event(), asyncio.Event()]
    tasks = [asyncio.create_task(leases.hold(client, key, f"p{n}", stop.wait, stop, ttl=0.6, held=gauge))
             for n, (gauge, stop) in enumerate(zip(gauges, stops, strict=True))]

    def shown():
        return [int(g._value.get()) for g in gauges]
    await until(lambda: sorted(shown()) == [0, 1], 10)
    first = shown().index(1)
    stops[first].set()
    await asyncio.wait_for(tasks[first], 5)
    await until(lambda: shown()[1 - first] == 1, 10)
    assert shown()[first] == 0
    stops[1 - first].set()
    await asyncio.wait_for(tasks[1 - first], 5)
    assert shown() == [0, 0]
    await client.aclose()


async def test_a_lease_holder_cancelled_with_its_work_ends(services):
    """A shutdown that cancels every task (asyncio.run on Ctrl-C, a test's loop closing)
    cancels the holder and its work together: the holder ends instead of taking the lease
    again (it used to, for ever)."""
    import redis.asyncio as aioredis

    from monitor.scaleout import leases
    _, rd = services
    client = aioredis.Redis.from_url(rd.url)
    stop, started = asyncio.Event(), asyncio.Event()

    async def work():
        started.set()
        await asyncio.Event().wait()
    holder = asyncio.create_task(leases.hold(client, f"t-{uuid.uuid4().hex[:8]}:lease:sweeper", "me", work, stop))
    await asyncio.wait_for(started.wait(), 10)
    [work_task] = [t for t in asyncio.all_tasks() if t.get_name().startswith("lease:")]
    work_task.cancel()  # both, as a loop's shutdown does
    holder.cancel()
    await asyncio.wait_for(asyncio.gather(holder, return_exceptions=True), 5)
    assert holder.cancelled() and not stop.is_set()
    await client.aclose()


async def test_a_cancel_landing_in_a_redis_command_is_never_lost(services):
    """A task cancelled at any moment of a Redis command (or a pipeline) ends cancelled. On
    Python 3.11, redis-py's send (asyncio.wait_for under a socket timeout) returned normally
    from about three in five such cancels, and a role's loop went on after its node was cancelled."""
    from monitor.scaleout.streams import RedisStreams
    _, rd = services
    streams = RedisStreams(rd.url, f"t-{uuid.uuid4().hex[:8]}")
    rng = random.Random(7)

    async def commands(piped: bool):
        while not asyncio.current_task().cancelling():  # a lost cancel ends the loop, not the test
            if piped:
                async with streams.redis.pipeline(transaction=False) as pipe:
                    pipe.xlen(streams.key("work"))
                    pipe.xlen(streams.key("dead"))
                    await pipe.execute()
            else:
                await streams.redis.xlen(streams.key("work"))
        return "went on after its cancel"

    outcomes = []
    for trial in range(400):
        task = asyncio.create_task(commands(piped=trial % 2 == 1))
        await asyncio.sleep(rng.uniform(0, 0.002))
        task.cancel()
        outcomes.append((await asyncio.gather(task, return_exceptions=True))[0])
    await streams.close()
    lost = [o for o in outcomes if not isinstance(o, asyncio.CancelledError)]
    assert not lost, f"{len(lost)} of {len(outcomes)} cancels lost: {lost[:3]}"


async def test_roles_cancelled_end_with_their_node(services, tmp_path, samples):
    """run_node cancelled (not stopped) cancels its roles: none is left running on a closed
    store and closed streams."""
    pg, rd = services
    site, hooks = PhotoSite(samples), Hooks()
    post_everything(site)
    url = pg.create_database(f"s_{uuid.uuid4().hex[:12]}")
    make_library(url, samples)
    async with serve(site.app()) as base, serve(hooks.app()) as recv:
        cfg = scaled_config(base, recv, url, rd.url, shards=1)
        before = asyncio.all_tasks()
        task = asyncio.create_task(run_node(cfg, parse_roles("intake,worker,shard,recorder,sender", 1),
                                            install_signals=False))
        await until(lambda: query(url, "SELECT COUNT(*) FROM work WHERE state != 'pending'")[0][0] > 0, 60)
        assert await cancel_and_list_left(task, before) == []


async def test_the_streams_client_reads_replies_with_hiredis(services):
    """Replies are parsed by hiredis (C), a declared dependency: the pure-Python parser cost
    the roles 10-16% of their throughput (bench/scaleout.py). A message still goes round."""
    from monitor.scaleout.streams import RedisStreams
    _, rd = services
    streams = RedisStreams(rd.url, prefix=f"t-{uuid.uuid4().hex[:8]}")
    try:
        await streams.ensure_group("work", "g")
        await streams.add("work", {b"url": b"http://example.test/a.jpg", b"n": b"\x00\xff"})
        [(_, fields)] = await streams.read("work", "g", 10, 1.0)
        assert fields == {b"url": b"http://example.test/a.jpg", b"n": b"\x00\xff"}
        connection = streams.redis.connection_pool.make_connection()
        assert type(connection._parser).__name__ == "_AsyncHiredisParser"
    finally:
        await streams.close()


async def test_a_lone_message_is_handled_at_once_and_a_busy_stream_in_batches(services):
    """A consumer lingers for a fuller batch only where the stream's pace promises more
    (at a few posts a second nothing more comes: waiting was latency for nothing), and its
    look for more never blocks: an idle Redis ends a short BLOCK only at its next tick, up
    to 100 ms later."""
    from monitor.scaleout.roles import _consume
    from monitor.scaleout.streams import RedisStreams
    _, rd = services
    streams = RedisStreams(rd.url, prefix=f"t-{uuid.uuid4().hex[:8]}")
    try:
        await streams.ensure_group("work", "g")
        start = time.perf_counter()
        for _ in range(20):
            assert await streams.read("work", "g", 8, 0) == []
        assert time.perf_counter() - start < 0.5  # ~1 s where each look waited for Redis's tick

        batches, stop = [], asyncio.Event()

        async def handle_batch(batch):
            batches.append((time.perf_counter(), len(batch)))
            return [mid for mid, _ in batch]

        async def handle(fields):
            batches.append((time.perf_counter(), 1))
        task = asyncio.create_task(_consume(streams, "work", "g", handle, stop, count=8,
                                            handle_batch=handle_batch, linger=0.5))
        await asyncio.sleep(0.3)
        waited = []
        for n in range(3):  # a post every 1.2 s (a pace of less than one per linger): each handled at once
            added = time.perf_counter()
            await streams.add("work", {"n": str(n)})
            await until(lambda k=n: len(batches) == k + 1, 5)
            waited.append(batches[-1][0] - added)
            await asyncio.sleep(1.2)
        assert max(waited) < 0.4, waited  # not the 0.5 s linger
        for n in range(200):  # now a busy stream: the consumer waits for fuller batches
            await streams.add("work", {"n": str(n)})
            if n % 4 == 3:
                await asyncio.sleep(0.01)
        await until(lambda: sum(k for _, k in batches) == 203, 10)
        assert max(k for _, k in batches) == 8 and len(batches) < 3 + 200 / 4
        stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        await streams.close()


async def test_the_recorder_holds_no_row_locked_through_the_keypoint_pass(services, samples):
    """The recorder's keypoint pass (ORB, a few ms a post) runs between the transaction that
    completes a post's set of answers and the one that records it: meanwhile no transaction
    of its is open, so another recorder storing a different shard's answer for one of those
    posts never waits on it. Watched from another session: the longest transaction the
    recorder held, against the time its keypoint pass took. The posts are cut and mirrored
    copies of the library's pictures, which all need the pass, and it records their matches."""
    import psycopg

    from feeds import FeedItem
    from monitor.fingerprints import fingerprint_bytes
    from monitor.metrics import Metrics
    from monitor.pipeline.recorder import Recorder
    from monitor.records import work as work_rows
    from monitor.records.library import Library
    from monitor.scaleout.recorder import RecorderRole
    from monitor.scaleout.streams import RedisStreams
    from monitor.scaleout.wire import answer_json, fingerprint_fields, work_fields
    from monitor.scan import add_files
    from monitor.search.answers import needs_keypoints
    from monitor.search.matcher import PRESETS, Matcher
    pg, rd = services
    url = pg.create_database(f"k_{uuid.uuid4().hex[:12]}")
    lib = Library(open_store(url))
    add_files(lib, sorted(samples.glob("library-*.jpg")), progress=False)
    posts = []
    for path in sorted(samples.glob("library-*.jpg")):
        img = Image.open(path).convert("RGB")
        w, h = img.size
        for cut in (0.12, 0.18, 0.24):
            for edit in (lambda i: i, ImageOps.mirror):
                for box in ((int(w * cut), 0, w, h), (0, int(h * cut), w, h - int(h * cut / 3))):
                    posts.append(encode(edit(img.crop(box)), quality=85))
    fps = [fingerprint_bytes(data, views="query", keypoint_picture=True) for data in posts]
    answers = Matcher(lib.index, PRESETS["near"]).hash_answers(fps, {i: True for i in range(len(fps))})
    needing = [(fp, a) for fp, a in zip(fps, answers, strict=True) if needs_keypoints(a)]
    assert len(needing) >= 30, len(needing)
    work, _ = work_rows.record_items(lib.store, "f", [FeedItem("f", str(i), (f"http://h/{i}.jpg",))
                                                      for i in range(len(needing))], 1.0)
    streams = RedisStreams(rd.url, prefix=f"k-{uuid.uuid4().hex[:8]}")
    await streams.add_many("unused", [], {w.id: fp.keypoint_picture for w, (fp, _) in zip(work, needing, strict=True)})
    metrics = Metrics()
    role = RecorderRole(lib.store, 1, streams, Recorder(lib.store, lib, metrics))
    batch = [(str(n).encode(), {k.encode(): v.encode() for k, v in {
        **work_fields(w), **fingerprint_fields(fp, True), "shard": "0", "matches": answer_json(a)}.items()})
             for n, (w, (fp, a)) in enumerate(zip(work, needing, strict=True))]
    longest, watching = [0.0], [True]

    def watch():  # the oldest open transaction of any other session on the database, as often as it can
        with psycopg.connect(url, autocommit=True) as conn:
            while watching[0]:
                age = conn.execute("SELECT COALESCE(MAX(EXTRACT(EPOCH FROM clock_timestamp() - xact_start)), 0) "
                                   "FROM pg_stat_activity WHERE datname = current_database() "
                                   "AND pid <> pg_backend_pid()").fetchone()[0]
                longest[0] = max(longest[0], float(age))
    watcher = asyncio.create_task(asyncio.to_thread(watch))
    await asyncio.sleep(0.2)
    try:
        assert await role.handle_batch(batch) == [mid for mid, _ in batch]
    finally:
        watching[0] = False
        await watcher
        await streams.close()
    searching = metrics.keypoint_search_seconds.collect()[0]
    spent = sum(s.value for s in searching.samples if s.name.endswith("_sum"))
    states = {s for (s,) in query(url, "SELECT state FROM work")}
    recorded = query(url, "SELECT COUNT(DISTINCT work_id) FROM matches")[0][0]
    lib.store.close()
    assert states == {"done"} and recorded >= len(needing) // 2, (states, recorded)
    assert spent > 0.05 and longest[0] < spent / 2, (longest[0], spent)


async def test_a_shards_replicas_retro_match_each_new_entry_once(services, samples):
    """Every replica of a shard indexes a new entry, but only the one holding the shard's
    retro lease matches it against the recent images (which it may fetch again: once, not
    once per replica); when that replica is gone, the other takes over from the store's mark."""
    import redis.asyncio as aioredis

    from monitor.metrics import Metrics
    from monitor.pipeline.recorder import Recorder
    from monitor.pipeline.retro import LibraryWatcher
    from monitor.records import changes
    from monitor.records.library import Library
    from monitor.scaleout import leases
    from monitor.scan import add_files
    from monitor.search.matcher import PRESETS, Matcher
    from tests.test_stages import seen_before_protected
    pg, rd = services
    url = pg.create_database(f"r_{uuid.uuid4().hex[:12]}")
    admin = Library(open_store(url))  # as `library add` from a shell
    add_files(admin, [samples / "library-chelsea.jpg"], progress=False)
    await seen_before_protected(admin, samples, ["flip-rocket.jpg", "q30-coffee.jpg"])
    client = aioredis.Redis.from_url(rd.url)
    key = f"t-{uuid.uuid4().hex[:8]}:lease:retro:0/1"
    recorded, replicas = [], []
    for n in range(2):
        lib = Library(open_store(url), (0, 1))
        metrics = Metrics()
        watcher = LibraryWatcher(lib.store, lib, Matcher(lib.index, PRESETS["near"]),
                                 Recorder(lib.store, lib, metrics, on_match=recorded.append), metrics,
                                 check_seconds=0.1, retro_here=False)
        stop = asyncio.Event()
        task = asyncio.gather(watcher.run(stop), leases.hold(client, key, f"replica-{n}",
                                                             lambda w=watcher, s=stop: w.retro_loop(s), stop, ttl=1.0))
        replicas.append((watcher, metrics, stop, task))

    def retro_runs():
        return [int(m.retro_seconds._sum.get() > 0) for _, m, _, _ in replicas]
    try:
        await asyncio.to_thread(add_files, admin, [samples / "library-rocket.jpg"], progress=False)
        await until(lambda: [r.entry.label for r in recorded] == ["library-rocket"], 20)
        await until(lambda: all(w.library.checkpoint == changes.last_change(admin.store) for w, *_ in replicas),
                    10)
        await asyncio.sleep(1.0)  # time enough for a second retro-match, were one to come
        assert sorted(retro_runs()) == [0, 1] and [r.entry.label for r in recorded] == ["library-rocket"]
        holder = retro_runs().index(1)
        _, _, stop, task = replicas[holder]
        stop.set()  # that replica ends: the other takes the lease
        await asyncio.wait_for(task, 10)
        await asyncio.to_thread(add_files, admin, [samples / "library-coffee.jpg"], progress=False)
        await until(lambda: [r.entry.label for r in recorded] == ["library-rocket", "library-coffee"], 20)
        assert retro_runs()[1 - holder] == 1
    finally:
        for watcher, _, stop, task in replicas:
            stop.set()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
            watcher.store.close()
        await client.aclose()
        admin.store.close()
