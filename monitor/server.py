"""The daemon's HTTP face (aiohttp, in the daemon's process): health and metrics.

The ingest listener and the library/matches/alerts API are the alerts
issue's (#4); they plug into :func:`make_app` as more routes.
"""

from __future__ import annotations

from aiohttp import web

from .metrics import Metrics

METRICS_KEY = web.AppKey("metrics", Metrics)
READY_KEY = web.AppKey("ready", dict)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[READY_KEY]
    ok = bool(state.get("ready"))
    return web.json_response({"ready": ok, **{k: v for k, v in state.items() if k != "ready"}},
                             status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def make_app(metrics_: Metrics, ready: dict) -> web.Application:
    app = web.Application(client_max_size=1024 * 1024)
    app[METRICS_KEY] = metrics_
    app[READY_KEY] = ready
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


async def start_server(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start listening; returns the runner and the bound port (port 0 picks one)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1] if site._server else port  # noqa: SLF001
    return runner, bound
