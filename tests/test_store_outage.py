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
    with open(where / "fill", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:  # ENOSPC: full
            pass


@pytest.mark.slow  # a store outage of a few seconds and the pauses after it: ~15 s
async def test_images_recorded_while_the_disk_is_full_are_recorded_once_it_is_not(small_disk, samples, caplog):
    db = small_disk / "m.sqlite"
    make_library(db, samples)
    img = Image.open(samples / "library-chelsea.jpg")
    img.thumbnail((300, 300))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=80)
    posts: list[int] = []

    async def feed(request):
        base = f"http://{request.host}"
        return web.json_response({"version": "https://jsonfeed.org/version/1.1", "title": "t", "items": [
            {"id": f"j{n}", "url": f"{base}/p/{n}", "image": f"{base}/slow/{n}.jpg"} for n in posts]})

    async def slow_image(request):  # downloads under way when the disk fills
        await asyncio.sleep(1.0)
        return web.Response(body=out.getvalue(), content_type="image/jpeg")
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
