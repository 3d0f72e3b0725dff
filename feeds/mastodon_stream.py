"""Mastodon (and Pixelfed, which speaks the same API) streaming: server-sent events from
``/api/v1/streaming/public``, ``/public/local``, ``/hashtag?tag=...`` or ``/user`` (with a
token in the feed's headers). ``update`` events carry a status; edits, deletions and
notifications carry no new picture. Before each (re)connection the matching timeline is
polled from the last status recorded (``min_id``), so nothing posted while disconnected
is missed; items seen in both are recorded once (by status id)."""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from .base import ParsedItems, StreamSource, build_items, json_document
from .mastodon import MastodonTimeline, status_item

TIMELINE_FOR_STREAM = {  # streaming path -> (timeline path, extra query)
    "/api/v1/streaming/public": ("/api/v1/timelines/public", {}),
    "/api/v1/streaming/public/local": ("/api/v1/timelines/public", {"local": "true"}),
    "/api/v1/streaming/public/remote": ("/api/v1/timelines/public", {"remote": "true"}),
    "/api/v1/streaming/user": ("/api/v1/timelines/home", {}),
}
CATCHUP_LIMIT = 40  # statuses per catch-up page (the API's maximum)


def catchup_url(stream_url: str) -> str | None:
    """The timeline that holds what a stream would have carried, or None if unknown."""
    parts = urlsplit(stream_url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    path = parts.path.rstrip("/")
    if path == "/api/v1/streaming/hashtag" and query.get("tag"):
        timeline, extra = f"/api/v1/timelines/tag/{query['tag']}", {}
    elif path in TIMELINE_FOR_STREAM:
        timeline, extra = TIMELINE_FOR_STREAM[path]
    else:
        return None
    return urlunsplit((parts.scheme, parts.netloc, timeline, urlencode({**extra, "limit": CATCHUP_LIMIT}), ""))


class MastodonStream(StreamSource):
    kind = "mastodon_stream"

    def parse_event(self, event: str, data: str) -> ParsedItems:
        if event != "update":
            return ParsedItems()  # status.update (an edit), delete, notification...: no new post
        try:
            status = json_document(data)
        except ValueError as exc:
            return ParsedItems.skip("malformed_item", f"update event: not JSON ({exc})")
        return build_items([status], lambda n, s, bad: status_item(self.name, n, s, bad))

    def catchup(self, cursor: str | None) -> MastodonTimeline | None:
        url = self.options.get("catchup_url") or catchup_url(self.url)
        if not url:
            return None
        if cursor:
            parts = urlsplit(url)
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()} | {"min_id": cursor}
            url = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))
        # recorded under the stream's name: a post seen both ways is one item
        return MastodonTimeline(name=self.name, url=url)
