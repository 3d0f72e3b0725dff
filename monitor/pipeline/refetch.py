"""Unsure matches of a fingerprint matched without its image at hand: one read from the
store (a URL another feed posted already), another fetch's, a retro-match's. The store keeps
fingerprints, not pixels, yet an unsure hash match stands only where the two pictures'
keypoints agree (monitor/search/detective.py); so the image is fetched again, only for such
a match (or a retro-match's second look), and matched with it, as a fresh download would
have been."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from monitor.fetch import FetchError
from monitor.fingerprints import Fingerprint, KeypointFinder
from monitor.metrics import Metrics
from monitor.search.detective import needs_confirmation
from monitor.search.matcher import Match, Matcher

log = logging.getLogger("repost_monitor.pipeline")


async def confirmed_again(matches: list[Match], url: str, fetch_image: Callable[[str], Awaitable[bytes]] | None | bool,
                          match_with_image: Callable[[bytes], Awaitable[list[Match]]],
                          metrics: Metrics) -> list[Match]:
    """``matches`` as the image's keypoints decide them: unchanged when none is unsure (or
    nothing fetches: None or False, keypoints off); else the matches of the image fetched again. An
    image that cannot be fetched again leaves the hashes' answer standing, as wherever the
    geometry cannot be told (an entry stored without keypoints)."""
    data = await fetched_again(matches, url, fetch_image, metrics)
    return matches if data is None else await match_with_image(data)


async def fetched_again(matches: list[Match], url: str, fetch_image: Callable[[str], Awaitable[bytes]] | None | bool,
                        metrics: Metrics) -> bytes | None:
    """The image fetched again where some of ``matches`` is unsure (and something fetches);
    None where none is, or it cannot be fetched (counted, and said: the hashes' answer stands)."""
    if not any(needs_confirmation(m) for m in matches):
        return None
    return await _fetched(url, fetch_image, metrics, "an unsure match could not be confirmed by keypoints")


async def fetched_for_look(url: str, fetch_image: Callable[[str], Awaitable[bytes]] | None | bool,
                           metrics: Metrics) -> bytes | None:
    """The image fetched again for a second look (a retro-match's: the hashes met no new
    entry, yet some lie near); None where nothing fetches or it cannot be fetched."""
    return await _fetched(url, fetch_image, metrics, "no second look at the new entries near it")


async def _fetched(url: str, fetch_image: Callable[[str], Awaitable[bytes]] | None | bool, metrics: Metrics,
                   lost: str) -> bytes | None:
    if not fetch_image:
        return None
    try:
        data = await fetch_image(url)
    except FetchError as exc:
        metrics.unsure_refetches.labels("unreachable").inc()
        log.warning("%s: %s (the image could not be fetched again: %s); the hashes' answer stands", url, lost, exc,
                    extra={"url": url})
        return None
    metrics.unsure_refetches.labels("fetched").inc()
    return data


def matched_in_thread(matcher: Matcher, fp: Fingerprint, max_pixels: int | None,
                      metrics: Metrics) -> Callable[[bytes], Awaitable[list[Match]]]:
    """What matches ``fp`` again, its image's keypoints at hand, off the event loop."""
    kwargs = {"max_pixels": max_pixels} if max_pixels else {}

    async def match(data: bytes) -> list[Match]:
        finder = KeypointFinder(data, **kwargs)
        matches = await asyncio.to_thread(matcher.match, fp, finder)
        metrics.observe_keypoint_searches([finder])
        return matches
    return match
