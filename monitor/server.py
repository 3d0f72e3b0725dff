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
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from aiohttp import web

from feeds import FeedItem

from .alerts.outbox import list_alerts, resend_dead
from .fingerprint import ImageError, fingerprint_bytes
from .metrics import Metrics
from .noise import VERDICTS, allowances, set_allowances, set_verdict

SIGNATURE_TOLERANCE = 300.0
MAX_BODY = 20 * 1024 * 1024
TIERS = ("exact", "near", "loose")


@dataclass
class Services:
    """What the API needs from the running daemon (absent in a bare health server)."""
    store: object
    library: object
    pipeline: object
    matcher: object
    fetcher: object
    token: str | None = None
    hmac_secret: str | None = None
    library_folders: tuple[str, ...] = ()


METRICS_KEY = web.AppKey("metrics", Metrics)
READY_KEY = web.AppKey("ready", dict)
SERVICES_KEY = web.AppKey("services", Services)


def error(status: int, code: str, message: str) -> web.HTTPException:
    cls = {400: web.HTTPBadRequest, 401: web.HTTPUnauthorized, 403: web.HTTPForbidden,
           404: web.HTTPNotFound, 413: web.HTTPRequestEntityTooLarge,
           415: web.HTTPUnsupportedMediaType, 422: web.HTTPUnprocessableEntity,
           502: web.HTTPBadGateway}[status]
    body = json.dumps({"error": {"code": code, "message": message}})
    if cls is web.HTTPRequestEntityTooLarge:
        return cls(max_size=MAX_BODY, actual_size=MAX_BODY + 1, text=body, content_type="application/json")
    return cls(text=body, content_type="application/json")


@web.middleware
async def json_errors(request: web.Request, handler):
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json" or exc.status < 400:
            raise
        body = json.dumps({"error": {"code": exc.reason.lower().replace(" ", "_"),
                                     "message": exc.text or exc.reason}})
        raise type(exc)(text=body, content_type="application/json",
                        **({"max_size": MAX_BODY, "actual_size": 0}
                           if isinstance(exc, web.HTTPRequestEntityTooLarge) else {})) from None


def _signed_ok(request: web.Request, body: bytes, secret: str) -> bool:
    ts = request.headers.get("X-Repost-Monitor-Timestamp", "")
    sig = request.headers.get("X-Repost-Monitor-Signature", "")
    if not ts.isdigit() or abs(time.time() - int(ts)) > SIGNATURE_TOLERANCE:
        return False
    want = "v1=" + hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, sig):
        return False
    store = request.app[SERVICES_KEY].store
    with store.transaction() as conn:  # a valid signature is good once
        conn.execute("DELETE FROM api_nonces WHERE seen_at < ?", (time.time() - 2 * SIGNATURE_TOLERANCE,))
        fresh = conn.execute("INSERT OR IGNORE INTO api_nonces VALUES (?,?)", (sig, time.time())).rowcount
    return bool(fresh)


async def authorize(request: web.Request, *, allow_signature: bool = False) -> bytes:
    """Check auth for a /v1 request; returns the raw body (read once)."""
    svc = request.app[SERVICES_KEY]
    body = await request.read()
    if not svc.token and not svc.hmac_secret:
        return body
    auth = request.headers.get("Authorization", "")
    if svc.token and hmac.compare_digest(auth.encode(), f"Bearer {svc.token}".encode()):
        return body
    if allow_signature and svc.hmac_secret and "X-Repost-Monitor-Signature" in request.headers:
        if _signed_ok(request, body, svc.hmac_secret):
            return body
        raise error(401, "bad_signature", "signature missing, wrong, too old or replayed")
    raise error(401, "unauthorized", "missing or wrong bearer token")


def _json(body: bytes) -> dict:
    try:
        doc = json.loads(body or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(400, "bad_json", f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise error(400, "bad_json", "body must be a JSON object")
    return doc


async def _multipart(request: web.Request, body: bytes) -> tuple[dict, list[tuple[str, bytes]]]:
    """(form fields, uploaded files) from a multipart body already read (the
    signature covers the raw body, so it is read before parsing)."""
    import email.parser
    import email.policy
    head = f"Content-Type: {request.headers.get('Content-Type', '')}\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise error(400, "bad_multipart", "could not parse the multipart body")
    fields, files = {}, []
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if part.get_filename():
            files.append((part.get_filename(), payload))
        elif name:
            fields[name] = payload.decode(part.get_content_charset() or "utf-8", errors="replace")
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


# -- handlers -------------------------------------------------------------------
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[READY_KEY]
    ok = bool(state.get("ready"))
    return web.json_response({"ready": ok, **{k: v for k, v in state.items() if k != "ready"}},
                             status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS_KEY].render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def ingest(request: web.Request) -> web.Response:
    body = await authorize(request, allow_signature=True)
    svc = request.app[SERVICES_KEY]
    if _is_multipart(request):
        fields, files = await _multipart(request, body)
        if not files:
            raise error(400, "no_image", "multipart ingest needs an image file part")
        source = fields.get("source") or "ingest"
        item_id = fields.get("id") or hashlib.sha256(files[0][1]).hexdigest()[:16]
        work_ids = []
        for _name, data in files:
            fp = await _fingerprint(request, data)
            url = f"upload:sha256:{hashlib.sha256(data).hexdigest()}"
            item = FeedItem(source, item_id, (url,), fields.get("page_url"), fields.get("author"),
                            _when(fields.get("published")))
            work = svc.pipeline.record_items(source, [item], time.time())
            for w in work:
                await svc.pipeline.process_fingerprint(w, fp)
                work_ids.append(w.id)
        return web.json_response({"id": item_id, "work_ids": work_ids, "status": "processed"},
                                 status=202)
    doc = _json(body)
    urls = doc.get("image_urls")
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        raise error(422, "bad_image_urls", "'image_urls' must be a non-empty list of URLs")
    if not all(u.startswith(("http://", "https://")) for u in urls):
        raise error(422, "bad_image_urls", "only http(s) image URLs can be ingested")
    source = str(doc.get("source") or "ingest")
    item_id = str(doc.get("id") or hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16])
    item = FeedItem(source, item_id, tuple(urls), doc.get("page_url"), doc.get("author"),
                    _when(doc.get("published")))
    work = await svc.pipeline.submit(source, [item])
    return web.json_response({"id": item_id, "work_ids": [w.id for w in work],
                              "status": "queued" if work else "duplicate"}, status=202)


async def check(request: web.Request) -> web.Response:
    """Match one image now. Records and alerts nothing unless asked with
    ``alert: true``, which records it like an ingested post (source ``check``)."""
    body = await authorize(request)
    svc = request.app[SERVICES_KEY]
    if _is_multipart(request):
        fields, files = await _multipart(request, body)
        if not files:
            raise error(400, "no_image", "multipart check needs an image file part")
        data = files[0][1]
        want_alert = fields.get("alert", "").lower() in ("1", "true", "yes")
        url = f"upload:sha256:{hashlib.sha256(data).hexdigest()}"
        page_url = fields.get("page_url")
    else:
        doc = _json(body)
        want_alert = doc.get("alert") is True
        page_url = doc.get("page_url")
        url = doc.get("url")
        if not isinstance(url, str):
            raise error(422, "bad_url", "give an uploaded image or JSON {\"url\": ...}")
        from .fetch import FetchError
        try:
            data = await svc.fetcher.fetch_image(url)
        except FetchError as exc:
            raise error(502 if exc.reason in ("timeout", "connection", "http_5xx") else 422,
                        f"fetch_{exc.reason}", str(exc)) from None
    fp = await _fingerprint(request, data)
    matches = await asyncio.get_running_loop().run_in_executor(
        svc.pipeline.executor, svc.matcher.match, fp)
    entries = svc.library.entries_by_id(m.entry_id for m in matches)
    recorded = []
    if want_alert:
        item = FeedItem("check", hashlib.sha256(url.encode()).hexdigest()[:16], (url,), page_url)
        for w in svc.pipeline.record_items("check", [item], time.time()):
            recorded += [r.id for r in await svc.pipeline.process_fingerprint(w, fp)]
    return web.json_response({
        "dhash": fp.dhash_hex, "phash": fp.phash_hex, "degenerate": fp.degenerate,
        "recorded_match_ids": recorded,
        "matches": [{"entry_id": m.entry_id, "label": entries[m.entry_id].label,
                     "source": entries[m.entry_id].source, "tier": m.tier,
                     "distance_bits": m.dhash_distance, "phash_distance_bits": m.phash_distance,
                     "fine_distance_bits": m.fine_distance, "mirrored": m.mirrored}
                    for m in matches if m.entry_id in entries]})


def _entry_json(e) -> dict:
    return {"id": e.id, "source": e.source, "label": e.label, "width": e.width, "height": e.height,
            "dhash": f"{e.dhash:016x}", "phash": f"{e.phash:016x}", "degenerate": e.degenerate,
            "added_at": e.added_at}


def _page(request: web.Request) -> tuple[int, int]:
    try:
        limit = min(500, max(1, int(request.query.get("limit", 50))))
        offset = max(0, int(request.query.get("offset", 0)))
    except ValueError:
        raise error(400, "bad_paging", "limit and offset must be integers") from None
    return limit, offset


async def library_list(request: web.Request) -> web.Response:
    await authorize(request)
    svc = request.app[SERVICES_KEY]
    limit, offset = _page(request)
    entries = svc.library.entries(limit=limit, offset=offset)
    return web.json_response({"entries": [_entry_json(e) for e in entries],
                              "total": svc.library.stats()["entries"], "limit": limit, "offset": offset})


async def library_add(request: web.Request) -> web.Response:
    body = await authorize(request)
    svc = request.app[SERVICES_KEY]
    added, skipped = [], []
    if _is_multipart(request):
        fields, files = await _multipart(request, body)
        if not files:
            raise error(400, "no_image", "upload at least one image file part")
        for name, data in files:
            try:
                fp = await _fingerprint(request, data, "library")
            except web.HTTPException as exc:
                skipped.append({"source": name, "error": json.loads(exc.text)["error"]["message"]})
                continue
            source = f"upload:{name}:sha256:{hashlib.sha256(data).hexdigest()[:16]}"
            added.append(svc.library.add_fingerprint(source, fp, fields.get("label") or Path(name).stem))
    else:
        doc = _json(body)
        if "url" in doc:
            from .fetch import FetchError
            try:
                data = await svc.fetcher.fetch_image(str(doc["url"]))
            except FetchError as exc:
                raise error(422, f"fetch_{exc.reason}", str(exc)) from None
            fp = await _fingerprint(request, data, "library")
            added.append(svc.library.add_fingerprint(str(doc["url"]), fp, doc.get("label")))
        elif "folder" in doc:
            folder = Path(str(doc["folder"])).resolve()
            if not any(folder.is_relative_to(Path(r).resolve()) for r in svc.library_folders):
                raise error(403, "folder_not_allowed",
                            "server-side folders must be under server.library_folders")
            report = await asyncio.to_thread(svc.library.add_files, [folder], label=doc.get("label"),
                                             progress=False)
            added += report.added
            skipped += [{"source": s, "error": why} for s, why in report.skipped]
        else:
            raise error(422, "bad_request", "give an upload, {\"url\": ...} or {\"folder\": ...}")
    return web.json_response({"added": [_entry_json(e) for e in added], "skipped": skipped},
                             status=201 if added else 422)


async def library_delete(request: web.Request) -> web.Response:
    await authorize(request)
    svc = request.app[SERVICES_KEY]
    entry_id = _int(request.match_info["id"])
    if not svc.library.remove(entry_id):
        raise error(404, "not_found", f"no library entry {entry_id}")
    return web.json_response({"deleted": entry_id})


async def library_allow(request: web.Request) -> web.Response:
    body = await authorize(request)
    svc = request.app[SERVICES_KEY]
    entry_id = _int(request.match_info["id"])
    if svc.library.get(entry_id) is None:
        raise error(404, "not_found", f"no library entry {entry_id}")
    doc = _json(body)
    for key, kind in (("domains", "domain"), ("authors", "author"), ("sources", "source")):
        values = doc.get(key) or []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise error(422, "bad_allowance", f"'{key}' must be a list of strings")
        set_allowances(svc.store, entry_id, kind, values)
    return web.json_response({"entry_id": entry_id, "allowed": allowances(svc.store, entry_id)})


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise error(404, "not_found", f"{text!r} is not an id") from None


MATCH_COLUMNS = ("id, image_url, entry_id, tier, dhash_distance, phash_distance, mirrored, feed, "
                 "item_id, page_url, author, published, detected_at, verdict, suppressed, fine_distance")


async def matches_list(request: web.Request) -> web.Response:
    await authorize(request)
    svc = request.app[SERVICES_KEY]
    limit, offset = _page(request)
    where, params = [], []
    for key, column in (("tier", "tier"), ("feed", "feed"), ("verdict", "verdict")):
        if key in request.query:
            where.append(f"{column}=?")
            params.append(request.query[key])
    if "entry_id" in request.query:
        where.append("entry_id=?")
        params.append(_int(request.query["entry_id"]))
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    rows = svc.store.query(f"SELECT {MATCH_COLUMNS} FROM matches{clause} ORDER BY id DESC "
                           "LIMIT ? OFFSET ?", (*params, limit, offset))
    total = svc.store.query(f"SELECT COUNT(*) FROM matches{clause}", params)[0][0]
    keys = [c.strip() for c in MATCH_COLUMNS.split(",")]
    entries = svc.library.entries_by_id(r[2] for r in rows)
    out = []
    for r in rows:
        m = dict(zip(keys, r, strict=True))
        m["mirrored"] = bool(m["mirrored"])
        e = entries.get(m["entry_id"])
        m["library"] = {"label": e.label, "source": e.source} if e else None
        out.append(m)
    return web.json_response({"matches": out, "total": total, "limit": limit, "offset": offset})


async def match_verdict(request: web.Request) -> web.Response:
    body = await authorize(request)
    svc = request.app[SERVICES_KEY]
    match_id = _int(request.match_info["id"])
    verdict = _json(body).get("verdict")
    if verdict not in VERDICTS:
        raise error(422, "bad_verdict", f"'verdict' must be one of {', '.join(VERDICTS)}")
    if not set_verdict(svc.store, match_id, verdict):
        raise error(404, "not_found", f"no match {match_id}")
    return web.json_response({"id": match_id, "verdict": verdict})


async def alerts_list(request: web.Request) -> web.Response:
    await authorize(request)
    svc = request.app[SERVICES_KEY]
    state = request.query.get("state")
    if state not in (None, "pending", "delivered", "dead"):
        raise error(400, "bad_state", "state must be pending, delivered or dead")
    limit, _ = _page(request)
    return web.json_response({"alerts": list_alerts(svc.store, state, limit)})


async def alerts_resend(request: web.Request) -> web.Response:
    body = await authorize(request)
    svc = request.app[SERVICES_KEY]
    ids = _json(body).get("ids")
    if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, int) for i in ids)):
        raise error(422, "bad_ids", "'ids' must be a list of alert ids")
    n = resend_dead(svc.store, ids)
    if svc.pipeline.outbox is not None:
        svc.pipeline.outbox.committed()
    return web.json_response({"requeued": n})


def _review_auth(request: web.Request) -> None:
    """Browsers cannot send a bearer header on navigation: /review also takes ?token=."""
    svc = request.app[SERVICES_KEY]
    if not svc.token:
        return
    given = request.query.get("token") or request.headers.get("Authorization", "").removeprefix("Bearer ")
    if not hmac.compare_digest(given.encode(), svc.token.encode()):
        raise error(401, "unauthorized", "open /review?token=TOKEN")


async def review(request: web.Request) -> web.Response:
    """The latest matches side by side, with verdict buttons that call the API."""
    from .report import Finding, render
    _review_auth(request)
    svc = request.app[SERVICES_KEY]
    limit, offset = _page(request)
    rows = svc.store.query("SELECT id, image_url, entry_id, tier, dhash_distance, phash_distance, mirrored, "
                           "feed, author, verdict, repost_dhash, suppressed FROM matches ORDER BY id DESC "
                           "LIMIT ? OFFSET ?", (limit, offset))
    entries = svc.library.entries_by_id(r[2] for r in rows)
    token = request.query.get("token")
    findings = []
    for (mid, url, eid, tier, d, p, mirrored, feed, author, verdict, rd, suppressed) in rows:
        e = entries.get(eid)
        lib_src = f"/review/library/{eid}.jpg" + (f"?token={token}" if token else "") if e else None
        from .store import sql_to_u64
        findings.append(Finding(
            tier, f"library: {e.label if e else eid}", lib_src,
            f"{url} ({feed}{', by ' + author if author else ''})",
            url if url.startswith(("http://", "https://")) else None,
            (e.dhash_mirror if mirrored else e.dhash) if e else None,
            sql_to_u64(rd) if rd is not None else None, d, p,
            ("mirrored; " if mirrored else "") + (f"no alert: {suppressed}" if suppressed else ""),
            mid, verdict))
    page = render("repost-monitor review", f"latest {len(rows)} matches", findings, review=True)
    if token:
        page = page.replace("<script>", f"<script>sessionStorage.setItem('rmToken',{json.dumps(token)});", 1)
    return web.Response(text=page, content_type="text/html")


async def review_library_image(request: web.Request) -> web.Response:
    from .report import THUMB
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
    except OSError:
        raise error(404, "not_found", "the library file cannot be read") from None
    return web.Response(body=data, content_type="image/jpeg")


async def openapi(request: web.Request) -> web.Response:
    from .openapi import OPENAPI
    return web.json_response(OPENAPI)


def make_app(metrics_: Metrics, ready: dict, services: Services | None = None) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[json_errors])
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
