"""JSON Feed 1.0 and 1.1 (https://www.jsonfeed.org/version/1.1/)."""

from __future__ import annotations

from datetime import datetime

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
    json_document,
    page_link,
    url_problem,
)


def parse_time(text) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def load_json(body: bytes):
    try:
        return json_document(body)
    except ValueError as exc:  # not UTF-8, not JSON, nested too deeply
        raise FeedError("malformed_json", str(exc)) from None


class JsonFeed(HttpSource):
    kind = "jsonfeed"
    accept = "application/feed+json, application/json;q=0.9"

    def hub(self, body: bytes, headers) -> tuple[str, str] | None:
        """The Link headers, else the feed's ``hubs`` (type WebSub) and its ``feed_url``."""
        found = super().hub(body, headers)
        if found:
            return found
        try:
            doc = load_json(body)
        except FeedError:
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("hubs"), list):
            return None
        hubs = [h.get("url") for h in doc["hubs"] if isinstance(h, dict) and str(h.get("type", "")).lower() == "websub"]
        topic = doc.get("feed_url")
        hub = next((h for h in hubs if isinstance(h, str) and url_problem(h) is None), None)
        return (hub, topic) if hub and isinstance(topic, str) and url_problem(topic) is None else None

    def parse(self, body: bytes, content_type: str | None = None) -> ParsedItems:
        doc = load_json(body)
        # Lenient on the version string ("1.1" is seen in the wild), strict on shape.
        if not isinstance(doc, dict) or "version" not in doc:
            raise FeedError("not_a_feed", "no JSON Feed version field")
        items = doc.get("items")
        if not isinstance(items, list):
            raise FeedError("not_a_feed", "'items' is not a list")
        base = as_text(doc.get("home_page_url")) or as_text(doc.get("feed_url")) or self.url
        feed_author = _author(doc)

        def build(n: int, item, bad_urls: list[str]) -> FeedItem | None:
            if not isinstance(item, dict):
                raise ValueError(f"an item is an object, not {type(item).__name__}")
            page = page_link(item.get("url"), base) or page_link(item.get("external_url"), base)
            urls = [item.get("image"), item.get("banner_image")]
            attachments = item.get("attachments")
            for att in attachments if isinstance(attachments, list) else []:
                if isinstance(att, dict) and str(att.get("mime_type", "")).startswith("image/"):
                    urls.append(att.get("url"))
            content = item.get("content_html")
            urls += images_in_html(content if isinstance(content, str) else None, page or base)
            urls = [absolute(u, page or base) for u in urls if u is not None]
            return FeedItem(self.name, as_text(item.get("id")) or page or f"#{n}",
                            clean_urls(urls, bad_urls), page, _author(item) or feed_author,
                            parse_time(item.get("date_published") or item.get("date_modified")),
                            as_text(item.get("title")))

        return build_items(items, build)


def _author(obj: dict) -> str | None:
    authors = obj.get("authors")
    if not isinstance(authors, list):
        authors = [obj["author"]] if isinstance(obj.get("author"), dict) else []
    for a in authors:
        if isinstance(a, dict) and as_text(a.get("name")):
            return as_text(a.get("name"))
    return None
