"""The subscriber tests of websub.rocks, the W3C WebSub test suite (aaronpk/websub.rocks,
app/Subscriber.php), played on loopback: for each test number the suite's feed, its Link
headers or links, its redirects and its hub's checks, then its deliveries. The suite's code
has no licence, so nothing of it is copied: the scenarios are re-implemented from what it
sends and what it expects of a subscriber.

100 hub and self in two separate Link headers; 102 Atom <link>s; 103 RSS <atom:link>s;
104 Link headers win over the document's (whose hub refuses); 200 rel=self differs from the
URL fetched; 201/202 the topic redirects (302/301); 203/204 the hub redirects (307/308);
205 the hub verifies a topic nobody asked for (must be 404); 300 a signed delivery (2xx);
301 a wrongly signed one (ignored); 302 an unsigned one (refused). 101 (hub links in an
HTML page) is not a feed, which is all this daemon subscribes to."""

import asyncio
import hashlib
import hmac
import secrets

import pytest
from aiohttp import ClientSession, web

from monitor.config import parse_config
from monitor.daemon import run_daemon
from tests.hosts import free_port, serve
from tests.test_daemon import PhotoSite, config_for, make_library, query, until

pytestmark = pytest.mark.slow  # ~10 s: thirteen subscriptions, verified one by one

TESTS = (100, 102, 103, 104, 200, 201, 202, 203, 204, 205, 300, 301, 302)


class Rocks:
    def __init__(self):
        self.base = ""
        self.images = ""
        self.outcome: dict[int, str] = {}      # test -> "verified" | the hub's error
        self.subscription: dict[int, dict] = {}

    def self_url(self, n: int) -> str:
        url = f"{self.base}/blog/{n}"
        return url + {200: "?self=other", 201: "?redirect=complete", 202: "?redirect=complete"}.get(n, "")

    def hub_url(self, n: int) -> str:
        return f"{self.base}/blog/{n}/hub" + ("?redirect=true" if n in (203, 204) else "")

    def item(self, n: int, guid: str, picture: str) -> str:
        return (f"<item><guid>{guid}</guid><link>{self.base}/p/{guid}</link>"
                f'<enclosure url="{self.images}/img/{picture}" type="image/jpeg" length="1"/></item>')

    def feed(self, n: int, items: str) -> tuple[str, str]:
        """(body, content type) of test n's feed."""
        if n in (102, 104):
            hub = self.hub_url(n) + ("?error=wrongtag" if n == 104 else "")
            return (f'<?xml version="1.0"?><feed xmlns="http://www.w3.org/2005/Atom"><title>rocks {n}</title>'
                    f'<id>{self.self_url(n)}</id><updated>2026-11-30T00:00:00Z</updated>'
                    f'<link rel="hub" href="{hub}"/><link rel="self" href="{self.self_url(n)}"/></feed>',
                    "text/xml")
        links = ""
        if n == 103:
            links = (f'<atom:link rel="hub" href="{self.hub_url(n)}"/>'
                     f'<atom:link rel="self" href="{self.self_url(n)}"/>')
        return (f'<?xml version="1.0"?><rss version="2.0" xmlns:atom="http://www.w3.org/2005/Atom"><channel>'
                f"<title>rocks {n}</title>{links}{items}</channel></rss>", "text/xml")

    def app(self):
        app = web.Application()

        async def feed(request):
            n = int(request.match_info["n"])
            if n in (201, 202) and "redirect" not in request.query:
                raise (web.HTTPFound if n == 201 else web.HTTPMovedPermanently)(self.self_url(n))
            body, ctype = self.feed(n, self.item(n, f"{n}-first", "other-apple.jpg"))
            resp = web.Response(text=body, content_type=ctype)
            if n not in (102, 103):  # two Link headers, as the suite sends them
                resp.headers.add("Link", f'<{self.self_url(n)}>; rel="self"')
                resp.headers.add("Link", f'<{self.hub_url(n)}>; rel="hub"')
            return resp

        async def hub(request):
            n = int(request.match_info["n"])
            form = dict(await request.post())
            if n in (203, 204) and request.query.get("redirect") == "true":
                raise (web.HTTPTemporaryRedirect if n == 203 else web.HTTPPermanentRedirect)(f"/blog/{n}/hub")
            if n == 104 and request.query.get("error") == "wrongtag":
                self.outcome[n] = "wrong_discovery_priority"
                return web.json_response({"error": "wrong_discovery_priority"}, status=400)
            if form.get("hub.mode") != "subscribe" or "hub.callback" not in form:
                self.outcome[n] = "missing_params"
                return web.json_response({"error": "missing_params"}, status=400)
            if form.get("hub.topic") != self.self_url(n):
                self.outcome[n] = f"invalid_topic {form.get('hub.topic')}"
                return web.json_response({"error": "invalid_topic"}, status=400)
            if not 0 < len(form.get("hub.secret", "")) < 200:
                self.outcome[n] = "invalid_secret"
                return web.json_response({"error": "invalid_secret"}, status=400)
            self.subscription[n] = form
            challenge = secrets.token_hex(10)
            topic = form["hub.topic"] + ("-not-yours" if n == 205 else "")
            async with ClientSession() as http, http.get(form["hub.callback"], params={
                    "hub.mode": "subscribe", "hub.topic": topic, "hub.challenge": challenge,
                    "hub.lease_seconds": "86400"}) as resp:
                answer = await resp.text()
                if n == 205:
                    self.outcome[n] = "rejected" if resp.status == 404 else f"not rejected: {resp.status}"
                    return web.Response(status=200 if resp.status == 404 else 400)
                ok = resp.status // 100 == 2 and answer == challenge
                self.outcome[n] = "verified" if ok else f"verification_failed {resp.status} {answer!r}"
            return web.Response(status=202 if ok else 400)

        app.router.add_get("/blog/{n}", feed)
        app.router.add_post("/blog/{n}/hub", hub)
        return app

    async def deliver(self, n: int, guid: str, picture: str, signing: str) -> int:
        body = self.feed(n, self.item(n, guid, picture))[0].encode()
        secret = {"valid": self.subscription[n]["hub.secret"], "invalid": "invalid"}.get(signing)
        headers = {"Content-Type": "application/rss+xml"}
        if secret:
            headers["X-Hub-Signature"] = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        async with ClientSession() as http, http.post(self.subscription[n]["hub.callback"], data=body,
                                                     headers=headers) as resp:
            return resp.status


async def test_the_websub_rocks_subscriber_tests(tmp_path, samples):
    site, rocks = PhotoSite(samples), Rocks()
    db = tmp_path / "m.sqlite"
    make_library(db, samples)
    port = free_port()
    async with serve(site.app()) as images, serve(rocks.app()) as base:
        rocks.base, rocks.images = base, images
        cfg = config_for(images, db)
        cfg = parse_config({**cfg.model_dump(), "server": {"port": port, "public_url": f"http://127.0.0.1:{port}"},
                            "feeds": [{"name": f"rocks-{n}", "type": "rss", "url": f"{base}/blog/{n}",
                                       "interval": 3600} for n in TESTS]})
        records, stop = [], asyncio.Event()
        task = asyncio.create_task(run_daemon(cfg, stop=stop, on_match=records.append, install_signals=False))
        await until(lambda: len(rocks.outcome) == len(TESTS), timeout=30)
        await asyncio.sleep(0.3)  # 104: a wrong hub tried after the right one would show here
        statuses = {n: await rocks.deliver(n, f"{n}-pushed", "small-chelsea.jpg", signing)
                    for n, signing in ((300, "valid"), (301, "invalid"), (302, "none"))}
        await until(lambda: len(records) == 1)
        stop.set()
        await asyncio.wait_for(task, 30)
    assert rocks.outcome == {**{n: "verified" for n in TESTS}, 205: "rejected"}
    assert rocks.subscription[201]["hub.topic"].endswith("?redirect=complete")
    assert statuses[300] // 100 == 2 and statuses[301] // 100 == 2 and statuses[302] == 403
    pushed = sorted(i for (i,) in query(db, "SELECT item_id FROM seen_items WHERE item_id LIKE '%-pushed'"))
    assert pushed == ["300-pushed"]  # the wrongly signed and the unsigned deliveries recorded nothing
    assert [r.entry.label for r in records] == ["library-chelsea"]
