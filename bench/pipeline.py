"""End-to-end daemon benchmark: a loopback feed host with N posts of real thumbnails.

    python3 bench/pipeline.py ../shared/corpus [--posts 20000] [--library 100000]

The host (a separate process) serves a JSON Feed that hands out the next batch of posts on every
poll, and the posts' 320 px JPEG thumbnails made from the corpus. The daemon runs with the real
config, store and pipeline. Printed: posts/s end to end, time from image downloaded to match
recorded (p50/p99 from the metrics histogram), resident memory over the run, and the CPU split
between download, decode/fingerprint and match (sums of the per-stage histograms).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def make_thumbs(corpus: Path, limit: int) -> list[bytes]:
    from PIL import Image
    out = []
    for f in sorted(corpus.glob("*.jpg"))[:limit]:
        img = Image.open(f).convert("RGB")
        img.thumbnail((320, 320))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def host_process(thumbs: list[bytes], posts: int, batch: int, port_q, rate: float | None = None,
                 go=None) -> None:
    """The feed host; with ``rate``, posts are published at that many per second (from the
    first poll) instead of ``batch`` per poll; given ``go`` (an Event), none until it is set."""
    from aiohttp import web
    served = {"next": 0, "t0": None}

    async def feed(request):
        if go is not None and not go.is_set():
            return web.json_response({"version": "https://jsonfeed.org/version/1.1", "title": "bench", "items": []})
        start = served["next"]
        stop = min(posts, start + batch)
        if rate:
            served["t0"] = served["t0"] or time.time()
            stop = min(stop, int((time.time() - served["t0"]) * rate))
        served["next"] = stop
        base = f"http://{request.host}"
        items = [{"id": f"p{i}", "url": f"{base}/p/{i}", "image": f"{base}/img/{i}.jpg"}
                 for i in range(start, stop)]
        return web.json_response({"version": "https://jsonfeed.org/version/1.1", "title": "bench",
                                  "items": items})

    async def image(request):
        i = int(request.match_info["n"])
        return web.Response(body=thumbs[i % len(thumbs)], content_type="image/jpeg")

    async def main():
        app = web.Application()
        app.router.add_get("/feed.json", feed)
        app.router.add_get("/img/{n}.jpg", image)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port_q.put(site._server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


def wait_ready(ports: list[int], procs: list[subprocess.Popen], timeout: float = 300, poll: float = 0.2) -> None:
    """Until the server on each of ``ports`` says ready on /readyz (kernels loaded, library
    and roles up), looking every ``poll`` s; RuntimeError if one of ``procs`` exits first or
    ``timeout`` passes."""
    import urllib.error
    import urllib.request
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a daemon process exited while starting")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the process on port {port} was not ready in {timeout:.0f} s")
            time.sleep(poll)


def seed_library(path: str, pictures: list[bytes], size: int) -> None:
    """A library of ``size`` entries: the fingerprints of ``pictures`` (which posts will
    repost), the rest random rows written straight into the table."""
    from monitor.fingerprints import ALGORITHM_VERSION, fingerprint_bytes
    from monitor.records.library import Library
    from monitor.records.store import Store
    store = Store(path)
    lib = Library(store)
    for i, picture in enumerate(pictures):
        lib.add_fingerprint(f"corpus/{i}", fingerprint_bytes(picture))
    rand = np.random.default_rng(5).integers(-(2**63), 2**63 - 1, size=(max(0, size - len(pictures)), 4),
                                             dtype=np.int64)
    with store.transaction() as conn:
        conn.executemany(
            "INSERT INTO library_entries (source, label, width, height, dhash, phash, dhash_mirror, "
            "phash_mirror, degenerate, added_at, algorithm) VALUES (?,?,?,?,?,?,?,?,NULL,0,?)",
            ((f"random/{i}", "random", 320, 240, *map(int, rand[i]), ALGORITHM_VERSION) for i in range(len(rand))))
    store.close()


def histogram_quantile(metrics_text: str, name: str, q: float) -> float:
    buckets = []
    for line in metrics_text.splitlines():
        if line.startswith(name + "_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    total = buckets[-1][1]
    for le, count in buckets:
        if count >= q * total:
            return le
    return float("inf")


def metric_sum(metrics_text: str, name: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith(name + "_sum"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


async def run(args, port: int, lib_path: str) -> None:
    from monitor.config import parse_config
    from monitor.daemon import run_daemon
    config = parse_config({
        "store": {"path": lib_path},
        "limits": {"allowed_networks": ["127.0.0.0/8"], "per_host_rate": 100000,
                   "concurrency": args.concurrency, "queue_size": 2000,
                   "fingerprint_processes": args.processes},
        "feeds": [{"name": "bench", "type": "jsonfeed", "url": f"http://127.0.0.1:{port}/feed.json",
                   "interval": 0.05, "jitter": 0}],
        "server": {"enabled": False}, "log": {"level": "warning"},
        "match": {"keypoints": not args.no_keypoints},
    })
    stop = asyncio.Event()
    state = {}
    memory = []

    async def watch(r):
        t0 = None
        while True:
            await asyncio.sleep(1)
            done = r.store.query("SELECT COUNT(*) FROM work WHERE state!='pending'")[0][0]
            memory.append(rss_mb())
            if done and t0 is None:
                t0 = time.perf_counter()
                state["first"] = done
            if done >= args.posts:
                state["elapsed"] = time.perf_counter() - t0
                state["metrics"] = r.metrics.render().decode()
                state["matches"] = r.store.query("SELECT COUNT(*) FROM matches")[0][0]
                stop.set()
                return
            print(f"  {done:,} posts processed, RSS {memory[-1]:.0f} MB", file=sys.stderr, flush=True)

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    await run_daemon(config, stop=stop, install_signals=False,
                     on_ready=lambda r: asyncio.get_running_loop().create_task(watch(r)))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    text = state["metrics"]
    rate = (args.posts - state["first"]) / state["elapsed"]
    print(f"posts: {args.posts:,}; library: {args.library:,} entries; matches recorded: {state['matches']:,}; "
          f"second look {'off' if args.no_keypoints else 'on'}")
    print(f"throughput: {rate:.0f} posts/s end to end (target >= 400)")
    p50 = histogram_quantile(text, "repost_monitor_image_to_record_duration_seconds", 0.5)
    p99 = histogram_quantile(text, "repost_monitor_image_to_record_duration_seconds", 0.99)
    print(f"image downloaded -> match recorded: p50 <= {p50 * 1e3:.0f} ms, p99 <= {p99 * 1e3:.0f} ms "
          f"(histogram bucket bounds; target p99 < 100 ms)")
    steady = memory[len(memory) // 4:]
    print(f"resident memory: start {memory[0]:.0f} MB, after warm-up {steady[0]:.0f} MB, end "
          f"{memory[-1]:.0f} MB ({(memory[-1] - steady[0]) / steady[0]:+.1%} after warm-up)")
    d = metric_sum(text, "repost_monitor_download_duration_seconds")
    f = metric_sum(text, "repost_monitor_fingerprint_duration_seconds")
    m = metric_sum(text, "repost_monitor_match_duration_seconds")
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    total = d + f + m
    print(f"stage time (wall, summed over concurrent work): download {d:.1f}s ({d / total:.0%}), "
          f"decode+fingerprint {f:.1f}s ({f / total:.0%}), match {m:.1f}s ({m / total:.0%}); "
          f"daemon process CPU {cpu:.1f}s ({cpu / args.posts * 1e3:.2f} ms per post)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--posts", type=int, default=20000)
    ap.add_argument("--library", type=int, default=100000)
    ap.add_argument("--processes", type=int, default=0,
                    help="limits.fingerprint_processes (0: threads of the daemon)")
    ap.add_argument("--concurrency", type=int, default=16, help="downloads in flight (the daemon's default)")
    ap.add_argument("--no-keypoints", action="store_true", help="[match] keypoints = false: hashes alone, "
                    "no keypoints found on each post for the second look")
    args = ap.parse_args()
    thumbs = make_thumbs(args.corpus, 1021)
    print(f"{len(thumbs)} thumbnails, mean {np.mean([len(t) for t in thumbs]) / 1e3:.0f} KB")
    q = mp.Queue()
    host = mp.Process(target=host_process, args=(thumbs, args.posts, 500, q), daemon=True)
    host.start()
    port = q.get()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.sqlite")
        seed_library(path, thumbs[:200], args.library)  # some posts will match these
        asyncio.run(run(args, port, path))
    with open(f"/proc/{host.pid}/stat") as fh:  # utime + stime, in clock ticks
        fields = fh.read().rsplit(")", 1)[1].split()
    host_cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    print(f"feed host process CPU {host_cpu:.1f}s ({host_cpu / args.posts * 1e3:.2f} ms per post): "
          f"it shares the {os.cpu_count()} cores with the daemon")
    host.terminate()


if __name__ == "__main__":
    main()
