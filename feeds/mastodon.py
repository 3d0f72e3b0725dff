"""Mastodon timelines: public, hashtag and account statuses (a JSON list of
Status entities). Boosts carry the original status in ``reblog``; its media
are what count. ``preview_url`` is the small rendition we want to download."""

from __future__ import annotations

from .base import FeedError, FeedItem, HttpSource, ParsedItems, as_text, build_items, clean_urls, page_link
from .jsonfeed import load_json, parse_time


def status_images(status: dict) -> list[str]:
    urls = []
    for media in status.get("media_attachments") or []:
        if isinstance(media, dict) and media.get("type") in ("image", "gifv"):
            urls.append(media.get("preview_url") or media.get("url") or media.get("remote_url"))
    quote = status.get("quote")
    if isinstance(quote, dict):
        urls += status_images(quote.get("quoted_status") or quote)
    return urls


class MastodonTimeline(HttpSource):
    kind = "mastodon"
    accept = "application/json"

    def parse(self, body: bytes, content_type: str | None = None) -> ParsedItems:
        doc = load_json(body)
        if isinstance(doc, dict) and "error" in doc:
            raise FeedError("api_error", f"Mastodon error: {doc['error']}")
        if not isinstance(doc, list):
            raise FeedError("not_a_feed", "a Mastodon timeline is a JSON list of statuses")

        return build_items(doc, lambda n, status, bad_urls: status_item(self.name, n, status, bad_urls))


def status_item(feed: str, n: int, status, bad_urls: list[str]) -> FeedItem:
    """A Status entity as an item (a boost stands for the status it boosts)."""
    if not isinstance(status, dict):
        raise ValueError(f"a status is an object, not {type(status).__name__}")
    shown = status.get("reblog") if isinstance(status.get("reblog"), dict) else status
    account = shown.get("account") if isinstance(shown.get("account"), dict) else {}
    return FeedItem(feed, as_text(status.get("id")) or f"#{n}", clean_urls(status_images(shown), bad_urls),
                    page_link(shown.get("url")) or page_link(shown.get("uri")),
                    as_text(account.get("acct")), parse_time(shown.get("created_at")))
