"""The HTTP API with real requests: auth, ingest (JSON, upload, signed), check, library,
matches and verdicts, allow-lists, alerts, retroactive matching, flood control, and the
OpenAPI document checked against every response seen here."""

import asyncio
import hashlib
import hmac
import io
import json
import re
import time

import aiohttp
import jsonschema
import pytest
from PIL import Image, ImageDraw, ImageOps

from monitor.api.openapi import OPENAPI
from monitor.config import AlertSinkConfig, ConfigError, parse_config
from monitor.daemon import run_daemon
from monitor.records.library import Library
from monitor.records.store import Store
from monitor.scan import add_files
from tests.hosts import serve
from tests.test_alerts import Receivers
from tests.test_daemon import PhotoSite, config_for, jpeg, until

TOKEN, SECRET = "t0k-e2e", "ingest-secret"
SEEN: list[tuple[str, str, int, object]] = []  # (method, route, status, json body)


class Api:
    def __init__(self, base, http):
        self.base, self.http = base, http

    async def call(self, method, route, path=None, *, auth=True, json_body=None, data=None,
                   headers=None, params=None):
        h = dict(headers or {})
        if auth:
            h["Authorization"] = f"Bearer {TOKEN}"
        async with self.http.request(method, self.base + (path or route), json=json_body, data=data,
                                     headers=h, params=params) as resp:
            if resp.content_type == "application/json":
                body = await resp.json()
            elif resp.content_type.startswith("text/"):
                body = await resp.text()
            else:
                body = await resp.read()
            SEEN.append((method.lower(), route, resp.status, body))
            return resp.status, body


async def ingest_url(daemon, name, **fields):
    return await daemon["api"].call("POST", "/v1/ingest", json_body={
        "image_urls": [f"{daemon['feeds']}/img/{name}"], **fields})


def upload(img_bytes, name="x.jpg", **fields):
    form = aiohttp.FormData()
    for k, v in fields.items():
        form.add_field(k, v)
    form.add_field("image", img_bytes, filename=name, content_type="image/jpeg")
    return form


@pytest.fixture
async def daemon(tmp_path, samples):
    site, recv = PhotoSite(samples), Receivers()
    db = tmp_path / "m.sqlite"
    lib = Library(Store(db))  # the rocket picture is added later, through the API
    add_files(lib, [p for p in sorted(samples.glob("library-*.jpg")) if "rocket" not in p.name],
                  progress=False)
    lib.store.close()
    async with serve(site.app()) as feeds, serve(recv.app()) as receivers:
        cfg = config_for(feeds, db).model_copy(update={
            "server": parse_config({"server": {"port": 0, "token": TOKEN, "hmac_secret": SECRET,
                                               "library_folders": [str(samples)]}}).server,
            "alerts": [AlertSinkConfig(name="hook", type="webhook", url=f"{receivers}/hooks/repost",
                                       secret="whsec-test", backoff_base=0.1)],
            "alert_policy": parse_config({"alert_policy": {"flood_max": 3}}).alert_policy,
        })
        stop, running = asyncio.Event(), {}
        task = asyncio.create_task(run_daemon(cfg, stop=stop, on_ready=lambda r: running.update(r=r),
                                              install_signals=False))
        await until(lambda: "r" in running)
        # unsafe: keep cookies set by an IP-address host (the review page's cookie)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            yield {"api": Api(f"http://127.0.0.1:{running['r'].port}", http), "site": site,
                   "recv": recv, "feeds": feeds, "db": db, "running": running["r"]}
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_auth_is_required_and_errors_are_json(daemon):
    api = daemon["api"]
    status, body = await api.call("GET", "/v1/library", auth=False)
    assert status == 401 and body["error"]["code"] == "unauthorized"
    status, body = await api.call("GET", "/v1/library", headers={"Authorization": "Bearer nope"},
                                  auth=False)
    assert status == 401
    status, body = await api.call("GET", "/v1/library")
    assert status == 200 and body["total"] == 5
    assert {e["protection"] for e in body["entries"]} == {"full"}  # weak: low detail; none: flat or tiny
    status, body = await api.call("POST", "/v1/ingest", data=b"{not json",
                                  headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"]["code"] == "bad_json"
    status, body = await api.call("POST", "/v1/ingest", json_body={"image_urls": "x"})
    assert status == 422
    status, body = await api.call("GET", "/v1/alerts", params={"state": "sideways"})
    assert status == 400
    status, body = await api.call("GET", "/v1/nothing-here")
    assert status == 404 and body["error"]["code"] == "not_found"
    for route in ("/healthz", "/readyz"):
        assert (await api.call("GET", route, auth=False))[0] == 200
    status, text = await api.call("GET", "/metrics", auth=False)
    assert status == 200 and "repost_monitor_build_info" in text
    assert (await api.call("GET", "/review", auth=False))[0] == 401
    status, page = await api.call("GET", "/review", auth=False, params={"token": TOKEN})
    assert status == 200 and "repost-monitor review" in page
    entry_id = (await api.call("GET", "/v1/library"))[1]["entries"][0]["id"]
    # the cookie /review?token= set is the page's credential from then on
    status, _ = await api.call("GET", "/review/library/{id}.jpg", f"/review/library/{entry_id}.jpg",
                               auth=False)
    assert status == 200
    assert (await api.call("GET", "/review/library/{id}.jpg", "/review/library/999.jpg",
                           auth=False))[0] == 404
    # WebSub callbacks answer hubs only for subscriptions the daemon asked for
    assert (await api.call("GET", "/websub/{feed}", "/websub/rss?hub.mode=subscribe&hub.topic=x&hub.challenge=c",
                           auth=False))[0] == 404
    assert (await api.call("POST", "/websub/{feed}", "/websub/rss", auth=False, data=b"<rss/>",
                           headers={"Content-Type": "application/rss+xml"}))[0] == 410
    status, doc = await api.call("GET", "/v1/openapi.json")
    assert status == 200 and doc == json.loads(json.dumps(OPENAPI))


def test_refuses_open_api_off_loopback():
    with pytest.raises(ConfigError, match="refusing to serve the API on non-loopback"):
        parse_config({"server": {"host": "0.0.0.0"}})
    assert parse_config({"server": {"host": "0.0.0.0", "token": "x"}}).server.token == "x"
    assert parse_config({"server": {"host": "0.0.0.0", "allow_unauthenticated": True}})


async def test_ingest_signed_replayed_and_uploaded(daemon, samples):
    api, recv = daemon["api"], daemon["recv"]
    body = json.dumps({"image_urls": [f"{daemon['feeds']}/img/small-chelsea.jpg"], "source": "partner-hook",
                       "id": "post-1", "page_url": "https://social.example/p/1", "author": "someone",
                       "published": "2026-11-22T05:00:00Z"}).encode()
    ts = str(int(time.time()))
    sig = "v1=" + hmac.new(SECRET.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    signed = {"Content-Type": "application/json", "X-Repost-Monitor-Timestamp": ts,
              "X-Repost-Monitor-Signature": sig}
    status, out = await api.call("POST", "/v1/ingest", data=body, headers=signed, auth=False)
    assert status == 202 and out["status"] == "queued" and len(out["work_ids"]) == 1
    status, out = await api.call("POST", "/v1/ingest", data=body, headers=signed, auth=False)
    assert status == 401 and out["error"]["code"] == "bad_signature"  # replay
    wrong = dict(signed, **{"X-Repost-Monitor-Signature": "v1=" + "0" * 64})
    assert (await api.call("POST", "/v1/ingest", data=body, headers=wrong, auth=False))[0] == 401
    old_ts = str(int(time.time()) - 3600)
    old_sig = "v1=" + hmac.new(SECRET.encode(), old_ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    old = dict(signed, **{"X-Repost-Monitor-Timestamp": old_ts, "X-Repost-Monitor-Signature": old_sig})
    assert (await api.call("POST", "/v1/ingest", data=body, headers=old, auth=False))[0] == 401
    await until(lambda: len(recv.webhook) == 1)
    alert = recv.webhook[0]
    assert alert["repost"]["source"] == "partner-hook" and alert["repost"]["author"] == "someone"
    assert alert["library"]["label"] == "library-chelsea" and alert["lag_seconds"] > 0
    # A multipart upload is matched at once.
    with Image.open(samples / "library-coffee.jpg") as img:
        data = jpeg(ImageOps.mirror(img.convert("RGB")))
    status, out = await api.call("POST", "/v1/ingest", data=upload(data, source="uploads", id="u1"))
    assert status == 202 and out["status"] == "processed"
    await until(lambda: len(recv.webhook) == 2)
    assert recv.webhook[1]["mirrored"] and recv.webhook[1]["repost"]["image_url"].startswith("upload:sha256:")


async def test_check_library_verdicts_and_allow_lists(daemon, samples):
    api, site, recv = daemon["api"], daemon["site"], daemon["recv"]
    apple = (samples / "other-apple.jpg").read_bytes()
    status, out = await api.call("POST", "/v1/check", data=upload(apple))
    assert status == 200 and out["matches"] == [] and len(out["dhash"]) == 16
    status, out = await api.call("POST", "/v1/library", data=upload(apple, name="apple.jpg", label="fruit"))
    assert status == 201 and out["added"][0]["label"] == "fruit"
    apple_id = out["added"][0]["id"]
    status, out = await api.call("POST", "/v1/check", data=upload(apple))
    assert out["matches"][0]["entry_id"] == apple_id and out["matches"][0]["tier"] == "exact"
    status, out = await api.call("POST", "/v1/check",
                                 json_body={"url": f"{daemon['feeds']}/img/small-chelsea.jpg"})
    assert status == 200 and out["matches"][0]["label"] == "library-chelsea"
    assert Store(daemon["db"]).query("SELECT COUNT(*) FROM matches") == [(0,)]  # check records nothing
    assert out["recorded_match_ids"] == []
    status, out = await api.call("POST", "/v1/check", json_body={
        "url": f"{daemon['feeds']}/img/small-chelsea.jpg", "alert": True, "page_url": "https://x.example/1"})
    assert status == 200 and len(out["recorded_match_ids"]) == 1  # asked: recorded, and it alerts
    await until(lambda: len(daemon["recv"].webhook) == 1)
    assert daemon["recv"].webhook[0]["repost"]["source"] == "check"
    daemon["recv"].webhook.clear()
    status, out = await api.call("POST", "/v1/ingest", data=b"x" * (21 * 1024 * 1024),
                                 headers={"Content-Type": "application/json"})
    assert status == 413 and out["error"]["code"] == "request_entity_too_large"
    status, out = await api.call("POST", "/v1/check", data=upload(b"<html>no</html>"))
    assert status == 422 and out["error"]["code"] == "image_not_an_image"
    status, out = await api.call("POST", "/v1/library", json_body={"folder": "/etc"})
    assert status == 403
    status, out = await api.call("DELETE", "/v1/library/{id}", f"/v1/library/{apple_id}")
    assert status == 200
    assert (await api.call("DELETE", "/v1/library/{id}", f"/v1/library/{apple_id}"))[0] == 404

    # A match marked false positive never alerts again for that (repost hash, entry).
    await ingest_url(daemon, "q30-coffee.jpg", source="s1")
    await until(lambda: len(recv.webhook) == 1)
    status, out = await api.call("GET", "/v1/matches", params={"tier": "exact", "feed": "s1"})
    assert status == 200 and out["total"] == 1
    match_id = out["matches"][0]["id"]
    assert (await api.call("POST", "/v1/matches/{id}/verdict", f"/v1/matches/{match_id}/verdict",
                           json_body={"verdict": "maybe"}))[0] == 422
    status, out = await api.call("POST", "/v1/matches/{id}/verdict", f"/v1/matches/{match_id}/verdict",
                                 json_body={"verdict": "false_positive"})
    assert status == 200
    site.add_image("q30-coffee-again.jpg", site.images["q30-coffee.jpg"][0])
    await ingest_url(daemon, "q30-coffee-again.jpg", source="s2")
    await until(lambda: Store(daemon["db"]).query("SELECT COUNT(*) FROM matches")[0][0] == 3)
    # Licensed use: the chelsea picture may appear in source "partner".
    entries = (await api.call("GET", "/v1/library"))[1]["entries"]
    chelsea = next(e for e in entries if e["label"] == "library-chelsea")
    status, out = await api.call("POST", "/v1/library/{id}/allow", f"/v1/library/{chelsea['id']}/allow",
                                 json_body={"sources": ["partner"], "domains": ["licensee.example"]})
    assert status == 200 and out["allowed"]["source"] == ["partner"]
    site.add_image("chelsea-partner.jpg", site.images["small-chelsea.jpg"][0])
    await ingest_url(daemon, "chelsea-partner.jpg", source="partner")
    site.add_image("chelsea-licensed.jpg", site.images["small-chelsea.jpg"][0])
    await ingest_url(daemon, "chelsea-licensed.jpg", source="elsewhere", page_url="https://www.licensee.example/p/9")
    await until(lambda: Store(daemon["db"]).query("SELECT COUNT(*) FROM matches")[0][0] == 5)
    await asyncio.sleep(0.5)
    status, out = await api.call("GET", "/v1/matches", params={"limit": 10})
    why = {(m["image_url"].rsplit("/", 1)[-1], m["feed"]): m["suppressed"] for m in out["matches"]}
    assert why == {("small-chelsea.jpg", "check"): None, ("q30-coffee.jpg", "s1"): None,
                   ("q30-coffee-again.jpg", "s2"): "false_positive",
                   ("chelsea-partner.jpg", "partner"): "allow_list",
                   ("chelsea-licensed.jpg", "elsewhere"): "allow_list"}
    assert len(recv.webhook) == 1  # neither suppressed match alerted
    status, out = await api.call("GET", "/v1/alerts", params={"state": "delivered"})
    assert status == 200 and len(out["alerts"]) == 2  # the check that asked to alert, and s1
    status, out = await api.call("POST", "/v1/alerts/resend", json_body={})
    assert status == 200 and out["requeued"] == 0


def _captioned_page(data: bytes) -> bytes:
    """The picture on a white page under a caption: only its frame view matches."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    page = Image.new("RGB", (img.width + 60, img.height + 160), "white")
    page.paste(img, (30, 120))
    ImageDraw.Draw(page).text((40, 40), "WHEN THE REPOST HITS", fill="black")
    buf = io.BytesIO()
    page.save(buf, "JPEG", quality=80)
    return buf.getvalue()


@pytest.mark.slow  # two library changes and their retro-matches: ~3 s
async def test_new_library_entries_are_matched_retroactively(daemon, samples):
    site, recv, api = daemon["site"], daemon["recv"], daemon["api"]
    rocket = (samples / "library-rocket.jpg").read_bytes()
    site.add_image("page-rocket.jpg", _captioned_page(rocket), "library-rocket")
    site.post("rss", 1, ["flip-rocket.jpg"])  # rocket is not in the library yet
    site.post("json", 2, ["page-rocket.jpg"])
    db = daemon["db"]
    await until(lambda: Store(db).query("SELECT COUNT(*) FROM work WHERE state='done'")[0][0] == 2)
    assert recv.webhook == []
    status, _ = await api.call("POST", "/v1/library", data=upload(rocket, name="rocket.jpg", label="rocket"))
    assert status == 201
    await until(lambda: len(recv.webhook) == 2, timeout=20)
    by_source = {a["repost"]["source"]: a for a in recv.webhook}
    assert {a["library"]["label"] for a in recv.webhook} == {"rocket"}
    assert by_source["rss"]["mirrored"]
    # The captioned page matched through the frame view stored with the image.
    assert by_source["json"]["repost"]["image_url"].endswith("page-rocket.jpg")


async def test_flood_control_sends_one_summary(daemon, samples):
    site, recv = daemon["site"], daemon["recv"]
    with Image.open(samples / "library-astronaut.jpg") as img:
        img = img.convert("RGB")
        for i in range(6):
            site.add_image(f"astro-{i}.jpg", jpeg(img.resize((300 - 10 * i, 300 - 10 * i)), 80 - i))
    for i in range(6):
        await ingest_url(daemon, f"astro-{i}.jpg", id=f"a{i}", source="spam")
    await until(lambda: Store(daemon["db"]).query("SELECT COUNT(*) FROM matches")[0][0] == 6)
    await until(lambda: len(recv.webhook) == 4)
    await asyncio.sleep(0.5)
    assert len(recv.webhook) == 4  # 3 alerts, then one summary replaces the storm
    assert [bool(a.get("flood")) for a in recv.webhook] == [False, False, False, True]


def test_openapi_matches_the_server_and_every_response_seen():
    """Runs last in this file: checks every request the tests above made."""
    from aiohttp import web

    from monitor.api.server import Services, make_app
    from monitor.metrics import Metrics
    app = make_app(Metrics(), {}, Services())
    served = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
              if r.method != "HEAD" and isinstance(r.resource, web.Resource)}
    documented = {(m, p) for p, ops in OPENAPI["paths"].items() for m in ops}
    assert served == documented
    assert SEEN, "run with the other tests of this file"
    for method, route, status, body in SEEN:
        if route not in OPENAPI["paths"]:
            assert status == 404
            continue
        op = OPENAPI["paths"][route][method]
        assert str(status) in op["responses"], (method, route, status)
        schema = op["responses"][str(status)].get("content", {}).get("application/json", {}).get("schema")
        if schema and isinstance(body, dict):
            # the whole body against the document, every field and type, not just the keys
            # ("#/components/..." resolves against the root: the components ride along)
            validator = jsonschema.Draft202012Validator({**schema, "components": OPENAPI["components"]})
            errors = [e.message for e in validator.iter_errors(body)]
            assert not errors, (method, route, status, errors[:3])
    routes_hit = {(m, r) for m, r, _, _ in SEEN if r in OPENAPI["paths"]}
    missing = documented - routes_hit
    assert not missing, missing
    assert re.match(r"\d+\.\d+\.\d+", OPENAPI["info"]["version"])


async def test_the_sources_api_callers_name_do_not_grow_the_metrics_series(daemon):
    """A partner naming each push's source after its uploader (or an attacker with a token) could
    create one series per name: its pushes are counted under "ingest", the configured feeds under
    their own names, and the alert still carries the source named."""
    import re
    for n in range(40):
        status, _ = await ingest_url(daemon, "other-apple.jpg", source=f"user-{n}", id=f"p{n}")
        assert status == 202
    status, text = await daemon["api"].call("GET", "/metrics")
    feeds = set(re.findall(r'^repost_monitor_(?:items_discovered|images_downloaded)_total\{feed="([^"]*)"\}',
                           text, re.M))
    assert "ingest" in feeds and not any(f.startswith("user-") for f in feeds), feeds
    discovered = re.search(r'^repost_monitor_items_discovered_total\{feed="ingest"\} (\S+)$', text, re.M)
    assert float(discovered[1]) >= 40
