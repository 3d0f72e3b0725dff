"""Throttled, size-capped, address-guarded HTTP downloads (one shared session).

Every hop of a request is checked: the URL's host (an IP literal, or every
address the name resolves to) must be a public address unless the config
allows it, and redirects are followed by hand so each new host is checked
too. The connector's resolver applies the same check, so a name that
re-resolves to a private address between our check and the connect (DNS
rebinding) is refused as well.
"""

from __future__ import annotations

import asyncio
import base64
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit
from urllib.request import url2pathname

import aiohttp
from asyncio_throttle import Throttler
from multidict import CIMultiDict

from feeds.base import url_problem
from monitor.addresses import AddressGuard, BlockedAddress, GuardedResolver
from monitor.fetcherrors import FetchError, as_fetch_error, parse_retry_after
from monitor.version import __version__

IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM",
               b"II*\x00", b"MM\x00*")
REDIRECTS = (301, 302, 303, 307, 308)
# Request headers kept across a redirect to another origin; all others (Authorization,
# Cookie, X-Api-Key, whatever a feed's config added) are dropped.
PORTABLE_HEADERS = frozenset({"accept", "if-none-match", "if-modified-since", "user-agent"})


def _origin(url: str) -> tuple:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port or {"http": 80, "https": 443}.get(parts.scheme)


@dataclass(frozen=True)
class FetchLimits:
    concurrency: int = 16
    per_host_rate: float = 8.0      # requests per second per host
    connect_timeout: float = 5.0
    read_timeout: float = 15.0      # between two reads
    total_timeout: float = 60.0     # whole request, so a slow drip cannot hold a slot
    max_image_bytes: int = 10_000_000
    max_feed_bytes: int = 5_000_000
    retries: int = 3
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    max_retry_after: float = 120.0
    max_redirects: int = 5
    allow_private: bool = False
    allowed_networks: tuple[str, ...] = ()
    local_roots: tuple[str, ...] = ()  # folders whose file:// URLs may be read
    stream_read_timeout: float = 90.0  # a stream silent this long (no heartbeat either) is reconnected
    user_agent: str = f"repost-monitor/{__version__} (+https://github.com/repost-monitor)"


@dataclass(frozen=True, slots=True)
class FeedResponse:
    not_modified: bool
    body: bytes = b""
    content_type: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    headers: CIMultiDict | None = None  # the response's, case-insensitive (rate-limit hints)


def read_local(url: str, roots: list[Path], max_bytes: int) -> bytes:
    """A file:// URL's bytes, only under one of ``roots`` (the watched folders)."""
    path = Path(url2pathname(urlsplit(url).path)).resolve()
    if not any(path.is_relative_to(root) for root in roots):
        raise FetchError("blocked_path", f"{path} is outside the watched folders")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise FetchError("too_large", f"{path} is {size:,} bytes, limit {max_bytes:,}")
        return path.read_bytes()
    except OSError as exc:
        raise FetchError("unreadable", f"{path}: {exc.strerror or exc}") from None


def image_magic_ok(head: bytes) -> bool:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    if head[4:12] in (b"ftypavif", b"ftypavis"):  # AVIF (ISO BMFF)
        return True
    return head.startswith(IMAGE_MAGIC)


class GuardedClient:
    """One aiohttp session whose every connection passes the address guard (the URL's
    host, every address it resolves to, every redirect), with a rate limit per host."""

    def __init__(self, limits: FetchLimits = FetchLimits(),
                 observe: Callable[[str, float, float], None] | None = None):
        """``observe(kind, wait, transfer)`` hears each completed request: the seconds it
        waited for the per-host rate limit and a slot, and the seconds from sending it
        to its last byte; kind is ``image`` or ``feed``."""
        self.limits = limits
        self.observe = observe
        self.guard = AddressGuard.from_limits(limits)
        self._slots = asyncio.Semaphore(limits.concurrency)
        self._throttlers: dict[str, Throttler] = {}
        self._session: aiohttp.ClientSession | None = None
        self._roots = [Path(r).resolve() for r in limits.local_roots]

    async def __aenter__(self):
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.guard),
                                         limit=self.limits.concurrency * 2, ttl_dns_cache=60)
        timeout = aiohttp.ClientTimeout(total=self.limits.total_timeout,
                                        sock_connect=self.limits.connect_timeout,
                                        sock_read=self.limits.read_timeout)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout,
                                              headers={"User-Agent": self.limits.user_agent},
                                              auto_decompress=True)
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session:
            await self._session.close()

    def add_local_root(self, path: str | Path) -> None:
        self._roots.append(Path(path).resolve())

    def _throttler(self, host: str) -> Throttler:
        t = self._throttlers.get(host)
        if t is None:
            # Throttler counts requests per period; a period of 1 s with a
            # fractional rate would round to 0, so scale the period instead.
            rate = self.limits.per_host_rate
            t = Throttler(rate_limit=max(1, int(rate)), period=max(1, int(rate)) / rate)
            self._throttlers[host] = t
        return t

    async def _check_host(self, url: str) -> str:
        why = url_problem(url)
        if why is not None:
            raise FetchError("bad_url", f"{url[:300]!r}: {why}")
        parts = urlsplit(url)
        host = parts.hostname
        try:
            literal = self.guard.check_ip(host)
        except BlockedAddress as exc:
            raise FetchError("blocked_address", str(exc)) from None
        if not literal:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                raise FetchError("dns", f"cannot resolve {host}: {exc}") from None
            for info in infos:
                if not self.guard.allows(info[4][0]):
                    raise FetchError("blocked_address",
                                     f"{host} resolves to private or reserved address {info[4][0]}")
        return host


    async def _connect_turn(self, url: str) -> None:
        """The guard's check, then this host's turn: (re)connections count against its rate."""
        async with self._throttler(await self._check_host(url)):
            pass


class Fetcher(GuardedClient):
    """Throttled, size-capped, guarded downloads. Use as ``async with Fetcher(limits) as f``;
    one per daemon."""

    async def fetch_image(self, url: str) -> bytes:
        if urlsplit(url).scheme == "file":
            return await asyncio.to_thread(read_local, url, self._roots, self.limits.max_image_bytes)
        body, ctype, _ = await self._get(url, self.limits.max_image_bytes, accept="image/*", kind="image")
        if ctype and not (ctype.startswith("image/") or ctype in ("application/octet-stream",
                                                                  "binary/octet-stream")):
            raise FetchError("not_image", f"content-type {ctype!r} from {url}")
        if not image_magic_ok(body[:16]):
            raise FetchError("not_image", f"body of {url} does not start like an image "
                                          f"({body[:12]!r})")
        return body

    async def fetch_feed(self, url: str, *, etag: str | None = None,
                         last_modified: str | None = None, accept: str = "*/*",
                         headers: dict | None = None) -> FeedResponse:
        headers = {**(headers or {}), "Accept": accept}
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        body, ctype, resp_headers = await self._get(url, self.limits.max_feed_bytes,
                                                    headers=headers, accept=accept, kind="feed")
        if resp_headers is None:
            return FeedResponse(True, etag=etag, last_modified=last_modified)
        return FeedResponse(False, body, ctype, resp_headers.get("ETag") or etag,
                            resp_headers.get("Last-Modified") or last_modified, CIMultiDict(resp_headers))

    async def websocket_messages(self, url: str, *, headers: dict | None = None,
                                 max_message: int = 1_000_000) -> AsyncIterator[str]:
        """The text messages of a WebSocket (ws:// or wss://) as they arrive, under the address
        guard. Ends when the server closes; raises FetchError on failure, or when nothing (not
        even a ping) arrives within ``limits.stream_read_timeout``."""
        assert self._session is not None, "use Fetcher as an async context manager"
        http_url = "http" + url[2:] if url.startswith(("ws://", "wss://")) else url
        await self._connect_turn(http_url)
        try:
            async with self._session.ws_connect(url, headers=headers, heartbeat=30.0, max_msg_size=max_message,
                                                timeout=aiohttp.ClientWSTimeout(ws_close=5.0)) as ws:
                while True:
                    msg = await ws.receive(timeout=self.limits.stream_read_timeout)
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        yield msg.data
                    elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                        return
                    elif msg.type == aiohttp.WSMsgType.ERROR:
                        too_big = getattr(msg.data, "code", None) == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
                        raise FetchError("too_large" if too_big else "connection",
                                         f"{url}: {msg.data or ws.exception()!r}")
                    # BINARY (compressed frames are never asked for), PING, PONG: nothing to read
        except FetchError:
            raise
        except aiohttp.WSServerHandshakeError as exc:
            reason = "rate_limited" if exc.status == 429 else "http_5xx" if exc.status >= 500 else "http_4xx"
            raise FetchError(reason, f"HTTP {exc.status} from {url}", status=exc.status) from None
        except Exception as exc:  # noqa: BLE001 - mapped to a reason, or re-raised
            raise as_fetch_error(url, exc) from None

    async def post_form(self, url: str, form: dict, *, auth: tuple[str, str] | None = None,
                        headers: dict | None = None, max_bytes: int = 65536, with_location: bool = False):
        """(status, body) of a form POST, with HTTP basic auth when given (an OAuth token
        request, a WebSub subscription); with ``with_location``, (status, body, Location).
        The host passes the address guard; no redirect is followed (credentials stay put;
        a caller that wants to follow one asks again, through the guard)."""
        assert self._session is not None, "use Fetcher as an async context manager"
        host = await self._check_host(url)
        async with self._throttler(host):
            try:
                headers = dict(headers or {})
                if auth is not None:
                    headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
                async with self._session.post(url, data=form, allow_redirects=False, headers=headers) as resp:
                    body = await resp.content.read(max_bytes)
                    return (resp.status, body, resp.headers.get("Location")) if with_location else (resp.status, body)
            except Exception as exc:  # noqa: BLE001 - mapped to a reason, or re-raised
                raise as_fetch_error(url, exc) from None

    # -- internals -----------------------------------------------------------
    async def _get(self, url: str, max_bytes: int, *, headers: dict | None = None,
                   accept: str = "*/*", kind: str = "image"):
        """GET with retries; returns (body, content type, headers), or
        (b"", None, None) on 304 Not Modified."""
        attempt = 0
        while True:
            try:
                return await self._get_once(url, max_bytes, headers or {"Accept": accept}, kind)
            except FetchError as exc:
                retryable = exc.reason in ("http_5xx", "rate_limited", "connection", "timeout")
                attempt += 1
                if not retryable or attempt > self.limits.retries:
                    raise
                if exc.retry_after is not None:
                    if exc.retry_after > self.limits.max_retry_after:
                        raise
                    delay = exc.retry_after
                else:
                    delay = min(self.limits.backoff_max,
                                self.limits.backoff_base * 2 ** (attempt - 1))
                    delay *= random.uniform(0.5, 1.0)  # jitter: retries do not stampede
                await asyncio.sleep(delay)

    async def _get_once(self, url: str, max_bytes: int, headers: dict, kind: str = "image"):
        assert self._session is not None, "use Fetcher as an async context manager"
        origin = _origin(url)
        for _ in range(self.limits.max_redirects + 1):
            if _origin(url) != origin:
                # A feed's Authorization, cookies or API keys are for its own origin:
                # a redirect elsewhere gets only what any client would send.
                headers = {k: v for k, v in headers.items() if k.lower() in PORTABLE_HEADERS}
            host = await self._check_host(url)
            # Throttle before taking a slot: a host that must wait holds no slot.
            queued = time.perf_counter()
            async with self._throttler(host), self._slots:
                sent = time.perf_counter()
                try:
                    async with self._session.get(url, headers=headers, allow_redirects=False) as resp:
                        if resp.status in REDIRECTS and "Location" in resp.headers:
                            url = urljoin(url, resp.headers["Location"])
                            continue
                        if resp.status == 304:
                            return b"", None, None
                        if resp.status == 429 or resp.status >= 500:
                            reason = "rate_limited" if resp.status == 429 else "http_5xx"
                            raise FetchError(reason, f"HTTP {resp.status} from {url}",
                                             status=resp.status,
                                             retry_after=parse_retry_after(
                                                 resp.headers.get("Retry-After")))
                        if resp.status >= 400:
                            raise FetchError("http_4xx", f"HTTP {resp.status} from {url}",
                                             status=resp.status)
                        declared = resp.content_length
                        if declared is not None and declared > max_bytes:
                            raise FetchError("too_large", f"{url} declares {declared:,} bytes, "
                                                          f"limit {max_bytes:,}")
                        chunks, size = [], 0
                        async for chunk in resp.content.iter_chunked(65536):
                            size += len(chunk)
                            if size > max_bytes:
                                raise FetchError("too_large", f"{url} sent more than "
                                                              f"{max_bytes:,} bytes")
                            chunks.append(chunk)
                        ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
                        if self.observe is not None:
                            self.observe(kind, sent - queued, time.perf_counter() - sent)
                        return b"".join(chunks), ctype or None, resp.headers
                except FetchError:
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a reason, or re-raised
                    raise as_fetch_error(url, exc) from None
        raise FetchError("too_many_redirects", f"more than {self.limits.max_redirects} redirects")

    async def stream_lines(self, url: str, *, headers: dict | None = None,
                           max_line: int = 1_000_000) -> AsyncIterator[bytes]:
        """The lines of a long-lived response (server-sent events) as they arrive, under the
        same address guard and redirect rules as every fetch. No total timeout: the read
        timeout (``limits.stream_read_timeout``) ends a stream whose server went silent,
        heartbeats included. Raises FetchError; returns when the server closes the stream."""
        assert self._session is not None, "use Fetcher as an async context manager"
        origin, headers = _origin(url), {**(headers or {}), "Accept": "text/event-stream"}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.limits.connect_timeout,
                                        sock_read=self.limits.stream_read_timeout)
        for _ in range(self.limits.max_redirects + 1):
            if _origin(url) != origin:
                headers = {k: v for k, v in headers.items() if k.lower() in PORTABLE_HEADERS}
            await self._connect_turn(url)
            try:
                async with self._session.get(url, headers=headers, allow_redirects=False, timeout=timeout) as resp:
                    if resp.status in REDIRECTS and "Location" in resp.headers:
                        url = urljoin(url, resp.headers["Location"])
                        continue
                    if resp.status == 429 or resp.status >= 500:
                        raise FetchError("rate_limited" if resp.status == 429 else "http_5xx",
                                         f"HTTP {resp.status} from {url}", status=resp.status,
                                         retry_after=parse_retry_after(resp.headers.get("Retry-After")))
                    if resp.status >= 400:
                        raise FetchError("http_4xx", f"HTTP {resp.status} from {url}", status=resp.status)
                    pending = b""
                    async for chunk in resp.content.iter_any():
                        pending += chunk
                        *lines, pending = pending.split(b"\n")
                        for line in lines:
                            yield line
                        if len(pending) > max_line:
                            raise FetchError("too_large", f"a line of over {max_line:,} bytes from {url}")
                    return
            except FetchError:
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a reason, or re-raised
                raise as_fetch_error(url, exc) from None
        raise FetchError("too_many_redirects", f"more than {self.limits.max_redirects} redirects")
