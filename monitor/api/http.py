"""The API's guard and plumbing: settings, JSON errors, Host/Origin/Content-Type checks,
credentials (bearer token, review cookie, HMAC signature) checked before a body is read,
bodies read bounded in size and time.

With a token configured, every ``/v1`` request needs ``Authorization: Bearer TOKEN``;
``/v1/ingest`` also accepts an HMAC signature instead (the webhook scheme:
``X-Repost-Monitor-Timestamp`` and ``X-Repost-Monitor-Signature: v1=hex(hmac_sha256(secret,
ts + "." + body))``), refused when older than 5 minutes or already seen (replay). Errors are
JSON ``{"error": {"code", "message"}}`` with a fitting status.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionResetError

from monitor.fetch import Fetcher
from monitor.metrics import Metrics
from monitor.pipeline import Pipeline
from monitor.records import work as work_rows
from monitor.records.library import Library
from monitor.records.store import DatabaseError, Store
from monitor.search.matcher import Matcher

log = logging.getLogger("repost_monitor.server")

SIGNATURE_TOLERANCE = 300.0
MAX_BODY = 20 * 1024 * 1024          # an upload; JSON bodies are capped lower
MAX_JSON_BODY = 1024 * 1024
MAX_PARTS = 64                       # multipart parts in all (files and fields)
MAX_FILES = 20                       # image files per multipart request
MAX_FIELD_BYTES = 16 * 1024          # one text field of a form
BODY_SECONDS = 30.0                  # a body that takes longer to arrive is refused (slow drip)
STORE_RETRY_AFTER = 5                # seconds a caller is told to wait while the store is failing
UNAUTHENTICATED_BODIES = 4           # signed bodies read at once before their signature is checked
# Uploads read, decoded and matched at once; the rest wait in their sockets (TCP holds the bytes
# back) for UPLOAD_WAIT seconds at most, then get 503. 300 callers' 8 MB uploads at once held
# 1.3 GB before (now 0.4 GB), and /healthz took up to 0.7 s (now 26 ms).
UPLOAD_SLOTS = 4
UPLOAD_WAIT = 30.0
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
MULTIPART_ROUTES = frozenset({"/v1/ingest", "/v1/check", "/v1/library"})
REVIEW_COOKIE = "rm_review"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass
class Services:
    """What the API needs from the running daemon. The server starts before the
    kernels compile: the auth settings are known at once, the rest is attached
    when the daemon is ready, and until then /v1 and /review answer 503."""
    store: Store | None = None
    library: Library | None = None
    pipeline: Pipeline | None = None
    matcher: Matcher | None = None
    fetcher: Fetcher | None = None
    token: str | None = None
    hmac_secret: str | None = None
    library_folders: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    loopback_only: bool = True
    allow_unauthenticated: bool = False
    _unauthenticated_bodies: asyncio.Semaphore | None = field(default=None, repr=False)
    _uploads: asyncio.Semaphore | None = field(default=None, repr=False)

    def attach(self, store: Store, library: Library, pipeline: Pipeline, matcher: Matcher,
               fetcher: Fetcher) -> None:
        self.store, self.library, self.pipeline = store, library, pipeline
        self.matcher, self.fetcher = matcher, fetcher

    @property
    def ready(self) -> bool:
        return self.pipeline is not None

    @property
    def open(self) -> bool:
        """No credentials needed: nothing configured, on loopback (or explicitly allowed)."""
        return not self.token and not self.hmac_secret and (self.loopback_only or self.allow_unauthenticated)

    def review_cookie(self) -> str:
        # The cookie proves the token was given once; it is not the token itself.
        return hmac.new((self.token or "").encode(), b"rm-review-cookie", hashlib.sha256).hexdigest()

    def upload_slots(self) -> asyncio.Semaphore:
        if self._uploads is None:
            self._uploads = asyncio.Semaphore(UPLOAD_SLOTS)
        return self._uploads

    def body_slots(self) -> asyncio.Semaphore:
        if self._unauthenticated_bodies is None:
            self._unauthenticated_bodies = asyncio.Semaphore(UNAUTHENTICATED_BODIES)
        return self._unauthenticated_bodies


METRICS_KEY = web.AppKey("metrics", Metrics)
READY_KEY = web.AppKey("ready", dict)
SERVICES_KEY = web.AppKey("services", Services)


class ApiError(web.HTTPException):
    """A JSON error ``{"error": {"code", "message"}}`` with any status."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        self.status_code = status
        super().__init__(text=json.dumps({"error": {"code": code, "message": message}}),
                         content_type="application/json", headers=headers)


def error(status: int, code: str, message: str) -> ApiError:
    return ApiError(status, code, message)


def _json_error(status: int, code: str, message: str, headers=None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status,
                             headers=headers)


@web.middleware
async def json_errors(request: web.Request, handler):
    """Every error as JSON with its status; a bug is a logged 500 without a traceback
    in the body; a client that went away is not an error of ours."""
    try:
        return await handler(request)
    except ApiError:
        raise
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        return _json_error(exc.status, (exc.reason or "error").lower().replace(" ", "_"),
                           exc.reason or "error", headers)
    except (ConnectionError, asyncio.IncompleteReadError, ClientConnectionResetError):
        log.debug("client went away during %s %s", request.method, request.path)
        raise web.HTTPBadRequest() from None
    except TimeoutError:
        return _json_error(408, "body_timeout", f"the body did not arrive within {BODY_SECONDS:g} s")
    except DatabaseError as exc:  # a full disk, a failover: nothing was taken, the caller retries
        log.error("%s %s: the store failed (%s); answered 503", request.method, request.path, exc)
        return _json_error(503, "store_unavailable", "the daemon's store cannot be written or read now; retry",
                           {"Retry-After": str(STORE_RETRY_AFTER)})
    except Exception:  # noqa: BLE001 - a bug: logged once with its traceback, answered plainly
        log.exception("internal error answering %s %s", request.method, request.path)
        return _json_error(500, "internal_error", "internal error; the daemon log has the details")


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0]


def _host_allowed(request: web.Request, svc: Services) -> bool:
    """DNS rebinding defence: a page on attacker.example that resolves to 127.0.0.1
    reaches us with ``Host: attacker.example``; only our own names are answered."""
    host = (request.host or "").strip().lower()
    name = _host_name(host)
    allowed = {h.lower() for h in svc.allowed_hosts}
    if name in allowed or host in allowed:
        return True
    if svc.loopback_only:
        return name in LOOPBACK_NAMES or name.startswith("127.")
    return not allowed  # off loopback credentials are required anyway; an allow-list narrows it


def _origin_allowed(request: web.Request, svc: Services) -> bool:
    if request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not a browser's cross-origin request (curl, scripts, server-side callers)
    own = f"{request.scheme}://{request.host}".lower()
    return origin.lower() == own or origin in svc.allowed_origins


@web.middleware
async def guard(request: web.Request, handler):
    """Host, Origin and Content-Type checks, before any handler reads a byte of the body."""
    if not request.path.startswith(("/v1/", "/review")):
        return await handler(request)
    svc = request.app[SERVICES_KEY]
    if not _host_allowed(request, svc):
        raise error(403, "bad_host", "this Host is not one of the server's names (server.allowed_hosts)")
    if request.match_info.http_exception is not None:
        return await handler(request)  # no such route or method: its 404/405, whatever the body's type
    if request.method not in SAFE_METHODS:
        if not _origin_allowed(request, svc):
            raise error(403, "cross_site", "cross-site request refused (server.allowed_origins)")
        ctype = request.content_type
        multipart_ok = request.path in MULTIPART_ROUTES
        # Browsers send text/plain and form bodies cross-site without a preflight: only
        # JSON (or multipart where documented) changes state. A DELETE has no body.
        needs_type = request.method != "DELETE" or request.body_exists
        if needs_type and ctype != "application/json" and not (multipart_ok and ctype == "multipart/form-data"):
            want = "application/json" + (" or multipart/form-data" if multipart_ok else "")
            raise error(415, "unsupported_media_type", f"send {want}, not {ctype or 'no content type'}")
    if not svc.ready:
        raise ApiError(503, "starting", "the daemon is starting (compiling kernels, loading the library)",
                       headers={"Retry-After": "5"})
    return await handler(request)


@contextlib.asynccontextmanager
async def upload_slot(svc: Services):
    """One of UPLOAD_SLOTS, for reading a multipart body and working on its images;
    503 with Retry-After when none is free within UPLOAD_WAIT seconds."""
    slots = svc.upload_slots()
    try:
        async with asyncio.timeout(UPLOAD_WAIT):
            await slots.acquire()
    except TimeoutError:
        raise ApiError(503, "busy", f"{UPLOAD_SLOTS} uploads are being worked on and more wait; retry",
                       headers={"Retry-After": "5"}) from None
    try:
        yield
    finally:
        slots.release()


async def _signed_ok(request: web.Request, body: bytes, secret: str) -> bool:
    ts = request.headers.get("X-Repost-Monitor-Timestamp", "")
    sig = request.headers.get("X-Repost-Monitor-Signature", "")
    if not ts.isdigit() or abs(time.time() - int(ts)) > SIGNATURE_TOLERANCE:
        return False
    want = "v1=" + hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, sig):
        return False
    # a valid signature is good once
    return await asyncio.to_thread(work_rows.claim_signature, request.app[SERVICES_KEY].store, sig, time.time(),
                                   2 * SIGNATURE_TOLERANCE)


def credentials_ok(request: web.Request, svc: Services) -> bool:
    if svc.open:
        return True
    if not svc.token:
        return False
    auth = request.headers.get("Authorization", "")
    if hmac.compare_digest(auth.encode(), f"Bearer {svc.token}".encode()):
        return True
    cookie = request.cookies.get(REVIEW_COOKIE, "")
    return bool(cookie) and hmac.compare_digest(cookie.encode(), svc.review_cookie().encode())


async def read_body(request: web.Request, limit: int) -> bytes:
    """The body, refused past ``limit`` bytes or ``BODY_SECONDS`` seconds."""
    if request.content_length is not None and request.content_length > limit:
        raise error(413, "request_entity_too_large", f"body over {limit:,} bytes")
    chunks, size = [], 0
    async with asyncio.timeout(BODY_SECONDS):
        async for chunk in request.content.iter_chunked(65536):
            size += len(chunk)
            if size > limit:
                raise error(413, "request_entity_too_large", f"body over {limit:,} bytes")
            chunks.append(chunk)
    return b"".join(chunks)


async def authorize(request: web.Request, *, allow_signature: bool = False) -> bytes | None:
    """Check a /v1 request's credentials from its headers, before its body is read.
    Returns the raw body when a signature had to be checked against it, else None
    (the handler reads the body itself, bounded)."""
    svc = request.app[SERVICES_KEY]
    if credentials_ok(request, svc):
        return None
    if allow_signature and svc.hmac_secret and "X-Repost-Monitor-Signature" in request.headers:
        slots = svc.body_slots()
        if slots.locked():
            raise ApiError(503, "busy", "too many signed bodies being checked; retry",
                           headers={"Retry-After": "1"})
        async with slots:
            body = await read_body(request, MAX_BODY)
        if await _signed_ok(request, body, svc.hmac_secret):
            return body
        raise error(401, "bad_signature", "signature missing, wrong, too old or replayed")
    if not svc.token and not svc.hmac_secret:
        raise error(401, "unauthorized", "this server listens off loopback: set server.token to use it")
    raise error(401, "unauthorized", "missing or wrong bearer token")
