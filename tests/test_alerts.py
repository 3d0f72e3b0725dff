"""Alert delivery to real receivers on loopback: signed webhooks, a Slack-like host that
rate-limits and fails, dead letters and re-sending, per-sink filters."""

import asyncio
import hashlib
import hmac
import json
import re
import subprocess
import sys
import time

import pytest
from aiohttp import web

from monitor.daemon import run_daemon
from monitor.records.engines import open_store
from monitor.records.store import Store
from tests.hosts import serve
from tests.test_daemon import PhotoSite, config_for, make_library, until

SECRET = "whsec-test"


class Receivers:
    def __init__(self):
        self.webhook: list[dict] = []
        self.keys: list[str] = []
        self.refused = 0
        self.slack: list[dict] = []
        self.slack_script = ["429", "500"]  # then 200 ok forever
        self.down: list[int] = []

    def app(self):
        app = web.Application()

        async def webhook(request):
            body = await request.read()
            ts = request.headers.get("X-Repost-Monitor-Timestamp", "")
            want = "v1=" + hmac.new(SECRET.encode(), ts.encode() + b"." + body,
                                    hashlib.sha256).hexdigest()
            if not hmac.compare_digest(want, request.headers.get("X-Repost-Monitor-Signature", "")):
                self.refused += 1
                return web.Response(status=401)
            key = request.headers["Idempotency-Key"]
            if key not in self.keys:  # honour the idempotency key
                self.keys.append(key)
                self.webhook.append(json.loads(body))
            return web.Response(text="ok")

        async def slack(request):
            if self.slack_script:
                step = self.slack_script.pop(0)
                if step == "429":
                    return web.Response(status=429, headers={"Retry-After": "1"}, text="rate_limited")
                return web.Response(status=500, text="oops")
            self.slack.append(await request.json())
            return web.Response(text="ok")

        async def down(request):
            self.down.append(1)
            # an endpoint's error body is not ours: it must not drive the operator's terminal
            return web.Response(status=503, text="down\x1b]0;pwned\x07\x1b[2J\n[ok] forged \u202eexe.jpg")

        app.router.add_post("/hooks/repost", webhook)
        app.router.add_post("/services/T0/B0/x", slack)
        app.router.add_post("/down", down)
        return app


def alert_config(base_feeds, base_recv, db, tmp_path, **over):
    cfg = config_for(base_feeds, db)
    return cfg.model_copy(update={"alerts": [
        __import__("monitor.config", fromlist=["AlertSinkConfig"]).AlertSinkConfig(**a)
        for a in over.get("alerts", [
            {"name": "hook", "type": "webhook", "url": f"{base_recv}/hooks/repost", "secret": SECRET,
             "backoff_base": 0.1},
            {"name": "slack", "type": "slack", "url": f"{base_recv}/services/T0/B0/x",
             "backoff_base": 0.1},
            {"name": "exact-only", "type": "file", "path": str(tmp_path / "alerts.jsonl"),
             "tiers": ["exact"], "labels": ["library-rocket", "library-coffee"]},
        ])]})


@pytest.mark.slow  # a daemon run end to end: ~1-3 s (the fast tier keeps under its minute)
async def test_alerts_reach_every_sink_once_with_signatures(store_location, tmp_path, samples):
    site, recv = PhotoSite(samples), Receivers()
    site.post("rss", 1, ["small-chelsea.jpg", "other-apple.jpg"])
    site.post("json", 2, ["flip-rocket.jpg"])
    site.post("reddit", 3, ["q30-coffee.jpg"])
    site.post("mastodon", 4, ["small-chelsea.jpg"])
    db = store_location
    make_library(db, samples)
    async with serve(site.app()) as feeds, serve(recv.app()) as receivers:
        stop = asyncio.Event()
        running = {}
        task = asyncio.create_task(run_daemon(alert_config(feeds, receivers, db, tmp_path), stop=stop,
                                              on_ready=lambda r: running.update(r=r),
                                              install_signals=False))
        await until(lambda: len(recv.webhook) == 3 and len(recv.slack) == 3, timeout=30)
        await asyncio.sleep(0.5)
        metrics = running["r"].metrics.render().decode()
        stop.set()
        await asyncio.wait_for(task, 30)
    assert recv.refused == 0
    labels = sorted(a["library"]["label"] for a in recv.webhook)
    assert labels == ["library-chelsea", "library-coffee", "library-rocket"]
    alert = next(a for a in recv.webhook if a["library"]["label"] == "library-rocket")
    assert alert["mirrored"] and alert["bits"] == 64 and alert["fine_bits"] == 512
    # exact is decided on the 64-bit hashes; near and loose verify with the fine hashes
    fine_used = alert["fine_distance_bits"] is not None
    assert alert["decided_by"] == ("dhash+phash+fine" if fine_used else "dhash+phash")
    assert fine_used == (alert["tier"] != "exact")
    assert alert["repost"]["image_url"].endswith("/img/flip-rocket.jpg")
    assert alert["repost"]["source"] == "json" and alert["detected_at"]
    assert set(alert["library"]) == {"id", "label", "source"}
    # Slack got Block Kit messages, in match order, after a 429 and a 500.
    assert all(m["blocks"][0]["type"] == "section" for m in recv.slack)
    assert [m["blocks"][0]["accessory"]["image_url"].rsplit("/", 1)[-1] for m in recv.slack] == \
        [a["repost"]["image_url"].rsplit("/", 1)[-1] for a in sorted(recv.webhook,
                                                                     key=lambda a: a["match_id"])]
    lines = [json.loads(x) for x in (tmp_path / "alerts.jsonl").read_text().splitlines()]
    assert sorted(x["library"]["label"] for x in lines) == ["library-coffee", "library-rocket"]
    assert 'repost_monitor_alert_deliveries_total{outcome="delivered",sink="slack"} 3.0' in metrics
    assert 'repost_monitor_alert_deliveries_total{outcome="failed",sink="slack"} 2.0' in metrics
    states = open_store(db).query("SELECT sink, state, COUNT(*) FROM alerts GROUP BY sink, state")
    assert sorted(states) == [("exact-only", "delivered", 2), ("hook", "delivered", 3),
                              ("slack", "delivered", 3)]


@pytest.mark.slow  # a sink retried until it gives up: seconds of backoff
async def test_a_receivers_retry_after_is_honoured_up_to_an_hour(tmp_path, samples, monkeypatch):
    """A receiver that answers 429 with Retry-After: a year (a bug, a quota misread) is asked again
    after RETRY_AFTER_MAX (an hour; half a second here), not a year later: the sink's queue,
    delivered in order, would have stalled that long."""
    from monitor.alerts import outbox
    monkeypatch.setattr(outbox, "RETRY_AFTER_MAX", 0.5)
    site, asked = PhotoSite(samples), []
    site.post("rss", 1, ["small-chelsea.jpg"])
    db = tmp_path / "m.sqlite"
    make_library(db, samples)

    async def later(request):
        asked.append(time.monotonic())
        if len(asked) == 1:
            return web.Response(status=429, headers={"Retry-After": "31536000"}, text="slow down")
        return web.Response(text="ok")
    app = web.Application()
    app.router.add_post("/later", later)
    async with serve(site.app()) as feeds, serve(app) as receiver:
        sinks = [{"name": "later", "type": "webhook", "url": f"{receiver}/later", "backoff_base": 0.05}]
        stop = asyncio.Event()
        task = asyncio.create_task(run_daemon(alert_config(feeds, receiver, db, tmp_path, alerts=sinks),
                                              stop=stop, install_signals=False))
        await until(lambda: Store(db).query("SELECT state FROM alerts") == [("delivered",)], 20)
        stop.set()
        await asyncio.wait_for(task, 30)
    assert len(asked) == 2 and asked[1] - asked[0] >= 0.45


@pytest.mark.slow  # two daemon runs and two CLI processes: ~3 s
async def test_dead_letters_are_kept_and_resendable(tmp_path, samples):
    site, recv = PhotoSite(samples), Receivers()
    site.post("rss", 1, ["small-chelsea.jpg"])
    db = tmp_path / "m.sqlite"
    make_library(db, samples)
    sinks = [{"name": "flaky", "type": "webhook", "url": "", "secret": SECRET,
              "max_attempts": 2, "backoff_base": 0.05}]
    async with serve(site.app()) as feeds, serve(recv.app()) as receivers:
        sinks[0]["url"] = f"{receivers}/down"
        stop = asyncio.Event()
        task = asyncio.create_task(run_daemon(alert_config(feeds, receivers, db, tmp_path, alerts=sinks),
                                              stop=stop, install_signals=False))
        await until(lambda: Store(db).query("SELECT state FROM alerts") == [("dead",)])
        stop.set()
        await asyncio.wait_for(task, 30)
        assert len(recv.down) == 2
        run = [sys.executable, "-m", "monitor", "alerts", "--db", str(db)]
        listed = subprocess.run(run + ["list", "--state", "dead"], capture_output=True, text=True)
        assert "flaky\tdead\tattempts=2" in listed.stdout and "HTTP 503" in listed.stdout
        assert listed.stdout.count("\n") == 1 and "\x1b" not in listed.stdout and "\u202e" not in listed.stdout
        assert "error=HTTP 503: down\\x1b]0;pwned\\x07\\x1b[2J\\n[ok] forged \\u202eexe.jpg" in listed.stdout
        resent = subprocess.run(run + ["resend"], capture_output=True, text=True)
        assert "1 dead alerts queued again" in resent.stdout
        # The receiver is fixed; the next start delivers the re-sent alert.
        sinks[0]["url"] = f"{receivers}/hooks/repost"
        stop = asyncio.Event()
        task = asyncio.create_task(run_daemon(alert_config(feeds, receivers, db, tmp_path, alerts=sinks),
                                              stop=stop, install_signals=False))
        await until(lambda: len(recv.webhook) == 1)
        stop.set()
        await asyncio.wait_for(task, 30)
    assert recv.webhook[0]["library"]["label"] == "library-chelsea"
    assert Store(db).query("SELECT state FROM alerts") == [("delivered",)]


@pytest.mark.slow
def test_sigkill_during_delivery_loses_and_duplicates_nothing(tmp_path, samples):
    """The daemon as a subprocess, killed with SIGKILL while delivering, three times."""
    import signal as sig
    import time as _time

    from PIL import Image

    from tests.test_daemon import jpeg, query

    site = PhotoSite(samples)
    n = 0
    for p in sorted(samples.glob("library-*.jpg")):
        with Image.open(p) as img:
            img = img.convert("RGB")
            for scale in (0.5, 0.6, 0.7):
                name = f"{p.stem}-{scale}.jpg"
                site.add_image(name, jpeg(img.resize((int(img.width * scale), int(img.height * scale)))),
                               p.stem)
                site.post("rss", n, [name])
                n += 1
    received: list[str] = []   # every request, duplicates included
    first_seen: list[str] = []

    async def slow_hook(request):
        await asyncio.sleep(0.15)  # a slow receiver widens the window a kill can land in
        key = request.headers["Idempotency-Key"]
        received.append(key)
        if key not in first_seen:
            first_seen.append(key)
        return web.Response(text="ok")

    db = tmp_path / "m.sqlite"
    make_library(db, samples)

    async def scenario():
        app = web.Application()
        app.router.add_post("/hook", slow_hook)
        async with serve(site.app()) as feeds, serve(app) as recv:
            cfg = tmp_path / "c.toml"
            cfg.write_text(
                f'[store]\npath = "{db}"\n[limits]\nallowed_networks = ["127.0.0.0/8"]\n'
                "[server]\nport = 0\n"
                f'[[feeds]]\nname = "rss"\ntype = "rss"\nurl = "{feeds}/rss.xml"\ninterval = 0.3\n'
                f'[[alerts]]\nname = "hook"\ntype = "webhook"\nurl = "{recv}/hook"\nbackoff_base = 0.1\n')
            cmd = [sys.executable, "-m", "monitor", "run", "--config", str(cfg)]
            log = open(tmp_path / "daemon.log", "wb")
            for kill_at in (2, 6, 10):
                proc = subprocess.Popen(cmd, stderr=log, stdout=subprocess.DEVNULL)
                await until(lambda k=kill_at: len(received) >= k, 60)
                await asyncio.sleep(0.07)  # land inside the next delivery
                proc.send_signal(sig.SIGKILL)
                proc.wait()
            proc = subprocess.Popen(cmd, stderr=log, stdout=subprocess.DEVNULL)
            await until(lambda: len(first_seen) == n, 90)
            await asyncio.sleep(0.5)
            proc.send_signal(sig.SIGTERM)
            proc.wait(timeout=30)
            log.close()
            assert proc.returncode == 0

    start = _time.monotonic()
    asyncio.run(scenario())
    assert _time.monotonic() - start < 120
    matches = query(db, "SELECT id FROM matches ORDER BY id")
    assert len(matches) == n
    keys = dict(query(db, "SELECT match_id, idempotency_key FROM alerts WHERE sink = 'hook'"))
    assert sorted(first_seen) == sorted(keys[m] for (m,) in matches)  # every alert arrived
    # In order per sink, and a re-send (same key) happens only for a delivery cut by the kill.
    assert first_seen == sorted(first_seen, key=lambda k: int(k.split("-")[1]))
    assert len(received) - len(first_seen) <= 3
    assert query(db, "SELECT state, COUNT(*) FROM alerts GROUP BY state") == [("delivered", n)]


@pytest.mark.slow  # waits out a stalled receiver
async def test_discord_embed_and_a_stalled_receiver_times_out(tmp_path, samples):
    site = PhotoSite(samples)
    site.post("json", 1, ["flip-rocket.jpg"])
    discord, stalled = [], []
    app = web.Application()

    async def discord_hook(request):
        discord.append(await request.json())
        return web.Response(status=204)

    async def stall(request):
        stalled.append(1)
        await asyncio.sleep(3)  # far past the sink timeout
        return web.Response(text="ok")

    app.router.add_post("/api/webhooks/1/abc", discord_hook)
    app.router.add_post("/stall", stall)
    db = tmp_path / "m.sqlite"
    make_library(db, samples)
    async with serve(site.app()) as feeds, serve(app) as recv:
        sinks = [{"name": "discord", "type": "discord", "url": f"{recv}/api/webhooks/1/abc",
                  "sources": ["json"]},
                 {"name": "slow", "type": "webhook", "url": f"{recv}/stall", "timeout": 0.5,
                  "max_attempts": 2, "backoff_base": 0.05},
                 {"name": "other-feeds-only", "type": "file", "path": str(tmp_path / "x.jsonl"),
                  "sources": ["rss"]}]
        stop = asyncio.Event()
        task = asyncio.create_task(run_daemon(alert_config(feeds, recv, db, tmp_path, alerts=sinks),
                                              stop=stop, install_signals=False))
        await until(lambda: len(discord) == 1 and Store(db).query(
            "SELECT state FROM alerts WHERE sink='slow'") == [("dead",)], timeout=30)
        stop.set()
        await asyncio.wait_for(task, 30)
    embed = discord[0]["embeds"][0]
    assert embed["title"] == "Repost of library-rocket" and embed["thumbnail"]["url"].endswith("flip-rocket.jpg")
    assert "mirrored" in discord[0]["content"]
    assert len(stalled) == 2
    err = Store(db).query("SELECT last_error FROM alerts WHERE sink='slow'")[0][0]
    assert "timed out after 0.5s" in err
    assert not (tmp_path / "x.jsonl").exists()  # its source filter let nothing through


def _detect(store, outbox, n_alerts, start=1):
    """Record matches through the real outbox, as the pipeline's _finish does."""
    import time as _t

    from monitor.pipeline import MatchRecord, WorkItem
    from monitor.records.library import LibraryEntry
    from monitor.search.matcher import Match
    entry = LibraryEntry(1, "/photos/a.jpg", "a", 100, 100, 0, 0, 0, 0, None, 0.0)
    with store.transaction() as conn:
        for n in range(start, start + n_alerts):
            url = f"http://reposts.example/{n}.jpg"
            conn.execute("INSERT INTO work (id, feed, item_id, image_url, discovered_at, state) "
                         "VALUES (?,?,?,?,?, 'done')", (n, "feed", str(n), url, _t.time()))
            match_id = conn.execute(
                "INSERT INTO matches (work_id, image_url, entry_id, tier, dhash_distance, phash_distance, "
                "mirrored, feed, item_id, detected_at) VALUES (?,?,?,?,?,?,?,?,?,?) RETURNING id",
                (n, url, 1, "near", 3, 4, 0, "feed", str(n), _t.time())).fetchone()[0]
            work = WorkItem(n, "feed", str(n), url, None, None, _t.time() - 5)
            outbox.enqueue(conn, MatchRecord(match_id, work, entry, Match(1, "near", 3, 4, False),
                                             _t.time()))
    outbox.committed()


@pytest.mark.slow  # a daemon run end to end: ~1-3 s (the fast tier keeps under its minute)
async def test_a_backlog_after_an_outage_drains_in_ordered_batches(store_location):
    from monitor.alerts.outbox import Outbox, SinkRule
    from monitor.alerts.sinks import SlackSink, WebhookSink
    from monitor.metrics import Metrics

    state = {"down": True}
    hook_requests: list[list[str]] = []   # alert keys per accepted request
    probes: list[int] = []                # alerts per refused request
    slack_messages: list[dict] = []

    async def hook(request):
        body = await request.read()
        ts = request.headers["X-Repost-Monitor-Timestamp"]
        want = "v1=" + hmac.new(SECRET.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(want, request.headers["X-Repost-Monitor-Signature"])
        alerts = json.loads(body)["alerts"]
        assert request.headers["X-Repost-Monitor-Alert-Keys"].split(",") == [
            a["idempotency_key"] for a in alerts]
        if state["down"]:
            probes.append(len(alerts))
            # an endpoint's error body is not ours: it must not drive the operator's terminal
            return web.Response(status=503, text="down\x1b]0;pwned\x07\x1b[2J\n[ok] forged \u202eexe.jpg")
        hook_requests.append([a["idempotency_key"] for a in alerts])
        return web.Response(text="ok")

    async def slack(request):
        if state["down"]:
            return web.Response(status=500, text="oops")
        slack_messages.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_post("/slack", slack)
    store = open_store(store_location)
    rule = SinkRule(backoff_base=0.05, backoff_max=0.2, max_attempts=1000)
    async with serve(app) as recv:
        outbox = Outbox(store, [(WebhookSink("hook", f"{recv}/hook", secret=SECRET, batch_size=50), rule),
                                (SlackSink("slack", f"{recv}/slack", batch_size=40), rule)],
                        Metrics(), flood_max=10**6)
        stop = asyncio.Event()
        sender = asyncio.create_task(outbox.run(stop))
        _detect(store, outbox, 30)
        await until(lambda: len(probes) >= 5)
        _detect(store, outbox, 90, start=31)   # more arrive while the sinks are down
        await asyncio.sleep(0.3)
        state["down"] = False
        await until(lambda: not store.query("SELECT 1 FROM alerts WHERE state='pending'"), 20)
        stop.set()
        await sender
    # While down only the head was retried, never a whole batch (after the first try).
    assert probes[0] >= 1 and set(probes[1:]) == {1}
    keys = [k for req in hook_requests for k in req]
    matches = [m for (m,) in store.query("SELECT id FROM matches ORDER BY id")]
    stored = dict(store.query("SELECT match_id, idempotency_key FROM alerts WHERE sink = 'hook'"))
    assert keys == [stored[m] for m in matches]       # every alert once, in order
    assert all(re.fullmatch(rf"rm-{m}-hook-[0-9a-f]{{8}}", stored[m]) for m in matches)
    assert len(hook_requests) <= 4 and max(len(r) for r in hook_requests) == 50
    sections = [b for msg in slack_messages for b in msg["blocks"] if b["type"] == "section"]
    assert len(sections) == 120 and all(len(msg["blocks"]) <= 50 for msg in slack_messages)
    digests = [msg for msg in slack_messages if msg["blocks"][0]["type"] == "header"]
    assert digests and digests[0]["blocks"][0]["text"]["text"].endswith("reposts found")
    assert store.query("SELECT state, COUNT(*) FROM alerts GROUP BY state") == [("delivered", 240)]
