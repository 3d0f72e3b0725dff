"""WebSub subscriber (W3C Recommendation): feeds that name a hub push their updates to us.

After a successful poll of a feed whose hub and topic are advertised (``Link`` headers, or
the feed's own hub/self links), and when ``server.public_url`` says where the hub can reach
us, the intake subscribes: ``hub.mode=subscribe`` with ``hub.callback`` =
``{public_url}/websub/{feed}``, a random ``hub.secret`` and a lease. The hub verifies the
intent (a GET echoing ``hub.challenge``, answered only for a subscription we asked for);
each delivery is a feed document signed with ``X-Hub-Signature`` (HMAC of the body under
the secret), parsed by the feed's own adapter and recorded like a poll's items. Leases are
renewed at 80% of their length, with the same secret and hub (also after a 304), and
subscriptions are stored, so a restart or a kill -9 goes on accepting the hub's pushes.
Polling goes on meanwhile, at ``SAFETY_POLL_SECONDS`` once subscribed, at the feed's
interval while no hub answers.

Scaled out, the intake that holds a feed's lease subscribes while the hub's requests may
reach another process (the API role, another intake): each side reads the stored row when
its own copy is unverified, awaiting verification, or fails a signature.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import secrets
import time
from urllib.parse import urljoin

from multidict import CIMultiDict

from feeds import FeedError, HttpSource
from monitor.fetch import FetchError
from monitor.pipeline.parsing import parsed
from monitor.records import subscriptions as subscription_rows
from monitor.records.subscriptions import Subscription

log = logging.getLogger("repost_monitor.websub")

LEASE_ASKED = 86_400          # seconds of lease asked for; the hub decides...
LEASE_MAX = 7 * 86_400        # ... up to this: one granted longer is renewed as if it were this
RENEW_AT = 0.8                # of the lease granted
VERIFY_WAIT = 300.0           # a hub that has not verified a request by then is asked again
HUB_REDIRECTS = 3             # 307/308 from a hub that moved (websub.rocks tests 203, 204)
REFRESH_EVERY = 1.0           # seconds between reads of a feed's stored subscription
SAFETY_POLL_SECONDS = 3600.0  # a subscribed feed is still polled this often, in case a push is lost
SIGNATURES = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}


class WebSub:
    def __init__(self, intake, public_url: str | None):
        self.intake = intake  # pipeline.intake.Intake: records, queues and counts for us
        self.public_url = public_url.rstrip("/") if public_url else None
        # Stored subscriptions: one row a feed, read once at start (load()).
        self.subscriptions: dict[str, Subscription] = {}
        self._pending: dict[str, float] = {}  # feed -> when a (re)subscription was asked, until verified
        self._refreshed: dict[str, float] = {}  # feed -> when its stored row was last read
        self._wakeups: dict[str, asyncio.Event] = {}  # set when a feed's subscription is verified

    async def load(self) -> None:
        """Read the stored subscriptions (before the feeds are watched and the hub's requests
        are served), off the event loop."""
        if self.public_url:
            self.subscriptions = await asyncio.to_thread(subscription_rows.load, self.intake.store)

    def wakeup(self, feed: str) -> asyncio.Event:
        """Set when the hub verifies the feed's subscription: its watcher's sleep is recomputed."""
        return self._wakeups.setdefault(feed, asyncio.Event())

    def _source(self, feed: str) -> HttpSource | None:
        return next((s for s, _ in self.intake.sources if s.name == feed and isinstance(s, HttpSource)), None)

    def active(self, feed: str) -> bool:
        sub = self.subscriptions.get(feed)
        return bool(sub and sub.verified and time.time() < sub.expires)

    def renew_in(self, feed: str) -> float | None:
        """Seconds until the next poll should (re)subscribe, for a verified subscription."""
        sub = self.subscriptions.get(feed)
        if sub is None or not sub.verified:
            return None
        if feed in self._pending:  # renewal asked: ask again if the hub stays silent
            return max(0.05, self._pending[feed] + VERIFY_WAIT - time.time())
        return max(0.05, sub.asked_at + RENEW_AT * (sub.expires - sub.asked_at) - time.time())

    def due(self, feed: str) -> bool:
        """Not subscribed, or the lease is past RENEW_AT, and no request awaits verification."""
        sub = self.subscriptions.get(feed)
        if sub is None:
            return True
        if time.time() - self._pending.get(feed, -VERIFY_WAIT) < VERIFY_WAIT:
            return False
        if not sub.verified:
            return True
        return time.time() > sub.asked_at + RENEW_AT * (sub.expires - sub.asked_at)

    async def after_poll(self, source: HttpSource, body: bytes | None, headers) -> None:
        """Subscribe (or renew) when the feed names a hub; ``body`` None is a 304, which renews
        where the feed was. A hub that fails leaves polling as it was."""
        if not self.public_url or not source.options.get("websub", True):
            return
        sub = self.subscriptions.get(source.name)
        if sub is not None and (source.name in self._pending or not sub.verified):
            await self._refresh(source.name)  # verified meanwhile by another process?
        if not self.due(source.name):
            return
        sub = self.subscriptions.get(source.name)
        # (a plain copy of the headers: a large body's parse goes to another process)
        found = await parsed(source.hub, body, CIMultiDict(headers)) if body is not None else None
        if found is None and body is None and sub is not None:
            found = (sub.hub, sub.topic)
        if not found:
            return
        hub, topic = found
        if sub is None or (sub.hub, sub.topic) != (hub, topic):
            # Renewals keep the secret: pushes signed with it stay valid while the hub verifies.
            sub = Subscription(source.name, hub, topic, secrets.token_hex(32), time.time())
            self.subscriptions[source.name] = sub
        # stored before it is sent: the hub's verification may reach another process
        sub.requested_at = self._pending[source.name] = time.time()
        await asyncio.to_thread(subscription_rows.save, self.intake.store, sub)
        form = {"hub.mode": "subscribe", "hub.topic": topic, "hub.callback": f"{self.public_url}/websub/{source.name}",
                "hub.secret": sub.secret, "hub.lease_seconds": str(LEASE_ASKED)}
        try:
            for _ in range(HUB_REDIRECTS + 1):
                status, answer, location = await self.intake.fetcher.post_form(hub, form, with_location=True)
                if status not in (307, 308) or not location:
                    break
                hub = urljoin(hub, location)  # the form goes again, to the hub's new address
        except FetchError as exc:
            log.warning("feed %s: WebSub hub %s unreachable (%s); polling goes on", source.name, hub, exc,
                        extra={"feed": source.name})
            return
        if not 200 <= status < 300:
            log.warning("feed %s: WebSub hub %s refused the subscription (HTTP %d: %s); polling goes on",
                        source.name, hub, status, answer[:200].decode(errors="replace"), extra={"feed": source.name})
            return
        if hub != sub.hub:
            sub.hub = hub
            await asyncio.to_thread(subscription_rows.save, self.intake.store, sub)
        log.info("feed %s: subscribed at WebSub hub %s, awaiting its verification", source.name, hub,
                 extra={"feed": source.name})

    async def _refresh(self, feed: str) -> Subscription | None:
        """The stored row (written by whichever process last subscribed or was verified); at
        most once a second per feed, so a stream of forged requests costs no store reads."""
        if time.monotonic() - self._refreshed.get(feed, -REFRESH_EVERY) < REFRESH_EVERY:
            return self.subscriptions.get(feed)
        self._refreshed[feed] = time.monotonic()
        sub = await asyncio.to_thread(subscription_rows.load_one, self.intake.store, feed)
        if sub is None:
            self.subscriptions.pop(feed, None)
            return None
        mine = self.subscriptions.get(feed)
        self.subscriptions[feed] = sub
        if sub.verified and (mine is None or sub.asked_at > mine.asked_at or not mine.verified):
            self._pending.pop(feed, None)  # our request was verified, by the process the hub reached
        return sub

    def _asked(self, feed: str, sub: Subscription) -> bool:
        """A request of ours, sent within VERIFY_WAIT, awaits the hub's verification (sent by
        this process, or by another one: the stored row's ``requested_at``, 0 once verified)."""
        return time.time() - max(self._pending.get(feed, 0.0), sub.requested_at) < VERIFY_WAIT

    # -- the hub's requests (routed from /websub/{feed}) -----------------------------------
    async def verify(self, feed: str, query) -> str | None:
        """The challenge to echo when the hub's verification of intent matches a subscription
        we asked for; None (answer 404) otherwise (websub.rocks test 205)."""
        if not self.public_url:
            return None
        sub = self.subscriptions.get(feed)
        if sub is None or not self._asked(feed, sub) or query.get("hub.topic") != sub.topic:
            sub = await self._refresh(feed)
        mode, topic = query.get("hub.mode"), query.get("hub.topic")
        if sub is None or topic != sub.topic:
            return None
        if mode == "denied":
            log.warning("feed %s: WebSub hub denied the subscription (%s); polling goes on", feed,
                        query.get("hub.reason", "no reason given"), extra={"feed": feed})
            del self.subscriptions[feed]
            self._pending.pop(feed, None)
            await asyncio.to_thread(subscription_rows.delete, self.intake.store, feed)
            return ""
        # Only a request we sent is verified: anyone can send this GET (the topic is the feed's
        # public URL), and one verifying a subscription that was not asked for, with a lease of
        # a year, would stop its renewals and slow the feed to the safety poll's hour.
        if mode != "subscribe" or not query.get("hub.challenge") or not self._asked(feed, sub):
            return None
        lease = _granted(query.get("hub.lease_seconds"))
        now = time.time()
        sub.verified, sub.asked_at, sub.expires, sub.requested_at = True, now, now + lease, 0.0
        self._pending.pop(feed, None)
        await asyncio.to_thread(subscription_rows.save, self.intake.store, sub)
        self.wakeup(feed).set()
        log.info("feed %s: WebSub subscription verified for %.0f s", feed, lease, extra={"feed": feed})
        return query["hub.challenge"]

    async def deliver(self, feed: str, body: bytes, content_type: str | None, signature: str) -> str:
        """Record a pushed feed document; the outcome is a metric label. A wrong signature is
        acknowledged and ignored (the spec's advice: no oracle for forgers); a missing one
        is refused (websub.rocks test 302)."""
        sub, source = self.subscriptions.get(feed), self._source(feed)
        if source is None or not self.public_url:
            return "unknown"
        if sub is None or not sub.verified:
            sub = await self._refresh(feed)
        if sub is None or not sub.verified:
            return "unknown"
        if not signature.strip():
            log.warning("feed %s: unsigned WebSub delivery refused", feed, extra={"feed": feed})
            return "unsigned"
        method, _, given = signature.partition("=")
        digest = SIGNATURES.get(method.strip().lower())

        def signed(secret: str) -> bool:
            return digest is not None and hmac.compare_digest(hmac.new(secret.encode(), body, digest).hexdigest(),
                                                              given.strip().lower())

        if not signed(sub.secret) and (digest is None or (sub := await self._refresh(feed)) is None
                                       or not signed(sub.secret)):  # a new secret, stored by another process?
            log.warning("feed %s: WebSub delivery with a wrong signature ignored", feed, extra={"feed": feed})
            return "bad_signature"
        try:
            items = await parsed(source.parse, body, content_type)
        except FeedError as exc:
            log.warning("feed %s: WebSub delivery is not a feed (%s)", feed, exc, extra={"feed": feed})
            return "malformed"
        self.intake.count_skipped(feed, items)
        work = await asyncio.to_thread(self.intake.record_items, feed, items, time.time())
        await self.intake.queue_work(work)
        return "recorded"


def _granted(value) -> float:
    """The lease a hub granted, in seconds: LEASE_ASKED where it names none (or no number), at
    least a second, at most LEASE_MAX."""
    try:
        lease = float(value) if value is not None else LEASE_ASKED
    except ValueError:
        return LEASE_ASKED
    return min(max(lease, 1.0), LEASE_MAX) if math.isfinite(lease) else LEASE_ASKED
