"""Reddit through its OAuth API, against a loopback stand-in speaking the real protocol:
client-credentials token (basic auth, grant_type), bearer listings, a token revoked early
(replaced once), X-Ratelimit-* honoured, the descriptive User-Agent, crossposts of a
post already seen not recorded again."""

import asyncio
import base64
import time

import pytest
from aiohttp import web

from monitor.config import parse_config
from monitor.daemon import run_daemon
from tests.hosts import serve
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

