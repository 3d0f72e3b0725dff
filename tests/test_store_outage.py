"""The store failing under a running daemon (a full disk: a real tmpfs filled up) loses no
repost: the images being recorded then are put back on the queue after a pause, and recorded
once the store can be written again; the feed's polls fail with a clear error and resume."""

from __future__ import annotations

import asyncio
import io
import logging
import sqlite3
import subprocess
import time

import pytest
from aiohttp import web
from PIL import Image

from monitor.config import parse_config
from monitor.daemon import run_daemon
from tests.hosts import serve
from tests.test_daemon import config_for, make_library, until


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (root only: skipped elsewhere), unmounted after."""
    where = tmp_path / "small"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(where)],
                      capture_output=True).returncode != 0:
        pytest.skip("a tmpfs cannot be mounted here (needs root)")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def fill(where) -> None:
    with open(where / "fill", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:  # ENOSPC: full
            pass


def repost(samples) -> bytes:
    """A smaller JPEG of a protected picture."""
    img = Image.open(samples / "library-chelsea.jpg")
    img.thumbnail((300, 300))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=80)
    return out.getvalue()


@pytest.mark.slow  # a store outage of a few seconds and the pauses after it: ~15 s
async def test_images_recorded_while_the_disk_is_full_are_recorded_once_it_is_not(small_disk, samples, caplog):
    db = small_disk / "m.sqlite"
    make_library(db, samples)
    data = repost(samples)
    posts: list[int] = []

    async def feed(request):
        base = f"http://{request.host}"
        return web.json_response({"version": "https://jsonfeed.org/version/1.1", "title": "t", "items": [
            {"id": f"j{n}", "url": f"{base}/p/{n}", "image": f"{base}/slow/{n}.jpg"} for n in posts]})

    async def slow_image(request):  # downloads under way when the disk fills
        await asyncio.sleep(1.0)
        return web.Response(body=data, content_type="image/jpeg")
    app = web.Application()
    app.router.add_get("/feed.json", feed)
    app.router.add_get("/slow/{n}.jpg", slow_image)
    caplog.set_level(logging.ERROR, logger="repost_monitor.pipeline")
    records = []
    async with serve(app) as base:
        cfg = config_for(base, db)
        cfg = parse_config({**cfg.model_dump(), "feeds": [{"name": "json", "type": "jsonfeed", "interval": 0.2,
                                                           "max_backoff": 2, "url": f"{base}/feed.json"}]})
        stop = asyncio.Event()
        task = asyncio.create_task(run_daemon(cfg, stop=stop, on_match=records.append, install_signals=False))
        posts.append(1)
        await until(lambda: records, 60)
        posts.extend(range(2, 8))
        await until(lambda: sqlite3.connect(db).execute("SELECT COUNT(*) FROM work").fetchone()[0] == 7, 30)
        fill(small_disk)  # the six are downloading: their recording fails
        await until(lambda: sum("the store failed" in r.getMessage() and "tried again" in r.getMessage()
                                for r in caplog.records) >= 6, 30)
        await asyncio.sleep(2)
        assert len(records) == 1 and not task.done()
        (small_disk / "fill").unlink()
        freed = time.monotonic()
        await until(lambda: len(records) == 7, 60)
        recovered_in = time.monotonic() - freed
        stop.set()
        await asyncio.wait_for(task, 60)
    assert recovered_in < 30  # the pause: 5 s doubling while the disk stayed full
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT state, COUNT(*) FROM work GROUP BY state").fetchall() == [("done", 7)]
    assert {r.entry.label for r in records} == {"library-chelsea"}
    messages = [r.getMessage() for r in caplog.records]
    assert any("feed json: the store failed" in m for m in messages)  # the polls said so, and went on
    assert not any("unexpected error" in m for m in messages)


@pytest.mark.slow  # ~10 s
async def test_an_alert_delivered_while_the_disk_is_full_is_marked_once_it_is_not(small_disk, samples, caplog):
    """The webhook answers while the disk is full, so the delivery cannot be marked: the sender
    says so and tries again (the alert sent again: at least once), and the daemon goes on."""
    db = small_disk / "m.sqlite"
    make_library(db, samples)
    data = repost(samples)
    received, answering = [], asyncio.Event()

    async def feed(request):
        return web.json_response({"version": "https://jsonfeed.org/version/1.1", "title": "t", "items": [
            {"id": "j1", "url": f"http://{request.host}/p/1", "image": f"http://{request.host}/img/1.jpg"}]})

    async def image(request):
        return web.Response(body=data, content_type="image/jpeg")

    async def hook(request):
        received.append(await request.json())
        if len(received) == 1:  # the disk fills while the first delivery is under way
            answering.set()
            await asyncio.sleep(1.0)
        return web.Response(status=200)
    app = web.Application()
    app.router.add_get("/feed.json", feed)
    app.router.add_get("/img/1.jpg", image)
    app.router.add_post("/hook", hook)
    caplog.set_level(logging.ERROR, logger="repost_monitor")
    async with serve(app) as base:
        cfg = config_for(base, db)
        cfg = parse_config({**cfg.model_dump(), "feeds": [{"name": "json", "type": "jsonfeed", "interval": 0.5,
                                                           "url": f"{base}/feed.json"}],
                            "alerts": [{"name": "hook", "type": "webhook", "url": f"{base}/hook"}]})
        stop = asyncio.Event()
        task = asyncio.create_task(run_daemon(cfg, stop=stop, install_signals=False))
        await until(answering.is_set, 60)
        fill(small_disk)
        await asyncio.sleep(3)
        assert not task.done(), task.exception() if task.done() else None
        (small_disk / "fill").unlink()

        def delivered():
            return sqlite3.connect(db).execute("SELECT state FROM alerts").fetchall() == [("delivered",)]
        await until(delivered, 60)
        stop.set()
        await asyncio.wait_for(task, 60)
    assert {r["alert_id"] for r in received} == {received[0]["alert_id"]} and len(received) >= 2
    assert any("could not be marked" in r.getMessage() or "the store failed" in r.getMessage()
               for r in caplog.records)


@pytest.mark.slow  # ~8 s
async def test_a_post_streamed_while_the_disk_is_full_is_caught_up_once_it_is_not(small_disk, samples, caplog):
    """A streaming source whose event cannot be recorded reconnects (its position kept in memory
    where it cannot be stored) and, once the store can be written, catches the post up."""
    from tests.test_daemon import PhotoSite
    from tests.test_streaming import Instance, stream_config

    site = PhotoSite(samples)
    db = small_disk / "m.sqlite"
    make_library(db, samples)
    base = [""]
    instance = Instance(base)
    records = []
    async with serve(site.app()) as images, serve(instance.app()) as masto:
        base[0] = images
        cfg = stream_config(images, masto, db)
        stop = asyncio.Event()
        task = asyncio.create_task(run_daemon(cfg, stop=stop, on_match=records.append, install_signals=False))
        instance.post(1, ["other-apple.jpg"], live=False)
        await until(lambda: instance.connections == 1)
        await until(lambda: sqlite3.connect(db).execute("SELECT COUNT(*) FROM work").fetchone()[0] == 1)
        fill(small_disk)
        instance.post(2, ["small-chelsea.jpg"])  # streamed while the disk is full
        await asyncio.sleep(3)  # the event, then each catch-up, fails: reconnecting
        assert not task.done() and not records
        (small_disk / "fill").unlink()
        await until(lambda: records, 30)
        stop.set()
        await asyncio.wait_for(task, 30)
    assert [r.entry.label for r in records] == ["library-chelsea"]
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM seen_items WHERE feed='live'").fetchone()[0] == 2
    assert any("feed live: the store failed" in r.getMessage() for r in caplog.records)


@pytest.mark.slow  # 35 posts at 5 a second and a restart: ~15 s
async def test_postgresql_restarted_under_the_one_process_daemon_loses_nothing(postgres_cluster, samples):
    """The one-process daemon on PostgreSQL, the server restarted mid-stream (a failover): the
    images whose recording met it are recorded once it is back, every alert delivered once."""
    from tests.test_scaleout import many_posts

    url, site, hooks, names = many_posts(postgres_cluster, samples)

    def query(sql):
        from monitor.records.engines import open_store
        store = open_store(url)
        try:
            return store.query(sql)
        finally:
            store.close()

    def done():
        return query("SELECT COUNT(*) FROM work WHERE state != 'pending'")[0][0]
    async with serve(site.app()) as base, serve(hooks.app()) as recv:
        cfg = config_for(base, url)
        cfg = parse_config({**cfg.model_dump(), "limits": {**cfg.limits.model_dump(), "per_host_rate": 5},
                            "alerts": [{"name": "hook", "type": "webhook", "url": f"{recv}/hook",
                                        "backoff_base": 0.2}]})
        stop = asyncio.Event()
        task = asyncio.create_task(run_daemon(cfg, stop=stop, install_signals=False))
        await until(lambda: done() >= 8, 60)
        await asyncio.to_thread(postgres_cluster.restart)
        await until(lambda: done() == len(names) and len(hooks.alerts) == 15, 120)
        assert not task.done()
        stop.set()
        await asyncio.wait_for(task, 30)
    assert query("SELECT state, COUNT(*) FROM work GROUP BY state") == [("done", len(names))]
    rows = query("SELECT image_url, entry_id FROM matches")
    assert len(rows) == len(set(rows)) == 15


@pytest.mark.slow  # ~5 s
async def test_the_api_answers_503_with_retry_after_while_the_disk_is_full(small_disk, samples):
    """An ingest the store cannot take is refused as retryable (503, Retry-After), not a 500,
    and taken once the disk has room again."""
    import aiohttp

    db = small_disk / "m.sqlite"
    make_library(db, samples)
    running = {}
    async with serve(web.Application()) as base:
        cfg = config_for(base, db)
        cfg = parse_config({**cfg.model_dump(), "feeds": []})
        stop = asyncio.Event()
        task = asyncio.create_task(run_daemon(cfg, stop=stop, install_signals=False,
                                              on_ready=lambda r: running.update(r=r)))
        await until(lambda: running, 60)
        api = f"http://127.0.0.1:{running['r'].port}/v1/ingest"
        body = {"source": "uploads", "image_urls": [f"{base}/a.jpg"], "id": "x1"}
        async with aiohttp.ClientSession() as session:
            fill(small_disk)
            async with session.post(api, json=body) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "5"
                assert (await resp.json())["error"]["code"] == "store_unavailable"
            (small_disk / "fill").unlink()
            async with session.post(api, json=body) as resp:
                assert resp.status in (200, 202), await resp.text()
        stop.set()
        await asyncio.wait_for(task, 30)
