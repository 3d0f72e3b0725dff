"""Downloads against real misbehaving hosts on loopback."""

import asyncio
import time

import pytest
from aiohttp import web

from monitor.addresses import AddressGuard
from monitor.fetch import Fetcher, FetchError, FetchLimits, parse_retry_after
from tests.hosts import serve

LOOPBACK = FetchLimits(allowed_networks=("127.0.0.0/8",), retries=2, backoff_base=0.05,
                       read_timeout=0.5, total_timeout=3, per_host_rate=1000)


@pytest.fixture
def jpeg(samples):
    return (samples / "other-home.jpg").read_bytes()


def host(jpeg):
    hits = {}
    app = web.Application()

    async def counted(request, name):
        hits[name] = hits.get(name, 0) + 1
        return hits[name]

    async def ok(request):
        await counted(request, "ok")
        return web.Response(body=jpeg, content_type="image/jpeg")

    async def flaky(request):
        n = await counted(request, "flaky")
        if n < 3:
            return web.Response(status=503)
        return web.Response(body=jpeg, content_type="image/jpeg")

    async def limited(request):
        n = await counted(request, "limited")
        if n == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(body=jpeg, content_type="image/jpeg")

    async def broken(request):
        await counted(request, "broken")
        return web.Response(status=500)

    async def stall(request):
        await asyncio.sleep(10)
        return web.Response(body=jpeg)

    async def drip(request):
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await resp.prepare(request)
        for i in range(100):
            await resp.write(jpeg[i:i + 1])
            await asyncio.sleep(0.2)
        return resp

    async def huge(request):
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await resp.prepare(request)
        await resp.write(jpeg[:4])
        for _ in range(200):
            await resp.write(b"\0" * 65536)
        return resp

    async def declared_huge(request):
        return web.Response(body=b"\xff\xd8\xff" + b"\0" * 2_000_000, content_type="image/jpeg")

    async def html(request):
        return web.Response(text="<html><body>Not found</body></html>", content_type="text/html")

    async def html_as_image(request):
        return web.Response(body=b"<html>oops</html>", content_type="image/jpeg")

    async def to_private(request):
        raise web.HTTPFound("http://169.254.169.254/latest/meta-data/")

    async def to_ok(request):
        raise web.HTTPFound("/ok")

    async def loop(request):
        raise web.HTTPFound("/loop")

    async def feed(request):
        await counted(request, "feed")
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers={"ETag": '"v1"'})
        return web.Response(text="<rss/>", content_type="application/rss+xml",
                            headers={"ETag": '"v1"', "Last-Modified": "Sun, 22 Nov 2026 05:00:00 GMT"})

    for path, handler in [("/ok", ok), ("/flaky", flaky), ("/limited", limited), ("/broken", broken),
                          ("/stall", stall), ("/drip", drip), ("/huge", huge),
                          ("/declared_huge", declared_huge), ("/html", html),
                          ("/html_as_image", html_as_image), ("/to_private", to_private),
                          ("/to_ok", to_ok), ("/loop", loop), ("/feed", feed)]:
        app.router.add_get(path, handler)
    return app, hits


@pytest.mark.slow  # a daemon run end to end: ~1-3 s (the fast tier keeps under its minute)
async def test_good_redirected_and_retried_downloads(jpeg):
    app, hits = host(jpeg)
    async with serve(app) as base, Fetcher(LOOPBACK) as f:
        assert await f.fetch_image(f"{base}/ok") == jpeg
        assert await f.fetch_image(f"{base}/to_ok") == jpeg
        assert await f.fetch_image(f"{base}/flaky") == jpeg
        assert hits["flaky"] == 3
        start = time.monotonic()
        assert await f.fetch_image(f"{base}/limited") == jpeg
        assert time.monotonic() - start >= 0.95  # Retry-After: 1 honoured
        assert hits["limited"] == 2


@pytest.mark.parametrize("path,reason", [
    ("/broken", "http_5xx"), pytest.param("/stall", "timeout", marks=pytest.mark.slow),
    pytest.param("/drip", "timeout", marks=pytest.mark.slow), ("/huge", "too_large"),
    ("/declared_huge", "too_large"), ("/html", "not_image"), ("/html_as_image", "not_image"),
    ("/to_private", "blocked_address"), ("/loop", "too_many_redirects"), ("/missing", "http_4xx"),
])
async def test_bad_downloads_fail_with_a_reason(jpeg, path, reason):
    app, hits = host(jpeg)
    limits = FetchLimits(**{**LOOPBACK.__dict__, "max_image_bytes": 1_000_000})
    async with serve(app) as base, Fetcher(limits) as f:
        start = time.monotonic()
        with pytest.raises(FetchError) as err:
            await f.fetch_image(f"{base}{path}")
        assert err.value.reason == reason
        assert time.monotonic() - start < 12
    if path == "/broken":
        assert hits["broken"] == 1 + LOOPBACK.retries


async def test_private_addresses_are_refused_by_default(jpeg):
    app, _ = host(jpeg)
    async with serve(app) as base, Fetcher(FetchLimits()) as f:
        port = base.rsplit(":", 1)[1]
        for url in (f"{base}/ok", f"http://localhost:{port}/ok", "http://10.1.2.3/x.jpg",
                    "http://[::1]/x.jpg", "http://169.254.169.254/latest/meta-data/",
                    "http://[::ffff:127.0.0.1]/x.jpg"):
            with pytest.raises(FetchError) as err:
                await f.fetch_image(url)
            assert err.value.reason == "blocked_address", url
        with pytest.raises(FetchError) as err:
            await f.fetch_image("ftp://example.org/x.jpg")
        assert err.value.reason == "bad_url"


def test_address_guard_rules():
    guard = AddressGuard()
    assert guard.allows("93.184.215.14") and guard.allows("2606:4700::1111")
    for addr in ("127.0.0.1", "10.0.0.1", "192.168.1.1", "172.16.0.1", "169.254.169.254",
                 "100.64.0.1", "::1", "fd00:ec2::254", "fe80::1", "0.0.0.0", "224.0.0.1"):
        assert not guard.allows(addr), addr
    assert AddressGuard(allowed=[__import__("ipaddress").ip_network("127.0.0.0/8")]).allows("127.0.0.1")


async def test_conditional_get(jpeg):
    app, hits = host(jpeg)
    async with serve(app) as base, Fetcher(LOOPBACK) as f:
        first = await f.fetch_feed(f"{base}/feed")
        assert not first.not_modified and first.etag == '"v1"' and first.body == b"<rss/>"
        second = await f.fetch_feed(f"{base}/feed", etag=first.etag,
                                    last_modified=first.last_modified)
        assert second.not_modified and second.etag == '"v1"'


async def test_local_files_only_under_watched_folders(tmp_path, jpeg):
    inside = tmp_path / "watched"
    inside.mkdir()
    (inside / "a.jpg").write_bytes(jpeg)
    (tmp_path / "secret.jpg").write_bytes(jpeg)
    async with Fetcher(FetchLimits(local_roots=(str(inside),))) as f:
        assert await f.fetch_image((inside / "a.jpg").as_uri()) == jpeg
        with pytest.raises(FetchError) as err:
            await f.fetch_image((inside / ".." / "secret.jpg").as_uri())
        assert err.value.reason == "blocked_path"


def test_retry_after_forms():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Sun, 22 Nov 2026 06:00:10 GMT", now=1795327200.0) == pytest.approx(10, abs=1)
    assert parse_retry_after("soon") is None
