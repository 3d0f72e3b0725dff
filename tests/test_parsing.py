"""Large feed bodies are parsed in worker processes with a time limit (monitor/pipeline/parsing.py):
a real feed's items come back, a parse past the limit is stopped, a process that dies or runs out
of memory fails its body alone, and the processes end with a daemon killed with kill -9."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from feeds import FeedError, make_source
from monitor.pipeline import intake as intake_module
from monitor.pipeline import parsing
from monitor.pipeline.parsing import LARGE, parsed, parsed_timed
from tests.parsed_in_process import die, forever, hoard, process_id

ROOT = Path(__file__).resolve().parents[1]
LARGE_BODY = b"x" * (LARGE + 1)


def dense_feed(items: int, extra: str = "") -> bytes:
    entries = extra + "".join(f"<item><guid>g{k}</guid><title>t{k}</title><link>http://example.org/{k}</link>"
                      f"<enclosure url='http://img.example/{k}.jpg' type='image/jpeg'/></item>"
                      for k in range(items))
    return f"<?xml version='1.0'?><rss version='2.0'><channel><title>x</title>{entries}</channel></rss>".encode()


@pytest.fixture(autouse=True, scope="module")
def parsers_stopped_after():
    yield
    parsing.stop_parsers()


@pytest.mark.slow  # a process started, a feed of 2,500 items parsed: ~2 s
async def test_a_large_feed_is_parsed_in_another_process_and_a_small_one_here():
    source = make_source("rss", "big", "http://example.org/feed.xml")
    body = dense_feed(2500, "<item><guid>bad</guid><enclosure url='ftp://x/y.jpg' type='image/jpeg'/></item>")
    assert len(body) > LARGE
    items, seconds = await parsed_timed(source.parse, body, "application/rss+xml")
    assert [i.id for i in items[:3]] == ["bad", "g0", "g1"] and len(items) == 2501  # and what was skipped
    assert items[0].image_urls == () and [reason for reason, _ in items.skipped] == ["bad_url"]
    assert items[1].image_urls == ("http://img.example/0.jpg",)
    assert 0 < seconds < 60  # the parse's CPU, told from its process
    assert await parsed(process_id, LARGE_BODY) != os.getpid()
    assert await parsed(process_id, b"small") == os.getpid()
    # a feed refused in its process comes back as the same error, its CPU time with it
    with pytest.raises(FeedError) as refused:
        await parsed_timed(source.parse, b"<html>" + b"<p>x</p>" * 40_000 + b"</html>", "text/html")
    assert refused.value.reason and refused.value.parse_seconds > 0


@pytest.mark.slow  # ~1 s
async def test_a_parse_past_the_limit_is_stopped_and_the_next_goes_on(monkeypatch):
    monkeypatch.setattr(parsing, "PARSE_LIMIT", 1.0)
    started = time.monotonic()
    with pytest.raises(FeedError) as stopped:
        await parsed(forever, LARGE_BODY)
    assert stopped.value.reason == "parse_timeout" and stopped.value.parse_seconds == 1.0
    assert time.monotonic() - started < 15  # a process start, then the limit
    assert await parsed(process_id, LARGE_BODY) != os.getpid()


async def test_a_parsing_process_that_dies_or_runs_out_of_memory_fails_its_body_alone():
    results = await asyncio.gather(parsed(die, LARGE_BODY), parsed(hoard, LARGE_BODY),
                                   parsed(process_id, LARGE_BODY), return_exceptions=True)
    assert [getattr(r, "reason", None) for r in results[:2]] == ["parse_failed", "parse_failed"], results
    assert "died" in str(results[0]) and "ran out of memory" in str(results[1])
    assert isinstance(results[2], int) and results[2] != os.getpid()
    assert await parsed(process_id, LARGE_BODY) != os.getpid()


async def test_a_feed_whose_parse_is_stopped_fails_its_poll_and_is_spaced(monkeypatch):
    """The daemon's poll of a feed whose parse passes the limit: the feed fails with reason
    parse_timeout, and its next poll waits as long as a parse that long would make it."""
    from aiohttp import web

    from monitor.fetch import Fetcher, FetchLimits
    from monitor.metrics import Metrics
    from monitor.pipeline.intake import Intake
    from monitor.pipeline.transport import InProcessTransport
    from monitor.records.engines import open_store
    from tests.hosts import serve

    monkeypatch.setattr(parsing, "PARSE_LIMIT", 0.2)
    monkeypatch.setattr(intake_module, "PARSE_SLOW", 0.1)
    body = dense_feed(30_000)  # ~4 MB: seconds of feedparser

    async def feed(request):
        return web.Response(body=body, content_type="application/rss+xml")
    app = web.Application()
    app.router.add_get("/feed.xml", feed)
    store = open_store(":memory:")
    try:
        async with serve(app) as base, Fetcher(FetchLimits(allowed_networks=("127.0.0.0/8",))) as fetcher:
            intake = Intake(store, fetcher, Metrics(), InProcessTransport(10))
            with pytest.raises(FeedError) as failed:
                await intake.poll_once(make_source("rss", "big", f"{base}/feed.xml"))
            assert failed.value.reason == "parse_timeout"
            assert intake._wait_hints["big"] == pytest.approx(0.2 / intake_module.PARSE_SHARE)
    finally:
        store.close()


@pytest.mark.slow  # a daemon-like process started and killed: ~5 s
def test_the_parsing_processes_end_when_the_daemon_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, sys
        sys.path.insert(0, {str(ROOT)!r})
        from monitor.pipeline.parsing import parsed
        from tests.parsed_in_process import sleep_long

        async def main():
            task = asyncio.ensure_future(parsed(sleep_long, b"x" * {LARGE + 1}))
            await asyncio.sleep(3)
            print("parsing", flush=True)
            await task

        if __name__ == "__main__":
            asyncio.run(main())
    """))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "parsing"
        children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent_of(int(p)) == parent.pid]
        assert children, "no parsing process started"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(c) for c in children), "a parsing process outlived its daemon"
    finally:
        parent.kill()


def _parent_of(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
