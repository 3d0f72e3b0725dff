"""Reddit through its OAuth API, against a loopback stand-in speaking the real protocol:
client-credentials token (basic auth, grant_type), bearer listings, a token revoked early
(replaced once), X-Ratelimit-* honoured, the descriptive User-Agent, crossposts of a
post already seen not recorded again."""

import asyncio
import base64
import json
import time

import pytest
from aiohttp import web

from feeds import make_source
from monitor.config import parse_config
from monitor.daemon import run_daemon
from tests.conftest import PAYLOADS
from tests.hosts import DaemonProcess, serve
from tests.test_daemon import PhotoSite, config_for, make_library, query, until

CLIENT, SECRET, AGENT = "script-app-id", "script-app-secret", "server:repost-monitor-test:1.0 (by /u/tester)"


class RedditStandIn:
    def __init__(self):
        self.tokens_issued: list[str] = []
        self.valid: set[str] = set()
        self.listing_times: list[float] = []
        self.agents: set[str] = set()
        self.refused = 0
        self.children: list[dict] = []

    def app(self):
        app = web.Application()

        async def token(request):
            self.agents.add(request.headers.get("User-Agent", ""))
            want = "Basic " + base64.b64encode(f"{CLIENT}:{SECRET}".encode()).decode()
            form = await request.post()
            if request.headers.get("Authorization") != want or form.get("grant_type") != "client_credentials":
                return web.json_response({"error": "invalid_grant"}, status=401)
            tok = f"tok-{len(self.tokens_issued) + 1}"
            self.tokens_issued.append(tok)
            self.valid = {tok}
            return web.json_response({"access_token": tok, "token_type": "bearer", "expires_in": 86400})

        async def listing(request):
            self.agents.add(request.headers.get("User-Agent", ""))
            auth = request.headers.get("Authorization", "")
            if not auth.lower().startswith("bearer ") or auth.split(" ", 1)[1] not in self.valid:
                self.refused += 1
                return web.json_response({"message": "Unauthorized", "error": 401}, status=401)
            self.listing_times.append(time.monotonic())
            if len(self.listing_times) == 2:
                self.valid = set()  # the token is revoked before its time
            headers = {"X-Ratelimit-Used": "1"}
            if len(self.listing_times) == 1:  # the window is spent: come back in 2 s
                headers.update({"X-Ratelimit-Remaining": "0.0", "X-Ratelimit-Reset": "2"})
            return web.json_response({"kind": "Listing", "data": {"children": self.children}}, headers=headers)

        app.router.add_post("/api/v1/access_token", token)
        app.router.add_get("/r/art/new", listing)
        return app


def post(base: str, n: int, image: str, **extra) -> dict:
    return {"kind": "t3", "data": {"name": f"t3_p{n}", "id": f"p{n}", "author": "artist", "created_utc": time.time(),
                                   "permalink": f"/r/art/comments/p{n}/", "url": f"{base}/img/{image}", **extra}}


@pytest.mark.slow  # waits out a 2 s rate-limit window
async def test_oauth_listings_refresh_rate_limits_and_crossposts(tmp_path, samples):
    site, reddit = PhotoSite(samples), RedditStandIn()
    db = tmp_path / "m.sqlite"
    make_library(db, samples)
    async with serve(site.app()) as images, serve(reddit.app()) as api:
        reddit.children = [post(images, 1, "small-chelsea.jpg"), post(images, 2, "other-apple.jpg")]
        cfg = config_for(images, db)
        cfg = parse_config({**cfg.model_dump(), "feeds": [{
            "name": "reddit-api", "type": "reddit_api", "url": f"{api}/r/art/new", "interval": 0.2,
            "client_id": CLIENT, "client_secret": SECRET, "user_agent": AGENT, "max_backoff": 1,
            "token_url": f"{api}/api/v1/access_token"}]})  # the stand-in's, not www.reddit.com's
        records = []
        stop = asyncio.Event()
        task = asyncio.create_task(run_daemon(cfg, stop=stop, on_match=records.append, install_signals=False))
        await until(lambda: len(records) == 1)
        # a crosspost of post 1 elsewhere, and a new post
        reddit.children = [post(images, 3, "small-chelsea.jpg", crosspost_parent="t3_p1"),
                           post(images, 4, "flip-rocket.jpg")] + reddit.children
        await until(lambda: len(reddit.listing_times) >= 3)
        await until(lambda: len(records) == 2)
        stop.set()
        await asyncio.wait_for(task, 30)
    assert reddit.agents == {AGENT}
    assert reddit.tokens_issued == ["tok-1", "tok-2"] and reddit.refused == 1  # revoked: replaced once
    assert reddit.listing_times[1] - reddit.listing_times[0] >= 2.0          # X-Ratelimit-Reset honoured
    items = sorted(i for (i,) in query(db, "SELECT item_id FROM seen_items WHERE feed='reddit-api'"))
    assert items == ["t3_p1", "t3_p2", "t3_p4"]  # the crosspost is post 1 again
    assert [r.entry.label for r in records] == ["library-chelsea", "library-rocket"]



RECORDED = json.loads((PAYLOADS / "reddit" / "praw__oauth_exchange_2026-04.json").read_text())
REDDIT_HOSTS = ("https://preview.redd.it/", "https://external-preview.redd.it/", "https://i.redd.it/")


class RecordedReddit:
    """Reddit replaying the recorded OAuth exchange: the token response, then the listing with
    its rate-limit headers; its picture hosts point at this server, which answers three of
    the pictures with reposts of the library and the rest with unrelated ones."""

    def __init__(self, site):
        self.site, self.base = site, ""
        self.tokens_issued = 0
        self.fetched: dict[str, int] = {}
        self.pictures: dict[str, str] = {}

    def listing_text(self) -> str:
        text = json.dumps(RECORDED["listing"]["response"]["body"])
        for host in REDDIT_HOSTS:
            text = text.replace(host, f"{self.base}/{host[8:]}")
        return text

    def app(self):
        app = web.Application()

        async def token(request):
            form = await request.post()
            if form.get("grant_type") != "client_credentials" or not request.headers.get("Authorization"):
                return web.json_response({"error": "invalid_grant"}, status=401)
            self.tokens_issued += 1
            body = dict(RECORDED["token"]["response"]["body"], access_token=f"tok-{self.tokens_issued}")
            return web.json_response(body)

        async def listing(request):
            if not request.headers.get("Authorization", "").startswith("bearer tok-"):
                return web.json_response({"message": "Unauthorized", "error": 401}, status=401)
            headers = {k: v for k, v in RECORDED["listing"]["response"]["headers"].items() if k.startswith("x-")}
            return web.Response(text=self.listing_text(), content_type="application/json", headers=headers)

        async def picture(request):
            key = request.path_qs
            self.fetched[key] = self.fetched.get(key, 0) + 1
            name = self.pictures.get(key, "other-apple.jpg")
            return web.Response(body=self.site.images[name][0], content_type="image/jpeg")

        app.router.add_post("/api/v1/access_token", token)
        app.router.add_get("/r/popular/hot", listing)
        for host in REDDIT_HOSTS:
            app.router.add_get(f"/{host[8:]}{{path:.*}}", picture)
        return app


@pytest.mark.slow
def test_recorded_oauth_listing_survives_kill_9_without_loss_or_duplicate(tmp_path, samples):
    """The recorded token and listing; the daemon SIGKILLed with downloads still owed (3 a
    second to the picture host), restarted: every picture fetched and matched, each repost
    recorded once, no item recorded twice."""
    site = PhotoSite(samples)
    reddit = RecordedReddit(site)
    db = tmp_path / "m.sqlite"
    make_library(db, samples)

    async def scenario():
        async with serve(reddit.app()) as base:
            reddit.base = base
            src = make_source("reddit_api", "r", f"{base}/r/popular/hot", client_id="a", client_secret="b",
                              user_agent=AGENT)
            items = list(src.parse(reddit.listing_text().encode(), "application/json"))
            for item, name in zip(items[::4], ["small-chelsea.jpg", "flip-rocket.jpg", "q30-coffee.jpg"],
                                  strict=True):
                reddit.pictures[item.image_urls[0][len(base):]] = name
            cfg = tmp_path / "c.toml"
            cfg.write_text(
                f'[store]\npath = "{db}"\n[limits]\nallowed_networks = ["127.0.0.0/8"]\nper_host_rate = 3\n'
                f'[server]\nport = 0\n[[feeds]]\nname = "reddit"\ntype = "reddit_api"\n'
                f'url = "{base}/r/popular/hot"\ninterval = 1\nclient_id = "{CLIENT}"\n'
                f'client_secret = "{SECRET}"\nuser_agent = "{AGENT}"\ntoken_url = "{base}/api/v1/access_token"\n')
            daemon = DaemonProcess(cfg, tmp_path / "daemon.log")
            daemon.start()
            await until(lambda: sum(reddit.fetched.values()) >= 5, 90)
            daemon.kill()
            daemon.start()
            total = sum(len(i.image_urls) for i in items)
            await until(lambda: query(db, "SELECT COUNT(*) FROM work WHERE state='pending'")[0][0] == 0
                        and query(db, "SELECT COUNT(*) FROM work")[0][0] == total, 90)
            assert daemon.stop() == 0, daemon.log()[-2000:]
            return items

    items = asyncio.run(scenario())
    assert reddit.tokens_issued == 2  # one per life of the process
    assert sorted(i for (i,) in query(db, "SELECT item_id FROM seen_items")) == sorted(i.id for i in items)
    rows = query(db, "SELECT image_url, entry_id FROM matches")
    assert len(rows) == len(set(rows)) == 3
    assert set(reddit.fetched) == {u[len(reddit.base):] for i in items for u in i.image_urls}
    assert all(n <= 2 for n in reddit.fetched.values())  # again only if killed mid-download
