"""Throwaway PostgreSQL and Redis servers in a temp dir on free loopback ports: for
`demo --shards`, the tests and the benchmarks. Nothing here is used by a configured daemon,
which connects to the servers its config names.

PostgreSQL comes from ``initdb``/``pg_ctl`` on PATH or in ``/usr/lib/postgresql/*/bin``
(where Debian puts them); run as root, the cluster belongs to the ``postgres`` user, as
``initdb`` refuses root. Redis is ``redis-server`` from PATH, with appendonly on.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

MISSING_POSTGRES = ("PostgreSQL's initdb and pg_ctl were not found (on PATH or in /usr/lib/postgresql/*/bin): "
                    "install the Debian package `postgresql`")
MISSING_REDIS = "redis-server was not found on PATH: install the Debian package `redis-server`"


class ServiceMissing(RuntimeError):
    """A server program is not installed; the message names the package."""


def free_port() -> int:
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

    def restart(self) -> None:
        self._ctl("restart", "-w", "-m", "fast")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._ctl("stop", "-m", "immediate")


class Redis:
    """``redis-server`` with appendonly on (a restart keeps the streams), on a free port."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = root / "redis.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Redis:
        binary = shutil.which("redis-server")
        if not binary:
            raise ServiceMissing(MISSING_REDIS)
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root),
                                      "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                                      "--logfile", str(self.log), "--protected-mode", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, 20, self.proc, "redis-server", self.log)
        return self

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


@contextlib.contextmanager
def throwaway(postgres: bool = True, redis: bool = True):
    """(Postgres or None, Redis or None), started in a temp dir and stopped and removed after."""
    root = Path(tempfile.mkdtemp(prefix="repost-monitor-services-"))
    os.chmod(root, 0o755)
    pg = rd = None
    try:
        if postgres:
            (root / "pg").mkdir()
            pg = Postgres(root / "pg").start()
        if redis:
            (root / "redis").mkdir()
            rd = Redis(root / "redis").start()
        yield pg, rd
    finally:
        if rd:
            rd.stop()
        if pg:
            pg.stop()
        shutil.rmtree(root, ignore_errors=True)
