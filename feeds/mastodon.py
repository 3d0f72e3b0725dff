"""Mastodon timelines: public, hashtag and account statuses (a JSON list of
Status entities). Boosts carry the original status in ``reblog``; its media
are what count. ``preview_url`` is the small rendition we want to download."""

from __future__ import annotations

from .base import FeedError, FeedItem, HttpSource, clean_urls
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

    def parse(self, body: bytes, content_type: str | None = None) -> list[FeedItem]:
        doc = load_json(body)
        if isinstance(doc, dict) and "error" in doc:
            raise FeedError("api_error", f"Mastodon error: {doc['error']}")
        if not isinstance(doc, list):
            raise FeedError("not_a_feed", "a Mastodon timeline is a JSON list of statuses")
        out = []
        for status in doc:
            if not isinstance(status, dict):
                continue
            shown = status.get("reblog") if isinstance(status.get("reblog"), dict) else status
            account = shown.get("account") or {}
            out.append(FeedItem(self.name, str(status.get("id")), clean_urls(status_images(shown)),
                                shown.get("url") or shown.get("uri"), account.get("acct"),
                                parse_time(shown.get("created_at"))))
        return out
