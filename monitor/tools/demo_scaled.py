"""`repost-monitor demo --shards S`: the same demo, scaled out. It starts a Redis server and
a throwaway PostgreSQL cluster in a temp dir on free loopback ports, then the roles as
separate OS processes (an intake, a fetch worker, every shard twice, a recorder, a sender),
publishes the posts, SIGKILLs one shard replica half-way (its twin takes over what it
held), and prints every detection and the same summary line as the one-process demo.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

from monitor.records import matches as match_rows
from monitor.records import work as work_rows
from monitor.records.engines import open_store
from monitor.records.library import Library
from monitor.scaleout.admin import stats
from monitor.scan import add_files
from monitor.tools.demo import (
    DEADLINE_AFTER_PUBLISHING,
    demo_feeds,
    demo_stream,
    print_detection,
    sample_library,
    start_host,
    summarize,
)
from monitor.tools.services import ServiceMissing, free_port, throwaway
from monitor.warmup import warm_up

CLAIM_IDLE = 2.0  # seconds before a dead replica's messages are taken over (30 in production)


def _config(tmp: Path, pg_url: str, redis_url: str, shards: int, base: str, source: str) -> Path:
    feeds = ""
    for f in demo_feeds(source, base):
        feeds += "[[feeds]]\n" + "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in f.items())
    path = tmp / "config.toml"
    path.write_text(f'[store]\nurl = "{pg_url}"\n[match]\ntier = "near"\n'
                    '[limits]\nallowed_networks = ["127.0.0.0/8"]\nper_host_rate = 50\n'
                    f'[server]\nhost = "127.0.0.1"\n[transport]\nurl = "{redis_url}"\nshards = {shards}\n'
                    f"claim_idle_seconds = {CLAIM_IDLE}\n"
                    f'[[alerts]]\nname = "demo-archive"\ntype = "file"\npath = "{tmp / "alerts.jsonl"}"\n'
                    + feeds)
    return path


async def run_scaled_demo(shards: int, posts: int = 40, rate: float = 4.0, out=None, source: str = "feeds",
                          keep_running: bool = False) -> int:
    out = out or sys.stdout

    def say(text: str) -> None:
        print(f"[demo] {text}", file=out, flush=True)

    await asyncio.to_thread(warm_up, say)  # compiled once here, loaded from the cache by the roles
    try:
        services = throwaway()
        running = await asyncio.to_thread(services.__enter__)
        pg, rd = running
    except ServiceMissing as exc:
        say(str(exc))
        return 2
    try:
        say(f"PostgreSQL on 127.0.0.1:{pg.port}, Redis on 127.0.0.1:{rd.port} (throwaway, in a temp dir)")
        return await _run(running, shards, posts, rate, out, source, say, keep_running)
    finally:
        await asyncio.to_thread(services.__exit__, None, None, None)


async def _run(services, shards, posts, rate, out, source, say, keep_running) -> int:
    pg, rd = services
    stream = demo_stream(posts)
    host, runner = await start_host(stream, rate)
    store = await asyncio.to_thread(open_store, pg.url)
    library = await asyncio.to_thread(Library, store)
    await asyncio.to_thread(add_files, library, sample_library(), progress=False)
    procs: dict[str, subprocess.Popen] = {}
    timed_out: list[str] = []
    detected: dict[str, str] = {}
    tmp = services.root / "roles"  # configs and logs, removed with the servers (by the reaper too)
    tmp.mkdir()
    config = _config(tmp, pg.url, rd.url, shards, host.base, source)
    roles = [("intake", "intake"), ("worker", "worker"), ("recorder", "recorder"), ("sender", "sender")]
    roles += [(f"shard{k}{r}", f"shard:{k}") for k in range(shards) for r in "ab"]
    ports = {}
    for name, role in roles:
        ports[name] = free_port()
        with open(tmp / f"{name}.log", "wb") as log:
            procs[name] = subprocess.Popen([sys.executable, "-m", "monitor", "run", "--config", str(config),
                                            "--role", role, "--port", str(ports[name])],
                                           stdout=subprocess.DEVNULL, stderr=log)
        services.adopt(procs[name])  # stopped with the servers, however this process ends
    try:
        say(f"{len(procs)} role processes: intake, worker, recorder, sender, and shards 0..{shards - 1} "
            f"twice each; library: {len(library.index)} images in {shards} shards")
        await _wait_for_consumers(config, shards, procs, say, logs=tmp)
        say("metrics: " + ", ".join(f"{name} http://127.0.0.1:{port}/metrics" for name, port in ports.items()))
        say(f"feed host on {host.base}; {len(stream)} posts, {rate:g} per second")
        host.start()
        stop = asyncio.Event()  # SIGINT/SIGTERM: the role processes and servers are stopped too
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        last, killed = 0, False
        deadline = host.started + len(stream) / rate + DEADLINE_AFTER_PUBLISHING
        while not stop.is_set():
            await asyncio.sleep(0.2)
            host.stream_published()
            for rec in await asyncio.to_thread(match_rows.records_after, store, last):
                last = rec.id
                detected[host.post_name(rec.work.image_url)] = rec.entry.label
                print_detection(rec, out)
            if not killed and len(host.published()) >= len(stream) // 2:
                procs["shard0a"].kill()
                killed = True
                say(f"killed one replica of shard 0 (SIGKILL); its twin takes over what it held "
                    f"after {CLAIM_IDLE:g} s")
            seen, pending = await asyncio.to_thread(work_rows.counts, store)
            if keep_running:
                continue
            if host.done_publishing and seen >= len(stream) and pending == 0:
                break
            if time.time() > deadline:
                timed_out.append(f"{seen} of {len(stream)} posts seen, {pending} still pending")
                break
        for rec in await asyncio.to_thread(match_rows.records_after, store, last):
            detected[host.post_name(rec.work.image_url)] = rec.entry.label
            print_detection(rec, out)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            try:
                await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
        await asyncio.to_thread(store.close)
        await runner.cleanup()
    return summarize(stream, detected, timed_out, out)


async def _wait_for_consumers(config_path: Path, shards: int, procs: dict, say, timeout: float = 120,
                              logs: Path | None = None) -> None:
    """Until every group has a consumer (each role process is up and reading). A role that
    exits first fails the demo with the end of its log (``logs``: their folder, removed
    with the servers)."""
    from monitor.config import load_config
    config = load_config(config_path)
    want = {("work", "workers"), ("answers", "recorders")} | {("fingerprints", f"shard-{k}") for k in range(shards)}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [n for n, p in procs.items() if p.poll() is not None]
        if dead:
            said = "".join(f"\n--- {n}'s log, its end:\n" + _log_end(logs / f"{n}.log") for n in dead if logs)
            raise RuntimeError(f"role processes exited at start: {', '.join(dead)}{said}")
        doc = await stats(config)
        have = {(s, g["group"]) for s, v in doc.items() for g in v["groups"] if g["consumers"]}
        if want <= have:
            return
        await asyncio.sleep(0.3)
    raise RuntimeError("the role processes did not start in time")


def _log_end(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(unreadable: {exc})"
