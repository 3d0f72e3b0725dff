"""Throwaway PostgreSQL and Redis servers in a temp dir on free loopback ports: for
`demo --shards`, the tests and the benchmarks. Nothing here is used by a configured daemon,
which connects to the servers its config names.

PostgreSQL comes from ``initdb``/``pg_ctl`` on PATH or in ``/usr/lib/postgresql/*/bin``
(where Debian puts them); run as root, the cluster belongs to the ``postgres`` user, as
``initdb`` refuses root. Redis is ``redis-server`` from PATH, with appendonly on.
A reaper process (monitor/tools/reaper.py) stops them, and the processes handed to it with
``adopt``, if their owner ends without doing so (a kill -9, a closed terminal).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from monitor.tools.reaper import started

MISSING_POSTGRES = ("PostgreSQL's initdb and pg_ctl were not found (on PATH or in /usr/lib/postgresql/*/bin): "
                    "install the Debian package `postgresql`")
MISSING_REDIS = "redis-server was not found on PATH: install the Debian package `redis-server`"


class ServiceMissing(RuntimeError):
    """A server program is not installed; the message names the package."""


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    """The lowest port the kernel picks for outgoing connections (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port free now, for a server started next. Taken below the kernel's range for
    outgoing connections (a role's connection to Redis could otherwise take the port another
    role is about to listen on) and never the same twice in this process (a port let go is
    soon handed out again); the kernel's pick where that range leaves no room."""
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(200 if low > 12000 else 0):
        port = rng.randrange(10000, low)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)),
                                       None)
    if not found:
        raise ServiceMissing(MISSING_POSTGRES)
    return found


def _as_postgres(cmd: list[str]) -> list[str]:
    """Root may not run a cluster: hand the command to the postgres user."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


def _wait_port(port: int, timeout: float, proc: subprocess.Popen | None, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"{what} did not start on port {port}: {tail}")


class Postgres:
    """A cluster of its own: ``url`` names its database ``repost`` (user ``repost``, trust
    auth on loopback). ``restart()`` stops and starts it on the same port."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "pgdata"
        self.port = free_port()
        self.log = root / "postgres.log"
        self.url = f"postgresql://repost@127.0.0.1:{self.port}/repost"

    def _ctl(self, *args: str) -> None:
        subprocess.run(_as_postgres([postgres_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), *args]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> Postgres:
        initdb = postgres_bin("initdb")
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        subprocess.run(_as_postgres([initdb, "-D", str(self.data), "-U", "repost", "--auth=trust",
                                     "--encoding=UTF8", "--no-sync"]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                       f"unix_socket_directories = '{self.root}'\nfsync = off\nmax_connections = 200\n")
        self._ctl("start", "-w")
        subprocess.run(_as_postgres([postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                                     "repost", "repost"]), check=True)
        return self

    def create_database(self, name: str, encoding: str | None = None) -> str:
        """A new empty database in the cluster (in ``encoding`` if given); its URL."""
        extra = ["-E", encoding, "-T", "template0"] if encoding else []
        subprocess.run(_as_postgres([postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                                     "repost", *extra, name]), check=True)
        return f"postgresql://repost@127.0.0.1:{self.port}/{name}"

    def drop_database(self, name: str) -> None:
        """The database gone, its sessions ended first (CalledProcessError if it cannot be)."""
        subprocess.run(_as_postgres([postgres_bin("dropdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                                     "repost", "--if-exists", "--force", name]), check=True)

    def restart(self) -> None:
        self._ctl("restart", "-w", "-m", "fast")

    def stop_command(self) -> list[str]:
        return _as_postgres([postgres_bin("pg_ctl"), "-D", str(self.data), "stop", "-m", "immediate"])

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            subprocess.run(self.stop_command(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Redis:
    """``redis-server`` with appendonly on (a restart keeps the streams), on a free port."""

    def __init__(self, root: Path, on_start=None):
        self.root = root
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = root / "redis.log"
        self.proc: subprocess.Popen | None = None
        self._on_start = on_start  # called with each new server's pid (a restart starts another)

    def start(self) -> Redis:
        binary = shutil.which("redis-server")
        if not binary:
            raise ServiceMissing(MISSING_REDIS)
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root),
                                      "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                                      "--logfile", str(self.log), "--protected-mode", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self._on_start:
            self._on_start(self.proc.pid)
        _wait_port(self.port, 20, self.proc, "redis-server", self.log)
        return self

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


class _Reaper:
    """monitor/tools/reaper.py, started for one temp dir: it waits on a pipe only this
    process holds the write end of (os.pipe's ends are not inherited by the processes
    started here), and ROOT/reap.json tells it what to stop if this process ends first."""

    def __init__(self, root: Path):
        self.root = root
        self.plan: dict[str, list] = {"processes": [], "stop": []}
        read, self._pipe = os.pipe()
        # a process forked from this one (multiprocessing) would hold the write end too, and
        # the reaper would wait for it as well: the fork closes its copy
        os.register_at_fork(after_in_child=self._close_in_fork)
        try:
            # a session of its own: a closed terminal's SIGHUP and a Ctrl-C do not reach it
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("reaper.py")), str(root)],
                                         stdin=read, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
        finally:
            os.close(read)

    def _close_in_fork(self) -> None:
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None

    def _save(self) -> None:
        part = self.root / "reap.json.part"
        part.write_text(json.dumps(self.plan))
        os.replace(part, self.root / "reap.json")

    def adopt(self, pid: int) -> None:
        if (start := started(pid)) is not None:
            self.plan["processes"].append([pid, start])
            self._save()

    def stop_with(self, argv: list[str]) -> None:
        self.plan["stop"].append(argv)
        self._save()

    def release(self) -> None:
        """The owner has stopped everything itself: the reaper ends (EOF, and ROOT is gone)."""
        pipe, self._pipe = self._pipe, None
        os.close(pipe)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


class Services(tuple):
    """(Postgres or None, Redis or None), as :func:`throwaway` yields them; ``adopt(proc)``
    has a process started over them stopped with them if the owner dies (the role
    processes of `demo --shards`, which would otherwise retry forever)."""

    def __new__(cls, pg: Postgres | None, rd: Redis | None, reaper: _Reaper):
        services = super().__new__(cls, (pg, rd))
        services._reaper = reaper
        return services

    @property
    def root(self) -> Path:
        return self._reaper.root

    def adopt(self, proc) -> None:
        """``proc``: a subprocess.Popen or a multiprocessing.Process, started."""
        self._reaper.adopt(proc.pid)


@contextlib.contextmanager
def throwaway(postgres: bool = True, redis: bool = True):
    """:class:`Services` (Postgres or None, Redis or None), started in a temp dir and
    stopped and removed after: by the reaper if this process ends first."""
    root = Path(tempfile.mkdtemp(prefix="repost-monitor-services-"))
    os.chmod(root, 0o755)
    reaper = _Reaper(root)
    pg = rd = None
    try:
        if postgres:
            (root / "pg").mkdir()
            pg = Postgres(root / "pg")
            reaper.stop_with(pg.stop_command())  # before it starts: a kill mid-start is covered too
            pg.start()
        if redis:
            (root / "redis").mkdir()
            rd = Redis(root / "redis", on_start=reaper.adopt).start()
        yield Services(pg, rd, reaper)
    finally:
        if rd:
            rd.stop()
        if pg:
            pg.stop()
        shutil.rmtree(root, ignore_errors=True)
        reaper.release()
