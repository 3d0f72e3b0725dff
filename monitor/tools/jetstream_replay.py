"""Bluesky Jetstream on loopback, for the demo and the benchmark: events in the shape the real
server sends (``jetstream/pkg/models`` v1: ``did``, ``time_us``, ``kind: commit`` with the
record inline), served on ``/subscribe`` over a WebSocket, in time order, resumed after
``?cursor=``, filtered by ``wantedCollections`` and ``maxMessageSizeBytes`` as the real
server does, and held open for events published later.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import json
from datetime import UTC, datetime

from aiohttp import web

POST = "app.bsky.feed.post"


def blob_cid(name: str) -> str:
    """A CID-shaped name for a picture (base32 lower case, as Bluesky's blob CIDs are)."""
    digest = hashlib.sha256(name.encode()).digest()
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    bits = int.from_bytes(digest, "big")
    return "bafkrei" + "".join(alphabet[(bits >> (5 * i)) & 31] for i in range(52))


def _stamp(time_us: int) -> str:
    return datetime.fromtimestamp(time_us / 1e6, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def post_event(did: str, rkey: str, time_us: int, text: str, cids: list[str] = (), lang: str = "en") -> dict:
    """A post's create commit; with ``cids``, an ``app.bsky.embed.images`` embed of those blobs."""
    record = {"$type": POST, "createdAt": _stamp(time_us), "langs": [lang], "text": text}
    if cids:
        record["embed"] = {"$type": "app.bsky.embed.images", "images": [
            {"alt": "", "aspectRatio": {"height": 240, "width": 320},
             "image": {"$type": "blob", "ref": {"$link": cid}, "mimeType": "image/jpeg", "size": 40000}}
            for cid in cids]}
    return {"did": did, "time_us": time_us, "kind": "commit",
            "commit": {"rev": rkey, "operation": "create", "collection": POST, "rkey": rkey,
                       "record": record, "cid": "bafyrei" + rkey}}


def like_event(did: str, rkey: str, time_us: int, subject: str) -> dict:
    """A like: most of the firehose, asked away by ``wantedCollections``."""
    return {"did": did, "time_us": time_us, "kind": "commit",
            "commit": {"rev": rkey, "operation": "create", "collection": "app.bsky.feed.like", "rkey": rkey,
                       "record": {"$type": "app.bsky.feed.like", "createdAt": _stamp(time_us),
                                  "subject": {"cid": "bafyrei" + rkey, "uri": subject}},
                       "cid": "bafyrei" + rkey}}


class JetstreamReplay:
    """``/subscribe``: every event published so far after the cursor, then new ones as they
    are published, until the client leaves."""

    def __init__(self) -> None:
        self.times: list[int] = []
        self.texts: list[tuple[str, str]] = []  # (collection, JSON text)
        self.connections = 0
        self.sent = 0
        self._grew = asyncio.Event()

    def publish(self, events: list[dict]) -> None:
        for event in sorted(events, key=lambda e: e["time_us"]):
            if self.times and event["time_us"] <= self.times[-1]:
                raise ValueError("events are published in time order")
            self.times.append(event["time_us"])
            self.texts.append((event.get("commit", {}).get("collection", ""), json.dumps(event)))
        self._grew.set()
        self._grew = asyncio.Event()

    async def subscribe(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=30)
        await ws.prepare(request)
        self.connections += 1
        wanted = set(request.query.getall("wantedCollections", []))
        limit = int(request.query.get("maxMessageSizeBytes") or 0) or None
        cursor = request.query.get("cursor")
        # Without a cursor the real server starts at "now"; a replay serves its whole history.
        at = bisect.bisect_right(self.times, int(cursor)) if cursor and cursor.isdigit() else 0
        closed = asyncio.ensure_future(self._until_closed(ws))
        try:
            while not closed.done():
                while at < len(self.texts) and not ws.closed:
                    collection, text = self.texts[at]
                    at += 1
                    if (wanted and collection not in wanted) or (limit and len(text) > limit):
                        continue
                    await ws.send_str(text)
                    self.sent += 1
                grew = asyncio.ensure_future(self._grew.wait())
                await asyncio.wait({grew, closed}, return_when=asyncio.FIRST_COMPLETED)
                grew.cancel()
        except ConnectionError:
            pass  # the client went away mid-send
        finally:
            closed.cancel()
        return ws

    @staticmethod
    async def _until_closed(ws: web.WebSocketResponse) -> None:
        async for _ in ws:  # a client sends nothing we need (options updates are ignored)
            pass

    def app(self, extra_routes=()) -> web.Application:
        app = web.Application()
        app.router.add_get("/subscribe", self.subscribe)
        for method, path, handler in extra_routes:
            app.router.add_route(method, path, handler)
        return app
