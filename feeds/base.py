"""What every source produces, and the two shapes of source.

Sources know nothing of downloading, matching or storage: an HTTP source
turns a response body into items, a local source lists items itself.
"""

from __future__ import annotations

import html.parser
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar
from urllib.parse import urljoin, urlsplit

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".avif")
MAX_IMAGES_PER_ITEM = 20


@dataclass(frozen=True, slots=True)
class FeedItem:
    source: str                      # the configured feed name
    id: str                          # stable within the source
    image_urls: tuple[str, ...]
    page_url: str | None = None
    author: str | None = None
    published: datetime | None = None
    title: str | None = None


class FeedError(ValueError):
    """A payload that is not a usable feed; ``reason`` is a metric label."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason

    def __reduce__(self):  # to and from the processes that parse large bodies, attributes kept
        return type(self), (self.reason, str(self).removeprefix(f"{self.reason}: ")), self.__dict__


@dataclass
class HttpSource(ABC):
    """A source fetched over HTTP by the monitor's poller (conditional GET,
    backoff, size limits live there), parsed here from the bytes."""

    kind: ClassVar[str]
    accept: ClassVar[str] = "*/*"
    name: str
    url: str
    options: dict = field(default_factory=dict)

    @abstractmethod
    def parse(self, body: bytes, content_type: str | None = None) -> list[FeedItem]:
        """Items in the payload; raises FeedError for a malformed one."""

    def token_request(self) -> TokenRequest | None:
        """The OAuth client-credentials request whose bearer token every poll needs, if any."""
        return None

    def request_headers(self) -> dict[str, str]:
        """Headers this API asks of its clients (a descriptive User-Agent...)."""
        return {}

    def hub(self, body: bytes, headers) -> tuple[str, str] | None:
        """(WebSub hub URL, topic URL) the feed advertises, from its ``Link`` headers (and, in
        the formats that carry them, its own links), or None."""
        if not headers:
            return None
        # A hub and its topic often come in separate Link headers (websub.rocks test 100).
        links = headers.getall("Link", []) if hasattr(headers, "getall") else [headers.get("Link", "")]
        return link_header_hub(", ".join(links))

    def wait_hint(self, headers) -> float | None:
        """Seconds to wait at least before the next poll, from a response's headers (rate limits)."""
        return None


@dataclass(frozen=True)
class TokenRequest:
    """An OAuth 2 client-credentials grant: POST ``url`` with HTTP basic auth and ``form``."""
    url: str
    client_id: str
    client_secret: str
    form: tuple[tuple[str, str], ...] = (("grant_type", "client_credentials"),)


@dataclass
class StreamSource(ABC):
    """A source that pushes its items over a long-lived connection (server-sent events).
    The monitor holds the connection open, reconnects with backoff, and before each
    (re)connection polls ``catchup()`` for what was posted while it was away, from
    ``cursor`` (the newest item id it has recorded)."""

    kind: ClassVar[str]
    protocol: ClassVar[str] = "sse"      # "sse" (text/event-stream) or "websocket" (one event a message)
    name: str
    url: str
    options: dict = field(default_factory=dict)

    def connect_url(self, cursor: str | None) -> str:
        """Where to connect, resuming after ``cursor`` where the server can (Jetstream's)."""
        return self.url

    @abstractmethod
    def parse_event(self, event: str, data: str) -> ParsedItems:
        """Items in one event (none for events that carry no post); a malformed event
        is an item skipped with its reason, never an exception."""

    @abstractmethod
    def catchup(self, cursor: str | None) -> HttpSource | None:
        """A polled source for the posts after ``cursor``, or None when there is none."""

    @staticmethod
    def newest(ids) -> str | None:
        """The newest of item ids that count up (Mastodon's: longer is newer, then larger)."""
        ids = [i for i in ids if i]
        return max(ids, key=lambda i: (len(i), i)) if ids else None


@dataclass
class LocalSource(ABC):
    kind: ClassVar[str]
    name: str
    options: dict = field(default_factory=dict)

    @abstractmethod
    def scan(self) -> list[FeedItem]:
        """Items available now (blocking I/O: the monitor runs it in a thread)."""


class _ImgCollector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.found: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag != "img":
            return
        a = dict(attrs)
        # Tracking pixels declare themselves 1x1; they are never reposts.
        if a.get("width") in ("0", "1") or a.get("height") in ("0", "1"):
            return
        src = a.get("src") or a.get("data-src")
        if src:
            self.found.append(src.strip())


# Markup whose content holds no tags: an <img> inside it is not an image of the post
_NO_TAGS_INSIDE = {"<!--": "-->", "<script": "</script", "<style": "</style"}
IMG_TAG_MAX = 8192  # chars: a longer "tag" (an inline data: URI, or no tag at all) is skipped
# the rest of a tag after "<img": attributes, quoted values (which may hold '>'), then '>'
# (unambiguous: a failed match backtracks once through what it read)
_TAG_REST = re.compile(r"""(?:[^>"']|"[^"]*"|'[^']*')*>""")
# ASCII letters only: str.lower() lengthens some characters ("İ"), and offsets must hold
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _tag_spans(lower: str) -> list[tuple[int, int]]:
    """The stretches of ``lower`` outside comments, scripts and styles (an unclosed
    comment runs to the end), in one pass: each opener's next place is looked up again only
    once the scan has passed it."""
    spans, pos, n = [], 0, len(lower)
    upcoming = {opener: lower.find(opener) for opener in _NO_TAGS_INSIDE}
    while pos < n:
        for opener, at in upcoming.items():
            if 0 <= at < pos:
                upcoming[opener] = lower.find(opener, pos)
        found = [(at, opener) for opener, at in upcoming.items() if at >= 0]
        if not found:
            spans.append((pos, n))
            break
        at, opener = min(found)
        spans.append((pos, at))
        end = lower.find(_NO_TAGS_INSIDE[opener], at + len(opener))
        pos = n if end < 0 else end + len(_NO_TAGS_INSIDE[opener])
    return spans


def _img_tags(text: str) -> list[str]:
    """The ``<img ...>`` tags of ``text`` outside comments, scripts and styles, in time
    linear in its length. Python's html.parser is quadratic on some hostile markup (an
    unclosed comment: 80 KB took 6.4 s, a 5 MB feed would take hours), so it only ever
    parses one short tag at a time. Tags that overlap (``<img<img<img...``) are read until
    a budget of a few times the text's length is spent, and no further."""
    lower = text.translate(_ASCII_LOWER)
    tags, budget = [], 4 * len(text) + IMG_TAG_MAX
    for start, stop in _tag_spans(lower):
        at = start
        while (at := lower.find("<img", at, stop)) >= 0:
            window = min(stop, at + IMG_TAG_MAX)
            tag = _TAG_REST.match(text, at + 4, window)
            budget -= (tag.end() if tag else window) - at
            if budget < 0:
                return tags
            if tag:
                tags.append(text[at:tag.end()])
            at += 4
    return tags


def images_in_html(text: str | None, base: str | None = None) -> list[str]:
    if not text or "<img" not in text.lower():
        return []
    found: list[str] = []
    for tag in _img_tags(text):
        parser = _ImgCollector()
        try:
            parser.feed(tag)
            parser.close()
        except Exception:  # noqa: BLE001 - html.parser on hostile markup: keep what was found
            pass
        found += parser.found
    return [absolute(src, base) for src in found]


def absolute(url: str, base: str | None) -> str:
    """``url`` resolved against ``base``; a URL that cannot be joined (unclosed
    IPv6 brackets, a non-string) comes back as it was, for ``clean_urls`` to refuse."""
    if not isinstance(url, str):
        return url
    url = url.strip()
    if not base or not isinstance(base, str):
        return url
    try:
        return urljoin(base, url)
    except ValueError:
        return url


def json_document(data: str | bytes):
    """``json.loads`` of a remote document; a ValueError for any that is not JSON, including
    one nested deeper than Python's recursion limit (a thousand ``[``: 2 KB), which
    ``json.loads`` answers with RecursionError: one hostile stream event would otherwise
    fail its connection, and the replay from the cursor fail it again, forever."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def as_text(value, limit: int = 2000) -> str | None:
    """A feed's optional text field (author, title, id) as a string, or None when
    it is missing or of a shape no text has (an object, a list)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        value = str(value)
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value[:limit] or None


def page_link(url, base: str | None = None) -> str | None:
    """A post's page URL, kept only when it is a fetchable http(s) URL."""
    url = absolute(url, base) if isinstance(url, str) else None
    return url if url and url_problem(url) is None else None


class ParsedItems(list):
    """A poll's items (a list), and the items or URLs skipped with their reasons:
    ``skipped`` holds ``(reason, detail)``, reason ``malformed_item`` or ``bad_url``."""

    def __init__(self, items=()):
        super().__init__(items)
        self.skipped: list[tuple[str, str]] = []
        self.cursor: str | None = None  # a stream's position after this event, where it has one

    @classmethod
    def skip(cls, reason: str, detail: str) -> ParsedItems:
        """No items: one thing skipped, with its reason."""
        out = cls()
        out.skipped.append((reason, detail[:300]))
        return out


def build_items(entries, build) -> ParsedItems:
    """``build(n, entry, bad_urls)`` for each entry: an item, or None to pass over it.
    An entry whose building raises is skipped with its reason, so one malformed
    item never costs the rest of the poll."""
    out = ParsedItems()
    for n, entry in enumerate(entries):
        bad_urls: list[str] = []
        try:
            item = build(n, entry, bad_urls)
        except Exception as exc:  # noqa: BLE001 - hostile input: any failure is this item's
            out.skipped.append(("malformed_item", f"item #{n}: {type(exc).__name__}: {exc}"[:300]))
            continue
        out.skipped += [("bad_url", f"item #{n}: {why}") for why in bad_urls]
        if item is not None:
            out.append(item)
    return out


def looks_like_image_url(url: str) -> bool:
    return urlsplit(url).path.lower().endswith(IMAGE_EXTENSIONS)


MAX_URL_LENGTH = 4096


def url_problem(url) -> str | None:
    """Why ``url`` is not a fetchable http(s) URL, or None when it is. Checks what
    the HTTP client would choke on later: brackets that do not close
    (``http://[::1/``), control characters, host names no DNS can carry
    (labels over 63 characters, names IDNA cannot encode)."""
    if not isinstance(url, str):
        return f"not a string ({type(url).__name__})"
    if len(url) > MAX_URL_LENGTH:
        return f"longer than {MAX_URL_LENGTH} characters"
    if any(ord(c) < 32 or ord(c) == 127 for c in url):
        return "control characters in the URL"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        return f"unparseable URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return f"scheme {parts.scheme!r} is not http(s)"
    if not host:
        return "no host"
    if any(c.isspace() for c in parts.netloc):
        return "white space in the host name"
    if host.startswith("[") or ":" in host:
        return None  # an IPv6 literal: urlsplit has checked the brackets
    try:
        encoded = host.encode("idna")
    except UnicodeError as exc:
        return f"host name cannot be encoded ({exc})"
    if len(encoded) > 253 or any(len(label) > 63 for label in encoded.split(b".")):
        return "host name longer than DNS allows"
    return None


def link_header_hub(link: str) -> tuple[str, str] | None:
    """(hub, self) from an HTTP ``Link`` header (RFC 8288), when it names both."""
    found: dict[str, str] = {}
    for part in link.split(","):
        target, _, params = part.partition(";")
        url = target.strip().strip("<>").strip()
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "rel":
                for rel in value.strip().strip('"').lower().split():
                    if rel in ("hub", "self") and url_problem(url) is None:
                        found.setdefault(rel, url)
    return (found["hub"], found["self"]) if "hub" in found and "self" in found else None


def clean_urls(urls, skipped: list[str] | None = None) -> tuple[str, ...]:
    """Fetchable http(s) URLs only, first occurrence kept, capped per item; the
    reason each other non-empty URL was dropped goes to ``skipped``."""
    seen: dict[str, None] = {}
    for url in urls:
        if not url:
            continue
        if isinstance(url, str):
            url = url.strip()
        why = url_problem(url)
        if why is not None:
            if skipped is not None and (not isinstance(url, str) or "://" in url):
                skipped.append(f"{str(url)[:200]!r}: {why}")
            continue
        if url not in seen:
            seen[url] = None
    return tuple(list(seen)[:MAX_IMAGES_PER_ITEM])
