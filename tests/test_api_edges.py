"""The API probed as an attacker would, on loopback, against a real daemon: reflected
script, cross-site and rebinding requests, credentials off loopback, body bombs, slow
and unauthenticated bodies, malformed input that once gave 500s, multi-file ingest."""

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time

import aiohttp
import pytest

from monitor.api import http as server_module
from monitor.config import parse_config
from monitor.daemon import run_daemon
from tests.conftest import encode
from tests.hosts import serve
from tests.test_daemon import PhotoSite, config_for, make_library, query, until

TOKEN, SECRET = "edge-token", "edge-secret"


@pytest.fixture
async def start(tmp_path, samples):
    """start(**server settings) -> a running daemon: its base URL, db, feed host and site."""
    started = []
    async with contextlib.AsyncExitStack() as exits:
        async def start_daemon(**server):
            started.append(server)
            db = tmp_path / f"m{len(started)}.sqlite"
            make_library(db, samples)
            site = PhotoSite(samples)
            feeds = await exits.enter_async_context(serve(site.app()))
            cfg = config_for(feeds, db).model_copy(update={
                "feeds": [], "server": parse_config({"server": {"port": 0, **server}}).server})
            stop, running = asyncio.Event(), {}
            task = asyncio.create_task(run_daemon(cfg, stop=stop, on_ready=lambda r: running.update(r=r),
                                                  install_signals=False))

            async def shut_down():
                stop.set()
                await asyncio.wait_for(task, 30)
            exits.push_async_callback(shut_down)
            await until(lambda: "r" in running or task.done())
            return {"base": f"http://127.0.0.1:{running['r'].port}", "db": db, "feeds": feeds,
                    "site": site, "running": running["r"]}

        yield start_daemon


async def record_a_match(d) -> int:
    """Ingest a repost of a library picture through the API; returns its match id."""
    async with aiohttp.ClientSession() as http:
        async with http.post(d["base"] + "/v1/ingest",
                             json={"image_urls": [f"{d['feeds']}/img/small-chelsea.jpg"]}) as r:
            assert r.status == 202, await r.text()
    await until(lambda: query(d["db"], "SELECT COUNT(*) FROM matches")[0][0] == 1)
    return query(d["db"], "SELECT id FROM matches")[0][0]


async def test_review_never_echoes_a_token_into_its_page(start):
    d = await start()
    payload = "</script><script>alert(1)</script>"
    async with aiohttp.ClientSession() as http:
        async with http.get(d["base"] + "/review", params={"token": payload}) as r:
            page = await r.text()
    assert r.status == 200
    assert "alert(1)" not in page and "rmToken" not in page and "sessionStorage" not in page
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    # with a token configured, a wrong one is refused and the right one never lands in the page
    d = await start(token=TOKEN)
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.get(d["base"] + "/review", params={"token": payload}) as r:
            assert r.status == 401
        async with http.get(d["base"] + "/review", params={"token": TOKEN}) as r:
            page = await r.text()
            assert r.status == 200 and TOKEN not in page and str(r.url).endswith("/review")
        cookie = next(c for c in jar if c.key == "rm_review")
        assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie.value != TOKEN


async def test_cross_site_and_rebinding_requests_are_refused(start):
    d = await start()
    match_id = await record_a_match(d)
    url = f"{d['base']}/v1/matches/{match_id}/verdict"
    body = json.dumps({"verdict": "false_positive"})
    attacks = [
        # a form or fetch from any page: text/plain needs no preflight
        ({"Origin": "https://evil.example", "Content-Type": "text/plain"}, 403),
        ({"Content-Type": "text/plain"}, 415),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
        # JSON from a foreign origin
        ({"Origin": "https://evil.example", "Content-Type": "application/json"}, 403),
        ({"Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"}, 403),
        # DNS rebinding: the browser thinks it talks to attacker.example
        ({"Host": "attacker.example:8080", "Content-Type": "application/json"}, 403),
    ]
    async with aiohttp.ClientSession() as http:
        for headers, status in attacks:
            async with http.post(url, data=body, headers=headers) as r:
                assert r.status == status, (headers, await r.text())
            async with http.post(d["base"] + "/v1/ingest", headers=headers, data=json.dumps(
                    {"image_urls": [f"{d['feeds']}/img/flip-rocket.jpg"]})) as r:
                assert r.status == status, headers
        # a route that does not exist is a 404 whatever is sent (it was a 415 to a multipart body)
        multipart = aiohttp.FormData()
        multipart.add_field("image", b"x", filename="x.jpg", content_type="image/jpeg")
        async with http.post(d["base"] + "/v1/match", data=multipart) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
        async with http.put(url, json={"verdict": "confirmed"}) as r:
            assert r.status == 405
        # rebinding reads too
        async with http.get(d["base"] + "/v1/matches", headers={"Host": "attacker.example"}) as r:
            assert r.status == 403
        assert query(d["db"], "SELECT verdict FROM matches") == [(None,)]
        assert query(d["db"], "SELECT COUNT(*) FROM work") == [(1,)]
        # the server's own page (same origin) and scripts without an Origin still work
        origin = d["base"]
        async with http.post(url, data=body, headers={"Origin": origin, "Content-Type": "application/json"}) as r:
            assert r.status == 200
    assert query(d["db"], "SELECT verdict FROM matches") == [("false_positive",)]


async def test_allowed_hosts_and_origins_widen_the_guard(start):
    d = await start(allowed_hosts=["monitor.internal"], allowed_origins=["https://dash.internal"])
    match_id = await record_a_match(d)
    async with aiohttp.ClientSession() as http:
        async with http.get(d["base"] + "/v1/matches", headers={"Host": "monitor.internal:8080"}) as r:
            assert r.status == 200
        async with http.post(f"{d['base']}/v1/matches/{match_id}/verdict", json={"verdict": "confirmed"},
                             headers={"Origin": "https://dash.internal"}) as r:
            assert r.status == 200


async def test_off_loopback_every_route_but_probes_needs_credentials(start):
    d = await start(host="0.0.0.0", hmac_secret=SECRET)
    async with aiohttp.ClientSession() as http:
        for route in ("/review", "/review/library/1.jpg", "/v1/library", "/v1/matches", "/v1/openapi.json"):
            async with http.get(d["base"] + route) as r:
                assert r.status == 401, route
        for route in ("/healthz", "/metrics"):
            async with http.get(d["base"] + route) as r:
                assert r.status == 200, route
        # the signature still opens the ingest listener
        body = json.dumps({"image_urls": [f"{d['feeds']}/img/small-chelsea.jpg"]}).encode()
        ts = str(int(time.time()))
        sig = "v1=" + hmac.new(SECRET.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        async with http.post(d["base"] + "/v1/ingest", data=body, headers={
                "Content-Type": "application/json", "X-Repost-Monitor-Timestamp": ts,
                "X-Repost-Monitor-Signature": sig}) as r:
            assert r.status == 202


async def test_a_multipart_bomb_is_cut_short_and_never_blocks_the_loop(start):
    d = await start()
    part = b'--bnd\r\nContent-Disposition: form-data; name="f"\r\n\r\nx\r\n'
    bomb = part * 19_418 + b"--bnd--\r\n"
    lags = []

    async def probe(http):
        while True:
            t = time.perf_counter()
            async with http.get(d["base"] + "/healthz") as r:
                assert r.status == 200
            lags.append(time.perf_counter() - t)
            await asyncio.sleep(0.01)

    async with aiohttp.ClientSession() as http:
        prober = asyncio.create_task(probe(http))
        for route in ("/v1/check", "/v1/ingest", "/v1/library"):
            t = time.perf_counter()
            async with http.post(d["base"] + route, data=bomb,
                                 headers={"Content-Type": "multipart/form-data; boundary=bnd"}) as r:
                err = await r.json()
            assert r.status == 413 and err["error"]["code"] == "too_many_parts", err
            assert time.perf_counter() - t < 2
        prober.cancel()
    assert max(lags) < 0.5


@pytest.mark.slow  # waits out body timeouts
async def test_bodies_wait_for_auth_and_time_out(start, monkeypatch):
    monkeypatch.setattr(server_module, "BODY_SECONDS", 1.0)
    d = await start(token=TOKEN, hmac_secret=SECRET)

    async def slow_body(seconds):
        yield b'{"image_urls": ['
        await asyncio.sleep(seconds)
        yield b"]}"

    async with aiohttp.ClientSession() as http:
        # no credentials: refused from the headers, before a byte of the 19 MB body is read
        t = time.perf_counter()
        async with http.post(d["base"] + "/v1/library", data=slow_body(10),
                             headers={"Content-Type": "application/json"}) as r:
            assert r.status == 401
        assert time.perf_counter() - t < 3
        # with credentials, a body that drips is cut off
        async with http.post(d["base"] + "/v1/library", data=slow_body(5), headers={
                "Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 408 and (await r.json())["error"]["code"] == "body_timeout"
        # signed bodies are read before the signature can be checked: only a few at once
        signed = {"Content-Type": "application/json", "X-Repost-Monitor-Signature": "v1=00",
                  "X-Repost-Monitor-Timestamp": str(int(time.time()))}

        async def post_signed():
            async with aiohttp.ClientSession() as h2:
                async with h2.post(d["base"] + "/v1/ingest", data=slow_body(3), headers=signed) as r:
                    return r.status
        statuses = await asyncio.gather(*(post_signed() for _ in range(12)))
        assert statuses.count(503) >= 12 - server_module.UNAUTHENTICATED_BODIES
        assert set(statuses) <= {503, 401, 408}


async def test_malformed_requests_get_json_4xx_not_500(start, caplog):
    caplog.set_level(logging.DEBUG)
    d = await start(library_folders=["/tmp"])
    cases = [
        ("OPTIONS", "/v1/matches", None, 405), ("PUT", "/v1/matches", b"{}", 405),
        ("POST", "/healthz", b"{}", 405), ("GET", "/websub/nofeed?hub.challenge=<script>", None, 404),
        ("POST", "/v1/ingest", b'{"image_urls": ' + b"[" * 1000 + b"]" * 1000 + b"}", 400),
        ("POST", "/v1/ingest", b"[" * 100_000 + b"]" * 100_000, 400),
        ("POST", "/v1/library", json.dumps({"folder": "/tmp/a\x00b"}).encode(), 422),
        ("POST", "/v1/library", json.dumps({"url": "https://example.org/x.jpg",
                                            "label": {"a": 1}}).encode(), 422),
        ("POST", "/v1/check", json.dumps({"url": "http://[::1/"}).encode(), 422),
        ("POST", "/v1/ingest", json.dumps({"image_urls": ["http://[::1/x.jpg"]}).encode(), 422),
        ("POST", "/v1/ingest", json.dumps({"image_urls": ["https://a.example/x.jpg"],
                                           "page_url": 12345}).encode(), 422),
        ("POST", "/v1/ingest", json.dumps({"image_urls": [f"http://{'a' * 64}.example/x.jpg"]}).encode(),
         422),
        ("GET", "/v1/matches?limit=-5", None, 400), ("GET", "/v1/matches?limit=100000", None, 400),
        ("GET", "/v1/library?offset=x", None, 400),
        ("DELETE", "/v1/library/99999999999999999999999", None, 404),
    ]
    async with aiohttp.ClientSession() as http:
        for method, route, body, status in cases:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            async with http.request(method, d["base"] + route, data=body, headers=headers) as r:
                assert r.status == status, (method, route, await r.text())
                assert r.content_type == "application/json"
                assert r.headers.get("X-Content-Type-Options") == "nosniff"
                assert "Traceback" not in await r.text()
        # a client that hangs up halfway is not an error of ours
        reader, writer = await asyncio.open_connection("127.0.0.1", int(d["base"].rsplit(":", 1)[1]))
        writer.write(b"POST /v1/ingest HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"image_urls\": [")
        await writer.drain()
        writer.close()
        await asyncio.sleep(0.3)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "Traceback" not in caplog.text


async def test_multipart_ingest_records_every_file(start, samples):
    d = await start()
    site = d["site"]
    form = aiohttp.FormData()
    form.add_field("source", "uploads")
    for name in ("small-chelsea.jpg", "flip-rocket.jpg", "q30-coffee.jpg"):
        form.add_field("image", site.images[name][0], filename=name, content_type="image/jpeg")
    async with aiohttp.ClientSession() as http:
        async with http.post(d["base"] + "/v1/ingest", data=form) as r:
            out = await r.json()
    assert r.status == 202 and out["status"] == "processed" and len(out["work_ids"]) == 3
    assert query(d["db"], "SELECT COUNT(*) FROM matches WHERE feed='uploads'") == [(3,)]
    assert query(d["db"], "SELECT state, COUNT(*) FROM work GROUP BY state") == [("done", 3)]


@pytest.mark.slow  # a daemon run end to end: ~1-3 s (the fast tier keeps under its minute)
async def test_uploads_are_worked_on_a_few_at_once_and_the_rest_wait_then_get_503(start, samples, monkeypatch):
    """Each upload's body, decode and match hold memory (300 callers' 8 MB uploads at once held
    1.3 GB): UPLOAD_SLOTS of them at once; the next waits UPLOAD_WAIT, then hears 503."""
    monkeypatch.setattr(server_module, "UPLOAD_WAIT", 1.0)
    d = await start()
    jpeg = (samples / "library-chelsea.jpg").read_bytes()
    boundary = "rm-test-boundary"
    multipart = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    release = asyncio.Event()

    async def dripping():  # an upload whose body stops halfway until released: it holds a slot
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
               "Content-Type: image/jpeg\r\n\r\n").encode() + jpeg[:1000]
        await release.wait()
        yield jpeg[1000:] + f"\r\n--{boundary}--\r\n".encode()

    def form():
        f = aiohttp.FormData()
        f.add_field("image", jpeg, filename="b.jpg", content_type="image/jpeg")
        return f

    async def check(http, data, headers=None):
        async with http.post(d["base"] + "/v1/check", data=data, headers=headers) as r:
            return r.status, r.headers.get("Retry-After"), await r.json()

    async with aiohttp.ClientSession() as http:
        holders = [asyncio.create_task(check(http, dripping(), multipart))
                   for _ in range(server_module.UPLOAD_SLOTS)]
        await asyncio.sleep(0.5)
        t = time.perf_counter()
        status, retry, doc = await check(http, form())
        assert (status, retry, doc["error"]["code"]) == (503, "5", "busy")
        assert 0.9 < time.perf_counter() - t < 5
        async with http.get(d["base"] + "/v1/library") as r:  # no upload: answered at once
            assert r.status == 200
        release.set()
        for status, _, doc in await asyncio.gather(*holders):
            assert status == 200 and doc["matches"][0]["label"] == "library-chelsea"
        status, _, doc = await check(http, form())  # the slots free again
        assert status == 200 and doc["matches"][0]["label"] == "library-chelsea"


async def test_too_many_files_and_oversized_parts(start, samples):
    d = await start()
    img = encode(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (64, 64), "red"), "PNG")
    async with aiohttp.ClientSession() as http:
        form = aiohttp.FormData()
        for i in range(server_module.MAX_FILES + 1):
            form.add_field("image", img, filename=f"{i}.png", content_type="image/png")
        async with http.post(d["base"] + "/v1/check", data=form) as r:
            assert r.status == 413 and (await r.json())["error"]["code"] == "too_many_files"
        form = aiohttp.FormData()
        form.add_field("page_url", "x" * (server_module.MAX_FIELD_BYTES + 1))
        form.add_field("image", img, filename="a.png", content_type="image/png")
        async with http.post(d["base"] + "/v1/check", data=form) as r:
            assert r.status == 413
