"""`repost-monitor streams`: look at the streams between the roles, and at the dead letters
(messages delivered ``max_deliveries`` times without success), and put those back."""

from __future__ import annotations

import json

from monitor.config import Config
from monitor.scaleout.streams import ANSWERS, DEAD, FINGERPRINTS, WORK, RedisStreams


def _streams(config: Config) -> RedisStreams:
    if not config.transport.url:
        raise ValueError("no [transport] url in the config: there are no streams")
    return RedisStreams(config.transport.url, config.transport.prefix)


async def stats(config: Config) -> dict:
    streams = _streams(config)
    try:
        return {stream: {"length": await streams.length(stream), "groups": await streams.group_stats(stream)}
                for stream in (WORK, FINGERPRINTS, ANSWERS, DEAD)}
    finally:
        await streams.close()


async def dead(config: Config, count: int = 100) -> list[dict]:
    """The dead letters, oldest first: where each came from, how often it was delivered, its fields."""
    streams = _streams(config)
    try:
        out = []
        for mid, fields in await streams.dead(count):
            text = {k.decode(): v.decode(errors="replace") if k != b"picture"
                    else f"<{len(v)} bytes: the post's keypoint picture>" for k, v in fields.items()}
            out.append({"id": mid.decode(), "stream": text.pop("origin_stream", ""),
                        "group": text.pop("origin_group", ""), "origin_id": text.pop("origin_id", ""),
                        "deliveries": int(text.pop("deliveries", "0") or 0),
                        "dead_at": float(text.pop("dead_at", "0") or 0), "fields": text})
        return out
    finally:
        await streams.close()


async def replay(config: Config, ids: list[str] | None) -> int:
    streams = _streams(config)
    try:
        return await streams.replay_dead([i.encode() for i in ids] if ids else None)
    finally:
        await streams.close()


def dumps(doc) -> str:
    return json.dumps(doc, indent=2, sort_keys=True)
