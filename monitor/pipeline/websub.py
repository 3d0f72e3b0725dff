"""WebSub subscriber (W3C Recommendation): feeds that name a hub push their updates to us.

After a successful poll of a feed whose hub and topic are advertised (``Link`` headers, or
the feed's own hub/self links), and when ``server.public_url`` says where the hub can reach
us, the intake subscribes: ``hub.mode=subscribe`` with ``hub.callback`` =
``{public_url}/websub/{feed}``, a random ``hub.secret`` and a lease. The hub verifies the
intent (a GET echoing ``hub.challenge``, answered only for a subscription we asked for);
each delivery is a feed document signed with ``X-Hub-Signature`` (HMAC of the body under
the secret), parsed by the feed's own adapter and recorded like a poll's items. Leases are
renewed at 80% of their length. Polling goes on meanwhile, at ``SAFETY_POLL_SECONDS`` once
subscribed, at the feed's interval while no hub answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass

from feeds import FeedError, HttpSource
from monitor.fetch import FetchError

log = logging.getLogger("repost_monitor.websub")

LEASE_ASKED = 86_400          # seconds of lease asked for; the hub decides
RENEW_AT = 0.8                # of the lease granted
SAFETY_POLL_SECONDS = 3600.0  # a subscribed feed is still polled this often, in case a push is lost
SIGNATURES = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}


@dataclass
class Subscription:
    source: HttpSource
    hub: str
    topic: str
    secret: str
    asked_at: float
    verified: bool = False
    expires: float = 0.0


class WebSub:
    def __init__(self, intake, public_url: str | None):
        self.intake = intake  # pipeline.intake.Intake: records, queues and counts for us
        self.public_url = public_url.rstrip("/") if public_url else None
        self.subscriptions: dict[str, Subscription] = {}

    def active(self, feed: str) -> bool:
        sub = self.subscriptions.get(feed)
        return bool(sub and sub.verified and time.time() < sub.expires)

    def renew_in(self, feed: str) -> float | None:
        """Seconds until a verified subscription's lease should be renewed (by the next poll)."""
        sub = self.subscriptions.get(feed)
        if sub is None or not sub.verified:
            return None
        return max(0.05, sub.asked_at + RENEW_AT * (sub.expires - sub.asked_at) - time.time())

    def due(self, feed: str) -> bool:
        """Not subscribed, or the lease is past RENEW_AT (and no answer is pending)."""
        sub = self.subscriptions.get(feed)
        if sub is None:
            return True
        if not sub.verified:
            return time.time() - sub.asked_at > 300  # the hub never verified: ask again
        lease = sub.expires - sub.asked_at
        return time.time() > sub.asked_at + RENEW_AT * lease

    async def after_poll(self, source: HttpSource, body: bytes, headers) -> None:
        """Subscribe (or renew) when the feed names a hub; a hub that fails leaves polling as it was."""
        if not self.public_url or not source.options.get("websub", True) or not self.due(source.name):
            return
        found = await asyncio.to_thread(source.hub, body, headers)
        if not found:
            return
        hub, topic = found
        sub = Subscription(source, hub, topic, secrets.token_hex(32), time.time())
        self.subscriptions[source.name] = sub
        form = {"hub.mode": "subscribe", "hub.topic": topic, "hub.callback": f"{self.public_url}/websub/{source.name}",
                "hub.secret": sub.secret, "hub.lease_seconds": str(LEASE_ASKED)}
        try:
            status, answer = await self.intake.fetcher.post_form(hub, form)
        except FetchError as exc:
            log.warning("feed %s: WebSub hub %s unreachable (%s); polling goes on", source.name, hub, exc,
                        extra={"feed": source.name})
            return
        if not 200 <= status < 300:
            log.warning("feed %s: WebSub hub %s refused the subscription (HTTP %d: %s); polling goes on",
                        source.name, hub, status, answer[:200].decode(errors="replace"), extra={"feed": source.name})
            return
        log.info("feed %s: subscribed at WebSub hub %s, awaiting its verification", source.name, hub,
                 extra={"feed": source.name})

    # -- the hub's requests (routed from /websub/{feed}) -----------------------------------
    def verify(self, feed: str, query) -> str | None:
        """The challenge to echo when the hub's verification of intent matches a subscription
        we asked for; None (answer 404) otherwise."""
        sub = self.subscriptions.get(feed)
        mode, topic = query.get("hub.mode"), query.get("hub.topic")
        if sub is None or topic != sub.topic:
            return None
        if mode == "denied":
            log.warning("feed %s: WebSub hub denied the subscription (%s); polling goes on", feed,
                        query.get("hub.reason", "no reason given"), extra={"feed": feed})
            del self.subscriptions[feed]
            return ""
        if mode != "subscribe" or not query.get("hub.challenge"):
            return None
        try:
            lease = float(query.get("hub.lease_seconds", LEASE_ASKED))
        except ValueError:
            lease = LEASE_ASKED
        sub.verified, sub.asked_at, sub.expires = True, time.time(), time.time() + max(1.0, lease)
        log.info("feed %s: WebSub subscription verified for %.0f s", feed, lease, extra={"feed": feed})
        return query["hub.challenge"]

    async def deliver(self, feed: str, body: bytes, content_type: str | None, signature: str) -> str:
        """Record a pushed feed document; the outcome is a metric label (a delivery is always
        acknowledged, as the spec asks, even when it is ignored)."""
        sub = self.subscriptions.get(feed)
        if sub is None or not sub.verified:
            return "unknown"
        method, _, given = signature.partition("=")
        digest = SIGNATURES.get(method.strip().lower())
        if digest is None or not hmac.compare_digest(hmac.new(sub.secret.encode(), body, digest).hexdigest(),
                                                      given.strip().lower()):
            log.warning("feed %s: WebSub delivery with a missing or wrong signature ignored", feed,
                        extra={"feed": feed})
            return "bad_signature"
        try:
            items = await asyncio.to_thread(sub.source.parse, body, content_type)
        except FeedError as exc:
            log.warning("feed %s: WebSub delivery is not a feed (%s)", feed, exc, extra={"feed": feed})
            return "malformed"
        self.intake.count_skipped(feed, items)
        work = await asyncio.to_thread(self.intake.record_items, feed, items, time.time())
        await self.intake.queue_work(work)
        return "recorded"
