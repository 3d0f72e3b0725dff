"""Alert sinks: each turns an alert payload into one delivery.

A sink returns normally on success and raises :class:`DeliveryError` on
failure, with ``retry_after`` when the receiver said when to come back.
Every HTTP delivery carries the alert's idempotency key.
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

from ..fetch import parse_retry_after

log = logging.getLogger("repost_monitor.alerts")


class DeliveryError(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The webhook signature: hex HMAC-SHA256 of ``timestamp + "." + body``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def summary(alert: dict) -> str:
    flip = ", mirrored" if alert["mirrored"] else ""
    if alert.get("flood"):
        return (f"Repost storm: {alert['flood']['alerts_in_window']}+ reposts of library "
                f"'{alert['library']['label']}' within {alert['flood']['window_seconds'] / 60:g} "
                f"minutes; further alerts held back. Latest: {alert['repost']['image_url']}")
    return (f"Repost found ({alert['tier']}, {alert['distance_bits']}/64 bits by {alert['decided_by']}"
            f"{flip}): {alert['repost']['image_url']} matches library '{alert['library']['label']}'")


@dataclass
class HttpSink:
    name: str
    url: str
    timeout: float = 10.0

    def body(self, alert: dict) -> dict:
        return alert

    def headers(self, alert: dict, body: bytes) -> dict:
        return {"Content-Type": "application/json", "Idempotency-Key": alert["idempotency_key"]}

    async def deliver(self, session: aiohttp.ClientSession, alert: dict) -> None:
        body = json.dumps(self.body(alert)).encode()
        try:
            async with session.post(self.url, data=body, headers=self.headers(alert, body),
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
    secret: str | None = None

    def headers(self, alert: dict, body: bytes) -> dict:
        headers = super().headers(alert, body)
        if self.secret:
            ts = str(int(time.time()))
            headers["X-Repost-Monitor-Timestamp"] = ts
            headers["X-Repost-Monitor-Signature"] = sign(self.secret, ts, body)
        return headers


@dataclass
class SlackSink(HttpSink):
    def body(self, alert: dict) -> dict:
        repost, lib = alert["repost"], alert["library"]
        links = [f"<{repost['page_url']}|the post>" if repost.get("page_url") else None,
                 f"<{lib['source']}|the original>" if lib["source"].startswith("http") else
                 f"original: `{lib['source']}`"]
        text = (f"*Repost of _{lib['label']}_* ({alert['tier']}, {alert['distance_bits']}/64 bits)\n"
                + " · ".join(x for x in links if x)
                + f"\nsource: {repost['source']}"
                + (f", by {repost['author']}" if repost.get("author") else ""))
        section = {"type": "section", "text": {"type": "mrkdwn", "text": text}}
        if repost["image_url"].startswith("http"):
            section["accessory"] = {"type": "image", "image_url": repost["image_url"],
                                    "alt_text": "the repost"}
        return {"text": summary(alert), "blocks": [section, {"type": "context", "elements": [
            {"type": "mrkdwn", "text": f"alert {alert['idempotency_key']} · detected "
                                       f"{alert['detected_at']}"}]}]}


@dataclass
class DiscordSink(HttpSink):
    def body(self, alert: dict) -> dict:
        repost, lib = alert["repost"], alert["library"]
        embed = {"title": f"Repost of {lib['label']}", "description": summary(alert),
                 "fields": [{"name": "tier", "value": alert["tier"], "inline": True},
                            {"name": "distance", "value": f"{alert['distance_bits']}/64 bits",
                             "inline": True},
                            {"name": "source", "value": repost["source"], "inline": True}]}
        if repost.get("page_url"):
            embed["url"] = repost["page_url"]
        if repost["image_url"].startswith("http"):
            embed["thumbnail"] = {"url": repost["image_url"]}
        return {"content": summary(alert), "embeds": [embed]}


@dataclass
class FileSink:
    """JSON lines, fsynced: a reader dedupes on idempotency_key after a crash."""
    name: str
    path: str

    async def deliver(self, session, alert: dict) -> None:
        line = json.dumps(alert, ensure_ascii=False) + "\n"
        await asyncio.to_thread(self._append, line)

    def _append(self, line: str) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


@dataclass
class LogSink:
    name: str

    async def deliver(self, session, alert: dict) -> None:
        log.warning("ALERT %s", summary(alert),
                    extra={"alert_id": alert["alert_id"], "match_id": alert["match_id"],
                           "sink": self.name, "tier": alert["tier"]})


SINK_TYPES = {"webhook": WebhookSink, "slack": SlackSink, "discord": DiscordSink,
              "file": FileSink, "log": LogSink}
