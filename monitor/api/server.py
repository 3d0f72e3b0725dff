"""The daemon's HTTP face (aiohttp, in the daemon's process).

- ``/healthz``, ``/readyz``, ``/metrics``: open, for probes and Prometheus.
- ``/v1/...``: the ingest listener, synchronous checks, the library, the review of
  matches, the alert outbox; ``/v1/openapi.json`` describes them.
- ``/review``: the review page.

The guard (``http.py``) runs before every handler; handlers are in ``routes.py`` and
``review.py``; bodies are read by ``bodies.py``.
"""

from __future__ import annotations

from aiohttp import web

from monitor.api import review as review_page
from monitor.api import routes
from monitor.api.http import MAX_BODY, METRICS_KEY, READY_KEY, SERVICES_KEY, Services, guard, json_errors
from monitor.metrics import Metrics

__all__ = ["Services", "make_app", "start_server"]


def make_app(metrics_: Metrics, ready: dict, services: Services | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[json_errors, guard])
    app.on_response_prepare.append(_no_sniffing)
    app[METRICS_KEY] = metrics_
    app[READY_KEY] = ready
    app.router.add_get("/healthz", routes.healthz)
    app.router.add_get("/readyz", routes.readyz)
    app.router.add_get("/metrics", routes.metrics)
    if services is not None:
        app[SERVICES_KEY] = services
        r = app.router
        r.add_post("/v1/ingest", routes.ingest)
        r.add_post("/v1/check", routes.check)
        r.add_get("/v1/library", routes.library_list)
        r.add_post("/v1/library", routes.library_add)
        r.add_delete("/v1/library/{id}", routes.library_delete)
        r.add_post("/v1/library/{id}/allow", routes.library_allow)
        r.add_get("/v1/matches", routes.matches_list)
        r.add_post("/v1/matches/{id}/verdict", routes.match_verdict)
        r.add_get("/v1/alerts", routes.alerts_list)
        r.add_post("/v1/alerts/resend", routes.alerts_resend)
        r.add_get("/v1/openapi.json", routes.openapi)
        r.add_get("/websub/{feed}", routes.websub)
        r.add_post("/websub/{feed}", routes.websub)
        r.add_get("/review", review_page.review)
        r.add_get("/review/library/{id}.jpg", review_page.review_library_image)
    return app


async def _no_sniffing(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer is read as the type it says it is: an echoed WebSub challenge (text/plain)
    or an error's JSON that carries a caller's text is never sniffed into a page on our origin."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")


async def start_server(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start listening; returns the runner and the bound port (port 0 picks one)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1] if site._server else port  # noqa: SLF001
    return runner, bound
