"""Headless Chromium (Debian's package) driven over the DevTools protocol with aiohttp."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile

import aiohttp

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    def __init__(self, ws):
        self.ws = ws
        self.ids = itertools.count(1)

    async def send(self, method: str, **params):
        msg_id = next(self.ids)
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        while True:
            msg = await asyncio.wait_for(self.ws.receive_json(), 30)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg["result"]

    async def eval(self, expression: str):
        out = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True,
                              returnByValue=True)
        if "exceptionDetails" in out:
            raise RuntimeError(out["exceptionDetails"])
        return out["result"].get("value")

    async def wait(self, expression: str, timeout: float = 30.0):
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if await self.eval(expression):
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"browser condition not met: {expression}")

    async def images_loaded(self) -> tuple[int, int]:
        """(images rendered with pixels, images on the page), once loading settled."""
        await self.wait("document.readyState === 'complete' && "
                        "[...document.images].every(i => i.complete)")
        return tuple(await self.eval(
            "[[...document.images].filter(i => i.naturalWidth > 0).length, document.images.length]"))

    async def click(self, selector: str) -> None:
        """A real mouse click (press and release) at the element's centre."""
        box = await self.eval(f"(() => {{const e = document.querySelector({json.dumps(selector)});"
                              "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
                              "return [r.x + r.width / 2, r.y + r.height / 2];})()")
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left",
                            clickCount=1)


class Browser:
    async def __aenter__(self) -> Browser:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        # Chromium's helper processes may still be writing the profile for a moment
        # after the browser exits: a leftover file must not fail the test.
        self.profile = tempfile.TemporaryDirectory(ignore_cleanup_errors=True)
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--allow-file-access-from-files", f"--user-data-dir={self.profile.name}",
             f"--remote-debugging-port={self.port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)  # its own process group: helpers are stopped with it
        self.http = aiohttp.ClientSession()
        for _ in range(100):
            try:
                async with self.http.get(f"http://127.0.0.1:{self.port}/json/version") as r:
                    await r.json()
                    break
            except aiohttp.ClientError:
                await asyncio.sleep(0.2)
        self.sockets = []
        return self

    async def open(self, url: str) -> Page:
        async with self.http.put(f"http://127.0.0.1:{self.port}/json/new?{url}") as r:
            target = await r.json()
        ws = await self.http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        self.sockets.append(ws)
        page = Page(ws)
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        # A new target starts as about:blank; wait for the real document.
        await page.wait("location.href !== 'about:blank' && document.readyState === 'complete'")
        return page

    async def __aexit__(self, *exc) -> None:
        for ws in self.sockets:
            await ws.close()
        await self.http.close()
        _signal_group(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.profile.cleanup()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # every process of the group has already exited
        pass
