"""What every source produces, and the two shapes of source.

Sources know nothing of downloading, matching or storage: an HTTP source
turns a response body into items, a local source lists items itself.
"""

from __future__ import annotations

import html.parser
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


def images_in_html(text: str | None, base: str | None = None) -> list[str]:
    if not text or "<img" not in text.lower():
        return []
    parser = _ImgCollector()
    try:
        parser.feed(text)
        parser.close()
    except Exception:  # noqa: BLE001 - html.parser on hostile markup: keep what was found
        pass
    return [absolute(src, base) for src in parser.found]


def absolute(url: str, base: str | None) -> str:
    url = url.strip()
    return urljoin(base, url) if base else url


def looks_like_image_url(url: str) -> bool:
    return urlsplit(url).path.lower().endswith(IMAGE_EXTENSIONS)


def clean_urls(urls) -> tuple[str, ...]:
    """http(s) URLs only, first occurrence kept, capped per item."""
    seen: dict[str, None] = {}
    for url in urls:
        if not url:
            continue
        url = url.strip()
        if urlsplit(url).scheme in ("http", "https") and url not in seen:
            seen[url] = None
    return tuple(list(seen)[:MAX_IMAGES_PER_ITEM])
