"""The daemon's HTTP face (aiohttp, in the daemon's process).

- ``/healthz``, ``/readyz``, ``/metrics``: open, for probes and Prometheus.
- ``/v1/...``: the ingest listener, synchronous checks, the library, the
  review of matches, the alert outbox; ``/v1/openapi.json`` describes them.

With a token configured, every ``/v1`` request needs ``Authorization:
Bearer TOKEN``; ``/v1/ingest`` also accepts an HMAC signature instead (the
webhook scheme: ``X-Repost-Monitor-Timestamp`` and
``X-Repost-Monitor-Signature: v1=hex(hmac_sha256(secret, ts + "." + body))``),
refused when older than 5 minutes or already seen (replay). Errors are JSON
``{"error": {"code", "message"}}`` with a fitting status.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.client_exceptions import ClientConnectionResetError
from aiohttp.http_exceptions import BadHttpMessage
from pydantic import BaseModel, ValidationError

from feeds import FeedItem

from monitor.api import models as m
from monitor.records.alerts import list_alerts, resend_dead
from monitor.fetch import FetchError, Fetcher
from monitor.fingerprints import ImageError, fingerprint_bytes
from monitor.isotime import iso
from monitor.records.library import Library
from monitor.search.matcher import Matcher
from monitor.metrics import Metrics
from monitor.records.verdicts import allowances, set_allowances, set_verdict
from monitor.pipeline import Pipeline
from monitor.tools.report import THUMB, Finding, render
from monitor.records import matches as match_rows
from monitor.records import work as work_rows
from monitor.records.store import Store
from monitor.scan import add_files

log = logging.getLogger("repost_monitor.server")

SIGNATURE_TOLERANCE = 300.0
MAX_BODY = 20 * 1024 * 1024          # an upload; JSON bodies are capped lower
MAX_JSON_BODY = 1024 * 1024
MAX_PARTS = 64                       # multipart parts in all (files and fields)
MAX_FILES = 20                       # image files per multipart request
MAX_FIELD_BYTES = 16 * 1024          # one text field of a form
BODY_SECONDS = 30.0                  # a body that takes longer to arrive is refused (slow drip)
UNAUTHENTICATED_BODIES = 4           # signed bodies read at once before their signature is checked
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


def _signed_ok(request: web.Request, body: bytes, secret: str) -> bool:
    ts = request.headers.get("X-Repost-Monitor-Timestamp", "")
    sig = request.headers.get("X-Repost-Monitor-Signature", "")
    if not ts.isdigit() or abs(time.time() - int(ts)) > SIGNATURE_TOLERANCE:
        return False
    want = "v1=" + hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, sig):
        return False
    # a valid signature is good once
    return work_rows.claim_signature(request.app[SERVICES_KEY].store, sig, time.time(), 2 * SIGNATURE_TOLERANCE)


def _credentials_ok(request: web.Request, svc: Services) -> bool:
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
    if _credentials_ok(request, svc):
        return None
    if allow_signature and svc.hmac_secret and "X-Repost-Monitor-Signature" in request.headers:
        slots = svc.body_slots()
        if slots.locked():
            raise ApiError(503, "busy", "too many signed bodies being checked; retry",
                           headers={"Retry-After": "1"})
        async with slots:
            body = await read_body(request, MAX_BODY)
        if _signed_ok(request, body, svc.hmac_secret):
            return body
        raise error(401, "bad_signature", "signature missing, wrong, too old or replayed")
    if not svc.token and not svc.hmac_secret:
        raise error(401, "unauthorized", "this server listens off loopback: set server.token to use it")
    raise error(401, "unauthorized", "missing or wrong bearer token")


def _validate(model: type[BaseModel], doc):
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}"
                             for e in exc.errors(include_url=False, include_input=False)[:10])
        raise error(422, "invalid_body", problems) from None


async def json_body(request: web.Request, model: type[BaseModel], raw: bytes | None = None):
    """The JSON body validated by ``model`` (422 naming each bad field)."""
    raw = raw if raw is not None else await read_body(request, MAX_JSON_BODY)
    try:
        doc = json.loads(raw or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise error(400, "bad_json", f"body is not JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise error(400, "bad_json", "body must be a JSON object")
    return _validate(model, doc)


class _BufferedContent:
    """A body already in memory (read to check its signature), readable the way
    aiohttp's MultipartReader reads a request stream."""

    def __init__(self, data: bytes):
        self._data, self._pos = data, 0

    async def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        out = self._data[self._pos:end]
        self._pos += len(out)
        return out

    async def readline(self, *, max_line_length: int | None = None) -> bytes:
        end = self._data.find(b"\n", self._pos)
        end = len(self._data) if end < 0 else end + 1
        if max_line_length is not None and end - self._pos > max_line_length:
            raise ValueError("line too long")
        out = self._data[self._pos:end]
        self._pos = end
        return out

    def unread_data(self, data: bytes) -> None:
        self._pos -= len(data)

    def at_eof(self) -> bool:
        return self._pos >= len(self._data)


async def multipart_body(request: web.Request, raw: bytes | None = None,
                         max_file: int = MAX_BODY) -> tuple[dict[str, str], list[tuple[str, bytes]]]:
    """(form fields, uploaded files), streamed part by part: at most MAX_PARTS parts,
    MAX_FILES files of ``max_file`` bytes, fields of MAX_FIELD_BYTES, all within
    BODY_SECONDS. Nothing here parses a whole body in one call on the event loop."""
    content = _BufferedContent(raw) if raw is not None else request.content
    try:
        reader = MultipartReader(request.headers, content)
    except (AssertionError, ValueError, KeyError) as exc:
        raise error(400, "bad_multipart", f"not a multipart body: {exc}") from None
    fields: dict[str, str] = {}
    files: list[tuple[str, bytes]] = []
    parts = 0
    try:
        async with asyncio.timeout(BODY_SECONDS):
            while True:
                part = await reader.next()
                if part is None:
                    break
                parts += 1
                if parts > MAX_PARTS:
                    raise error(413, "too_many_parts", f"more than {MAX_PARTS} parts")
                if not isinstance(part, BodyPartReader):
                    raise error(400, "bad_multipart", "nested multipart bodies are not accepted")
                is_file = part.filename is not None
                if is_file and len(files) >= MAX_FILES:
                    raise error(413, "too_many_files", f"more than {MAX_FILES} files")
                cap = max_file if is_file else MAX_FIELD_BYTES
                chunks, size = [], 0
                while chunk := await part.read_chunk(65536):
                    size += len(chunk)
                    if size > cap:
                        raise error(413, "request_entity_too_large", f"part {part.name!r} is over {cap:,} bytes")
                    chunks.append(chunk)
                data = b"".join(chunks)
                if is_file:
                    files.append((part.filename or "upload", data))
                elif part.name:
                    text = data.decode(part.get_charset("utf-8"), errors="replace")
                    if "\x00" in text:
                        raise error(422, "invalid_body", f"{part.name}: NUL characters are not allowed")
                    fields[part.name] = text
    except (ValueError, LookupError, BadHttpMessage) as exc:
        raise error(400, "bad_multipart", f"could not parse the multipart body: {str(exc)[:200]}") from None
    return fields, files


def _when(text) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        raise error(422, "bad_published", f"'published' is not an ISO 8601 time: {text!r}") from None


def _is_multipart(request: web.Request) -> bool:
    return request.content_type.startswith("multipart/")


async def _fingerprint(request: web.Request, data: bytes, views: str = "query"):
    svc = request.app[SERVICES_KEY]
    kwargs = {"max_pixels": svc.pipeline.max_pixels} if svc.pipeline.max_pixels else {}
    try:
        return await asyncio.get_running_loop().run_in_executor(
            svc.pipeline.executor, lambda: fingerprint_bytes(data, views=views, **kwargs))
    except ImageError as exc:
        raise error(422, f"image_{exc.reason}", str(exc)) from None


def _max_image(svc: Services) -> int:
    return svc.fetcher.limits.max_image_bytes if svc.fetcher is not None else MAX_BODY


# -- handlers -------------------------------------------------------------------
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[READY_KEY]
    ok = bool(state.get("ready"))
    return web.json_response({"ready": ok, "phase": state.get("phase", "starting"),
                              **{k: v for k, v in state.items() if k not in ("ready", "phase")}},
                             status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS_KEY].render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def _ok(model: BaseModel, status: int = 200) -> web.Response:
    return web.json_response(model.model_dump(mode="json"), status=status)


def _upload_url(data: bytes) -> str:
    return f"upload:sha256:{hashlib.sha256(data).hexdigest()}"


async def ingest(request: web.Request) -> web.Response:
    raw = await authorize(request, allow_signature=True)
    svc = request.app[SERVICES_KEY]
    if _is_multipart(request):
        fields, files = await multipart_body(request, raw, _max_image(svc))
        if not files:
            raise error(400, "no_image", "multipart ingest needs an image file part")
        form = _validate(m.IngestForm, fields)
        fingerprints = {}
        for _name, data in files:
            fingerprints.setdefault(_upload_url(data), await _fingerprint(request, data))
        source = form.source or "ingest"
        item_id = form.id or hashlib.sha256(b"".join(sorted(u.encode() for u in fingerprints))).hexdigest()[:16]
        # One item with every uploaded file: each gets its own work row.
        item = FeedItem(source, item_id, tuple(fingerprints), form.page_url, form.author, form.published)
        work = await asyncio.to_thread(svc.pipeline.record_items, source, [item], time.time())
        for w in work:
            await svc.pipeline.process_fingerprint(w, fingerprints[w.image_url])
        return _ok(m.IngestResult(id=item_id, work_ids=[w.id for w in work],
                                  status="processed" if work else "duplicate"), 202)
    doc = await json_body(request, m.IngestRequest, raw)
    urls = list(dict.fromkeys(doc.image_urls))
    source = doc.source or "ingest"
    item_id = doc.id or hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]
    item = FeedItem(source, item_id, tuple(urls), doc.page_url, doc.author, doc.published)
    work = await svc.pipeline.submit(source, [item])
    return _ok(m.IngestResult(id=item_id, work_ids=[w.id for w in work],
                              status="queued" if work else "duplicate"), 202)


async def check(request: web.Request) -> web.Response:
    """Match one image now. Records and alerts nothing unless asked with
    ``alert: true``, which records it like an ingested post (source ``check``)."""
    await authorize(request)
    svc = request.app[SERVICES_KEY]
    if _is_multipart(request):
        fields, files = await multipart_body(request, None, _max_image(svc))
        if not files:
            raise error(400, "no_image", "multipart check needs an image file part")
        form = _validate(m.CheckForm, fields)
        data = files[0][1]
        want_alert = form.alert in ("1", "true", "yes")
        url, page_url = _upload_url(data), form.page_url
    else:
        doc = await json_body(request, m.CheckRequest)
        want_alert, page_url, url = doc.alert, doc.page_url, doc.url
        try:
            data = await svc.fetcher.fetch_image(url)
        except FetchError as exc:
            raise error(502 if exc.reason in ("timeout", "connection", "http_5xx") else 422,
                        f"fetch_{exc.reason}", str(exc)) from None
    fp = await _fingerprint(request, data)
    matches = await asyncio.get_running_loop().run_in_executor(
        svc.pipeline.executor, svc.matcher.match, fp)
    entries = svc.library.entries_by_id(x.entry_id for x in matches)
    recorded = []
    if want_alert:
        item = FeedItem("check", hashlib.sha256(url.encode()).hexdigest()[:16], (url,), page_url)
        for w in await asyncio.to_thread(svc.pipeline.record_items, "check", [item], time.time()):
            recorded += [r.id for r in await svc.pipeline.process_fingerprint(w, fp)]
    return _ok(m.CheckResult(
        dhash=fp.dhash_hex, phash=fp.phash_hex, degenerate=fp.degenerate, recorded_match_ids=recorded,
        matches=[m.CheckMatch(entry_id=x.entry_id, label=entries[x.entry_id].label,
                              source=entries[x.entry_id].source, tier=x.tier,
                              distance_bits=x.dhash_distance, phash_distance_bits=x.phash_distance,
                              fine_distance_bits=x.fine_distance, mirrored=x.mirrored)
                 for x in matches if x.entry_id in entries]))


def _entry(e) -> m.Entry:
    return m.Entry(id=e.id, source=e.source, label=e.label, width=e.width, height=e.height,
                   dhash=f"{e.dhash:016x}", phash=f"{e.phash:016x}", degenerate=e.degenerate,
                   added_at=iso(e.added_at))


def _page(request: web.Request, default: int = 50) -> tuple[int, int]:
    try:
        limit = int(request.query.get("limit", default))
        offset = int(request.query.get("offset", 0))
    except ValueError:
        raise error(400, "bad_paging", "limit and offset must be integers") from None
    if not 1 <= limit <= 500 or offset < 0:
        raise error(400, "bad_paging", "limit must be 1..500 and offset >= 0")
    return limit, offset


async def library_list(request: web.Request) -> web.Response:
    await authorize(request)
    svc = request.app[SERVICES_KEY]
    limit, offset = _page(request)
    entries = await asyncio.to_thread(svc.library.entries, limit=limit, offset=offset)
    total = (await asyncio.to_thread(svc.library.stats))["entries"]
    return _ok(m.EntryList(entries=[_entry(e) for e in entries], total=total, limit=limit, offset=offset))


async def library_add(request: web.Request) -> web.Response:
    await authorize(request)
    svc = request.app[SERVICES_KEY]
    added, skipped = [], []
    if _is_multipart(request):
        fields, files = await multipart_body(request, None, _max_image(svc))
        if not files:
            raise error(400, "no_image", "upload at least one image file part")
        form = _validate(m.LibraryForm, fields)
        for name, data in files:
            try:
                fp = await _fingerprint(request, data, "library")
            except web.HTTPException as exc:
                skipped.append(m.Skipped(source=name, error=json.loads(exc.text)["error"]["message"]))
                continue
            source = f"upload:{name}:sha256:{hashlib.sha256(data).hexdigest()[:16]}"
            added.append(await asyncio.to_thread(svc.library.add_fingerprint, source, fp,
                                                 form.label or Path(name).stem))
    else:
        doc = await json_body(request, m.LibraryAddRequest)
        if doc.url:
            try:
                data = await svc.fetcher.fetch_image(doc.url)
            except FetchError as exc:
                raise error(422, f"fetch_{exc.reason}", str(exc)) from None
            fp = await _fingerprint(request, data, "library")
            added.append(await asyncio.to_thread(svc.library.add_fingerprint, doc.url, fp, doc.label))
        elif doc.folder:
            folder = Path(doc.folder).resolve()
            if not any(folder.is_relative_to(Path(r).resolve()) for r in svc.library_folders):
                raise error(403, "folder_not_allowed",
                            "server-side folders must be under server.library_folders")
            report = await asyncio.to_thread(add_files, svc.library, [folder], label=doc.label,
                                             progress=False)
            added += report.added
            skipped += [m.Skipped(source=str(s), error=why) for s, why in report.skipped]
        else:
            raise error(422, "bad_request", "give an upload, {\"url\": ...} or {\"folder\": ...}")
    if not added:
        why = "; ".join(f"{x.source}: {x.error}" for x in skipped[:10]) or "no image found"
        raise error(422, "nothing_added", f"nothing was added: {why}"[:2000])
    return _ok(m.LibraryAddResult(added=[_entry(e) for e in added], skipped=skipped), 201)


async def library_delete(request: web.Request) -> web.Response:
    await authorize(request)
    svc = request.app[SERVICES_KEY]
    entry_id = _int(request.match_info["id"])
    if not await asyncio.to_thread(svc.library.remove, entry_id):
        raise error(404, "not_found", f"no library entry {entry_id}")
    return _ok(m.Deleted(deleted=entry_id))


async def library_allow(request: web.Request) -> web.Response:
    await authorize(request)
    svc = request.app[SERVICES_KEY]
    entry_id = _int(request.match_info["id"])
    doc = await json_body(request, m.AllowRequest)
    if svc.library.get(entry_id) is None:
        raise error(404, "not_found", f"no library entry {entry_id}")
    for values, kind in ((doc.domains, "domain"), (doc.authors, "author"), (doc.sources, "source")):
        await asyncio.to_thread(set_allowances, svc.store, entry_id, kind, values)
    return _ok(m.Allowances(entry_id=entry_id, allowed=allowances(svc.store, entry_id)))


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise error(404, "not_found", f"{text[:40]!r} is not an id") from None
    if not -(2 ** 63) <= value < 2 ** 63:
        raise error(404, "not_found", "no such id")
    return value


async def matches_list(request: web.Request) -> web.Response:
    await authorize(request)
    svc = request.app[SERVICES_KEY]
    limit, offset = _page(request)
    filters = {key: request.query[key] for key in ("tier", "feed", "verdict") if key in request.query}
    if "entry_id" in request.query:
        filters["entry_id"] = _int(request.query["entry_id"])
    rows, total = await asyncio.to_thread(match_rows.list_matches, svc.store, filters, limit, offset)
    entries = svc.library.entries_by_id(r["entry_id"] for r in rows)
    out = []
    for row in rows:
        e = entries.get(row["entry_id"])
        out.append(m.Match(**{**row, "mirrored": bool(row["mirrored"]), "published": iso(row["published"]),
                              "detected_at": iso(row["detected_at"]),
                              "library": m.LibraryRef(label=e.label, source=e.source) if e else None}))
    return _ok(m.MatchList(matches=out, total=total, limit=limit, offset=offset))


async def match_verdict(request: web.Request) -> web.Response:
    await authorize(request)
    svc = request.app[SERVICES_KEY]
    match_id = _int(request.match_info["id"])
    doc = await json_body(request, m.VerdictRequest)
    if not await asyncio.to_thread(set_verdict, svc.store, match_id, doc.verdict):
        raise error(404, "not_found", f"no match {match_id}")
    return _ok(m.VerdictResult(id=match_id, verdict=doc.verdict))


async def alerts_list(request: web.Request) -> web.Response:
    await authorize(request)
    svc = request.app[SERVICES_KEY]
    state = request.query.get("state")
    if state not in (None, "pending", "delivered", "dead"):
        raise error(400, "bad_state", "state must be pending, delivered or dead")
    limit, _ = _page(request)
    return _ok(m.AlertList(alerts=list_alerts(svc.store, state, limit)))


async def alerts_resend(request: web.Request) -> web.Response:
    await authorize(request)
    svc = request.app[SERVICES_KEY]
    doc = await json_body(request, m.ResendRequest)
    n = await asyncio.to_thread(resend_dead, svc.store, doc.ids)
    if svc.pipeline.outbox is not None:
        svc.pipeline.outbox.committed()
    return _ok(m.Requeued(requeued=n))


def _review_auth(request: web.Request) -> web.Response | None:
    """Browsers cannot send a bearer header on navigation: /review takes ?token= once,
    answers with a same-site, HTTP-only cookie and a redirect to a URL without it."""
    svc = request.app[SERVICES_KEY]
    if _credentials_ok(request, svc):
        return None
    given = request.query.get("token")
    if svc.token and given and hmac.compare_digest(given.encode(), svc.token.encode()):
        query = {k: v for k, v in request.query.items() if k != "token"}
        resp = web.HTTPSeeOther(str(request.rel_url.with_query(query)))
        resp.set_cookie(REVIEW_COOKIE, svc.review_cookie(), httponly=True, samesite="Strict",
                        path="/", secure=request.secure)
        raise resp
    if not svc.token:
        raise error(401, "unauthorized", "this server listens off loopback: set server.token to use /review")
    raise error(401, "unauthorized", "open /review?token=TOKEN once")


async def review(request: web.Request) -> web.Response:
    """The latest matches side by side, with verdict buttons that call the API."""
    _review_auth(request)
    svc = request.app[SERVICES_KEY]
    limit, offset = _page(request)
    rows = await asyncio.to_thread(match_rows.review_rows, svc.store, limit, offset)
    entries = svc.library.entries_by_id(r.entry_id for r in rows)
    findings = []
    for r in rows:
        e = entries.get(r.entry_id)
        findings.append(Finding(
            r.tier, f"library: {e.label if e else r.entry_id}", f"/review/library/{r.entry_id}.jpg" if e else None,
            f"{r.image_url} ({r.feed}{', by ' + r.author if r.author else ''})", None,
            r.library_view_dhash, r.repost_view_dhash if r.library_view_dhash is not None else None,
            r.dhash_distance, r.phash_distance,
            ("mirrored; " if r.mirrored else "") + (f"no alert: {r.suppressed}" if r.suppressed else ""),
            r.id, r.verdict,
            right_link=r.page_url if r.page_url and r.page_url.startswith(("http://", "https://")) else None,
            image_link=r.image_url if r.image_url.startswith(("http://", "https://")) else None))
    page_html = render("repost-monitor review", f"latest {len(rows)} matches", findings, review=True)
    # The page loads nothing from other sites (the repost image is linked, not embedded).
    return web.Response(text=page_html, content_type="text/html", headers={
        "Content-Security-Policy": "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
                                   "script-src 'unsafe-inline'; connect-src 'self'; form-action 'none'; "
                                   "frame-ancestors 'none'; base-uri 'none'",
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store"})


async def review_library_image(request: web.Request) -> web.Response:
    _review_auth(request)
    svc = request.app[SERVICES_KEY]
    entry = svc.library.get(_int(request.match_info["id"]))
    if entry is None or not Path(entry.source).is_file():
        raise error(404, "not_found", "no local image for this entry")

    def thumb() -> bytes:
        import io

        from PIL import Image, ImageOps
        with Image.open(entry.source) as img:
            img = ImageOps.exif_transpose(img)
            img.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            img.convert("RGB").save(buf, "JPEG", quality=80)
            return buf.getvalue()
    try:
        data = await asyncio.to_thread(thumb)
    except (OSError, ValueError):
        raise error(404, "not_found", "the library file cannot be read") from None
    return web.Response(body=data, content_type="image/jpeg", headers={"Cache-Control": "private"})


async def openapi(request: web.Request) -> web.Response:
    await authorize(request)
    from monitor.api.openapi import OPENAPI
    return web.json_response(OPENAPI)


def make_app(metrics_: Metrics, ready: dict, services: Services | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[json_errors, guard])
    app[METRICS_KEY] = metrics_
    app[READY_KEY] = ready
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    if services is not None:
        app[SERVICES_KEY] = services
        r = app.router
        r.add_post("/v1/ingest", ingest)
        r.add_post("/v1/check", check)
        r.add_get("/v1/library", library_list)
        r.add_post("/v1/library", library_add)
        r.add_delete("/v1/library/{id}", library_delete)
        r.add_post("/v1/library/{id}/allow", library_allow)
        r.add_get("/v1/matches", matches_list)
        r.add_post("/v1/matches/{id}/verdict", match_verdict)
        r.add_get("/v1/alerts", alerts_list)
        r.add_post("/v1/alerts/resend", alerts_resend)
        r.add_get("/v1/openapi.json", openapi)
        r.add_get("/review", review)
        r.add_get("/review/library/{id}.jpg", review_library_image)
    return app


async def start_server(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start listening; returns the runner and the bound port (port 0 picks one)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1] if site._server else port  # noqa: SLF001
    return runner, bound
