"""/review: the latest matches side by side, with verdict buttons that call the API."""

from __future__ import annotations

import asyncio
import hmac
import io
from pathlib import Path

from aiohttp import web
from PIL import Image, ImageOps

from monitor.api.http import REVIEW_COOKIE, SERVICES_KEY, credentials_ok, error
from monitor.api.routes import paging, path_id
from monitor.records import matches as match_rows
from monitor.tools.report import THUMB, Finding, content_policy, render


def _review_auth(request: web.Request) -> web.Response | None:
    """Browsers cannot send a bearer header on navigation: /review takes ?token= once,
    answers with a same-site, HTTP-only cookie and a redirect to a URL without it."""
    svc = request.app[SERVICES_KEY]
    if credentials_ok(request, svc):
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
    limit, offset = paging(request)
    rows = await asyncio.to_thread(match_rows.review_rows, svc.store, limit, offset)
    entries = await asyncio.to_thread(svc.library.entries_by_id, [r.entry_id for r in rows])
    findings = []
    for r in rows:
        e = entries.get(r.entry_id)
        findings.append(Finding(
            r.tier, f"library: {e.label if e else r.entry_id}", f"/review/library/{r.entry_id}.jpg" if e else None,
            f"{r.image_url} ({r.feed}{', by ' + r.author if r.author else ''})", None,
            r.library_view_dhash, r.repost_view_dhash if r.library_view_dhash is not None else None,
            r.dhash_distance, r.phash_distance,
            ("mirrored; " if r.mirrored else "")
            + (f"keypoints: {r.keypoint_inliers} pairs agree; " if r.keypoint_inliers is not None else "")
            + (f"no alert: {r.suppressed}" if r.suppressed else ""),
            r.id, r.verdict,
            right_link=r.page_url if r.page_url and r.page_url.startswith(("http://", "https://")) else None,
            image_link=r.image_url if r.image_url.startswith(("http://", "https://")) else None))
    page_html = render("repost-monitor review", f"latest {len(rows)} matches", findings, review=True)
    # The page loads nothing from other sites (the repost image is linked, not embedded).
    return web.Response(text=page_html, content_type="text/html", headers={
        "Content-Security-Policy": content_policy(review=True) + "; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store"})


async def review_library_image(request: web.Request) -> web.Response:
    _review_auth(request)
    svc = request.app[SERVICES_KEY]
    entry = await asyncio.to_thread(svc.library.get, path_id(request.match_info["id"]))
    if entry is None or not Path(entry.source).is_file():
        raise error(404, "not_found", "no local image for this entry")

    def thumb() -> bytes:

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
