"""Alert delivery benchmark: 200 detections/s to two sinks on loopback, then a sink outage.

    python3 bench/alerts.py [--rate 200] [--seconds 20] [--outage 300]

Two receivers (a signed-webhook receiver and a Slack-like one) run in a child process; the sinks
use the production retry policy and --batch (webhook batch_size, Slack digests of up to 40). Detections
are recorded through the real outbox at --rate per second. Phase 1 measures whether delivery keeps
up; phase 2 takes both receivers down (503) for --outage seconds while detections continue, then
brings them back and measures how long until every alert is delivered, and checks per-sink order.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def receivers(port_q, down_flag, counts) -> None:
    from aiohttp import web

    async def handler(request):
        if down_flag.value:
            return web.Response(status=503, text="down")
        sink = request.match_info["sink"]
        await request.read()
        for key in request.headers["X-Repost-Monitor-Alert-Keys"].split(","):
            counts.put((sink, key, time.time()))
        return web.Response(text="ok")

    async def main():
        app = web.Application()
        app.router.add_post("/{sink}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port_q.put(site._server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


async def run(args, port, down_flag, counts) -> None:
    from monitor.alerts.outbox import Outbox, SinkRule
    from monitor.alerts.sinks import SlackSink, WebhookSink
    from monitor.metrics import Metrics
    from monitor.pipeline import MatchRecord, WorkItem
    from monitor.records.library import LibraryEntry
    from monitor.records.store import Store
    from monitor.search.matcher import Match

    tmp = tempfile.mkdtemp()
    store = Store(os.path.join(tmp, "alerts.sqlite"))
    rule = SinkRule(max_attempts=10_000)  # production backoff: 1 s doubling to 15 s
    outbox = Outbox(store, [(WebhookSink("hook", f"http://127.0.0.1:{port}/hook", secret="s",
                                         batch_size=args.batch), rule),
                            (SlackSink("slack", f"http://127.0.0.1:{port}/slack",
                                       batch_size=min(args.batch, 40)), rule)], Metrics())
    stop = asyncio.Event()
    sender = asyncio.create_task(outbox.run(stop))
    seq = {"n": 0}

    def detect(count):
        with store.transaction() as conn:
            for _ in range(count):
                seq["n"] += 1
                n = seq["n"]
                url = f"http://x/{n}.jpg"
                conn.execute("INSERT INTO work (id, feed, item_id, image_url, discovered_at, state) "
                             "VALUES (?,?,?,?,?, 'done')", (n, "bench", str(n), url, time.time()))
                cur = conn.execute(
                    "INSERT INTO matches (work_id, image_url, entry_id, tier, dhash_distance, "
                    "phash_distance, mirrored, feed, item_id, detected_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (n, url, n % 50_000, "near", 3, 4, 0, "bench", str(n), time.time()))
                work = WorkItem(n, "bench", str(n), f"http://x/{n}.jpg", None, None, time.time() - 5)
                # A stream of reposts of many different library images, as in a real feed.
                entry = LibraryEntry(n % 50_000, f"/photos/{n % 50_000}.jpg", "photos", 100, 100,
                                     0, 0, 0, 0, None, 0.0)
                outbox.enqueue(conn, MatchRecord(cur.lastrowid, work, entry, Match(1, "near", 3, 4, False),
                                                 time.time()))
        outbox.committed()

    async def produce(seconds):
        start = time.perf_counter()
        sent = 0
        while time.perf_counter() - start < seconds:
            due = int((time.perf_counter() - start) * args.rate) - sent
            if due > 0:
                detect(due)
                sent += due
            await asyncio.sleep(0.01)
        return sent

    def pending():
        return store.query("SELECT COUNT(*) FROM alerts WHERE state='pending'")[0][0]

    # Phase 1: steady load.
    t0 = time.perf_counter()
    produced = await produce(args.seconds)
    while pending():
        await asyncio.sleep(0.05)
    t1 = time.perf_counter()
    print(f"phase 1: {produced:,} detections at {args.rate}/s for {args.seconds}s -> {2 * produced:,} "
          f"deliveries; all delivered {t1 - t0 - args.seconds:.2f}s after the last detection "
          f"({2 * produced / (t1 - t0):.0f} deliveries/s sustained)")
    # Phase 2: outage.
    down_flag.value = 1
    before = seq["n"]
    produced = await produce(args.outage)
    backlog = pending()
    down_flag.value = 0
    back = time.perf_counter()
    while pending():
        await asyncio.sleep(0.05)
    drained = time.perf_counter() - back
    print(f"phase 2: {args.outage}s outage with {produced:,} detections ({backlog:,} alerts waiting); "
          f"every alert delivered {drained:.1f}s after the sinks returned (target < 30 s)")
    stop.set()
    await sender
    keys: dict[str, list[int]] = {"hook": [], "slack": []}
    while not counts.empty():
        sink, key, _ = counts.get()
        keys[sink].append(int(key.split("-")[1]))
    for sink, ids in keys.items():
        firsts = list(dict.fromkeys(ids))
        print(f"  {sink}: {len(firsts):,} alerts received, in order: {firsts == sorted(firsts)}, "
              f"duplicates: {len(ids) - len(firsts)}")
    assert seq["n"] > before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--outage", type=float, default=300)
    ap.add_argument("--batch", type=int, default=100,
                    help="sink batch_size (Slack capped at 40); 1 = one request per alert")
    args = ap.parse_args()
    port_q, counts = mp.Queue(), mp.Queue()
    down = mp.Value("i", 0)
    proc = mp.Process(target=receivers, args=(port_q, down, counts), daemon=True)
    proc.start()
    asyncio.run(run(args, port_q.get(), down, counts))
    proc.terminate()


if __name__ == "__main__":
    main()
