"""The self-contained demo: a feed host on loopback, a sample library, the real daemon.

No network is needed: the feed host publishes posts (mostly unrelated
pictures, some reposts of library images: resized, recompressed, cropped,
flipped, captioned) on an RSS feed and a JSON Feed, a few per second, and
the daemon watches both and prints each detection as it happens.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from importlib import resources
from pathlib import Path
from xml.sax.saxutils import escape

from aiohttp import web
from PIL import Image, ImageDraw, ImageOps

from monitor.config import parse_config
from monitor.daemon import run_daemon
from monitor.records.library import Library
from monitor.records.store import Store
from monitor.records.work import counts as work_counts
from monitor.safe_text import printable
from monitor.scan import add_files
from monitor.search.matcher import PRESETS
from monitor.tools.batch import run_match
from monitor.tools.jetstream_replay import JetstreamReplay, blob_cid, like_event, post_event
from monitor.warmup import warm_up


def sample_dir() -> Path:
    return Path(str(resources.files("monitor") / "demo_images"))


def sample_library() -> list[Path]:
    return sorted(sample_dir().glob("library-*.jpg"))


def sample_others() -> list[Path]:
    return sorted(sample_dir().glob("other-*.jpg"))


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _caption(img: Image.Image) -> Image.Image:
    band = max(24, img.height // 7)
    out = Image.new("RGB", (img.width, img.height + band), "white")
    out.paste(img, (0, band))
    ImageDraw.Draw(out).text((10, band // 3), "when you see it", fill="black")
    return out


def _crop(img: Image.Image, share: float) -> Image.Image:
    dx, dy = int(img.width * share / 2), int(img.height * share / 2)
    return img.crop((dx, dy, img.width - dx, img.height - dy))


# What people do to a picture before reposting it.
REPOST_KINDS = {
    "resized": lambda im: _jpeg(im.resize((im.width * 3 // 5, im.height * 3 // 5)), 85),
    "recompressed": lambda im: _jpeg(im, 35),
    "cropped": lambda im: _jpeg(_crop(im, 0.06), 80),
    "flipped": lambda im: _jpeg(ImageOps.mirror(im), 85),
    "captioned": lambda im: _jpeg(_caption(im), 85),
}


@dataclass(frozen=True, slots=True)
class DemoImage:
    name: str
    data: bytes
    repost_of: str | None  # library file name, or None for an unrelated picture
    kind: str


def demo_stream(count: int, seed: int = 7, repost_share: float = 0.3) -> list[DemoImage]:
    """A stream of posts: mostly unrelated pictures, some reposts of library images."""
    rng = random.Random(seed)
    library = [(p.name, Image.open(p).convert("RGB")) for p in sample_library()]
    others = [(p.name, Image.open(p).convert("RGB")) for p in sample_others()]
    kinds = list(REPOST_KINDS)
    out = []
    for i in range(count):
        if rng.random() < repost_share:
            name, img = rng.choice(library)
            kind = kinds[i % len(kinds)]
            out.append(DemoImage(f"post-{i:04d}-{kind}.jpg", REPOST_KINDS[kind](img), name, kind))
        else:
            name, img = rng.choice(others)
            # Unrelated pictures, each one a new encode so no two posts share bytes.
            scale = rng.uniform(0.5, 1.0)
            small = img.resize((max(32, int(img.width * scale)), max(32, int(img.height * scale))))
            out.append(DemoImage(f"post-{i:04d}.jpg", _jpeg(small, rng.randint(60, 92)), None,
                                 "unrelated"))
    return out


def run_batch_demo() -> int:
    """`match` over generated reposts: the engine on its own, no daemon."""
    with tempfile.TemporaryDirectory(prefix="repost-monitor-demo-") as tmp:
        library, posts = Path(tmp) / "library", Path(tmp) / "posts"
        library.mkdir()
        posts.mkdir()
        for path in sample_library():
            (library / path.name).write_bytes(path.read_bytes())
        for item in demo_stream(30):
            (posts / item.name).write_bytes(item.data)
        return run_match([str(posts)], str(library), PRESETS["near"], best=True,
                         fmt="table", output=None, cache=None, progress=False)


class DemoFeedHost:
    """An aiohttp app playing a photo site: /rss.xml, /feed.json, /img/NAME; and Bluesky:
    Jetstream's /subscribe and the CDN's /img/feed_thumbnail/plain/DID/CID@jpeg.

    Posts appear over time (``rate`` per second), alternately on each feed;
    both feeds answer conditional GETs with 304 when nothing changed. On Jetstream every
    post is there, among nine events without pictures (likes, text posts), as on the
    real firehose.
    """

    def __init__(self, posts: list[DemoImage], rate: float = 4.0):
        self.posts = posts
        self.rate = rate
        self.started: float | None = None  # nothing is published before start()
        self.images = {p.name: p.data for p in posts}
        self.blobs = {blob_cid(p.name): p.data for p in posts}
        self.blob_names = {blob_cid(p.name): p.name for p in posts}
        self.base = ""
        self.jetstream = JetstreamReplay()
        self._streamed = 0  # posts already out on Jetstream

    def start(self) -> None:
        """Begin publishing: called once the daemon watches (its kernels compiled, which
        takes ~10 s on a machine's first run), so no post scrolls off the feeds unseen."""
        if self.started is None:
            self.started = time.time()

    def published(self) -> list[tuple[int, DemoImage, float]]:
        if self.started is None:
            return []
        count = min(len(self.posts), 2 + int((time.time() - self.started) * self.rate))
        # Post i appears once (i - 1) / rate seconds have passed.
        return [(i, p, self.started + max(0.0, (i - 1) / self.rate))
                for i, p in enumerate(self.posts[:count])]

    @property
    def done_publishing(self) -> bool:
        return len(self.published()) == len(self.posts)

    def post_name(self, image_url: str) -> str:
        last = image_url.rsplit("/", 1)[-1]
        return self.blob_names.get(last.removesuffix("@jpeg"), last)

    def stream_published(self) -> None:
        """Put the posts published since the last call on Jetstream, each after nine events
        without a picture."""
        published = self.published()
        for i, post, when in published[self._streamed:]:
            base_us = int(when * 1e6) + 16 * i  # posts 0 and 1 share a second
            did = f"did:plc:demoartist{i % 7}"
            events = [like_event(f"did:plc:demoliker{k}", f"l{i}x{k}", base_us + k,
                                 f"at://did:plc:demoartist0/app.bsky.feed.post/p{i}") for k in range(5)]
            events += [post_event(f"did:plc:demotalker{k}", f"t{i}x{k}", base_us + 5 + k, f"just words {i}.{k}")
                       for k in range(4)]
            events.append(post_event(did, f"p{i}", base_us + 10, f"post {i}", [blob_cid(post.name)]))
            self.jetstream.publish(events)
        self._streamed = len(published)

    def app(self):

        async def image(request):
            data = self.images.get(request.match_info["name"])
            if data is None:
                raise web.HTTPNotFound()
            return web.Response(body=data, content_type="image/jpeg")

        def conditional(request, body: str, content_type: str):
            etag = '"' + hashlib.sha1(body.encode()).hexdigest()[:16] + '"'
            if request.headers.get("If-None-Match") == etag:
                return web.Response(status=304, headers={"ETag": etag})
            return web.Response(text=body, content_type=content_type, headers={"ETag": etag})

        async def rss(request):
            items = []
            for i, post, when in self.published()[::-1][:30]:
                if i % 2:
                    continue
                url = f"{self.base}/img/{post.name}"
                items.append(
                    f"<item><title>post {i}</title><link>{self.base}/post/{i}</link>"
                    f"<guid>{self.base}/post/{i}</guid><author>user{i % 7}@example.org (user{i % 7})</author>"
                    f"<pubDate>{format_datetime(datetime.fromtimestamp(when, UTC))}</pubDate>"
                    f'<media:content url="{escape(url)}" medium="image" type="image/jpeg"/></item>')
            body = ('<?xml version="1.0" encoding="utf-8"?><rss version="2.0" '
                    'xmlns:media="http://search.yahoo.com/mrss/"><channel><title>demo photos</title>'
                    f"<link>{self.base}/</link><description>demo</description>{''.join(items)}"
                    "</channel></rss>")
            return conditional(request, body, "application/rss+xml")

        async def jsonfeed(request):
            items = [{"id": f"j{i}", "url": f"{self.base}/post/{i}", "title": f"post {i}",
                      "image": f"{self.base}/img/{post.name}",
                      "authors": [{"name": f"artist{i % 5}"}],
                      "date_published": datetime.fromtimestamp(when, UTC).isoformat()}
                     for i, post, when in self.published()[::-1][:30] if i % 2]
            body = json.dumps({"version": "https://jsonfeed.org/version/1.1", "title": "demo",
                               "home_page_url": f"{self.base}/", "items": items})
            return conditional(request, body, "application/feed+json")

        async def blob(request):
            data = self.blobs.get(request.match_info["cid"].removesuffix("@jpeg"))
            if data is None:
                raise web.HTTPNotFound()
            return web.Response(body=data, content_type="image/jpeg")

        app = self.jetstream.app([("GET", "/img/feed_thumbnail/plain/{did}/{cid}", blob)])
        app.router.add_get("/rss.xml", rss)
        app.router.add_get("/feed.json", jsonfeed)
        app.router.add_get("/img/{name}", image)
        return app


def _demo_library(db: Path) -> None:
    """The demo's protected library, in a new store at ``db``."""
    library = Library(Store(db))
    add_files(library, sample_library(), progress=False)
    library.store.close()


async def start_host(stream: list[DemoImage], rate: float) -> tuple[DemoFeedHost, web.AppRunner]:
    """The demo's feed host, serving on a free loopback port (``host.base``)."""
    host = DemoFeedHost(stream, rate)
    runner = web.AppRunner(host.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host.base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # noqa: SLF001
    return host, runner


# After the last post is out, the daemon has this long to process everything before the
# demo gives up and names what it missed (polls run every second; a post takes milliseconds).
DEADLINE_AFTER_PUBLISHING = 60.0


DEMO_SOURCES = ("feeds", "jetstream")


def demo_feeds(source: str, base: str) -> list[dict]:
    """The daemon's feeds for a demo source: an RSS feed and a JSON Feed polled every second,
    or Bluesky's Jetstream replayed on loopback (pictures from its CDN stand-in)."""
    if source == "jetstream":
        return [{"name": "bsky", "type": "jetstream", "url": "ws" + base.removeprefix("http") + "/subscribe",
                 "image_url_template": base + "/img/feed_thumbnail/plain/{did}/{cid}@jpeg"}]
    return [{"name": "demo-rss", "type": "rss", "url": f"{base}/rss.xml", "interval": 1.0},
            {"name": "demo-jsonfeed", "type": "jsonfeed", "url": f"{base}/feed.json", "interval": 1.0}]


async def run_daemon_demo(posts: int = 40, rate: float = 4.0, keep_running: bool = False,
                          port: int = 0, out=None, source: str = "feeds") -> int:
    """Start the feed host and the real daemon; print detections; summarise.
    Exit status 0 when every repost was detected, 1 when some were missed."""


    out = out or sys.stdout

    def say(text: str) -> None:
        print(f"[demo] {text}", file=out, flush=True)

    # Compile before anything is timed: the first run on a machine takes ~10 s here.
    await asyncio.to_thread(warm_up, say)
    stream = demo_stream(posts)
    host, runner = await start_host(stream, rate)
    with tempfile.TemporaryDirectory(prefix="repost-monitor-demo-") as tmp:
        db = Path(tmp) / "demo.sqlite"
        await asyncio.to_thread(_demo_library, db)  # the demo's feed host is serving meanwhile
        config = parse_config({
            "store": {"path": str(db)},
            "match": {"tier": "near"},
            "limits": {"allowed_networks": ["127.0.0.0/8"], "per_host_rate": 50},
            "feeds": demo_feeds(source, host.base),
            "server": {"host": "127.0.0.1", "port": port},
            # Alerts go through the real outbox to a file sink (the console shows detections).
            "alerts": [{"name": "demo-archive", "type": "file", "path": str(Path(tmp) / "alerts.jsonl")}],
        })
        stop = asyncio.Event()
        detected: dict[str, str] = {}

        def on_match(rec):
            detected[host.post_name(rec.work.image_url)] = rec.entry.label
            print_detection(rec, out)

        def on_ready(running):
            where = ("Jetstream /subscribe, each post among 9 events without a picture" if source == "jetstream"
                     else "/rss.xml, /feed.json")
            print(f"[demo] feed host on {host.base} ({where}); {len(stream)} posts, "
                  f"{rate:g} per second", file=out)
            api = f"http://127.0.0.1:{running.port}"
            print(f"[demo] library: {len(running.library.index)} images; API on {api}/v1/ "
                  f"(OpenAPI: {api}/v1/openapi.json), metrics on {api}/metrics, health on "
                  f"{api}/healthz", file=out, flush=True)
            host.start()
            asyncio.get_running_loop().create_task(watch(running))

        async def watch(running):
            try:
                await watch_until_done(running)
            except Exception as exc:
                timed_out.append(f"the demo's own watcher failed: {exc!r}")
                stop.set()
                raise

        async def watch_until_done(running):
            # Stop once every post is out and every image has been processed, or at the
            # deadline (then the summary names what was missed).
            deadline = host.started + len(stream) / rate + DEADLINE_AFTER_PUBLISHING
            ticks = 0
            while True:
                await asyncio.sleep(0.1)
                host.stream_published()
                if keep_running or (ticks := ticks + 1) % 5:
                    continue
                seen, pending = await asyncio.to_thread(work_counts, running.store)
                if host.done_publishing and seen >= len(stream) and pending == 0:
                    stop.set()
                elif time.time() > deadline:
                    timed_out.append(f"{seen} of {len(stream)} posts seen, {pending} still pending")
                    stop.set()

        timed_out: list[str] = []
        try:
            await run_daemon(config, stop=stop, on_match=on_match, on_ready=on_ready, say=say)
        finally:
            await runner.cleanup()
    return summarize(stream, detected, timed_out, out)


def print_detection(rec, out) -> None:
    lag = f", {rec.lag_seconds:.1f}s after publication" if rec.lag_seconds is not None else ""
    flip = " mirrored" if rec.match.mirrored else ""
    fine = f", fine {rec.match.fine_distance}/512" if rec.match.fine_distance is not None else ""
    print(f"[detected] {rec.match.tier}{flip} dist={rec.match.dhash_distance}/64 "
          f"(pHash {rec.match.phash_distance}/64{fine}): {printable(rec.work.image_url)} is a repost of "
          f"library '{printable(rec.entry.label)}' (feed {rec.work.feed}, by {printable(rec.work.author)}{lag})",
          file=out, flush=True)


def summarize(stream: list[DemoImage], detected: dict[str, str], timed_out: list[str], out) -> int:
    """The summary line, and each missed repost; the demo's exit status."""
    reposts = {p.name: p.repost_of for p in stream if p.repost_of}
    caught = {n for n in detected if n in reposts}
    false_alarms = [n for n in detected if n not in reposts]
    by_kind: dict[str, list[int]] = {}
    for p in stream:
        if p.repost_of:
            by_kind.setdefault(p.kind, [0, 0])
            by_kind[p.kind][1] += 1
            by_kind[p.kind][0] += p.name in caught
    kinds = ", ".join(f"{k} {c}/{n}" for k, (c, n) in sorted(by_kind.items()))
    print(f"[demo] done: {len(stream)} posts, {len(reposts)} reposts, {len(caught)} detected "
          f"({kinds}); {len(false_alarms)} false alarms", file=out)
    if timed_out:
        print(f"[demo] deadline reached: {timed_out[0]}", file=out)
    missed = sorted(set(reposts) - caught)
    for name in missed:
        print(f"[demo] missed: {name} (a repost of {reposts[name]})", file=out)
    return 1 if missed or timed_out else 0
