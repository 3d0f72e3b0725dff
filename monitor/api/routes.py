"""The /v1 handlers and the probes: thin, over the pipeline and the records layer."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path

from aiohttp import web
from pydantic import BaseModel

from feeds import FeedItem
from monitor.api import models as m
from monitor.api.bodies import json_body, multipart_body, validate
from monitor.api.http import (
    MAX_BODY,
    METRICS_KEY,
    READY_KEY,
    SERVICES_KEY,
    Services,
    authorize,
    error,
    read_body,
    upload_slot,
)
from monitor.api.openapi import OPENAPI
from monitor.fetch import FetchError
from monitor.fingerprints import ImageError, fingerprint_bytes
from monitor.isotime import iso
from monitor.pipeline.transport import MatchUnavailable
from monitor.records import matches as match_rows
from monitor.records.alerts import list_alerts, resend_dead
from monitor.records.verdicts import allowances, set_allowances, set_verdict
from monitor.records.work import CachedFailure
from monitor.scan import add_files
from monitor.search.tiers import protection_of


def _is_multipart(request: web.Request) -> bool:
    return request.content_type.startswith("multipart/")


async def _fingerprint(request: web.Request, data: bytes, views: str = "query"):
    svc = request.app[SERVICES_KEY]
    kwargs = {"max_pixels": svc.pipeline.max_pixels} if svc.pipeline.max_pixels else {}
    if views == "query":  # as the pipeline's posts: keypoints for the second look when it is on,
        # found (from this small copy) only if the matcher asks, here or on a shard
        kwargs["keypoint_picture"] = svc.pipeline.worker.keypoints
    try:
        return await asyncio.get_running_loop().run_in_executor(
            svc.pipeline.executor, lambda: fingerprint_bytes(data, views=views, **kwargs))
    except ImageError as exc:
        raise error(422, f"image_{exc.reason}", str(exc)) from None


async def _upload(request: web.Request, form_model, raw: bytes | None = None):
    """(the validated text fields, the image files) of a multipart body; 400 without a file."""
    fields, files = await multipart_body(request, raw, _max_image(request.app[SERVICES_KEY]))
    if not files:
        raise error(400, "no_image", "a multipart body needs at least one image file part")
    return validate(form_model, fields), files


def _max_image(svc: Services) -> int:
    return svc.fetcher.limits.max_image_bytes if svc.fetcher is not None else MAX_BODY


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


async def _digest(data: bytes) -> str:
    """An upload's sha256 in hex, off the loop (20 MB: ~10 ms)."""
    return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())


async def _upload_url(data: bytes) -> str:
    return f"upload:sha256:{await _digest(data)}"


async def ingest(request: web.Request) -> web.Response:
    raw = await authorize(request, allow_signature=True)
    svc = request.app[SERVICES_KEY]
    if _is_multipart(request):
        async with upload_slot(svc):
            form, files = await _upload(request, m.IngestForm, raw)
            fingerprints = {}
            for _name, data in files:
                fingerprints.setdefault(await _upload_url(data), await _fingerprint(request, data))
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
        async with upload_slot(svc):  # the body, its decode and its match held by few at once
            form, files = await _upload(request, m.CheckForm)
            data = files[0][1]
            want_alert = form.alert in ("1", "true", "yes")
            url, page_url = await _upload_url(data), form.page_url
            fp = await _fingerprint(request, data)
            try:
                matches = await svc.pipeline.match(fp)
            except MatchUnavailable as exc:
                raise error(503, "match_unavailable", str(exc)) from None
    else:
        doc = await json_body(request, m.CheckRequest)
        want_alert, page_url, url = doc.alert, doc.page_url, doc.url
        # The feeds' own path: the stored fingerprint if any feed fetched this URL, a fetch in
        # flight, or a download under the same backlog limit.
        try:
            fp, matches = await svc.pipeline.check_url(url)
        except (FetchError, CachedFailure) as exc:
            raise error(502 if exc.reason in ("timeout", "connection", "http_5xx") else 422,
                        f"fetch_{exc.reason}", str(exc)) from None
        except ImageError as exc:
            raise error(422, f"image_{exc.reason}", str(exc)) from None
        except MatchUnavailable as exc:
            raise error(503, "match_unavailable", str(exc)) from None
    entries = await asyncio.to_thread(svc.library.entries_by_id, [x.entry_id for x in matches])
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
                              fine_distance_bits=x.fine_distance, mirrored=x.mirrored,
                              decided_by=x.decided_by, keypoint_inliers=x.inliers)
                 for x in matches if x.entry_id in entries]))


def _entry(e) -> m.Entry:
    return m.Entry(id=e.id, source=e.source, label=e.label, width=e.width, height=e.height,
                   dhash=f"{e.dhash:016x}", phash=f"{e.phash:016x}", degenerate=e.degenerate,
                   protection=protection_of(e.degenerate), added_at=iso(e.added_at))


def paging(request: web.Request, default: int = 50) -> tuple[int, int]:
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
    limit, offset = paging(request)
    entries = await asyncio.to_thread(svc.library.entries, limit=limit, offset=offset)
    total = (await asyncio.to_thread(svc.library.stats))["entries"]
    return _ok(m.EntryList(entries=[_entry(e) for e in entries], total=total, limit=limit, offset=offset))


async def library_add(request: web.Request) -> web.Response:
    await authorize(request)
    svc = request.app[SERVICES_KEY]
    added, skipped = [], []
    if _is_multipart(request):
        async with upload_slot(svc):
            form, files = await _upload(request, m.LibraryForm)
            for name, data in files:
                try:
                    fp = await _fingerprint(request, data, "library")
                except web.HTTPException as exc:
                    skipped.append(m.Skipped(source=name, error=json.loads(exc.text)["error"]["message"]))
                    continue
                source = f"upload:{name}:sha256:{(await _digest(data))[:16]}"
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
    entry_id = path_id(request.match_info["id"])
    if not await asyncio.to_thread(svc.library.remove, entry_id):
        raise error(404, "not_found", f"no library entry {entry_id}")
    return _ok(m.Deleted(deleted=entry_id))


async def library_allow(request: web.Request) -> web.Response:
    await authorize(request)
    svc = request.app[SERVICES_KEY]
    entry_id = path_id(request.match_info["id"])
    doc = await json_body(request, m.AllowRequest)
    if await asyncio.to_thread(svc.library.get, entry_id) is None:
        raise error(404, "not_found", f"no library entry {entry_id}")
    for values, kind in ((doc.domains, "domain"), (doc.authors, "author"), (doc.sources, "source")):
        await asyncio.to_thread(set_allowances, svc.store, entry_id, kind, values)
    return _ok(m.Allowances(entry_id=entry_id, allowed=await asyncio.to_thread(allowances, svc.store, entry_id)))


def path_id(text: str) -> int:
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
    limit, offset = paging(request)
    filters = {key: request.query[key] for key in ("tier", "feed", "verdict") if key in request.query}
    if "entry_id" in request.query:
        filters["entry_id"] = path_id(request.query["entry_id"])
    rows, total = await asyncio.to_thread(match_rows.list_matches, svc.store, filters, limit, offset)
    entries = await asyncio.to_thread(svc.library.entries_by_id, [r["entry_id"] for r in rows])
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
    match_id = path_id(request.match_info["id"])
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
    limit, _ = paging(request)
    return _ok(m.AlertList(alerts=await asyncio.to_thread(list_alerts, svc.store, state, limit)))


async def alerts_resend(request: web.Request) -> web.Response:
    await authorize(request)
    svc = request.app[SERVICES_KEY]
    doc = await json_body(request, m.ResendRequest)
    n = await asyncio.to_thread(resend_dead, svc.store, doc.ids)
    if svc.pipeline.outbox is not None:
        svc.pipeline.outbox.committed()
    return _ok(m.Requeued(requeued=n))


async def websub(request: web.Request) -> web.Response:
    """A WebSub hub's requests: GET verifies our intent (echo the challenge of a subscription
    we asked for), POST delivers a signed feed document. Not under /v1: hubs carry no bearer
    token; the topic and the signature authenticate them."""
    svc = request.app[SERVICES_KEY]
    if not svc.ready:
        raise error(503, "starting", "the daemon is starting")
    feed, subscriber = request.match_info["feed"], svc.pipeline.intake.websub
    if request.method == "GET":
        challenge = await subscriber.verify(feed, request.query)
        if challenge is None:
            raise error(404, "not_found", "no such subscription")
        return web.Response(text=challenge, content_type="text/plain")
    body = await read_body(request, svc.fetcher.limits.max_feed_bytes)
    result = await subscriber.deliver(feed, body, request.content_type,
                                      request.headers.get("X-Hub-Signature", ""))
    if result != "unknown":
        svc.pipeline.intake.metrics.websub_deliveries.labels(feed, result).inc()
    status = {"unknown": 410, "unsigned": 403}.get(result, 202)  # 410: the hub may drop the subscription
    return web.Response(status=status, text=result, content_type="text/plain")


async def openapi(request: web.Request) -> web.Response:
    await authorize(request)
    return web.json_response(OPENAPI)
