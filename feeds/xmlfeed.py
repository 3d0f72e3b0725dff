"""RSS 2.0, RSS 1.0 and Atom, parsed by feedparser after a defusedxml check.

feedparser is lenient with broken markup (real feeds are often broken), but
entity declarations are refused before it sees the bytes: billion-laughs,
quadratic blow-up and external entities never reach an XML parser that
would expand them. That holds for ill-formed documents too, which defusedxml's
strict parser gives up on before it meets the declaration: feedparser's loose
parser would still take any entity whose text holds no reference, and expand
each use of it (a 100 KB feed with one damaged byte in its declaration became a
96 MB string and 25 s of CPU holding the GIL; the fuzz tests' mutated payloads
found it).
"""

from __future__ import annotations

import calendar
import io
import re
from datetime import UTC, datetime
from xml.sax import SAXParseException

import defusedxml.ElementTree as SafeET
import feedparser
from defusedxml import DefusedXmlException
from feedparser.encodings import convert_to_utf8
from feedparser.sanitizer import replace_doctype

from .base import (
    FeedError,
    FeedItem,
    HttpSource,
    ParsedItems,
    absolute,
    as_text,
    build_items,
    clean_urls,
    images_in_html,
    looks_like_image_url,
    page_link,
    url_problem,
)

_NAMES_A_HUB = re.compile(rb"""rel\s*=\s*["']?hub\b""", re.IGNORECASE)


def _refuse_entities(body: bytes, headers: dict | None = None) -> None:
    """FeedError(forbidden_xml) for a document declaring entities; ``headers``: the response's,
    as feedparser is given them (a charset there decides how it reads the bytes)."""
    try:
        SafeET.parse(io.BytesIO(body), forbid_dtd=False, forbid_entities=True,
                     forbid_external=True)
    except DefusedXmlException as exc:
        raise FeedError("forbidden_xml", f"entity or external reference refused: {exc!r}") from None
    except (SafeET.ParseError, SAXParseException, ValueError, LookupError):
        # ill-formed: feedparser's lenient parser decides below, with the entities that
        # feedparser itself finds in the document as it will read it (any encoding)
        try:
            declared = replace_doctype(convert_to_utf8(dict(headers or {}), body, {}))[2]
        except Exception as exc:  # noqa: BLE001 - as feedparser.parse, which would meet the same
            raise FeedError("malformed_xml", f"the feed parser failed: {type(exc).__name__}: {exc}") from None
        if declared:
            raise FeedError("forbidden_xml", "entity declaration refused (in a document that is "
                                             "not well-formed)") from None


def _when(entry) -> datetime | None:
    for key in ("published_parsed", "updated_parsed", "created_parsed"):
        # the stored value only: feedparser's own get() answers a missing updated_parsed with
        # published_parsed and a DeprecationWarning (its issue 310)
        t = dict.get(entry, key)
        if t:
            return datetime.fromtimestamp(calendar.timegm(t), UTC)
    return None


def _is_image(url: str, mime: str | None, medium: str | None = None) -> bool:
    if medium:
        return medium == "image"
    if mime:
        return mime.lower().startswith("image/")
    return looks_like_image_url(url)


def entry_images(entry, base: str | None) -> list[str]:
    urls: list[str] = []
    for enc in entry.get("enclosures", []):
        href = enc.get("href") or enc.get("url")
        if href and _is_image(href, enc.get("type")):
            urls.append(absolute(href, base))
    for media in entry.get("media_content", []):
        url = media.get("url")
        if url and _is_image(url, media.get("type"), media.get("medium")):
            urls.append(absolute(url, base))
    for thumb in entry.get("media_thumbnail", []):
        if thumb.get("url"):
            urls.append(absolute(thumb["url"], base))
    for content in entry.get("content", []):
        urls += images_in_html(content.get("value"), content.get("base") or base)
    summary = entry.get("summary_detail") or {}
    urls += images_in_html(entry.get("summary"), summary.get("base") or base)
    return urls


class XmlFeed(HttpSource):
    kind = "rss"
    accept = ("application/rss+xml, application/atom+xml, application/rdf+xml, "
              "application/xml;q=0.9, */*;q=0.5")

    def hub(self, body: bytes, headers) -> tuple[str, str] | None:
        """The Link headers first (the spec's preferred place), else the feed's atom:link /
        link elements with rel="hub" and rel="self"."""
        found = super().hub(body, headers)
        # Most feeds name no hub: those are not parsed a second time (a UTF-16 or -32 one, whose
        # bytes the pattern cannot read, still is)
        wide = body[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in body[:4]
        if found or (not wide and not _NAMES_A_HUB.search(body)):
            return found
        try:
            _refuse_entities(body)
            links = feedparser.parse(body).feed.get("links") or []
        except Exception:  # noqa: BLE001 - no usable hub is simply no hub
            return None
        rels = {link.get("rel"): link.get("href") for link in links if isinstance(link, dict)}
        hub, topic = rels.get("hub"), rels.get("self")
        return (hub, topic) if hub and topic and url_problem(hub) is None and url_problem(topic) is None else None

    def parse(self, body: bytes, content_type: str | None = None) -> ParsedItems:
        if not body.strip():
            raise FeedError("empty", "empty body")
        headers = {"content-type": content_type} if content_type else {}
        _refuse_entities(body, headers)
        try:
            parsed = feedparser.parse(body, response_headers=headers, sanitize_html=False,
                                      resolve_relative_uris=True)
        except Exception as exc:  # noqa: BLE001 - feedparser's loose parser has crashes of its own
            # Found by bench/fuzz.py: a cut <image> block (`=height>35</height>`) raises TypeError
            # inside feedparser, and other damage AttributeError, instead of setting bozo.
            raise FeedError("malformed_xml", f"the feed parser failed: {type(exc).__name__}: {exc}") from None
        why = parsed.get("bozo_exception")
        if not parsed.get("version") and not parsed.entries:
            raise FeedError("not_a_feed", f"no RSS/Atom feed found ({why or 'unknown format'})")
        if parsed.get("bozo") and not parsed.entries:
            # A cut-off or broken document with nothing salvageable.
            raise FeedError("malformed_xml", f"broken feed with no items: {why}")
        base = as_text(parsed.feed.get("link")) or self.url

        def build(n: int, entry, bad_urls: list[str]) -> FeedItem:
            page = page_link(entry.get("link"), base)
            item_id = as_text(entry.get("id")) or page or as_text(entry.get("title")) or f"#{n}"
            return FeedItem(self.name, item_id, clean_urls(entry_images(entry, page or base), bad_urls),
                            page, as_text(entry.get("author")), _when(entry), as_text(entry.get("title")))

        return build_items(parsed.entries, build)
