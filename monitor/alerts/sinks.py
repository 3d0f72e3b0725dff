"""Alert sinks: each turns a list of alert payloads into one delivery.

A sink returns normally on success and raises :class:`DeliveryError` on
failure, with ``retry_after`` when the receiver said when to come back.
Every HTTP delivery carries the idempotency key of each alert it holds.
A sink's ``batch_size`` caps how many queued alerts one delivery carries:
1 (the default for HTTP sinks) sends one request per alert; more lets a
backlog, e.g. after an outage, drain in a few requests.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from monitor.fetch import parse_retry_after

log = logging.getLogger("repost_monitor.alerts")


class DeliveryError(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The webhook signature: hex HMAC-SHA256 of ``timestamp + "." + body``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def mrkdwn(text) -> str:
    """Untrusted text for Slack mrkdwn: ``&``, ``<``, ``>`` escaped (so ``<!channel>``
    cannot ping anyone and ``<url|text>`` cannot forge a link), and the formatting
    characters neutralised with a zero-width space so a label cannot break out of
    its italics or bold."""
    text = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for ch in ("*", "_", "~", "`"):
        text = text.replace(ch, ch + "\u200b")
    return text


_DISCORD_MARKDOWN = {ord(c): "\\" + c for c in "\\*_~`|>[]()"}  # (a line never starts with untrusted text)


def discord_text(text) -> str:
    """Untrusted text for Discord markdown: every formatting character escaped, so a label
    cannot make a masked link, a heading or a spoiler (mentions are off via allowed_mentions)."""
    return str(text).translate(_DISCORD_MARKDOWN)


def summary(alert: dict) -> str:
    flip = ", mirrored" if alert["mirrored"] else ""
    if alert.get("flood"):
        return (f"Repost storm: {alert['flood']['alerts_in_window']}+ reposts of library "
                f"'{alert['library']['label']}' within {alert['flood']['window_seconds'] / 60:g} "
                f"minutes; further alerts held back. Latest: {alert['repost']['image_url']}")
    return (f"Repost found ({alert['tier']}, {alert['distance_bits']}/64 bits by {alert['decided_by']}"
            f"{flip}): {alert['repost']['image_url']} matches library '{alert['library']['label']}'")


def batch_key(alerts: list[dict]) -> str:
    """One alert's own key; for several, a key naming the first and last alert."""
    if len(alerts) == 1:
        return alerts[0]["idempotency_key"]
    first, last = alerts[0]["idempotency_key"], alerts[-1]["idempotency_key"]
    return f"{first}..{last}"


@dataclass
class HttpSink:
    name: str
    url: str
    timeout: float = 10.0
    batch_size: int = 1

    def body(self, alerts: list[dict]) -> dict:
        return alerts[0]

    def headers(self, alerts: list[dict], body: bytes) -> dict:
        # Idempotency-Key for receivers that dedupe per request; the per-alert
        # keys (also inside each alert) for receivers that dedupe per alert.
        return {"Content-Type": "application/json", "Idempotency-Key": batch_key(alerts),
                "X-Repost-Monitor-Alert-Keys": ",".join(a["idempotency_key"] for a in alerts)}

    async def deliver(self, session: aiohttp.ClientSession, alerts: list[dict]) -> None:
        body = json.dumps(self.body(alerts)).encode()
        try:
            async with session.post(self.url, data=body, headers=self.headers(alerts, body),
                                    timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                text = (await resp.content.read(2048)).decode(errors="replace")
                if 200 <= resp.status < 300:
                    return
                raise DeliveryError(f"HTTP {resp.status}: {text[:200]}",
                                    parse_retry_after(resp.headers.get("Retry-After"))
                                    if resp.status in (429, 503) else None)
        except TimeoutError:
            raise DeliveryError(f"timed out after {self.timeout:g}s") from None
        except aiohttp.ClientError as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from None


@dataclass
class WebhookSink(HttpSink):
    """JSON POST. ``batch_size`` 1: the body is the alert; more: ``{"alerts": [...]}`` always."""
    secret: str | None = None

    def body(self, alerts: list[dict]) -> dict:
        return alerts[0] if self.batch_size == 1 else {"alerts": alerts}

    def headers(self, alerts: list[dict], body: bytes) -> dict:
        headers = super().headers(alerts, body)
        if self.secret:
            ts = str(int(time.time()))
            headers["X-Repost-Monitor-Timestamp"] = ts
            headers["X-Repost-Monitor-Signature"] = sign(self.secret, ts, body)
        return headers


# Block Kit allows 50 blocks per message: a digest is a header plus one section per alert.
SLACK_MAX_BATCH = 40


def _link(url: str) -> str:
    # Inside <url|text> only these three break the link syntax.
    return url.replace("&", "&amp;").replace("<", "%3C").replace(">", "%3E").replace("|", "%7C")


@dataclass
class SlackSink(HttpSink):
    """Block Kit message per alert; a backlog of several arrives as digests."""

    def body(self, alerts: list[dict]) -> dict:
        if len(alerts) == 1:
            return self._message(alerts[0])
        header = {"type": "header", "text": {"type": "plain_text",
                                             "text": f"{len(alerts)} reposts found"}}
        blocks = [header] + [self._section(a) for a in alerts[:SLACK_MAX_BATCH]]
        keys = f"{alerts[0]['idempotency_key']} .. {alerts[-1]['idempotency_key']}"
        blocks.append({"type": "context", "elements": [
            {"type": "mrkdwn", "text": f"alerts {keys} · detected {alerts[0]['detected_at']} "
                                       f"to {alerts[-1]['detected_at']}"}]})
        return {"text": f"{len(alerts)} reposts found: " + "; ".join(mrkdwn(summary(a)) for a in alerts[:3])
                + (" ..." if len(alerts) > 3 else ""), "blocks": blocks}

    def _section(self, alert: dict) -> dict:
        repost, lib = alert["repost"], alert["library"]
        links = [f"<{_link(repost['page_url'])}|the post>" if repost.get("page_url") else None,
                 f"<{_link(lib['source'])}|the original>" if lib["source"].startswith("http") else
                 f"original: {mrkdwn(lib['source'])}"]
        text = (f"*Repost of _{mrkdwn(lib['label'])}_* ({alert['tier']}, {alert['distance_bits']}/64 bits)\n"
                + " · ".join(x for x in links if x)
                + f"\nsource: {mrkdwn(repost['source'])}"
                + (f", by {mrkdwn(repost['author'])}" if repost.get("author") else ""))
        section = {"type": "section", "text": {"type": "mrkdwn", "text": text}}
        if repost["image_url"].startswith("http"):
            section["accessory"] = {"type": "image", "image_url": repost["image_url"],
                                    "alt_text": "the repost"}
        return section

    def _message(self, alert: dict) -> dict:
        return {"text": mrkdwn(summary(alert)), "blocks": [self._section(alert), {"type": "context", "elements": [
            {"type": "mrkdwn", "text": f"alert {alert['idempotency_key']} · detected "
                                       f"{alert['detected_at']}"}]}]}


@dataclass
class DiscordSink(HttpSink):
    def body(self, alerts: list[dict]) -> dict:
        alert = alerts[0]  # batch_size is always 1 for Discord
        repost, lib = alert["repost"], alert["library"]
        text = discord_text(summary(alert))
        embed = {"title": f"Repost of {discord_text(lib['label'])}", "description": text,
                 "fields": [{"name": "tier", "value": alert["tier"], "inline": True},
                            {"name": "distance", "value": f"{alert['distance_bits']}/64 bits",
                             "inline": True},
                            {"name": "source", "value": discord_text(repost["source"]), "inline": True}]}
        if repost.get("page_url"):
            embed["url"] = repost["page_url"]
        if repost["image_url"].startswith("http"):
            embed["thumbnail"] = {"url": repost["image_url"]}
        # Nobody is pinged, whatever a feed's author names or labels contain.
        return {"content": text, "embeds": [embed], "allowed_mentions": {"parse": []}}


@dataclass
class FileSink:
    """JSON lines, fsynced: a reader dedupes on idempotency_key after a crash."""
    name: str
    path: str
    batch_size: int = 100  # one write and one fsync per batch

    async def deliver(self, session, alerts: list[dict]) -> None:
        lines = "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in alerts)
        await asyncio.to_thread(self._append, lines)

    def _append(self, lines: str) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(lines)
            fh.flush()
            os.fsync(fh.fileno())


@dataclass
class LogSink:
    name: str
    batch_size: int = 100

    async def deliver(self, session, alerts: list[dict]) -> None:
        for alert in alerts:
            log.warning("ALERT %s", summary(alert),
                        extra={"alert_id": alert["alert_id"], "match_id": alert["match_id"],
                               "sink": self.name, "tier": alert["tier"]})


SINK_TYPES = {"webhook": WebhookSink, "slack": SlackSink, "discord": DiscordSink,
              "file": FileSink, "log": LogSink}
