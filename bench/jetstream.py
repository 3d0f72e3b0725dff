"""Bluesky Jetstream replay through the daemon: a firehose at a set rate, ~10% of its events
posts with pictures, some of those reposts of the library.

    python3 bench/jetstream.py ../shared/corpus [--rate 2500] [--seconds 30] [--library 100000]

Any folder of JPEG images will do. A host process (monitor/tools/jetstream_replay.py) publishes
the events live on /subscribe and serves the pictures as Bluesky's CDN would; the daemon runs
in this process with the real config, store and pipeline. Printed: events/s the daemon
sustained against the rate offered, the backlog when publishing ended, daemon CPU per event,
the lag from an event's publication to its match being recorded (p50/p99), and what JSON
parsing costs per event with the standard library, orjson and msgspec (those installed),
timed in turns on the same events.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from pipeline import make_thumbs, rss_mb, seed_library  # noqa: E402 - bench/pipeline.py, beside this file


def host_process(thumbs: list[bytes], library_share: int, args, port_q, published) -> None:
    """Publish ``args.rate`` events a second for ``args.seconds`` s, all of them posts (what the
    daemon asks for): 90% text only, 10% with a picture (a third of those reposts of the first
    ``library_share`` pictures)."""
    from aiohttp import web

    from monitor.tools.jetstream_replay import JetstreamReplay, blob_cid, post_event
    replay = JetstreamReplay()
    blobs: dict[str, bytes] = {}
    rng = random.Random(11)

    async def blob(request):
        data = blobs.get(request.match_info["cid"].removesuffix("@jpeg"))
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data, content_type="image/jpeg")

    def event(n: int, time_us: int) -> dict:
        if rng.random() >= args.image_share:  # likes and the like are asked away (wantedCollections)
            return post_event(f"did:plc:talker{n % 991}", f"t{n}", time_us, f"words and words {n}")
        if rng.random() < args.repost_share:
            picture = rng.randrange(library_share)
        else:
            picture = rng.randrange(library_share, len(thumbs))
        cid = blob_cid(f"picture{n}")
        blobs[cid] = thumbs[picture]
        return post_event(f"did:plc:artist{n % 89}", f"p{n}", time_us, f"look {n}", [cid])

    async def main():
        runner = web.AppRunner(replay.app([("GET", "/img/feed_thumbnail/plain/{did}/{cid}", blob)]), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port_q.put(site._server.sockets[0].getsockname()[1])  # noqa: SLF001
        while replay.connections == 0:
            await asyncio.sleep(0.05)
        start, n, tick = time.time(), 0, 0.02
        total = int(args.rate * args.seconds)
        while n < total:
            due = min(total, int((time.time() - start) * args.rate))
            now_us = int(time.time() * 1e6)
            replay.publish([event(k, now_us - (due - k)) for k in range(n, due)])
            n = due
            published.value = n
            await asyncio.sleep(tick)
        await asyncio.Event().wait()

    asyncio.run(main())


def stream_events(metrics_text: str) -> int:
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in metrics_text.splitlines()
                   if line.startswith("repost_monitor_stream_events_total{")))


def quantiles(values: list[float]) -> str:
    if not values:
        return "no matches"
    a = np.array(values) * 1e3
    return f"p50 {np.percentile(a, 50):.0f} ms, p99 {np.percentile(a, 99):.0f} ms (n={len(a)})"


async def run(args, port: int, lib_path: str, published) -> dict:
    from monitor.config import parse_config
    from monitor.daemon import run_daemon
    base = f"127.0.0.1:{port}"
    config = parse_config({
        "store": {"path": lib_path},
        "limits": {"allowed_networks": ["127.0.0.0/8"], "per_host_rate": 100000, "queue_size": 2000},
        "feeds": [{"name": "bsky", "type": "jetstream", "url": f"ws://{base}/subscribe",
                   "image_url_template": f"http://{base}/img/feed_thumbnail/plain/{{did}}/{{cid}}@jpeg"}],
        "server": {"enabled": False}, "log": {"level": "warning"},
    })
    total = int(args.rate * args.seconds)
    stop, lags, out = asyncio.Event(), [], {}

    def on_match(rec):
        if rec.work.published is not None:
            lags.append(rec.lag_seconds)

    async def watch(r):
        t0 = cpu0 = None
        while True:
            await asyncio.sleep(0.25)
            seen = stream_events(r.metrics.render().decode())
            if t0 is None and seen:
                t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
                out["first"] = seen
            if "backlog" not in out and published.value >= total:
                out["backlog"] = total - seen
                out["rss"] = rss_mb()
            pending = r.store.query("SELECT COUNT(*) FROM work WHERE state='pending'")[0][0]
            if seen >= total and pending == 0:
                cpu1 = resource.getrusage(resource.RUSAGE_SELF)
                out["elapsed"] = time.perf_counter() - t0
                out["cpu"] = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
                out["events"] = seen - out["first"]
                out["images"] = r.store.query("SELECT COUNT(*) FROM work")[0][0]
                out["matches"] = r.store.query("SELECT COUNT(*) FROM matches")[0][0]
                stop.set()
                return

    await run_daemon(config, stop=stop, install_signals=False, on_match=on_match,
                     on_ready=lambda r: asyncio.get_running_loop().create_task(watch(r)))
    out["lags"] = lags
    return out


def parser_costs(events: list[str]) -> list[tuple[str, float]]:
    """Microseconds per event for each JSON parser installed, best of 5 turns taken in rotation."""
    parsers = [("json (stdlib)", json.loads)]
    try:
        import orjson
        parsers.append(("orjson", orjson.loads))
    except ImportError:
        pass
    try:
        import msgspec
        parsers.append(("msgspec", msgspec.json.decode))
    except ImportError:
        pass
    best = {name: float("inf") for name, _ in parsers}
    for _ in range(5):
        for name, loads in parsers:
            t = time.perf_counter()
            for e in events:
                loads(e)
            best[name] = min(best[name], (time.perf_counter() - t) / len(events) * 1e6)
    return list(best.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--rate", type=float, default=2500, help="events per second offered (default %(default)s)")
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--image-share", type=float, default=0.10, help="events that are posts with a picture")
    ap.add_argument("--repost-share", type=float, default=0.3, help="picture posts that repost the library")
    ap.add_argument("--library", type=int, default=100000)
    args = ap.parse_args()
    thumbs = make_thumbs(args.corpus, 1021)
    share = len(thumbs) // 4
    q, published = mp.Queue(), mp.Value("q", 0)
    host = mp.Process(target=host_process, args=(thumbs, share, args, q, published), daemon=True)
    host.start()
    port = q.get()
    from monitor.warmup import warm_up
    warm_up(lambda text: print(text, file=sys.stderr))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.sqlite")
        seed_library(path, thumbs[:share], args.library)
        out = asyncio.run(run(args, port, path, published))
    host.terminate()
    with open("/proc/cpuinfo") as fh:
        cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "?")
    offered = int(args.rate * args.seconds)
    rate = out["events"] / out["elapsed"]
    print(f"CPU: {cpu}, {os.cpu_count()} cores (the host process publishing the firehose shares them)")
    print(f"offered: {offered:,} events at {args.rate:,.0f}/s for {args.seconds:g} s; "
          f"library {args.library:,} entries")
    print(f"daemon: {out['events']:,} events in {out['elapsed']:.1f} s = {rate:,.0f} events/s sustained; "
          f"backlog when publishing ended: {out['backlog']:,} events (target >= 2,000 events/s)")
    print(f"pictures: {out['images']:,} downloaded and fingerprinted, {out['matches']:,} matches recorded; "
          f"RSS {out['rss']:.0f} MB")
    print(f"daemon CPU: {out['cpu']:.1f} s = {out['cpu'] / out['events'] * 1e6:.0f} us per event "
          f"(pictures included: download, decode, fingerprint, match, record)")
    print(f"event published -> match recorded: {quantiles(out['lags'])}")
    from monitor.tools.jetstream_replay import blob_cid, post_event
    rng = random.Random(3)
    sample = [json.dumps(post_event("did:plc:a", f"p{i}", 10**15 + i, f"words and words {i}",
                                    [blob_cid(str(i))] if rng.random() < args.image_share else []))
              for i in range(20000)]
    costs = parser_costs(sample)
    cost_line = ", ".join(f"{name} {us:.1f} us" for name, us in costs)
    stdlib = costs[0][1]
    print(f"JSON parsing per event: {cost_line}; the standard library's share of the daemon's CPU per "
          f"event: {stdlib / (out['cpu'] / out['events'] * 1e6):.1%}")


if __name__ == "__main__":
    main()
