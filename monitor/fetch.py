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
import email.utils
import ipaddress
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit
from urllib.request import url2pathname

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import DefaultResolver
from asyncio_throttle import Throttler

from feeds.base import url_problem
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


class FetchError(Exception):
    """A download that failed; ``reason`` is a short metric label."""

    def __init__(self, reason: str, message: str, *, retry_after: float | None = None,
                 status: int | None = None):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.retry_after = retry_after
        self.status = status


class BlockedAddress(OSError):
    pass


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
    user_agent: str = f"repost-monitor/{__version__} (+https://github.com/repost-monitor)"


@dataclass(frozen=True, slots=True)
class FeedResponse:
    not_modified: bool
    body: bytes = b""
    content_type: str | None = None
    etag: str | None = None
    last_modified: str | None = None


NAT64_PREFIXES = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped:
        return ip.ipv4_mapped
    if ip.sixtofour:
        return ip.sixtofour
    if ip.teredo:
        return ip.teredo[1]
    value = int(ip)
    if any(ip in net for net in NAT64_PREFIXES):
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    if value >> 32 == 0 and value > 1:  # ::a.b.c.d (deprecated IPv4-compatible); not :: or ::1
        return ipaddress.IPv4Address(value)
    return None


@dataclass
class AddressGuard:
    allow_private: bool = False
    allowed: list = field(default_factory=list)

    @classmethod
    def from_limits(cls, limits: FetchLimits) -> AddressGuard:
        return cls(limits.allow_private, [ipaddress.ip_network(n, strict=False)
                                          for n in limits.allowed_networks])

    def allows(self, address: str) -> bool:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if ip.version == 6:
            # An IPv6 address that carries an IPv4 one is judged by the IPv4 address it
            # reaches: mapped (::ffff:a.b.c.d), compatible (::a.b.c.d), NAT64, 6to4, Teredo.
            ip = embedded_ipv4(ip) or ip
        if any(ip in net for net in self.allowed):
            return True
        if self.allow_private:
            return True
        # is_global is False for private, loopback, link-local (cloud metadata
        # at 169.254.169.254 and fd00:ec2::254), CGNAT, reserved ranges.
        return ip.is_global and not ip.is_multicast

    def check_ip(self, host: str) -> bool:
        """True if host is an IP literal (and allowed); raises if refused."""
        try:
            ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
        except ValueError:
            return False
        if not self.allows(host.strip("[]")):
            raise FetchError("blocked_address", f"{host} is a private or reserved address")
        return True


class GuardedResolver(AbstractResolver):
    def __init__(self, guard: AddressGuard):
        self._guard = guard
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET):
        infos = await self._inner.resolve(host, port, family)
        bad = [i["host"] for i in infos if not self._guard.allows(i["host"])]
        if bad:
            raise BlockedAddress(f"{host} resolves to private or reserved address {bad[0]}")
        return infos

    async def close(self) -> None:
        await self._inner.close()


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (now or time.time()))


def image_magic_ok(head: bytes) -> bool:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    if head[4:12] in (b"ftypavif", b"ftypavis"):  # AVIF (ISO BMFF)
        return True
    return head.startswith(IMAGE_MAGIC)


class Fetcher:
    """Use as ``async with Fetcher(limits) as f``; one per daemon."""

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

    async def __aenter__(self) -> Fetcher:
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

    # -- public --------------------------------------------------------------
    async def fetch_image(self, url: str) -> bytes:
        if urlsplit(url).scheme == "file":
            return await asyncio.to_thread(self._read_local, url)
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
                            resp_headers.get("Last-Modified") or last_modified)

    # -- internals -----------------------------------------------------------
    def _read_local(self, url: str) -> bytes:
        path = Path(url2pathname(urlsplit(url).path)).resolve()
        if not any(path.is_relative_to(root) for root in self._roots):
            raise FetchError("blocked_path", f"{path} is outside the watched folders")
        try:
            size = path.stat().st_size
            if size > self.limits.max_image_bytes:
                raise FetchError("too_large", f"{path} is {size:,} bytes, limit "
                                              f"{self.limits.max_image_bytes:,}")
            return path.read_bytes()
        except OSError as exc:
            raise FetchError("unreadable", f"{path}: {exc.strerror or exc}") from None

    async def _check_host(self, url: str) -> str:
        why = url_problem(url)
        if why is not None:
            raise FetchError("bad_url", f"{url[:300]!r}: {why}")
        parts = urlsplit(url)
        host = parts.hostname
        if not self.guard.check_ip(host):
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
                except TimeoutError:
                    raise FetchError("timeout", f"{url} timed out") from None
                except aiohttp.ClientConnectorError as exc:
                    if isinstance(getattr(exc, "os_error", None), BlockedAddress):
                        raise FetchError("blocked_address", str(exc.os_error)) from None
                    raise FetchError("connection", f"{url}: {exc}") from None
                except BlockedAddress as exc:
                    raise FetchError("blocked_address", str(exc)) from None
                except (aiohttp.ClientError, OSError) as exc:
                    raise FetchError("connection", f"{url}: {exc!r}") from None
                except (ValueError, UnicodeError) as exc:  # a URL the client cannot encode
                    raise FetchError("bad_url", f"{url[:300]!r}: {exc}") from None
        raise FetchError("too_many_redirects", f"more than {self.limits.max_redirects} redirects")
