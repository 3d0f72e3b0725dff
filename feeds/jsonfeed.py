"""JSON Feed 1.0 and 1.1 (https://www.jsonfeed.org/version/1.1/)."""

from __future__ import annotations

import json
from datetime import datetime

from .base import FeedError, FeedItem, HttpSource, absolute, clean_urls, images_in_html


def parse_time(text) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def load_json(body: bytes):
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FeedError("malformed_json", str(exc)) from None


class JsonFeed(HttpSource):
    kind = "jsonfeed"
    accept = "application/feed+json, application/json;q=0.9"

    def parse(self, body: bytes, content_type: str | None = None) -> list[FeedItem]:
        doc = load_json(body)
        # Lenient on the version string ("1.1" is seen in the wild), strict on shape.
        if not isinstance(doc, dict) or "version" not in doc:
            raise FeedError("not_a_feed", "no JSON Feed version field")
        items = doc.get("items")
        if not isinstance(items, list):
            raise FeedError("not_a_feed", "'items' is not a list")
        base = doc.get("home_page_url") or doc.get("feed_url") or self.url
        feed_author = _author(doc)
        out = []
        for n, item in enumerate(items):
            if not isinstance(item, dict):
                continue
            page = item.get("url") or item.get("external_url")
            urls = [item.get("image"), item.get("banner_image")]
            for att in item.get("attachments") or []:
                if isinstance(att, dict) and str(att.get("mime_type", "")).startswith("image/"):
                    urls.append(att.get("url"))
            urls += images_in_html(item.get("content_html"), page or base)
            urls = [absolute(u, page or base) for u in urls if isinstance(u, str)]
            out.append(FeedItem(self.name, str(item.get("id") or page or f"#{n}"), clean_urls(urls),
                                absolute(page, base) if page else None,
                                _author(item) or feed_author,
                                parse_time(item.get("date_published") or item.get("date_modified")),
                                item.get("title")))
        return out


def _author(obj: dict) -> str | None:
    authors = obj.get("authors") or ([obj["author"]] if isinstance(obj.get("author"), dict) else [])
    for a in authors:
        if isinstance(a, dict) and a.get("name"):
            return str(a["name"])
    return None
