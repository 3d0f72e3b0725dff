"""Cold start: seconds from an empty numba cache to the first output and to work, each
command in its own fresh NUMBA_CACHE_DIR, the old way (one process compiles everything)
beside the new (cold modules compiled in separate interpreters at once).

    python3 bench/coldstart.py IMAGE [--rounds 2]

IMAGE is any JPEG (the first `hash` and `match` use it; the library is its folder's first
few images). Measures: the compile alone (warm_up, one process vs processes at once), the
first `hash` (first output line, exit), and `run` (seconds until /readyz answers 200).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from pipeline import wait_ready  # noqa: E402 - bench/pipeline.py, beside this file

from monitor.tools.services import free_port  # noqa: E402 - the repository root, put on the path by pipeline

CLI = [sys.executable, "-m", "monitor"]


def cold_env(cache: str, **extra: str) -> dict:
    return {**os.environ, "NUMBA_CACHE_DIR": cache, "PYTHONUNBUFFERED": "1", **extra}


def time_to_first_line(args: list[str], env: dict) -> tuple[float, float]:
    """(seconds to the first line on stdout or stderr, seconds to exit)."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    for _ in proc.stdout:
        if first is None:
            first = time.perf_counter() - start
    proc.wait()
    if proc.returncode:
        raise SystemExit(f"{args} exited {proc.returncode}")
    return first or float("nan"), time.perf_counter() - start


def warm_up_seconds(cache: str, processes: int | None) -> float:
    start = time.perf_counter()
    code = f"from monitor.warmup import warm_up; warm_up(None, processes={processes!r})"
    subprocess.run([sys.executable, "-c", code], env=cold_env(cache), check=True)
    return time.perf_counter() - start


def ready_seconds(cache: str, workdir: Path) -> float:
    port = free_port()
    cfg = workdir / "config.toml"
    cfg.write_text(f'[store]\npath = "m.sqlite"\n[server]\nport = {port}\n')
    start = time.perf_counter()
    proc = subprocess.Popen([*CLI, "run", "--config", str(cfg)], env=cold_env(cache), cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready([port], [proc], timeout=300, poll=0.1)
        return time.perf_counter() - start
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print(f"CPU: {cpu_name()}, {len(os.sched_getaffinity(0))} usable cores")
    rows: dict[str, list[float]] = {}
    for _ in range(args.rounds):  # in turns: the machine's speed drifts
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            rows.setdefault("compile, one process", []).append(warm_up_seconds(a, 1))
            rows.setdefault("compile, processes at once", []).append(warm_up_seconds(b, None))
        with tempfile.TemporaryDirectory() as cache:
            first, done = time_to_first_line([*CLI, "hash", str(args.image), "--no-cache"], cold_env(cache))
            rows.setdefault("first `hash`: first output", []).append(first)
            rows.setdefault("first `hash`: done", []).append(done)
        with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as work:
            rows.setdefault("first `run`: /readyz 200", []).append(ready_seconds(cache, Path(work)))
        with tempfile.TemporaryDirectory() as work:  # the same, warm (the cache of the `hash` above is gone)
            cache = os.path.join(work, "cache")
            warm_up_seconds(cache, None)
            rows.setdefault("warm `run`: /readyz 200", []).append(ready_seconds(cache, Path(work)))
    for label, values in rows.items():
        print(f"{label:36s} " + "  ".join(f"{v:6.2f} s" for v in values))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
