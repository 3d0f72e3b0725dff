"""Stops the throwaway servers of monitor/tools/services.py, and the processes their owner
started over them, once the owner is gone, however it ended: a kill -9, a closed terminal
(SIGHUP), an OOM kill. Without it each such end left a PostgreSQL cluster, a Redis and (for
`demo --shards`) eight role processes running, retrying forever, and ~70 MB in the temp dir.

    python reaper.py ROOT    (run as a file, not imported: no package import, so it starts at once)

Its stdin is the read end of a pipe whose write end only the owner holds: the read returns
(EOF) when the owner closes it or dies. By then an owner that ended normally has stopped
everything and removed ROOT, and there is nothing to do; otherwise ROOT/reap.json names what
to stop: processes as (pid, start time), so that a pid the system has given to another
process since is left alone, and commands that stop a server (PostgreSQL's ``pg_ctl stop``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PLAN = "reap.json"
GRACE = 10.0  # s a process gets to end on SIGTERM before SIGKILL


def started(pid: int) -> int | None:
    """When a process started (clock ticks since boot: /proc/PID/stat's 22nd field); None
    when there is no such process, or only its zombie is left."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state, *rest = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if state in "ZX" else int(rest[18])


def _alive(processes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(pid, start) for pid, start in processes if started(pid) == start]


def _signal(processes: list[tuple[int, int]], sig: int) -> None:
    for pid, _ in processes:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def reap(root: Path) -> None:
    """Stop what ROOT/reap.json names, then remove ROOT."""
    try:
        plan = json.loads((root / PLAN).read_text())
    except (OSError, ValueError):
        plan = {}
    processes = _alive([(int(pid), int(start)) for pid, start in plan.get("processes", [])])
    _signal(processes, signal.SIGTERM)
    for argv in plan.get("stop", []):
        try:
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired):
            pass
    deadline = time.monotonic() + GRACE
    while (processes := _alive(processes)) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal(processes, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the owner's to handle
    root = Path(sys.argv[1])
    while sys.stdin.buffer.read(65536):  # nothing is written: this returns at EOF
        pass
    if root.exists():
        reap(root)


if __name__ == "__main__":
    main()
