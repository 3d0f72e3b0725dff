"""Real aiohttp servers on loopback playing feed hosts, image hosts and receivers."""

from __future__ import annotations

import asyncio
import contextlib
import io
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


class Tarpit:
    """An image host that answers every image after ``delay`` seconds and lists ``count`` of them
    in a JSON Feed (``/feed.json``), served on 127.0.0.2: another host name than the loopback
    sites' 127.0.0.1. Counts the downloads in flight (``most``: at once) and each image's."""

    def __init__(self, image: bytes, count: int = 200, delay: float = 1.0):
        self.image, self.count, self.delay = image, count, delay
        self.now = self.most = 0
        self.requests: dict[str, int] = {}

    def app(self) -> web.Application:
        async def feed(request):
            base = f"http://{request.host}"
            return web.json_response({"version": "https://jsonfeed.org/version/1.1", "title": "tarpit", "items": [
                {"id": f"t{n}", "attachments": [{"url": f"{base}/img/{n}.jpg", "mime_type": "image/jpeg"}]}
                for n in range(self.count)]})

        async def image(request):
            name = request.match_info["name"]
            self.requests[name] = self.requests.get(name, 0) + 1
            self.now += 1
            self.most = max(self.most, self.now)
            try:
                await asyncio.sleep(self.delay)
                return web.Response(body=self.image, content_type="image/jpeg")
            finally:
                self.now -= 1
        app = web.Application()
        app.router.add_get("/feed.json", feed)
        app.router.add_get("/img/{name}", image)
        return app

    @contextlib.asynccontextmanager
    async def serve(self):
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.2", 0).start()
        try:
            yield f"http://127.0.0.2:{runner.addresses[0][1]}"
        finally:
            await runner.cleanup()


class DaemonProcess:
    """`repost-monitor run --config FILE` as a subprocess, its log appended to a file (a full
    pipe would block it): started, SIGKILLed and restarted as a test needs. ``adopt``: a
    throwaway Services' adopt, so that a role process retrying its servers forever is
    stopped with them even when the test run itself is killed."""

    def __init__(self, config_path, log_path, adopt=None):
        self.cmd = [sys.executable, "-m", "monitor", "run", "--config", str(config_path)]
        self.log_path, self.adopt = log_path, adopt
        self.proc = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stderr=log, stdout=subprocess.DEVNULL)
        if self.adopt is not None:
            self.adopt(self.proc)

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


async def cancel_and_list_left(task: asyncio.Task, before: set[asyncio.Task]) -> list[asyncio.Task]:
    """Cancel ``task`` (a daemon or a node), wait for it, and list the tasks it started that
    still run (those of the tests' own servers aside)."""
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=15)
    if not done:  # name where each task stood: a hang is otherwise a bare TimeoutError
        stacks = io.StringIO()
        for t in asyncio.all_tasks() - before - {asyncio.current_task()}:
            t.print_stack(limit=12, file=stacks)
        raise AssertionError(f"{task.get_name()} did not end within 15 s of its cancel:\n{stacks.getvalue()}")
    await asyncio.sleep(0.2)
    return [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task() and not t.done()
            and "RequestHandler" not in repr(t.get_coro())]
