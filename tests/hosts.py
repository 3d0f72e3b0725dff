"""Real aiohttp servers on loopback playing feed hosts, image hosts and receivers."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys

from aiohttp import web

from monitor.tools.services import free_port  # noqa: F401 - the tests' one free-port helper


@contextlib.asynccontextmanager
async def serve(app: web.Application):
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class DaemonProcess:
    """`repost-monitor run --config FILE` as a subprocess, its log appended to a file (a full
    pipe would block it): started, SIGKILLed and restarted as a test needs."""

    def __init__(self, config_path, log_path):
        self.cmd = [sys.executable, "-m", "monitor", "run", "--config", str(config_path)]
        self.log_path = log_path
        self.proc = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stderr=log, stdout=subprocess.DEVNULL)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        """SIGTERM; the exit status (0 for a clean stop)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as fh:
            return fh.read()
