"""WebSub against a loopback hub speaking the W3C protocol: discovery from the feed's Link
header, subscription with hub.secret, the hub's verification of intent (challenge echoed
only for our own topic), signed deliveries recorded and badly signed ones ignored, the
lease renewed before it ends, and polling left as it was where no hub answers."""

import asyncio
import hashlib
import hmac
import secrets

import pytest
from aiohttp import ClientSession, web

from feeds import make_source
from monitor.config import parse_config
from monitor.daemon import run_daemon
from tests.hosts import DaemonProcess, free_port, serve
from tests.test_daemon import PhotoSite, config_for, make_library, query, until

pytestmark = pytest.mark.slow  # waits for a lease to come round


class Hub:
    def __init__(self, lease: int = 2):
        self.lease = lease
        self.subscriptions: list[dict] = []   # every subscribe request, in order
        self.verified: list[bool] = []
        self.forged: list[int] = []           # what the forged verification after each real one got

    def app(self):
        app = web.Application()

        async def hub(request):
            form = await request.post()
            sub = dict(form)
            self.subscriptions.append(sub)
            asyncio.get_running_loop().create_task(self._verify(sub))
            return web.Response(status=202)

        app.router.add_post("/hub", hub)
        return app

    async def _verify(self, sub):
        challenge = secrets.token_hex(8)
        async with ClientSession() as http:
            async with http.get(sub["hub.callback"], params={
                    "hub.mode": "subscribe", "hub.topic": sub["hub.topic"], "hub.challenge": challenge,
                    "hub.lease_seconds": str(self.lease)}) as resp:
                # the echo is plain text no browser may sniff into a page on the daemon's origin
                self.verified.append(resp.status == 200 and await resp.text() == challenge
                                     and resp.content_type == "text/plain"
                                     and resp.headers.get("X-Content-Type-Options") == "nosniff")
            # a forged verification for a topic nobody asked for is refused
            async with http.get(sub["hub.callback"], params={
                    "hub.mode": "subscribe", "hub.topic": "https://evil.example/feed", "hub.challenge": "x"}) as resp:
                assert resp.status == 404
            # and one for the feed's own topic, now that no request awaits verification: a lease of a
            # year taken would stop the renewals (and the pushes once the hub's own lease ended)
            async with http.get(sub["hub.callback"], params={
                    "hub.mode": "subscribe", "hub.topic": sub["hub.topic"], "hub.challenge": "y",
                    "hub.lease_seconds": "31536000"}) as resp:
                self.forged.append(resp.status)

    async def publish(self, body: bytes, secret: str | None = None) -> str:
        sub = self.subscriptions[-1]
        mac = hmac.new((secret or sub["hub.secret"]).encode(), body, hashlib.sha256).hexdigest()
        async with ClientSession() as http:
            async with http.post(sub["hub.callback"], data=body, headers={
                    "Content-Type": "application/rss+xml", "X-Hub-Signature": f"sha256={mac}"}) as resp:
                return await resp.text()


def rss(base: str, items: list[tuple[str, str]]) -> bytes:
    entries = "".join(f'<item><guid>{guid}</guid><link>{base}/p/{guid}</link>'
                      f'<enclosure url="{base}/img/{name}" type="image/jpeg" length="1"/></item>'
                      for guid, name in items)
    return (f'<?xml version="1.0"?><rss version="2.0"><channel><title>t</title>{entries}</channel></rss>').encode()


def test_hub_discovery_from_headers_and_links():
    feed = make_source("rss", "f", "https://blog.example/feed.xml")
    assert feed.hub(b"", {"Link": '<https://hub.example/>; rel="hub", <https://blog.example/feed.xml>; rel="self"'}) \
        == ("https://hub.example/", "https://blog.example/feed.xml")
    assert feed.hub(b"<rss/>", {"Link": '<https://hub.example/>; rel="hub"'}) is None  # no topic: no subscription
    body = (b'<?xml version="1.0"?><feed xmlns="http://www.w3.org/2005/Atom"><title>t</title>'
            b'<link rel="hub" href="https://pubsubhubbub.appspot.com/"/><link rel="self" href="https://b/atom"/></feed>')
    assert feed.hub(body, {}) == ("https://pubsubhubbub.appspot.com/", "https://b/atom")
    # found without a second parse's help where the bytes name no hub; a UTF-16 feed is parsed
    single = body.replace(b'rel="hub"', b"rel = 'HUB'")  # feedparser reads rel in any case
    assert feed.hub(single, {}) == ("https://pubsubhubbub.appspot.com/", "https://b/atom")
    wide = body.decode().replace('version="1.0"', 'version="1.0" encoding="utf-16"').encode("utf-16")
    assert feed.hub(wide, {}) == ("https://pubsubhubbub.appspot.com/", "https://b/atom")
    assert feed.hub(body.replace(b'rel="hub"', b'rel="alternate"'), {}) is None
    jf = make_source("jsonfeed", "j", "https://b/feed.json")
    assert jf.hub(b'{"version": "https://jsonfeed.org/version/1.1", "feed_url": "https://b/feed.json", '
                  b'"hubs": [{"type": "WebSub", "url": "https://hub.example/"}], "items": []}', {}) \
        == ("https://hub.example/", "https://b/feed.json")


async def test_pushed_posts_are_recorded_signed_only_and_the_lease_is_renewed(tmp_path, samples):
    site, hub = PhotoSite(samples), Hub(lease=2)
    db = tmp_path / "m.sqlite"
    make_library(db, samples)
    port = free_port()
    async with serve(site.app()) as images, serve(hub.app()) as hub_base:
        topic = f"{images}/websub-feed.xml"
        feed_app = web.Application()

        polls = []

        async def feed(request):  # unchanged after the first poll: 304s from then on
            polls.append(request.headers.get("If-None-Match"))
            if request.headers.get("If-None-Match") == '"v1"':
                return web.Response(status=304, headers={"ETag": '"v1"'})
            return web.Response(body=rss(images, [("p1", "other-apple.jpg")]), content_type="application/rss+xml",
                                headers={"Link": f'<{hub_base}/hub>; rel="hub", <{topic}>; rel="self"',
                                         "ETag": '"v1"'})
        feed_app.router.add_get("/websub-feed.xml", feed)
        async with serve(feed_app) as feeds_base:
            cfg = config_for(images, db)
            cfg = parse_config({**cfg.model_dump(), "server": {"port": port, "public_url": f"http://127.0.0.1:{port}"},
                                "feeds": [{"name": "blog", "type": "rss", "url": f"{feeds_base}/websub-feed.xml",
                                           "interval": 3600}]})
            records, stop, running = [], asyncio.Event(), {}
            task = asyncio.create_task(run_daemon(cfg, stop=stop, on_match=records.append,
                                                  on_ready=lambda r: running.update(r=r), install_signals=False))
            await until(lambda: hub.verified == [True])
            sub = hub.subscriptions[0]
            assert sub["hub.mode"] == "subscribe" and sub["hub.topic"] == topic
            assert sub["hub.callback"] == f"http://127.0.0.1:{port}/websub/blog" and len(sub["hub.secret"]) >= 32
            # a push, signed: recorded and matched at once (the feed is polled hourly)
            assert await hub.publish(rss(images, [("p2", "small-chelsea.jpg")])) == "recorded"
            await until(lambda: len(records) == 1)
            # a push signed with another secret: acknowledged, ignored
            assert await hub.publish(rss(images, [("p3", "flip-rocket.jpg")]), secret="not-the-secret") == \
                "bad_signature"
            # the 2 s lease is renewed before it ends, by a poll (a 304: the hub is remembered)
            # and a new subscription; once asked, no poll until the hub answers or the lease ends
            await until(lambda: len(hub.subscriptions) >= 2 and hub.verified[-1], timeout=15)
            assert polls[0] is None and '"v1"' in polls[1:] and len(polls) <= 4, polls
            assert hub.subscriptions[1]["hub.secret"] == sub["hub.secret"]  # pushes in flight stay valid
            assert await hub.publish(rss(images, [("p4", "q30-coffee.jpg")])) == "recorded"
            await until(lambda: len(records) == 2)
            assert hub.forged and set(hub.forged) == {404}, hub.forged  # the lease stayed the hub's: renewed
            metrics = running["r"].metrics.render().decode()
            stop.set()
            await asyncio.wait_for(task, 30)
    assert [r.entry.label for r in records] == ["library-chelsea", "library-coffee"]
    items = sorted(i for (i,) in query(db, "SELECT item_id FROM seen_items WHERE feed='blog'"))
    assert items == ["p1", "p2", "p4"]
    assert 'repost_monitor_websub_deliveries_total{feed="blog",result="recorded"} 2.0' in metrics
    assert 'repost_monitor_websub_deliveries_total{feed="blog",result="bad_signature"} 1.0' in metrics


def test_a_subscription_outlives_a_kill_9(tmp_path, samples):
    """The daemon as a subprocess, subscribed, SIGKILLed right after acknowledging a push,
    restarted: the acknowledged push is downloaded and matched, and the hub's next push,
    signed with the secret it was given before the kill, is accepted at once: no new
    subscription needed (the hub granted an hour)."""
    site, hub = PhotoSite(samples), Hub(lease=3600)
    db = tmp_path / "m.sqlite"
    make_library(db, samples)
    port = free_port()

    async def scenario():
        async with serve(site.app()) as images, serve(hub.app()) as hub_base:
            topic = f"{images}/websub-feed.xml"
            feed_app = web.Application()

            async def feed(request):
                return web.Response(body=rss(images, [("p1", "other-apple.jpg")]), content_type="application/rss+xml",
                                    headers={"Link": f'<{hub_base}/hub>; rel="hub", <{topic}>; rel="self"'})
            feed_app.router.add_get("/websub-feed.xml", feed)
            async with serve(feed_app) as feeds_base:
                cfg = tmp_path / "c.toml"
                cfg.write_text(
                    f'[store]\npath = "{db}"\n[limits]\nallowed_networks = ["127.0.0.0/8"]\nper_host_rate = 2\n'
                    f'[server]\nport = {port}\npublic_url = "http://127.0.0.1:{port}"\n'
                    f'[[feeds]]\nname = "blog"\ntype = "rss"\nurl = "{feeds_base}/websub-feed.xml"\ninterval = 3600\n')
                daemon = DaemonProcess(cfg, tmp_path / "daemon.log")
                daemon.start()
                await until(lambda: hub.verified == [True], 90)
                assert await hub.publish(rss(images, [("p2", "small-chelsea.jpg"), ("p3", "flip-rocket.jpg")])) \
                    == "recorded"
                daemon.kill()  # acknowledged: its two pictures are owed
                daemon.start()
                answer = None
                while answer != "recorded":  # 503 while the daemon starts, then accepted
                    await asyncio.sleep(0.2)
                    try:
                        answer = await hub.publish(rss(images, [("p4", "q30-coffee.jpg")]))
                    except OSError:
                        pass
                await until(lambda: query(db, "SELECT COUNT(*) FROM matches")[0][0] == 3, 60)
                assert daemon.stop() == 0, daemon.log()[-2000:]

    asyncio.run(scenario())
    assert len(hub.subscriptions) == 1  # the stored subscription went on; nothing asked again
    rows = query(db, "SELECT image_url, entry_id FROM matches")
    assert len(rows) == len(set(rows)) == 3
    assert sorted(i for (i,) in query(db, "SELECT item_id FROM seen_items")) == ["p1", "p2", "p3", "p4"]
