"""Property-based fuzz targets (hypothesis), shared by tests/test_fuzz.py (a bounded
few hundred inputs each, in CI) and bench/fuzz.py (10,000 or more each).

Every target states what must hold for any input: a result or a clear, typed reason;
never an unexpected exception, a 500, a hang or a work row left pending.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feeds import FeedError, FeedItem
from feeds.base import clean_urls, url_problem
from feeds.registry import make_source
from monitor.scan import add_files

SLOW_INPUT_SECONDS = 2.0  # one input taking longer than this is a finding (a hang in the making)


@dataclass
class Tally:
    inputs: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def saw(self, outcome: str) -> None:
        self.inputs += 1
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    took = time.perf_counter() - start
    assert took < SLOW_INPUT_SECONDS, f"one input took {took:.2f} s"
    return out


# -- mutation of real payloads -----------------------------------------------------------
def load_seeds(folder: Path) -> dict[str, list[bytes]]:
    """Real feed payloads by adapter kind (the folder layout of tests/payloads)."""
    kinds = {"rss2": "rss", "rss1": "rss", "atom": "rss", "malformed": "rss", "jsonfeed": "jsonfeed",
             "reddit": "reddit", "mastodon": "mastodon"}
    seeds: dict[str, list[bytes]] = {}
    for sub, kind in kinds.items():
        for p in sorted((folder / sub).glob("*")) if (folder / sub).is_dir() else []:
            if p.is_file() and p.stat().st_size < 2_000_000:
                seeds.setdefault(kind, []).append(p.read_bytes())
    return seeds


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=40) | st.sampled_from(["http://[::1/x.jpg", "javascript:alert(1)",
                                              "http://" + "a" * 64 + ".example/x.jpg", "", "\x00",
                                              "https://ok.example/a.jpg", "//x", "image/jpeg"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children,
                                                                          max_size=4),
    max_leaves=12)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def _replace(doc, path, value):
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(doc, dict):
        return {k: (_replace(v, rest, value) if k == head else v) for k, v in doc.items()}
    return [(_replace(v, rest, value) if i == head else v) for i, v in enumerate(doc)]


@st.composite
def mutated_json(draw, seeds: list[bytes]) -> bytes:
    """A real JSON payload with some of its values replaced by values of any shape."""
    doc = json.loads(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(doc))  # anew: a replaced value may have taken paths with it
        path = paths[draw(st.integers(0, len(paths) - 1))]
        doc = _replace(doc, path, draw(JSON_VALUES))
    return json.dumps(doc).encode()


@st.composite
def mutated_bytes(draw, seeds: list[bytes]) -> bytes:
    """A real payload cut, spliced, with bytes flipped or inserted."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "dup"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at:at + draw(st.integers(1, 4096))]
        elif op == "insert":
            data[at:at] = draw(st.sampled_from([b"<", b"&", b"]]>", b"<!ENTITY x 'y'>", b"\x00", b"\xff\xfe",
                                                b'<enclosure url="http://[::1/a.jpg" type="image/jpeg"/>',
                                                b"<img src=javascript:x>", b'"', b"{", b"[" * 50,
                                                b"[" * 3000, b"<b>" * 3000]))  # past json's recursion limit
        else:
            end = min(len(data), at + draw(st.integers(1, 2048)))
            data[at:at] = data[at:end]
    return bytes(data)


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def check_feed(kind: str, body: bytes, tally: Tally) -> None:
    source = make_source(kind, "fuzz", "https://feed.example/x")
    try:
        items = _timed(source.parse, body, None)
    except FeedError as exc:
        assert exc.reason and str(exc)
        tally.saw(f"{kind}: FeedError {exc.reason}")
        return
    for item in items:
        assert isinstance(item, FeedItem) and isinstance(item.id, str) and item.id
        assert all(url_problem(u) is None for u in item.image_urls), item.image_urls
        for text in (item.page_url, item.author, item.title):
            assert text is None or isinstance(text, str)
        assert item.page_url is None or url_problem(item.page_url) is None
    tally.saw(f"{kind}: {len(items)} items, {len(getattr(items, 'skipped', []))} skipped")


def feed_target(seeds: dict[str, list[bytes]], kind: str, tally: Tally, examples: int) -> Callable:
    strategy = mutated_bytes(seeds[kind])
    json_seeds = [b for b in seeds[kind] if _is_json(b)]
    if kind != "rss" and json_seeds:
        strategy = mutated_json(json_seeds) | strategy

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(body):
        check_feed(kind, body, tally)
    return run


# -- streaming: server-sent events -----------------------------------------------------------
def stream_target(seeds: dict[str, list[bytes]], tally: Tally, examples: int) -> Callable:
    """Lines of an event stream (mutated recorded events, heartbeats, junk) through the SSE
    decoder and the Mastodon stream's parser: events or skipped reasons, nothing else."""
    from feeds.sse import EventTooLarge, SSEDecoder
    stream = make_source("mastodon_stream", "fuzz", "https://example.social/api/v1/streaming/public")
    statuses = [s for s in seeds.get("mastodon", []) if _is_json(s) and isinstance(json.loads(s), dict)]
    line = st.one_of(st.binary(max_size=80), st.sampled_from([b"", b":thump", b"event: update", b"event: delete",
                                                              b"data: {", b"retry: 10", b"id: 1", b"\r"]),
                     (mutated_json(statuses) if statuses else st.binary()).map(lambda d: b"data: " + d))

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(line, max_size=12))
    def run(lines):
        decoder = SSEDecoder(max_bytes=20_000)
        for raw in lines + [b""]:
            try:
                event = decoder.line(raw)
            except EventTooLarge:
                tally.saw("event too large")
                continue
            if event is not None:
                items = _timed(stream.parse_event, *event)
                for item in items:
                    assert isinstance(item, FeedItem) and all(url_problem(u) is None for u in item.image_urls)
                tally.saw(f"{event[0][:12]}: {len(items)} items, {len(items.skipped)} skipped")
    return run


# -- URLs and the address guard -------------------------------------------------------------
URLISH = st.one_of(
    st.text(max_size=80),
    st.builds(lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
              st.sampled_from(["http", "https", "ftp", "file", "HTTP", "javascript", ""]),
              st.one_of(st.from_regex(r"[a-z0-9.-]{0,70}", fullmatch=True),
                        st.ip_addresses().map(lambda ip: f"[{ip}]" if ip.version == 6 else str(ip)),
                        st.sampled_from(["[::1", "[::127.0.0.1]", "[64:ff9b::7f00:1]", "xn--", "é.example",
                                         "a..b", "@evil", "user:pw@host", "%00", "\u3002example"])),
              st.sampled_from(["", ":80", ":0", ":99999", ":x", ":"]),
              st.text(max_size=20)))


def url_target(tally: Tally, examples: int) -> Callable:
    from monitor.addresses import AddressGuard, embedded_ipv4
    guard = AddressGuard()

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(URLISH, max_size=5), st.ip_addresses())
    def run(urls, ip):
        kept = clean_urls(urls + [12345, None], skipped := [])
        assert all(url_problem(u) is None for u in kept) and len(kept) + len(skipped) <= len(urls) + 2
        allowed = guard.allows(str(ip))
        inner = embedded_ipv4(ip) if ip.version == 6 else None
        if inner is not None and not inner.is_global:
            assert not allowed, ip  # a private IPv4 inside an IPv6 form is never reached
        if not ip.is_global and inner is None:
            assert not allowed, ip
        tally.saw(f"urls kept {len(kept)}; address {'allowed' if allowed else 'refused'}")
    return run


# -- config ---------------------------------------------------------------------------------
CONFIG_KEYS = {"store": ["path"], "library": ["paths", "label", "reload_check_seconds"],
               "match": ["tier"], "limits": ["concurrency", "per_host_rate", "max_pixels", "allowed_networks",
                                             "fingerprint_processes", "retries"],
               "server": ["host", "port", "token", "hmac_secret", "allowed_hosts", "allow_unauthenticated"],
               "alert_policy": ["flood_max"], "log": ["format", "level"]}


@st.composite
def config_docs(draw) -> dict:
    doc: dict = {}
    for section in draw(st.lists(st.sampled_from(sorted(CONFIG_KEYS) + ["feeds", "alerts", "bogus"]),
                                 max_size=5, unique=True)):
        if section in ("feeds", "alerts"):
            doc[section] = draw(st.lists(st.dictionaries(
                st.sampled_from(["name", "type", "url", "path", "interval", "headers", "tiers", "secret",
                                 "batch_size", "jitter"]), JSON_VALUES | st.sampled_from(
                    ["rss", "slack", "webhook", "file", "https://x.example/f", "${RM_FUZZ_UNSET}"]),
                max_size=6), max_size=3))
        elif section == "bogus":
            doc[section] = draw(JSON_VALUES)
        else:
            doc[section] = draw(st.dictionaries(st.sampled_from(CONFIG_KEYS[section] + ["unknown"]),
                                                JSON_VALUES | st.sampled_from(["${RM_FUZZ_UNSET}", "0.0.0.0",
                                                                               "10.0.0.0/8", "json"]),
                                                max_size=4))
    return doc


def config_target(tally: Tally, examples: int) -> Callable:
    from monitor.config import Config, ConfigError, parse_config

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(config_docs())
    def run(doc):
        try:
            cfg = parse_config(doc)
        except ConfigError as exc:
            assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
            tally.saw("ConfigError")
            return
        assert isinstance(cfg, Config)
        tally.saw("valid")
    return run


# -- image decoding -------------------------------------------------------------------------
def image_seeds(folder: Path, limit: int = 12) -> list[bytes]:
    """Real pictures, re-encoded small in every format the decoder takes."""
    from PIL import Image
    out = []
    for p in sorted(folder.glob("*.jpg"))[:limit // 3 or 1]:
        with Image.open(p) as img:
            img = img.convert("RGB")
            img.thumbnail((96, 96))
            for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
                buf = io.BytesIO()
                img.save(buf, fmt)
                out.append(buf.getvalue())
    return out


def image_target(seeds: list[bytes], tally: Tally, examples: int) -> Callable:
    from monitor.fingerprints import ImageError, fingerprint_bytes

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(mutated_bytes(seeds) | st.binary(max_size=64))
    def run(data):
        try:
            fp = _timed(lambda: fingerprint_bytes(data, views="query", max_pixels=4_000_000))
        except ImageError as exc:
            assert exc.reason in ("empty", "not_an_image", "truncated", "corrupt", "too_many_pixels"), exc.reason
            tally.saw(f"ImageError {exc.reason}")
            return
        assert fp.width > 0 and fp.height > 0 and 0 <= fp.dhash < 2**64
        tally.saw("fingerprinted" + (f" ({fp.degenerate})" if fp.degenerate else ""))
    return run


# -- the API --------------------------------------------------------------------------------
class DaemonThread:
    """The real daemon on loopback in a thread of its own (hypothesis drives it synchronously)."""

    def __init__(self, db: Path, library_images: list[Path]):
        from monitor.records.library import Library
        from monitor.records.store import Store
        lib = Library(Store(db))
        add_files(lib, library_images, progress=False)
        lib.store.close()
        self.db = db
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.base = self.call(self._start())

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> str:
        import aiohttp

        from monitor.config import parse_config
        from monitor.daemon import run_daemon
        cfg = parse_config({"store": {"path": str(self.db)}, "server": {"port": 0},
                            "limits": {"retries": 0, "connect_timeout": 1, "total_timeout": 3}})
        self.stop = asyncio.Event()
        running: dict = {}
        self.task = asyncio.ensure_future(run_daemon(cfg, stop=self.stop, install_signals=False,
                                                     on_ready=lambda r: running.update(r=r)))
        while "r" not in running:
            assert not self.task.done(), self.task.exception()
            await asyncio.sleep(0.05)
        self.http = aiohttp.ClientSession()
        return f"http://127.0.0.1:{running['r'].port}"

    async def request(self, method: str, route: str, body: bytes, ctype: str) -> tuple[int, str, bytes]:
        async with self.http.request(method, self.base + route, data=body,
                                     headers={"Content-Type": ctype}) as resp:
            return resp.status, resp.content_type, await resp.read()

    def close(self) -> None:
        async def shut():
            self.stop.set()
            await asyncio.wait_for(self.task, 30)
            await self.http.close()
        self.call(shut())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


JSON_ROUTES = ["/v1/ingest", "/v1/check", "/v1/library", "/v1/library/1/allow", "/v1/matches/1/verdict",
               "/v1/alerts/resend"]


@st.composite
def api_bodies(draw) -> tuple[str, bytes, str]:
    route = draw(st.sampled_from(JSON_ROUTES))
    kind = draw(st.sampled_from(["json", "json", "multipart", "raw"]))
    if kind == "json":
        doc = draw(st.dictionaries(st.sampled_from(["image_urls", "url", "page_url", "folder", "label", "id",
                                                    "source", "author", "published", "alert", "verdict", "ids",
                                                    "domains", "x"]), JSON_VALUES, max_size=5))
        if draw(st.booleans()):
            doc["image_urls"] = draw(st.lists(URLISH | JSON_VALUES, max_size=3))
        return route, json.dumps(doc).encode(), "application/json"
    if kind == "multipart":
        boundary = "fz"
        parts = []
        for _ in range(draw(st.integers(0, 6))):
            name = draw(st.sampled_from(["image", "source", "page_url", "id", "alert", "label", 'x"y', ""]))
            filename = draw(st.sampled_from([None, "a.jpg", "", "../../etc/passwd", "x\r\ny"]))
            payload = draw(st.binary(max_size=64) | st.sampled_from([b"\xff\xd8\xff" + b"\0" * 40, b"--fz"]))
            disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
            parts.append(f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + payload + b"\r\n")
        body = b"".join(parts) + (f"--{boundary}--\r\n".encode() if draw(st.booleans()) else b"")
        return route if route in ("/v1/ingest", "/v1/check", "/v1/library") else "/v1/check", body, \
            f"multipart/form-data; boundary={boundary}"
    return route, draw(st.binary(max_size=200)), "application/json"


def api_target(daemon: DaemonThread, tally: Tally, examples: int) -> Callable:
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(api_bodies())
    def run(case):
        route, body, ctype = case
        status, content_type, raw = daemon.call(daemon.request("POST", route, body, ctype))
        assert status < 500 or status in (502, 503), (route, status, raw[:300])
        assert content_type == "application/json", (route, status, content_type)
        doc = json.loads(raw)
        if status >= 400:
            assert doc["error"]["code"] and doc["error"]["message"]
        tally.saw(f"{route} {status}")
    return run


def pending_work(db: Path, wait: float = 15.0) -> int:
    """Work rows still pending once the daemon has had ``wait`` seconds to finish them."""
    from monitor.records.store import Store
    deadline = time.monotonic() + wait
    while True:
        store = Store(db, create=False)
        try:
            n = store.query("SELECT COUNT(*) FROM work WHERE state='pending'")[0][0]
        finally:
            store.close()
        if n == 0 or time.monotonic() > deadline:
            return n
        time.sleep(0.2)
