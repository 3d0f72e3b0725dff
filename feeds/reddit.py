"""Reddit listings: the /r/NAME/new.json shape (Listing -> children -> t3 posts).

Images come from the post preview (a resolution near thumbnail size, not the
full source), gallery media_metadata, or a direct image link. Without
``raw_json=1`` Reddit HTML-escapes ``&`` as ``&amp;`` in URLs: unescaped here.
"""

from __future__ import annotations

import html
import math
from datetime import UTC, datetime

from .base import (
    FeedError,
    FeedItem,
    HttpSource,
    ParsedItems,
    TokenRequest,
    as_text,
    build_items,
    clean_urls,
    looks_like_image_url,
    page_link,
)
from .jsonfeed import load_json

THUMB_WIDTH = 320
RATE_WINDOW = 600.0  # seconds: Reddit's rate-limit window (X-Ratelimit-Reset counts down within it)


def _pick(source: dict, resolutions: list) -> str | None:
    for res in sorted((r for r in resolutions or [] if isinstance(r, dict)),
                      key=lambda r: r.get("width") or 0):
        if (res.get("width") or 0) >= THUMB_WIDTH and res.get("url"):
            return res["url"]
    return (source or {}).get("url")


def post_images(post: dict) -> list[str]:
    urls = []
    for image in (post.get("preview") or {}).get("images") or []:
        urls.append(_pick(image.get("source"), image.get("resolutions")))
    meta = post.get("media_metadata") or {}
    order = [g.get("media_id") for g in (post.get("gallery_data") or {}).get("items") or []]
    for media_id in order or list(meta):
        m = meta.get(media_id) or {}
        if m.get("status") != "valid" or m.get("e") not in ("Image", "AnimatedImage"):
            continue
        urls.append(_pick(m.get("s"), [{"url": p.get("u"), "width": p.get("x")} for p in m.get("p") or []])
                    or (m.get("s") or {}).get("u") or (m.get("s") or {}).get("gif"))
    direct = post.get("url_overridden_by_dest") or post.get("url")
    if isinstance(direct, str) and looks_like_image_url(direct):
        urls.append(direct)
    for parent in post.get("crosspost_parent_list") or []:
        if not urls:
            urls += post_images(parent)
    return [html.unescape(u) for u in urls if isinstance(u, str)]


class RedditListing(HttpSource):
    kind = "reddit"
    accept = "application/json"

    def parse(self, body: bytes, content_type: str | None = None) -> ParsedItems:
        doc = load_json(body)
        if isinstance(doc, list):
            # A post's own page (/comments/ID.json): [post listing, comments listing].
            doc = next((d for d in doc if isinstance(d, dict) and d.get("kind") == "Listing"), {})
        if not isinstance(doc, dict) or doc.get("kind") != "Listing":
            if isinstance(doc, dict) and "error" in doc:
                raise FeedError("api_error", f"Reddit error {doc.get('error')}: {doc.get('message')}")
            raise FeedError("not_a_feed", "not a Reddit Listing")
        data = doc.get("data")
        children = data.get("children") if isinstance(data, dict) else None

        def build(n: int, child, bad_urls: list[str]) -> FeedItem | None:
            if not isinstance(child, dict) or child.get("kind") != "t3":
                return None  # comments and other kinds of listing entries
            post = child.get("data")
            if not isinstance(post, dict):
                raise ValueError("a post's data is not an object")
            created = post.get("created_utc")
            permalink = as_text(post.get("permalink"))
            # A crosspost carries the original's pictures: it is the original post again, not a
            # new repost, so it takes the original's id and is recorded once.
            parent = as_text(post.get("crosspost_parent"))
            return FeedItem(
                self.name, parent or as_text(post.get("name")) or as_text(post.get("id")) or f"#{n}",
                clean_urls(post_images(post), bad_urls),
                page_link(f"https://www.reddit.com{permalink}") if permalink else page_link(post.get("url")),
                as_text(post.get("author")),
                datetime.fromtimestamp(created, UTC) if isinstance(created, (int, float))
                and not isinstance(created, bool) and 0 <= created < 1e11 else None,
                as_text(post.get("title")))

        return build_items(children if isinstance(children, list) else [], build)


class RedditAPI(RedditListing):
    """The same listings through Reddit's OAuth API (a "script" app's client credentials):
    ``https://oauth.reddit.com/r/NAME/new?limit=100&raw_json=1``. Reddit asks for a
    descriptive User-Agent and counts requests per 10 minutes (``X-Ratelimit-*``)."""
    kind = "reddit_api"
    TOKEN_URL = "https://www.reddit.com/api/v1/access_token"

    def token_request(self) -> TokenRequest:
        return TokenRequest(self.options.get("token_url") or self.TOKEN_URL, self.options.get("client_id", ""),
                            self.options.get("client_secret", ""))

    def request_headers(self) -> dict[str, str]:
        agent = self.options.get("user_agent") or (f"server:repost-monitor:{self.options.get('client_id', '')}"
                                                   " (repost detection; https://github.com/repost-monitor)")
        return {"User-Agent": agent}

    def wait_hint(self, headers) -> float | None:
        """Out of requests for this window: wait for it to reset (at most a window: a reset
        a year away, or infinite, would silence the feed for that long)."""
        try:
            remaining = float(headers.get("X-Ratelimit-Remaining", "inf"))
            reset = float(headers.get("X-Ratelimit-Reset", "0"))
        except ValueError:
            return None
        return min(max(reset, 0.0), RATE_WINDOW) + 1 if remaining < 1 and math.isfinite(reset) else None
