"""Mastodon streaming: a loopback instance speaking the real protocol (server-sent events
on /api/v1/streaming/..., the timeline for catch-up with min_id), replaying recorded
statuses: posts as they happen, a dropped connection caught up without gaps or
duplicates, a restart resumed from the stored cursor, bad events skipped and counted."""

import asyncio
import copy
import json

import pytest
from aiohttp import web

from feeds import make_source
from feeds.mastodon_stream import catchup_url
from feeds.sse import EventTooLarge, SSEDecoder
from monitor.config import parse_config
from monitor.daemon import run_daemon
from tests.conftest import PAYLOADS
from tests.hosts import DaemonProcess, serve
from tests.test_daemon import PhotoSite, config_for, make_library, query, until

RECORDED_EVENT = (PAYLOADS / "mastodon" / "mastodon-api__streaming_update.txt").read_bytes()
TWO_IMAGES = json.loads((PAYLOADS / "mastodon" / "mastodonpy__status_two_images_2026-08.json").read_text())


def test_sse_decoder_on_the_recorded_stream():
    decoder = SSEDecoder(max_bytes=10_000)
    events = [e for line in (b":thump\n" + RECORDED_EVENT).splitlines(keepends=True) if (e := decoder.line(line))]
    assert len(events) == 1 and events[0][0] == "update" and json.loads(events[0][1])["id"] == 29443
    # several data lines join with newlines; CRLF ends lines too; a comment is nothing
    got = [decoder.line(x) for x in (b"event: update\r\n", b"data: {\"a\":\r\n", b"data: 1}\r\n", b": hi\n", b"\r\n")]
    assert got[-1] == ("update", '{"a":\n1}')
    try:
        decoder.line(b"data: " + b"x" * 20_000)
    except EventTooLarge:
        pass
    else:
        raise AssertionError("an oversized event must be refused")
    assert decoder.line(b"") is None and decoder.line(b"data: small") is None and decoder.line(b"") == ("message",
                                                                                                          "small")


def test_the_recorded_update_becomes_an_item_and_catch_up_follows_the_stream_path():
    stream = make_source("mastodon_stream", "live", "https://example.social/api/v1/streaming/hashtag?tag=art")
    decoder = SSEDecoder()
    event, data = next(e for line in RECORDED_EVENT.splitlines() if (e := decoder.line(line)))
    [item] = stream.parse_event(event, data)
    assert item.id == "29443" and item.author == "tester@mastodon.social" and item.image_urls == ()
    assert list(stream.parse_event("delete", "29443")) == []
    bad = stream.parse_event("update", "{not json")
    assert list(bad) == [] and bad.skipped[0][0] == "malformed_item"
    assert catchup_url(stream.url) == "https://example.social/api/v1/timelines/tag/art?limit=40"
    assert catchup_url("https://x.social/api/v1/streaming/public/local") == \
        "https://x.social/api/v1/timelines/public?local=true&limit=40"
    assert stream.catchup("42").url.endswith("/api/v1/timelines/tag/art?limit=40&min_id=42")


class Instance:
    """A Mastodon instance on loopback: a public stream and the public timeline."""

    def __init__(self, site_base_holder):
        self.statuses: list[dict] = []     # everything "posted", oldest first
        self.live: asyncio.Queue = asyncio.Queue()
        self.min_ids: list[str | None] = []  # what each catch-up asked for
        self.connections = 0
        self.drop_after: int | None = None  # close the stream after this many events
        self.sent_total = 0
        self.base = site_base_holder

    def post(self, n: int, images: list[str], live: bool = True) -> dict:
        status = copy.deepcopy(TWO_IMAGES)
        status["id"] = str(117020576664345360 + n)
        status["url"] = f"https://example.social/@artist/{status['id']}"
        status["media_attachments"] = [dict(TWO_IMAGES["media_attachments"][0], id=str(n * 10 + i),
                                            preview_url=f"{self.base[0]}/img/{name}", url=f"{self.base[0]}/img/{name}")
                                       for i, name in enumerate(images)]
        self.statuses.append(status)
        if live:
            self.live.put_nowait(("update", json.dumps(status)))
        return status

    def app(self):
        app = web.Application()

        async def stream(request):
            self.connections += 1
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b":)\n\n")
            sent = 0
            while True:
                try:
                    event, data = await asyncio.wait_for(self.live.get(), 0.5)
                except TimeoutError:
                    await resp.write(b":thump\n\n")  # Mastodon's heartbeat
                    continue
                await resp.write(f"event: {event}\ndata: {data}\n\n".encode())
                sent += 1
                self.sent_total += 1
                if self.drop_after is not None and sent >= self.drop_after:
                    self.drop_after = None
                    return resp  # the connection drops

        async def timeline(request):
            min_id = request.query.get("min_id")
            self.min_ids.append(min_id)
            limit = int(request.query.get("limit", 20))
            newer = [s for s in self.statuses if not min_id or (len(s["id"]), s["id"]) > (len(min_id), min_id)]
            page = newer[:limit] if min_id else newer[-limit:]
            return web.json_response(list(reversed(page)))  # newest first, as Mastodon answers

        app.router.add_get("/api/v1/streaming/public", stream)
        app.router.add_get("/api/v1/timelines/public", timeline)
        return app


def stream_config(images: str, masto: str, db):
    """The test config with one feed: the instance's public stream, reconnecting within 0.5 s."""
    cfg = config_for(images, db)
    return parse_config({**cfg.model_dump(), "feeds": [{"name": "live", "type": "mastodon_stream",
                                                        "url": f"{masto}/api/v1/streaming/public",
                                                        "max_backoff": 0.5}]})


@pytest.mark.slow  # ~2 s (a restart): the fast tier keeps under its minute
async def test_posts_as_they_happen_a_dropped_stream_and_a_restart_lose_and_repeat_nothing(tmp_path, samples):
    site = PhotoSite(samples)
    db = tmp_path / "m.sqlite"
    make_library(db, samples)
    base = [""]
    instance = Instance(base)
    async with serve(site.app()) as images, serve(instance.app()) as masto:
        base[0] = images
        cfg = stream_config(images, masto, db)
        records = []
        stop = asyncio.Event()
        running = {}
        task = asyncio.create_task(run_daemon(cfg, stop=stop, on_match=records.append,
                                              on_ready=lambda r: running.update(r=r), install_signals=False))
        instance.post(1, ["other-apple.jpg"], live=False)  # before the daemon listened: caught up
        await until(lambda: instance.connections == 1)
        instance.post(2, ["small-chelsea.jpg", "other-baboon.jpg"])  # as it happens
        instance.live.put_nowait(("update", "{broken json"))        # a bad event: skipped, counted
        instance.live.put_nowait(("update", "[" * 5000))            # nested past json's recursion: the same
        instance.live.put_nowait(("delete", "117020576664345361"))   # not a post
        await until(lambda: len(records) == 1)
        # the stream drops after the next event; two posts land while nobody listens
        instance.drop_after = 1
        instance.post(3, ["other-building.jpg"])
        await until(lambda: instance.connections == 1 and instance.drop_after is None)
        instance.post(4, ["flip-rocket.jpg"], live=False)
        instance.post(5, ["other-coins.jpg"], live=False)
        await until(lambda: instance.connections == 2)
        await until(lambda: len(records) == 2)
        metrics = running["r"].metrics.render().decode()
        stop.set()
        await asyncio.wait_for(task, 30)
        # while stopped: one more post; a restart catches up from the stored cursor
        instance.post(6, ["q30-coffee.jpg"], live=False)
        stop2 = asyncio.Event()
        task2 = asyncio.create_task(run_daemon(cfg, stop=stop2, on_match=records.append, install_signals=False))
        await until(lambda: len(records) == 3)
        await until(lambda: query(db, "SELECT COUNT(*) FROM work WHERE state='pending'") == [(0,)])
        stop2.set()
        await asyncio.wait_for(task2, 30)
    items = [i for (i,) in query(db, "SELECT item_id FROM seen_items WHERE feed='live' ORDER BY item_id")]
    assert items == [str(117020576664345360 + n) for n in range(1, 7)]   # every post once, none missed
    urls = [u.rsplit("/", 1)[-1] for (u,) in query(db, "SELECT image_url FROM work ORDER BY id")]
    assert sorted(urls) == sorted(["other-apple.jpg", "small-chelsea.jpg", "other-baboon.jpg", "other-building.jpg",
                                   "flip-rocket.jpg", "other-coins.jpg", "q30-coffee.jpg"])
    assert [r.entry.label for r in records] == ["library-chelsea", "library-rocket", "library-coffee"]
    assert query(db, "SELECT cursor FROM feed_state WHERE feed='live'") == [(str(117020576664345366),)]
    # catch-ups: the first start (no cursor), after the drop (from post 3), after the restart (from 5)
    assert instance.min_ids[0] is None
    assert str(117020576664345363) in instance.min_ids and instance.min_ids[-1] == str(117020576664345365)
    assert 'repost_monitor_stream_events_total{feed="live",result="post"} 2.0' in metrics
    assert 'repost_monitor_stream_events_total{feed="live",result="skipped"} 2.0' in metrics
    assert 'repost_monitor_stream_events_total{feed="live",result="ignored"}' in metrics
    assert 'repost_monitor_feed_items_skipped_total{feed="live",reason="malformed_item"} 2.0' in metrics
    assert 'repost_monitor_stream_connects_total{feed="live"} 2.0' in metrics


@pytest.mark.slow
def test_mastodon_stream_after_kill_9_catches_up_without_gap_or_duplicate(tmp_path, samples):
    """The daemon as a subprocess on a Mastodon stream, SIGKILLed just after an event went out,
    a post made while it was dead, restarted: the catch-up from the stored cursor brings what
    the stream carried while nobody listened, the stream the rest; every post once."""
    site = PhotoSite(samples)
    db = tmp_path / "m.sqlite"
    make_library(db, samples)
    base = [""]
    instance = Instance(base)

    async def scenario():
        async with serve(site.app()) as images, serve(instance.app()) as masto:
            base[0] = images
            cfg = tmp_path / "c.toml"
            cfg.write_text(
                f'[store]\npath = "{db}"\n[limits]\nallowed_networks = ["127.0.0.0/8"]\n[server]\nport = 0\n'
                f'[[feeds]]\nname = "live"\ntype = "mastodon_stream"\nurl = "{masto}/api/v1/streaming/public"\n'
                "max_backoff = 0.5\n")
            daemon = DaemonProcess(cfg, tmp_path / "daemon.log")
            daemon.start()
            await until(lambda: instance.connections == 1, 90)
            instance.post(1, ["other-apple.jpg"])
            instance.post(2, ["small-chelsea.jpg"])
            await until(lambda: query(db, "SELECT COUNT(*) FROM matches")[0][0] == 1, 30)
            instance.post(3, ["other-building.jpg"])
            await until(lambda: instance.sent_total == 3)
            daemon.kill()  # post 3 was sent: recorded or not, it must come back exactly once
            instance.post(4, ["flip-rocket.jpg"], live=False)  # nobody listening
            daemon.start()
            await until(lambda: instance.connections == 2, 90)
            instance.post(5, ["q30-coffee.jpg"])
            await until(lambda: query(db, "SELECT COUNT(*) FROM matches")[0][0] == 3
                        and query(db, "SELECT COUNT(*) FROM work WHERE state='pending'")[0][0] == 0, 60)
            assert daemon.stop() == 0, daemon.log()[-2000:]

    asyncio.run(scenario())
    items = [i for (i,) in query(db, "SELECT item_id FROM seen_items ORDER BY item_id")]
    assert items == [str(117020576664345360 + n) for n in range(1, 6)]
    rows = query(db, "SELECT image_url, entry_id FROM matches")
    assert len(rows) == len(set(rows)) == 3
    assert len(instance.min_ids) == 2 and instance.min_ids[1] in (str(117020576664345362), str(117020576664345363))


# -- Bluesky Jetstream ----------------------------------------------------------------------
JETSTREAM = [json.loads(line) for line in
             (PAYLOADS / "jetstream" / "jetstream__expected_v1.jsonl").read_text().splitlines()]


def image_posts(events):
    from feeds.jetstream import blob_cids
    return [e for e in events if e.get("kind") == "commit" and e["commit"].get("operation") == "create"
            and blob_cids((e["commit"].get("record") or {}).get("embed"))]


def test_jetstream_events_become_items_with_filters_and_cursor():
    stream = make_source("jetstream", "bsky", "wss://jetstream.example/subscribe")
    found = [(items, items.cursor) for e in JETSTREAM for items in [stream.parse_event("message", json.dumps(e))]]
    posts = [i for items, _ in found for i in items]
    assert len(posts) == 2 == len(image_posts(JETSTREAM))  # 150 commits, 2 with pictures
    assert all(c == str(e["time_us"]) for (_, c), e in zip(found, JETSTREAM, strict=True))  # every event moves it
    assert posts[0].image_urls[0].startswith("https://cdn.bsky.app/img/feed_thumbnail/plain/did:plc:")
    assert posts[0].id.startswith("at://did:plc:") and "/app.bsky.feed.post/" in posts[0].id
    only_en = make_source("jetstream", "bsky", "wss://x/subscribe", languages=["en"])
    kw = make_source("jetstream", "bsky", "wss://x/subscribe", keywords=["TIMMI"])
    for source in (only_en, kw):
        kept = [i for e in JETSTREAM for i in source.parse_event("message", json.dumps(e))]
        assert [i.author for i in kept] == ["did:plc:ynfp6wddjqpl44gordpsqkuw"]
    assert only_en.connect_url("17").endswith(
        "?wantedCollections=app.bsky.feed.post&maxMessageSizeBytes=1000000&cursor=17")
    bad = stream.parse_event("message", "{not json")
    assert list(bad) == [] and bad.skipped and bad.cursor is None


class JetstreamServer:
    """Jetstream on loopback: the recorded events in time order, resumed after ?cursor=,
    leaving out events over ?maxMessageSizeBytes= as the real server does; optionally
    paced (so a kill lands mid-stream) or dropped after some events."""

    def __init__(self, events, per_second: float | None = None):
        self.events = sorted(events, key=lambda e: e["time_us"])
        self.pause = 1 / per_second if per_second else 0.0
        self.cursors: list[str | None] = []
        self.limits: list[str | None] = []
        self.collections: list[str] = []
        self.drop_after: int | None = None
        self.sent_total = 0

    def app(self):
        app = web.Application()

        async def subscribe(request):
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            cursor = request.query.get("cursor")
            limit = int(request.query.get("maxMessageSizeBytes", 10**9))
            self.cursors.append(cursor)
            self.limits.append(request.query.get("maxMessageSizeBytes"))
            self.collections.append(request.query.get("wantedCollections"))
            sent = 0
            try:
                for e in self.events:
                    if (cursor and e["time_us"] <= int(cursor)) or len(json.dumps(e)) > limit:
                        continue
                    await ws.send_str(json.dumps(e))
                    sent += 1
                    self.sent_total += 1
                    if self.drop_after is not None and sent >= self.drop_after:
                        self.drop_after = None
                        await ws.close()
                        return ws
                    if self.pause:
                        await asyncio.sleep(self.pause)
                async for _ in ws:  # live: nothing more to send; held open until the client leaves
                    pass
            except ConnectionError:
                pass  # the daemon was killed
            return ws

        app.router.add_get("/subscribe", subscribe)
        return app


def cdn_app(site, repost: dict[str, str]) -> web.Application:
    """Bluesky's CDN on loopback: /img/feed_thumbnail/plain/{did}/{cid}@jpeg -> a picture."""
    cdn = web.Application()

    async def blob(request):
        name = repost.get(request.match_info["blob"].removesuffix("@jpeg"))
        if name is None:
            raise web.HTTPNotFound()
        return web.Response(body=site.images[name][0], content_type="image/jpeg")
    cdn.router.add_get("/img/feed_thumbnail/plain/{did}/{blob}", blob)
    return cdn


def jetstream_config(cdn_base: str, js: str, db):
    """The daemon's config for the loopback Jetstream ``js`` and its CDN ``cdn_base``."""
    return parse_config({**config_for(cdn_base, db).model_dump(), "feeds": [{
        "name": "bsky", "type": "jetstream", "url": "ws" + js[4:] + "/subscribe", "max_backoff": 0.5,
        "image_url_template": cdn_base + "/img/feed_thumbnail/plain/{did}/{cid}@jpeg"}]})


@pytest.mark.slow  # ~2 s of a daemon: the fast tier keeps under its minute
async def test_an_event_the_adapter_fails_on_is_skipped_and_the_stream_goes_on(tmp_path, samples, monkeypatch):
    """A fault injected into the adapter (no real event breaks one now; a nested one did): the
    event it raises on is skipped and counted, the connection stays up, the post after it is
    recorded. Failing the connection instead replayed the event from the cursor forever."""
    from feeds import registry
    from feeds.jetstream import Jetstream
    posts = image_posts(JETSTREAM)
    poisoned = posts[0]["time_us"]

    class Faulty(Jetstream):
        def parse_event(self, event, data):
            if json.loads(data)["time_us"] == poisoned:
                raise ZeroDivisionError("an adapter's bug")
            return super().parse_event(event, data)
    monkeypatch.setitem(registry.SOURCE_TYPES, "jetstream", Faulty)
    site = PhotoSite(samples)
    db = tmp_path / "m.sqlite"
    make_library(db, samples)
    repost = {p["commit"]["record"]["embed"]["images"][0]["image"]["ref"]["$link"]: name
              for p, name in zip(posts, ["small-chelsea.jpg", "flip-rocket.jpg"], strict=False)}
    server = JetstreamServer(JETSTREAM)
    async with serve(cdn_app(site, repost)) as cdn_base, serve(server.app()) as js:
        cfg = jetstream_config(cdn_base, js, db)
        records, stop, running = [], asyncio.Event(), {}
        task = asyncio.create_task(run_daemon(cfg, stop=stop, on_match=records.append,
                                              on_ready=lambda r: running.update(r=r), install_signals=False))
        await until(lambda: len(records) == 1 and query(db, "SELECT cursor FROM feed_state WHERE feed='bsky'") ==
                    [(str(server.events[-1]["time_us"]),)])
        metrics = running["r"].metrics.render().decode()
        stop.set()
        await asyncio.wait_for(task, 30)
    assert [r.entry.label for r in records] == ["library-rocket"] and len(server.cursors) == 1
    assert 'repost_monitor_feed_items_skipped_total{feed="bsky",reason="malformed_item"} 1.0' in metrics
    assert 'repost_monitor_errors_total{stage="poll"} 1.0' in metrics
    assert 'repost_monitor_stream_connects_total{feed="bsky"} 1.0' in metrics


@pytest.mark.slow  # ~2 s (a restart): the fast tier keeps under its minute
async def test_jetstream_resumes_after_a_drop_and_a_restart_without_gaps_or_duplicates(tmp_path, samples):
    site = PhotoSite(samples)
    db = tmp_path / "m.sqlite"
    make_library(db, samples)
    posts = image_posts(JETSTREAM)
    repost = {posts[0]["commit"]["record"]["embed"]["images"][0]["image"]["ref"]["$link"]: "small-chelsea.jpg",
              posts[1]["commit"]["record"]["embed"]["images"][0]["image"]["ref"]["$link"]: "flip-rocket.jpg"}
    cdn = cdn_app(site, repost)
    server = JetstreamServer(JETSTREAM)
    server.drop_after = 80  # the first connection drops mid-stream
    async with serve(cdn) as cdn_base, serve(server.app()) as js:
        cfg = jetstream_config(cdn_base, js, db)
        records, stop, running = [], asyncio.Event(), {}
        task = asyncio.create_task(run_daemon(cfg, stop=stop, on_match=records.append,
                                              on_ready=lambda r: running.update(r=r), install_signals=False))
        await until(lambda: len(server.cursors) == 2 and len(records) == 2)
        await until(lambda: query(db, "SELECT cursor FROM feed_state WHERE feed='bsky'") ==
                    [(str(server.events[-1]["time_us"]),)])
        metrics = running["r"].metrics.render().decode()
        stop.set()
        await asyncio.wait_for(task, 30)
        # a restart resumes from the stored position: nothing replayed, nothing recorded twice
        stop2 = asyncio.Event()
        task2 = asyncio.create_task(run_daemon(cfg, stop=stop2, on_match=records.append, install_signals=False))
        await until(lambda: len(server.cursors) == 3)
        await asyncio.sleep(0.5)
        stop2.set()
        await asyncio.wait_for(task2, 30)
    assert server.cursors[0] is None and server.cursors[1] == str(server.events[79]["time_us"])
    assert server.cursors[2] == str(server.events[-1]["time_us"])
    assert set(server.collections) == {"app.bsky.feed.post"}
    assert sorted(r.entry.label for r in records) == ["library-chelsea", "library-rocket"]
    items = [i for (i,) in query(db, "SELECT item_id FROM seen_items WHERE feed='bsky'")]
    assert sorted(items) == sorted(f"at://{p['did']}/app.bsky.feed.post/{p['commit']['rkey']}" for p in posts)
    assert 'repost_monitor_stream_events_total{feed="bsky",result="post"} 2.0' in metrics
    assert 'repost_monitor_stream_connects_total{feed="bsky"} 2.0' in metrics


@pytest.mark.slow
def test_jetstream_after_kill_9_resumes_without_gap_or_duplicate(tmp_path, samples):
    """The daemon as a subprocess, SIGKILLed mid-stream, restarted: it resumes from its stored
    position (at most a second back), and every image post is recorded once. An event over
    the daemon's message limit is left out by the server, as Jetstream does when asked
    (maxMessageSizeBytes): resent after every reconnection, it would hold the stream forever."""
    import signal
    import subprocess
    import sys
    site = PhotoSite(samples)
    db = tmp_path / "m.sqlite"
    make_library(db, samples)
    posts = image_posts(JETSTREAM)
    cids = [p["commit"]["record"]["embed"]["images"][0]["image"]["ref"]["$link"] for p in posts]
    repost = dict(zip(cids, ["small-chelsea.jpg", "flip-rocket.jpg"], strict=True))
    huge = {"did": "did:plc:huge", "time_us": sorted(e["time_us"] for e in JETSTREAM)[10] + 1, "kind": "commit",
            "commit": {"operation": "create", "collection": "app.bsky.feed.post", "rkey": "x",
                       "record": {"text": "x" * 2_000_000}}}
    server = JetstreamServer(JETSTREAM + [huge], per_second=40)
    cdn = cdn_app(site, repost)

    async def scenario():
        async with serve(cdn) as cdn_base, serve(server.app()) as js:
            cfg = tmp_path / "c.toml"
            cfg.write_text(
                f'[store]\npath = "{db}"\n[limits]\nallowed_networks = ["127.0.0.0/8"]\n[server]\nport = 0\n'
                f'[[feeds]]\nname = "bsky"\ntype = "jetstream"\nurl = "ws{js[4:]}/subscribe"\nmax_backoff = 0.5\n'
                f'image_url_template = "{cdn_base}/img/feed_thumbnail/plain/{{did}}/{{cid}}@jpeg"\n')
            cmd = [sys.executable, "-m", "monitor", "run", "--config", str(cfg)]
            log = open(tmp_path / "daemon.log", "wb")
            proc = subprocess.Popen(cmd, stderr=log, stdout=subprocess.DEVNULL)
            await until(lambda: server.sent_total >= 90, 90)  # mid-stream, past the first image post
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_at = server.sent_total
            proc = subprocess.Popen(cmd, stderr=log, stdout=subprocess.DEVNULL)
            await until(lambda: query(db, "SELECT COUNT(*) FROM matches")[0][0] == 2
                        and query(db, "SELECT COUNT(*) FROM work WHERE state='pending'")[0][0] == 0, 90)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            log.close()
            return killed_at

    killed_at = asyncio.run(scenario())
    resumed = int(server.cursors[-1])
    order = [e["time_us"] for e in server.events]
    assert server.cursors[0] is None and 0 < order.index(resumed) + 1 <= killed_at  # resumed, not restarted
    rows = query(db, "SELECT image_url, entry_id FROM matches")
    assert len(rows) == len(set(rows)) == 2  # both image posts, each once
    assert sorted(i for (i,) in query(db, "SELECT item_id FROM seen_items")) == \
        sorted(f"at://{p['did']}/app.bsky.feed.post/{p['commit']['rkey']}" for p in posts)
    assert set(server.limits) == {"1000000"}
