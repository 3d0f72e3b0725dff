"""Throughput: the one-process daemon (SQLite) against the roles as processes over Redis and
PostgreSQL, on the same posts, in turns.

    python3 bench/scaleout.py IMAGES [--posts 10000] [--library 100000] [--turns 2] [--workers 2]

Any folder of JPEG images will do. A feed host process (bench/pipeline.py's) hands out the
posts, 320 px thumbnails, a JSON Feed batch per poll; some repost library pictures. The
one-process daemon is `repost-monitor run`; the roles are an intake, ``--workers`` fetch
workers, one shard and a recorder, each `repost-monitor run --role ...`, over a throwaway
Redis and PostgreSQL (monitor/tools/services.py). The feed host publishes once every
process's /readyz says ready, so start-up is in neither mode's figures. Printed per turn:
posts/s from the first row recorded to the last, and the time from a row's discovery to its
recording (p50, p99: queueing included), read from the work table in both modes; and the CPU
time per post of each process, in the roles mode of the Redis server and the PostgreSQL
cluster too, and of the feed host, from the first row recorded to the last, with the cores
they kept busy in all.
``--rate`` publishes at a set pace (latency at a load the machine carries) instead of as fast
as the daemon polls (throughput). ``--process ROLES``, repeated, lays the roles out otherwise:
``--process intake,shard:0,recorder --process worker --process worker`` (three processes) was
slower on 2 cores than one process a role, 261 against 329 posts/s in one turn each (the
PostgreSQL cluster's CPU a post doubled).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from pipeline import host_process, make_thumbs, wait_ready  # noqa: E402 - bench/pipeline.py, beside this file


def seed(location: str, pictures: list[bytes], size: int) -> None:
    from monitor.fingerprints import ALGORITHM_VERSION, fingerprint_bytes
    from monitor.records.engines import open_store
    from monitor.records.library import Library
    store = open_store(location)
    lib = Library(store)
    for i, picture in enumerate(pictures):  # as `library add` adds them: views and keypoints
        lib.add_fingerprint(f"corpus/{i}", fingerprint_bytes(picture, views="library"))
    rand = np.random.default_rng(5).integers(-(2**63), 2**63 - 1, size=(size - len(pictures), 4), dtype=np.int64)
    for start in range(0, len(rand), 20000):
        with store.transaction() as conn:
            conn.executemany(
                "INSERT INTO library_entries (source, label, width, height, dhash, phash, dhash_mirror, "
                "phash_mirror, degenerate, added_at, algorithm) VALUES (?,?,?,?,?,?,?,?,NULL,0,?)",
                ((f"random/{i}", "random", 320, 240, *map(int, rand[i]), ALGORITHM_VERSION)
                 for i in range(start, min(len(rand), start + 20000))))
    store.close()
    if location.startswith("postgresql"):
        # What a library loaded long ago has had: its tables vacuumed and analysed, the load
        # checkpointed. Else autovacuum's first visit (a minute after the load: during the
        # turn) reads the 100,000 fresh rows, a ~0.5 s stall on 2 cores, in the roles' p99.
        # Only the library's: the posts' tables are as a new deployment's, empty and not yet
        # analysed, as they are in the one-process mode's SQLite file.
        import psycopg
        with psycopg.connect(location, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE library_entries, library_changes, library_meta, entry_keypoints")
            conn.execute("CHECKPOINT")


def cpu_seconds(pid: int, children: bool = False) -> float:
    """A process's CPU time (utime + stime; with ``children``, also its exited children's)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + ((int(fields[13]) + int(fields[14])) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def services_cpu(pg, rd=None) -> dict[str, float]:
    """CPU seconds so far of the throwaway Redis server (given ``rd``), and of the PostgreSQL
    cluster (the postmaster, its live backends and those that exited)."""
    postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
    backends = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == postmaster:
                        backends += cpu_seconds(int(entry))
            except (OSError, ValueError):
                continue  # gone meanwhile
    out = {"postgresql": cpu_seconds(postmaster, children=True) + backends}
    if rd is not None:
        out["redis"] = cpu_seconds(rd.proc.pid)
    return out


def measure(location: str, posts: int, procs: list[subprocess.Popen], host: int, services=None,
            timeout: float = 1800) -> dict:
    """Posts/s, latency and CPU ms per post of each process (and, given ``services`` as
    (pg, rd), of Redis and PostgreSQL; and of ``host``, the feed and image host's pid) from
    the first row recorded to the last: CPU spent starting (imports, loading the library)
    is left out, so the figures add up to the cores in use while posts flow."""
    from monitor.records.engines import open_store
    store = open_store(location)
    deadline = time.monotonic() + timeout

    def recorded() -> int:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a daemon process exited")
        return store.query("SELECT COUNT(*) FROM work WHERE state != 'pending'")[0][0]

    def cpu_now() -> tuple[list[float], dict[str, float], float, float]:
        return ([cpu_seconds(p.pid) for p in procs], services_cpu(*services) if services else {},
                cpu_seconds(host), time.monotonic())

    try:
        while (first_done := recorded()) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = cpu_now()
        while (done := recorded()) < posts and time.monotonic() < deadline:
            time.sleep(0.5)
        after = cpu_now()
        rows = np.array(store.query("SELECT discovered_at, finished_at FROM work WHERE finished_at IS NOT NULL"))
    finally:
        store.close()
    first, last = rows[:, 1].min(), rows[:, 1].max()
    lat = (rows[:, 1] - rows[:, 0]) * 1e3  # every row: the posts came only once all processes were ready
    n = max(1, done - first_done)
    procs_ms = [(a - b) / n * 1e3 for a, b in zip(after[0], before[0], strict=True)]
    services_ms = {k: (after[1][k] - before[1][k]) / n * 1e3 for k in after[1]}
    services_ms["feed host"] = (after[2] - before[2]) / n * 1e3
    cores = (sum(after[0]) - sum(before[0]) + sum(after[1].values()) - sum(before[1].values())
             + after[2] - before[2]) / (after[3] - before[3])
    return {"rate": len(rows) / (last - first), "p50": np.percentile(lat, 50), "p99": np.percentile(lat, 99),
            "cpu_ms_per_post": procs_ms, "services_ms_per_post": services_ms, "cores": cores}


def config_text(port: int, store: str, extra: str = "", server_port: int = 0) -> str:
    """A daemon's or a role process's config; its server (for /readyz) on ``server_port``."""
    return (f"{store}\n[limits]\nallowed_networks = [\"127.0.0.0/8\"]\nper_host_rate = 100000\nqueue_size = 2000\n"
            f"[server]\nenabled = true\nhost = \"127.0.0.1\"\nport = {server_port}\n[log]\nlevel = \"warning\"\n{extra}"
            f"[[feeds]]\nname = \"bench\"\ntype = \"jsonfeed\"\nurl = \"http://127.0.0.1:{port}/feed.json\"\n"
            "interval = 0.05\njitter = 0\n")


ROLES = ["intake", "shard:0", "recorder"]


def layout(args) -> list[str]:
    """Each process's roles: ``--process`` as given, else one process a role."""
    return args.process or ROLES + ["worker"] * args.workers


def run_turn(mode: str, args, thumbs, tmp: Path, services) -> dict:
    from monitor.tools.services import free_port
    pg, rd = services
    q, go = mp.Queue(), mp.Event()
    host = mp.Process(target=host_process, args=(thumbs, args.posts, 500, q, args.rate, go), daemon=True)
    host.start()
    services.adopt(host)  # these end with the servers if the bench is killed
    port = q.get()
    procs, database = [], None
    try:
        if mode == "one process":
            db = tmp / f"one-{uuid.uuid4().hex[:6]}.sqlite"
            seed(str(db), thumbs[:200], args.library)
            conf = tmp / "one.toml"
            ports = [free_port()]
            conf.write_text(config_text(port, f'[store]\npath = "{db}"', server_port=ports[0]))
            procs.append(subprocess.Popen([sys.executable, "-m", "monitor", "run", "--config", str(conf)]))
            services.adopt(procs[-1])
            wait_ready(ports, procs)
            go.set()
            return measure(str(db), args.posts, procs, host.pid)
        name = f"b_{uuid.uuid4().hex[:10]}"
        url, database = pg.create_database(name), name  # named for dropping once it exists
        seed(url, thumbs[:200], args.library)
        prefix, ports = f"b-{uuid.uuid4().hex[:6]}", []
        for n, role in enumerate(layout(args)):
            conf = tmp / f"roles-{n}.toml"
            ports.append(free_port())
            conf.write_text(config_text(port, f'[store]\nurl = "{url}"',
                                        f'[transport]\nurl = "{rd.url}"\nprefix = "{prefix}"\n', ports[-1]))
            procs.append(subprocess.Popen([sys.executable, "-m", "monitor", "run", "--config", str(conf),
                                           "--role", role]))
            services.adopt(procs[-1])
        wait_ready(ports, procs)
        go.set()
        return measure(url, args.posts, procs, host.pid, (pg, rd))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)
        host.terminate()
        if database:  # else autovacuum reads this turn's rows in the next one, on its CPU
            try:
                pg.drop_database(database)
            except subprocess.CalledProcessError as exc:
                print(f"the turn's database {database} was not dropped ({exc})", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--posts", type=int, default=10000)
    ap.add_argument("--library", type=int, default=100000)
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="fetch worker processes in the roles mode")
    ap.add_argument("--process", action="append", metavar="ROLES",
                    help="a roles process's --role (repeat it a process; default: intake, shard:0, recorder "
                         "and --workers workers, each its own process)")
    ap.add_argument("--modes", default="one process,roles", help="which to run, comma-separated")
    ap.add_argument("--rate", type=float, default=None,
                    help="posts published per second (default: as fast as the daemon polls, 500 a poll)")
    args = ap.parse_args()
    from monitor.tools.services import throwaway
    from monitor.warmup import warm_up
    warm_up(lambda text: print(text, file=sys.stderr))
    thumbs = make_thumbs(args.corpus, 1021)
    with open("/proc/cpuinfo") as fh:
        cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "?")
    print(f"CPU: {cpu}, {os.cpu_count()} cores shared by every process (feed host, daemon or roles, "
          f"Redis, PostgreSQL); {args.posts:,} posts, library {args.library:,} entries")
    results: dict[str, list[dict]] = {m: [] for m in args.modes.split(",")}
    with throwaway() as services, tempfile.TemporaryDirectory() as tmp:
        for turn in range(args.turns):
            # one process first, then roles first, and so on: a drift of the machine's speed
            # through a run favours neither (a pair is its turn's two runs, back to back)
            for mode in (list(results) if turn % 2 == 0 else list(results)[::-1]):
                r = run_turn(mode, args, thumbs, Path(tmp), services)
                results[mode].append(r)
                names = ["daemon"] if mode == "one process" else layout(args)
                cpu = ", ".join([f"{n} {c:.2f}" for n, c in zip(names, r["cpu_ms_per_post"], strict=True)]
                                + [f"{n} {c:.2f}" for n, c in r["services_ms_per_post"].items()])
                print(f"turn {turn + 1}, {mode}: {r['rate']:.0f} posts/s, discovered -> recorded "
                      f"p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms; {r['cores']:.2f} cores busy; "
                      f"CPU ms per post: {cpu}", flush=True)
    if len(results) < 2:
        return
    one = np.median([r["rate"] for r in results["one process"]])
    roles = np.median([r["rate"] for r in results["roles"]])
    # each turn's pair too: the machine's speed drifts from minute to minute, the pair less
    pairs = [r["rate"] / o["rate"] for o, r in zip(results["one process"], results["roles"], strict=True)]
    print(f"median: one process {one:.0f} posts/s, roles {roles:.0f} posts/s: roles / one process = "
          f"{roles / one:.2f}x (target >= 1.3x); turn by turn {', '.join(f'{p:.2f}x' for p in pairs)}, "
          f"median {np.median(pairs):.2f}x")


if __name__ == "__main__":
    main()
