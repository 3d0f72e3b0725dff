"""Bluesky through Jetstream: the network's posts as JSON over a WebSocket
(``wss://jetstream2.us-east.bsky.network/subscribe?wantedCollections=app.bsky.feed.post``).

A post with ``app.bsky.embed.images`` (or ``recordWithMedia`` carrying images) names each
picture by its blob CID; its URL comes from a CDN template (the thumbnail rendition by
default). Every event carries ``time_us``: the stream resumes after the last one processed
(``cursor=``), so a reconnection or a restart loses nothing, and a post replayed twice is
one item (its at:// URI). Filters: DIDs (asked of the server), languages, keywords. Most
events of a firehose carry no picture and end here, cheaply.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from .base import FeedItem, ParsedItems, StreamSource, as_text, build_items, clean_urls, json_document, page_link
from .jsonfeed import parse_time

POST = "app.bsky.feed.post"
CDN_TEMPLATE = "https://cdn.bsky.app/img/feed_thumbnail/plain/{did}/{cid}@jpeg"
MAX_MESSAGE_BYTES = 1_000_000  # a post event is a few KB


def blob_cids(embed) -> list[str]:
    """The image blob CIDs of a post's embed (images, or the media of a quote with media)."""
    if not isinstance(embed, dict):
        return []
    kind = embed.get("$type")
    if kind == "app.bsky.embed.recordWithMedia":
        return blob_cids(embed.get("media"))
    if kind != "app.bsky.embed.images":
        return []
    cids = []
    for image in embed.get("images") or []:
        blob = image.get("image") if isinstance(image, dict) else None
        if isinstance(blob, dict):
            ref = blob.get("ref")
            # {"ref": {"$link": CID}} today; {"cid": CID} in records from before blobs had refs
            cid = ref.get("$link") if isinstance(ref, dict) else blob.get("cid")
            if isinstance(cid, str) and cid.isalnum():
                cids.append(cid)
    return cids


class Jetstream(StreamSource):
    kind = "jetstream"
    protocol = "websocket"

    def connect_url(self, cursor: str | None) -> str:
        parts = urlsplit(self.url)
        query = [(k, v) for k, vs in parse_qs(parts.query).items() for v in vs if k != "cursor"]
        if not any(k == "wantedCollections" for k, _ in query):
            query.append(("wantedCollections", POST))
        query += [("wantedDids", did) for did in self.options.get("dids") or []]
        # The server drops what we could not take anyway: one oversized event resent after
        # every reconnection would otherwise hold the stream at that point forever.
        query.append(("maxMessageSizeBytes", str(MAX_MESSAGE_BYTES)))
        if cursor:
            query.append(("cursor", cursor))
        return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), ""))

    def parse_event(self, event: str, data: str) -> ParsedItems:
        try:
            doc = json_document(data)
        except ValueError as exc:
            return ParsedItems.skip("malformed_item", f"not JSON ({exc})")
        if not isinstance(doc, dict):
            return ParsedItems.skip("malformed_item", "an event is a JSON object")
        commit = doc.get("commit")
        wanted = (doc.get("kind") == "commit" and isinstance(commit, dict) and commit.get("operation") == "create"
                  and commit.get("collection") == POST and self._accepts(commit.get("record")))
        out = build_items([doc] if wanted else [], self._item)
        stamp = doc.get("time_us")
        out.cursor = str(stamp) if isinstance(stamp, int) and not isinstance(stamp, bool) and stamp > 0 else None
        return out

    def _accepts(self, record) -> bool:
        if not isinstance(record, dict) or not blob_cids(record.get("embed")):
            return False  # no picture: nothing to match
        languages = self.options.get("languages")
        if languages and not set(record.get("langs") or []) & set(languages):
            return False
        keywords = self.options.get("keywords")
        text = record.get("text") if isinstance(record.get("text"), str) else ""
        return not keywords or any(k.lower() in text.lower() for k in keywords)

    def _item(self, n: int, doc: dict, bad_urls: list[str]):
        did, commit = as_text(doc.get("did")), doc["commit"]
        rkey, record = as_text(commit.get("rkey")), commit["record"]
        if not did or not did.startswith("did:") or not rkey:
            raise ValueError("a commit without its DID or record key")
        template = self.options.get("image_url_template") or CDN_TEMPLATE
        urls = [template.format(did=did, cid=cid) for cid in blob_cids(record.get("embed"))]
        return FeedItem(self.name, f"at://{did}/{POST}/{rkey}", clean_urls(urls, bad_urls),
                        page_link(f"https://bsky.app/profile/{did}/post/{rkey}"), did,
                        parse_time(record.get("createdAt")), as_text(record.get("text"), 200))

    def catchup(self, cursor: str | None):
        return None  # the server replays from the cursor itself
