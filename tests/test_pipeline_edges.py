"""One bad thing never stops the good things beside it: malformed feed items, URLs the
HTTP client chokes on, a read-only store, restored backups, hostile redirects and
addresses; and what users read: Slack and Discord text, logs, metrics, reports, docs."""

import asyncio
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
from aiohttp import web

from monitor.addresses import AddressGuard
from monitor.alerts.sinks import DiscordSink, SlackSink
from monitor.config import Config, parse_config
from monitor.daemon import run_daemon
from monitor.fetch import Fetcher, FetchError, FetchLimits
from monitor.logs import RepeatFilter
from monitor.metrics import Metrics
from monitor.records.store import Store
from tests.conftest import ROOT
from tests.hosts import Tarpit, serve
from tests.test_daemon import PhotoSite, config_for, make_library, query, until


def one_feed(base, db, feed, **extra):
    cfg = config_for(base, db, **extra)
    return cfg.model_copy(update={"feeds": [f for f in cfg.feeds if f.name == feed]})


class HostileFeeds(PhotoSite):
    """An RSS feed and a JSON Feed where one item in six is malformed."""

    def app(self):
        app = super().app()
        site = self

        async def rss(request):
            base = f"http://{request.host}"
            good = "".join(f'<item><guid>g{i}</guid><link>{base}/p/{i}</link>'
                           f'<enclosure url="{base}/img/{name}" type="image/jpeg" length="1"/></item>'
                           for i, name in enumerate(site.good))
            bad = ('<item><guid>bad</guid><enclosure url="http://[::1/x.jpg" type="image/jpeg" length="1"/>'
                   '<description>&lt;img src="http://[::1/y.jpg"&gt;</description></item>')
            return web.Response(text='<?xml version="1.0"?><rss version="2.0"><channel><title>x</title>'
                                + bad + good + "</channel></rss>", content_type="application/rss+xml")

        async def jsonfeed(request):
            base = f"http://{request.host}"
            items = [{"id": "a", "authors": 5, "image": f"{base}/img/{site.good[0]}"},
                     {"id": "b", "url": 12345, "image": f"{base}/img/{site.good[1]}"},
                     {"id": "c", "image": "http://[::1/x.jpg"},
                     {"id": "d", "image": f"http://{'a' * 64}.example/x.jpg"},
                     "not an item", {"id": {"nested": True}, "attachments": 7}]
            items += [{"id": f"g{i}", "image": f"{base}/img/{name}"} for i, name in enumerate(site.good[2:])]
            return web.json_response({"version": "https://jsonfeed.org/version/1.1", "items": items})

        app.router.add_get("/hostile.xml", rss)
        app.router.add_get("/hostile.json", jsonfeed)
        return app


async def test_a_bad_item_is_skipped_and_counted_and_the_rest_kept(tmp_path, samples):
    site = HostileFeeds(samples)
    site.good = ["small-chelsea.jpg", "flip-rocket.jpg", "q30-coffee.jpg", "other-apple.jpg",
                 "other-baboon.jpg"]
    db = tmp_path / "m.sqlite"
    make_library(db, samples)
    async with serve(site.app()) as base:
        cfg = config_for(base, db)
        feeds = [{"name": "xml", "type": "rss", "url": f"{base}/hostile.xml", "interval": 0.3},
                 {"name": "jf", "type": "jsonfeed", "url": f"{base}/hostile.json", "interval": 0.3}]
        cfg = parse_config({**cfg.model_dump(), "feeds": feeds})
        stop, running = asyncio.Event(), {}
        task = asyncio.create_task(run_daemon(cfg, stop=stop, on_ready=lambda r: running.update(r=r),
                                              install_signals=False))
        await until(lambda: query(db, "SELECT COUNT(*) FROM work WHERE state != 'pending'")[0][0] >= 10)
        await asyncio.sleep(0.5)  # a few more polls: none of them backs off
        metrics = running["r"].metrics.render().decode()
        stop.set()
        await asyncio.wait_for(task, 30)
    by_feed = dict(query(db, "SELECT feed, COUNT(*) FROM work GROUP BY feed"))
    assert by_feed == {"xml": 5, "jf": 5}  # every good item of both feeds got its work row
    # the same 3 reposts in each feed: the same image URLs, fetched and matched once
    assert query(db, "SELECT COUNT(*) FROM matches")[0][0] == 3
    assert query(db, "SELECT feed, consecutive_failures FROM feed_state ORDER BY feed") == [("jf", 0), ("xml", 0)]
    assert 'repost_monitor_feed_polls_total{feed="xml",result="error"} 0.0' in metrics
    assert 'repost_monitor_feed_items_skipped_total{feed="xml",reason="bad_url"}' in metrics
    assert 'repost_monitor_feed_items_skipped_total{feed="jf",reason="malformed_item"}' in metrics
    skipped_jf = [line for line in metrics.splitlines() if line.startswith(
        'repost_monitor_feed_items_skipped_total{feed="jf",reason="bad_url"}')]
    assert float(skipped_jf[0].split()[-1]) >= 2


async def test_a_pending_row_that_cannot_be_fetched_ends_failed_with_its_reason(tmp_path, samples):
    """A row left by an older version (its URL no client can encode) is resumed and closed."""
    db = tmp_path / "m.sqlite"
    make_library(db, samples)
    store = Store(db)
    bad = f"http://{'a' * 64}.example/x.jpg"
    with store.transaction() as conn:
        conn.execute("INSERT INTO work (feed, item_id, image_url, discovered_at) VALUES ('old', '1', ?, 0)",
                     (bad,))
    store.close()
    async with serve(PhotoSite(samples).app()) as base:
        stop = asyncio.Event()
        task = asyncio.create_task(run_daemon(one_feed(base, db, "rss"), stop=stop, install_signals=False))
        await until(lambda: query(db, "SELECT state FROM work")[0][0] != "pending")
        stop.set()
        await asyncio.wait_for(task, 30)
    state, error = query(db, "SELECT state, error FROM work")[0]
    assert state == "failed" and error.startswith("bad_url")


@pytest.mark.slow  # ~2.5 s
def test_a_read_only_store_fails_at_start_naming_the_file(tmp_path, samples):
    db = tmp_path / "m.sqlite"
    make_library(db, samples)
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[store]\npath = "{db}"\n[server]\nenabled = false\n')
    immutable = os.geteuid() == 0  # root writes through file modes: make the file immutable
    if immutable:
        if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
            pytest.skip("LOUD SKIP: running as root and chattr +i is not supported here")
    else:
        os.chmod(db, 0o444)
    try:
        r = subprocess.run([sys.executable, "-m", "monitor", "run", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=120)
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(db)], check=True)
    assert r.returncode == 2, r.stderr
    assert str(db) in r.stderr and ("read-only" in r.stderr or "readonly" in r.stderr
                                    or "cannot be written" in r.stderr or "cannot open" in r.stderr), r.stderr
    assert "Traceback" not in r.stderr


async def test_idempotency_keys_differ_after_restoring_a_backup(tmp_path, samples):
    site = PhotoSite(samples)
    db, backup = tmp_path / "m.sqlite", tmp_path / "backup.sqlite"
    make_library(db, samples)
    shutil.copy(db, backup)
    cfg_alerts = {"alerts": [{"name": "out", "type": "file", "path": str(tmp_path / "a.jsonl")}]}
    keys = []
    async with serve(site.app()) as base:
        for image in ("small-chelsea.jpg", "flip-rocket.jpg"):  # run, restore, run on another picture
            site.posts[:] = [{"feed": "rss", "n": len(keys), "images": [image]}]
            stop = asyncio.Event()
            task = asyncio.create_task(run_daemon(one_feed(base, db, "rss", **cfg_alerts), stop=stop,
                                                  install_signals=False))
            await until(lambda: query(db, "SELECT COUNT(*) FROM alerts WHERE state='delivered'")[0][0] == 1)
            keys += [k for (k,) in query(db, "SELECT idempotency_key FROM alerts")]
            stop.set()
            await asyncio.wait_for(task, 30)
            shutil.copy(backup, db)
            for suffix in ("-wal", "-shm"):
                (tmp_path / f"m.sqlite{suffix}").unlink(missing_ok=True)
    assert len(keys) == 2 and keys[0] != keys[1]
    assert all(k.startswith("rm-1-out-") for k in keys)  # the same match id, different keys


async def test_credentials_stay_with_their_origin_across_redirects():
    seen = {}

    async def feed_a(request):
        seen["a"] = request.headers.get("Authorization")
        target = request.query.get("to")
        raise web.HTTPFound(target)

    async def feed_b(request):
        seen.setdefault("b", []).append((request.headers.get("Authorization"),
                                         request.headers.get("X-Api-Key")))
        return web.Response(text="<rss/>", content_type="application/rss+xml")

    app_a, app_b = web.Application(), web.Application()
    app_a.router.add_get("/feed", feed_a)
    app_a.router.add_get("/same", feed_b)
    app_b.router.add_get("/feed", feed_b)
    runners = []
    for app, host in ((app_a, "127.0.0.5"), (app_b, "127.0.0.6")):
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, host, 0)
        await site.start()
        runners.append((runner, site._server.sockets[0].getsockname()[1]))
    (ra, pa), (rb, pb) = runners
    try:
        async with Fetcher(FetchLimits(allowed_networks=("127.0.0.0/8",), retries=0)) as f:
            creds = {"Authorization": "Bearer feed-secret", "X-Api-Key": "k"}
            await f.fetch_feed(f"http://127.0.0.5:{pa}/feed?to=http://127.0.0.6:{pb}/feed", headers=creds)
            await f.fetch_feed(f"http://127.0.0.5:{pa}/feed?to=/same", headers=creds)
    finally:
        await ra.cleanup()
        await rb.cleanup()
    assert seen["a"] == "Bearer feed-secret"
    assert seen["b"] == [(None, None), ("Bearer feed-secret", "k")]  # cross-origin: dropped; same: kept


@pytest.mark.parametrize("host", ["[::127.0.0.1]", "[64:ff9b::7f00:1]", "[2002:7f00:1::]", "[::ffff:127.0.0.1]",
                                  "[2001:0:4136:e378:8000:63bf:80ff:fffe]", "[64:ff9b::a9fe:a9fe]"])
async def test_ipv6_forms_of_private_ipv4_are_refused(host):
    assert not AddressGuard().allows(host.strip("[]"))
    async with Fetcher(FetchLimits(retries=0)) as f:
        with pytest.raises(FetchError) as err:
            await f.fetch_image(f"http://{host}:9/x.jpg")
    assert err.value.reason == "blocked_address"
    assert AddressGuard().allows("64:ff9b::808:808")  # NAT64 of a public address is public


@pytest.mark.slow  # waits out a host's rate limit on purpose
async def test_download_time_excludes_the_wait_for_the_host_rate_limit(samples):
    data = (samples / "other-apple.jpg").read_bytes()
    app = web.Application()

    async def image(request):
        return web.Response(body=data, content_type="image/jpeg")
    app.router.add_get("/{n}.jpg", image)
    metrics = Metrics()
    async with serve(app) as base:
        limits = FetchLimits(allowed_networks=("127.0.0.0/8",), per_host_rate=2.0, retries=0)
        async with Fetcher(limits, observe=metrics.observe_fetch) as f:
            await asyncio.gather(*(f.fetch_image(f"{base}/{i}.jpg") for i in range(6)))
    download = metrics.download_seconds.collect()[0].samples
    wait = metrics.throttle_wait_seconds.collect()[0].samples
    get = lambda samples_, suffix: next(s.value for s in samples_ if s.name.endswith(suffix))  # noqa: E731
    assert get(download, "_count") == 6 and get(wait, "_count") == 6
    assert get(download, "_sum") < 1.0      # loopback transfers of 80 KB
    assert get(wait, "_sum") > 1.0          # 6 requests at 2 per second wait their turn


def test_slack_and_discord_text_cannot_ping_or_break_formatting():
    alert = {"idempotency_key": "rm-1-s-00", "tier": "near", "distance_bits": 3, "decided_by": "dhash",
             "mirrored": False, "detected_at": "2026-11-30T00:00:00+00:00",
             "library": {"label": "my__label_*bold*", "source": "https://ex.org/a.jpg?x=1&y=<2>"},
             "repost": {"image_url": "https://cdn.ex/p.jpg", "page_url": "https://ex.org/p|<!here>",
                        "source": "feed<@U123>", "author": "<!channel> user0 & co"}}
    slack = json.dumps(SlackSink("s", "https://hooks.example").body([alert]))
    for raw in ("<!channel>", "<!here>", "<@U123>", "y=<2>"):
        assert raw not in slack, raw
    assert "&lt;!channel&gt; user0 &amp; co" in slack
    digest = json.dumps(SlackSink("s", "https://hooks.example").body([alert, alert]))
    assert "<!channel>" not in digest
    section = SlackSink("s", "u").body([alert])["blocks"][0]["text"]["text"]
    label = section.split("Repost of _", 1)[1].split("_*", 1)[0]
    assert "_" not in label.replace("_\u200b", "") and "*" not in label.replace("*\u200b", "")
    discord = DiscordSink("d", "https://discord.example").body([dict(alert, library={
        "label": "[claim your prize](https://evil.example) ||x||", "source": "s"})])
    assert discord["allowed_mentions"] == {"parse": []}
    for text in (discord["content"], discord["embeds"][0]["title"], discord["embeds"][0]["description"]):
        assert "[claim your prize](" not in text and "||x||" not in text
        assert "\\[claim your prize\\]\\(" in text


def test_a_flood_of_one_log_line_is_rate_limited(capsys):
    clock = [0.0]
    logger = logging.getLogger("rm-test-flood")
    handler = logging.StreamHandler()
    handler.addFilter(RepeatFilter(burst=5, window=60, clock=lambda: clock[0]))
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for _ in range(10_000):
            logger.error("socket.accept() out of system resource")
        logger.error("something else")
        clock[0] = 61.0
        logger.error("socket.accept() out of system resource")
    finally:
        logger.removeHandler(handler)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 5 + 1 + 1
    assert lines[-1] == "socket.accept() out of system resource [9995 more like this in the last 60 s]"


def test_example_config_documents_every_key():
    text = (ROOT / "examples" / "config.toml").read_text()
    uncommented = "\n".join(line.lstrip("# ") if line.lstrip().startswith("#") else line
                            for line in text.splitlines())

    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            ann = field.annotation
            inner = getattr(ann, "__args__", (ann,))
            sub = next((a for a in inner if isinstance(a, type) and hasattr(a, "model_fields")), None)
            if sub is not None:
                yield from keys(sub, f"{prefix}{name}.")
            else:
                yield prefix + name
    missing = [k for k in keys(Config) if not any(
        line.strip().startswith(k.rsplit(".", 1)[-1] + " ") or line.strip().startswith(k.rsplit(".", 1)[-1] + "=")
        for line in uncommented.splitlines())]
    assert not missing, f"examples/config.toml lacks {missing}"
    sections = {k.split(".", 1)[0] for k in keys(Config)}
    for section in sections:
        assert f"[{section}]" in uncommented or f"[[{section}]]" in uncommented, section
    tomllib.loads(text)  # and it is valid TOML as shipped


def test_report_grids_show_the_views_that_matched_and_name_unreadable_inputs(tmp_path, samples):
    """The grid of differing dHash bits is drawn from the two views that met: its red
    cells are the distance reported beside it (a cropped repost matched through a crop
    view used to show the whole pictures' 20-odd differing bits)."""
    import re

    from PIL import Image

    from monitor.search.matcher import PRESETS
    from monitor.tools.batch import match_files, open_library, write_report
    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in sorted(samples.glob("library-*.jpg")):
        with Image.open(p) as img:
            w, h = img.size
            img.convert("RGB").crop((w // 8, h // 8, w - w // 8, h - h // 8)).save(inputs / f"crop-{p.name}")
    (inputs / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 100)
    library = open_library(str(samples), None, False, open(os.devnull, "w"))
    rows, bad = match_files([str(inputs)], library, PRESETS["near"], best=True, progress=False,
                            log=open(os.devnull, "w"))
    assert len(rows) >= 4 and any(r.match.dhash_distance > 0 for r in rows)
    report = tmp_path / "r.html"
    write_report(str(report), rows, bad)
    page = report.read_text()
    cards = [c for c in page.split('<div class="card"')[1:] if 'class="bits"' in c]
    assert len(cards) == len(rows)
    for card in cards:
        shown = int(re.search(r"dHash (\d+)/64 bits", card).group(1))
        assert card.count('class="bd"') == shown
    assert "broken.jpg" in page and 'data-kind="unreadable"' in page


def test_avif_is_decoded_where_feeds_offer_it(samples):
    """Feeds take .avif links: the fetcher and the decoder take the files too."""
    import io

    from PIL import Image

    from monitor.fetch import image_magic_ok
    from monitor.fingerprints import fingerprint_bytes
    from monitor.fingerprints.core import AVIF
    if not AVIF:
        pytest.skip("LOUD SKIP: this Pillow was built without AVIF")
    with Image.open(samples / "library-coffee.jpg") as img:
        buf = io.BytesIO()
        img.save(buf, "AVIF", quality=80)
    data = buf.getvalue()
    assert image_magic_ok(data[:16])
    avif = fingerprint_bytes(data)
    jpeg = fingerprint_bytes((samples / "library-coffee.jpg").read_bytes())
    assert (avif.dhash ^ jpeg.dhash).bit_count() <= 6


def test_untrusted_text_cannot_forge_a_text_log_line(capsys):
    """A feed's text in a log message (a title, an exception from hostile input) stays on one line."""
    from monitor.logs import setup_logging
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("text", "info")
        logging.getLogger("rm-test-forge").warning("feed %s: skipped %s", "blog",
                                                   "item #3\n12:00:00 ERROR    repost_monitor: forged\x1b[2J")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\\n12:00:00 ERROR" in err and "\x1b" not in err


def test_untrusted_text_in_a_traceback_cannot_forge_a_log_line(capsys):
    """A parser's exception quoting hostile input (a newline, an ESC sequence, a bidi override)
    in a logged traceback, its note and its cause: the
    traceback keeps its own lines, the messages are escaped."""
    from monitor.logs import setup_logging
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    forged = "\n12:00:00 ERROR    repost_monitor: forged\x1b[2J\u202e"
    try:
        setup_logging("text", "info")
        try:
            try:
                raise KeyError("inner" + forged)
            except KeyError as inner:
                err = ValueError("bad item" + forged)
                err.add_note("note" + forged)
                raise err from inner
        except ValueError:
            logging.getLogger("rm-test-forge").exception("feed %s: unexpected error", "blog")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    err = capsys.readouterr().err
    assert "Traceback (most recent call last):" in err and "ValueError: bad item\\n12:00:00 ERROR" in err
    assert "note\\n12:00:00" in err and "inner\\n12:00:00" in err
    assert not any(line.startswith("12:00:00") for line in err.splitlines())
    assert "\x1b" not in err and "\u202e" not in err


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_untrusted_text_cannot_drive_a_terminal_through_the_logs(capsys, fmt):
    """C1 controls (U+009B opens an escape sequence by itself) and the bidirectional overrides
    (a name read backwards) are escaped in both log formats; JSON stays the same JSON."""
    from monitor.logs import setup_logging
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    hostile = "author \x9b2J \u202egpj.exe \u2028next"
    try:
        setup_logging(fmt, "info")
        logging.getLogger("rm-test-forge").warning("by %s", hostile)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not any(c in err for c in "\x9b\u202e\u2028")
    if fmt == "json":
        assert json.loads(err)["msg"] == f"by {hostile}"
    else:
        assert "by author \\x9b2J \\u202egpj.exe \\u2028next" in err


async def seconds_to_find_a_repost(cfg, site: PhotoSite, ready, settle: float = 0.0, linger=None) -> float:
    """Run the daemon until ``ready()`` (and ``settle`` s more), post a repost on the site's JSON
    feed: the seconds until it is recorded (the daemon then stopped once ``linger()``, if given)."""
    import time
    records, stop = [], asyncio.Event()
    task = asyncio.create_task(run_daemon(cfg, stop=stop, on_match=records.append, install_signals=False))
    await until(ready, 30)
    await asyncio.sleep(settle)
    site.post("json", 1, ["small-chelsea.jpg"])
    posted = time.monotonic()
    await until(lambda: records, timeout=60)
    found_after = time.monotonic() - posted
    if linger is not None:
        await until(linger, 60)
    stop.set()
    await asyncio.wait_for(task, 60)
    assert [r.entry.label for r in records] == ["library-chelsea"]
    return found_after


@pytest.mark.slow  # eight feeds of dense markup, ~2 s of CPU each to parse: ~20 s
async def test_large_feeds_being_parsed_do_not_hold_up_the_store_or_the_small_feeds(tmp_path, samples, caplog):
    """Eight feeds of 640 KB of dense markup (~2 s of feedparser each, the GIL held) polled
    every 0.1 s: on the loop's default threads their parses held all six, and every store
    call (work rows, the recorder's writes) and every small feed's parse waited behind them
    (13.7 s for a repost on a small feed). Parsed in two processes of their own, the repost is
    recorded at once; and a feed whose parse took more than a second of CPU is polled again
    only after 20 times that (its parsing keeps to 5% of a core), so each was parsed once, the
    one refused as no feed after its parse too (its backoff alone would have polled it again)."""
    body = (b'<?xml version="1.0"?><rss version="2.0"><channel><title>big</title><item><title>x</title>'
            b"<link>http://127.0.0.1/x</link><description>" + b"<b>.</b>" * 80_000
            + b"</description></item></channel></rss>")
    no_feed = b'<?xml version="1.0"?><html><body><p>' + b"<b>.</b>" * 100_000 + b"</p></body></html>"
    served = []

    async def big_feed(request):  # the last is no feed at all, refused once parsed
        served.append(request.match_info["n"])
        return web.Response(body=no_feed if request.match_info["n"] == "7" else body,
                            content_type="application/rss+xml")
    big = web.Application()
    big.router.add_get("/big/{n}.xml", big_feed)
    site = PhotoSite(samples)
    db = tmp_path / "m.sqlite"
    make_library(db, samples)
    caplog.set_level(logging.WARNING, logger="repost_monitor.pipeline")

    def spaced():
        return [r.getMessage() for r in caplog.records if "its next poll waits" in r.getMessage()]
    async with serve(site.app()) as base, serve(big) as big_base:
        cfg = config_for(base, db)
        feeds = [{"name": f"big{n}", "type": "rss", "url": f"{big_base}/big/{n}.xml", "interval": 0.1, "jitter": 0}
                 for n in range(8)] + [{"name": "json", "type": "jsonfeed", "url": f"{base}/feed.json",
                                        "interval": 0.2}]
        cfg = parse_config({**cfg.model_dump(), "feeds": feeds})
        # once the large feeds are being parsed
        found_after = await seconds_to_find_a_repost(cfg, site, lambda: len(served) >= 8, settle=0.5,
                                                     linger=lambda: len(spaced()) >= 8)
    assert found_after < 3, f"the repost waited {found_after:.1f} s behind the large feeds' parses"
    assert sorted(served) == [str(n) for n in range(8)]  # each polled once: the next poll is minutes away
    assert len(spaced()) == 8 and all(re.search(r"took [1-9][\d.]* s of CPU; its next poll waits [2-9]\d+ s", m)
                                      for m in spaced()), spaced()


@pytest.mark.slow  # a tarpit's backlog: ~10 s
async def test_a_slow_image_host_does_not_hold_up_the_other_hosts_images(tmp_path, samples):
    """A host that answers every image slowly (a tarpit, an overloaded CDN) and lists hundreds of
    them: its images are fetched a few at a time, and a repost on another host is found at once,
    not after the tarpit's backlog (FIFO: 200 images x 1 s / 16 workers = 13 s)."""

    from PIL import Image

    from tests.test_daemon import jpeg

    tarpit = Tarpit(jpeg(Image.open(samples / "other-apple.jpg")))
    site = PhotoSite(samples)
    db = tmp_path / "m.sqlite"
    make_library(db, samples)
    async with serve(site.app()) as base, tarpit.serve() as tarpit_base:
        cfg = config_for(base, db)
        feeds = [{"name": "tarpit", "type": "jsonfeed", "url": f"{tarpit_base}/feed.json", "interval": 60},
                 {"name": "json", "type": "jsonfeed", "url": f"{base}/feed.json", "interval": 0.2}]
        cfg = parse_config({**cfg.model_dump(), "feeds": feeds,
                            "limits": {**cfg.limits.model_dump(), "per_host_rate": 100.0, "read_timeout": 5,
                                       "per_host_workers": 4}})
        # once the tarpit's images fill the queue
        found_after = await seconds_to_find_a_repost(cfg, site, lambda: tarpit.now > 0, settle=1.5)
    assert found_after < 4, f"the repost waited {found_after:.1f} s behind the tarpit's images"
    assert tarpit.most <= 4


async def test_the_queues_count_of_rows_wanted_holds_through_random_traffic():
    """wanted() is kept incrementally (it is asked at each row handed out): after each of 3,000
    random offers, takes and downloads ended over 40 hosts it equals the plain count, the idle
    workers less the rows waiting whose host has a download to spare."""
    import random

    from monitor.pipeline.transport import InProcessTransport, _host
    from monitor.records.work import WorkItem
    rng, stop = random.Random(7), asyncio.Event()
    queue = InProcessTransport(size=200, per_host=3)
    in_hand = []
    for n in range(3000):
        step = rng.random()
        if step < 0.5:
            queue.offer(WorkItem(n, "f", str(n), f"https://h{rng.randrange(40)}.example/{n}.jpg", None, None, None))
        elif step < 0.75 and queue.depth():
            async with asyncio.timeout(0.5):
                got = asyncio.create_task(queue.get(stop))
                await asyncio.sleep(0)
                if got.done():
                    in_hand.append(got.result())
                else:
                    got.cancel()
        elif in_hand:
            queue.downloaded(in_hand.pop(rng.randrange(len(in_hand))))
        fetching = {}
        for w in in_hand:
            fetching[_host(w)] = fetching.get(_host(w), 0) + 1
        plain = sum(min(len(rows), queue.per_host - fetching.get(h, 0)) for h, rows in queue._waiting.items())
        assert queue.wanted() == -plain, n


async def test_the_queue_hands_out_rows_host_by_host_within_each_hosts_limits():
    """The in-process queue: hosts in turn, at most per_host rows of one host being worked on, at
    most half of size of one host waiting (its watcher waits; another host's does not)."""
    from monitor.pipeline.transport import InProcessTransport
    from monitor.records.work import WorkItem

    def row(n, host):
        return WorkItem(n, "f", str(n), f"https://{host}/{n}.jpg", None, None, None)
    queue, stop = InProcessTransport(size=20, per_host=2), asyncio.Event()
    for n in range(10):
        await queue.put(row(n, "slow.example"))
    with pytest.raises(TimeoutError):  # slow.example has its 10 (half of 20) waiting
        async with asyncio.timeout(0.2):
            await queue.put(row(10, "slow.example"))
    await queue.put(row(100, "cdn.example"))
    await queue.put(row(101, "cdn.example"))
    taken = [await queue.get(stop) for _ in range(4)]
    assert [w.id for w in taken] == [0, 100, 1, 101] and queue.depth() == 8
    with pytest.raises(TimeoutError):  # both of slow.example's are being worked on
        async with asyncio.timeout(0.2):
            await queue.get(stop)
    queue.done(taken[0])
    assert (await queue.get(stop)).id == 2
    await queue.put(row(11, "slow.example"))  # a place was taken: slow.example's watcher goes on
    # What a reader of a shared stream (a scaled-out fetch worker) asks: a row offered where its
    # host has its share waiting is refused, not waited for; and how many more rows the workers
    # could start now (those waiting for one, less the rows whose host has a download to spare)
    assert queue.offer(row(12, "slow.example")) and queue.offer(row(13, "slow.example"))
    assert not queue.offer(row(14, "slow.example")) and queue.offer(row(102, "cdn.example"))
    assert queue.wanted() == 0  # each host has its two in hand
    queue.done(taken[1])
    assert queue.wanted() == -1  # cdn.example's row could start now
    moved = asyncio.create_task(queue.moved())
    await asyncio.sleep(0)
    getters = [asyncio.create_task(queue.get(stop)) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert moved.done() and [g.done() for g in getters] == [True, False, False]
    assert queue.wanted() == 2  # two workers wait, and every row left is slow.example's
    stop.set()
    assert await queue.get(stop) is None
    assert [await g for g in getters][1:] == [None, None]
