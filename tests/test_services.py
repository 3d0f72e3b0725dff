"""The throwaway servers of `demo --shards`, the tests and the benchmarks
(monitor/tools/services.py) end with the process that started them, however it ends: a
kill -9 or a closed terminal once left a PostgreSQL cluster, a Redis and the demo's role
processes running (retrying forever) and ~70 MB in the temp dir."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from monitor.tools.reaper import started

pytestmark = pytest.mark.slow  # starts PostgreSQL and Redis

ROOT = Path(__file__).resolve().parent.parent

# The owner: servers, and one process of its own started over them and handed to the reaper
OWNER = """
import json, subprocess, sys, time
from monitor.tools.services import throwaway
with throwaway() as services:
    pg, rd = services
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    services.adopt(child)
    print(json.dumps([pg.port, rd.port, str(services.root), child.pid, started(child.pid)]), flush=True)
    if sys.argv[1] == "stay":
        time.sleep(600)
"""


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _reapers(root: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"reaper.py {root}"], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def _owner(how: str) -> tuple[subprocess.Popen, list]:
    proc = subprocess.Popen([sys.executable, "-c", "from monitor.tools.reaper import started\n" + OWNER, how],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line, "the owner did not start its servers"
    return proc, json.loads(line)


def _until(check, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGHUP])
def test_servers_and_adopted_processes_end_with_a_killed_owner(signum):
    proc, (pg_port, redis_port, root, child, child_start) = _owner("stay")
    try:
        assert _listening(pg_port) and _listening(redis_port)
        assert _reapers(root), "no reaper watches the servers"
        assert started(child) == child_start
        proc.send_signal(signum)  # SIGHUP: what a closed terminal sends; no handler ends the process
        assert proc.wait(10) == -signum
        assert _until(lambda: not Path(root).exists()), "the servers' temp dir is still there"
        assert not _listening(pg_port), "PostgreSQL still runs"
        assert not _listening(redis_port), "Redis still runs"
        assert started(child) is None, "the adopted process still runs"
        assert _until(lambda: not _reapers(root)), "the reaper did not end"
    finally:
        if proc.poll() is None:
            proc.kill()
        if started(child) == child_start:
            os.kill(child, signal.SIGKILL)


def test_an_owner_that_ends_normally_leaves_nothing_and_no_reaper():
    proc, (pg_port, redis_port, root, child, child_start) = _owner("leave")
    try:
        assert proc.wait(60) == 0
        assert not Path(root).exists()
        assert not _listening(pg_port) and not _listening(redis_port)
        assert _until(lambda: not _reapers(root), 10), "the reaper outlived its owner's clean exit"
        # the owner's own processes are its to stop when it ends normally: left alone here
        assert started(child) == child_start
    finally:
        if started(child) == child_start:
            os.kill(child, signal.SIGKILL)


def test_a_database_is_dropped_with_its_sessions_ended_and_dropping_it_again_is_harmless(postgres_cluster):
    """bench/scaleout.py drops each turn's database so autovacuum does not read it during the
    next turn; a session left open on it does not stop that."""
    import uuid

    import psycopg
    name = f"d_{uuid.uuid4().hex[:12]}"
    url = postgres_cluster.create_database(name)
    left_open = psycopg.connect(url)
    try:
        postgres_cluster.drop_database(name)
        postgres_cluster.drop_database(name)
        with pytest.raises(psycopg.OperationalError, match="does not exist"):
            psycopg.connect(url).close()
    finally:
        left_open.close()


async def test_a_role_that_exits_at_start_fails_the_scaled_demo_with_the_end_of_its_log(tmp_path):
    """`demo --shards` waits for every role to read its stream; a role process that exits
    first (a port taken, a bad config) fails the demo with its log's last lines, which are
    otherwise removed with the temp dir (it said only "role processes exited at start: intake")."""
    from monitor.tools.demo_scaled import _config, _wait_for_consumers
    config = _config(tmp_path, "postgresql://u@127.0.0.1:1/d", "redis://127.0.0.1:1/0", 2, "http://127.0.0.1:1",
                     "feeds")
    with open(tmp_path / "intake.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", "import sys; print('OSError: [Errno 98] address in use', "
                                 "file=sys.stderr); sys.exit(1)"], stderr=log)
    proc.wait(30)
    with pytest.raises(RuntimeError) as failed:
        await _wait_for_consumers(config, 2, {"intake": proc}, print, timeout=10, logs=tmp_path)
    assert "exited at start: intake" in str(failed.value) and "[Errno 98] address in use" in str(failed.value)
