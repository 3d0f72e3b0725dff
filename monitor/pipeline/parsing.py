"""Where the sources' bodies are parsed: a large body on threads of its own.

feedparser takes ~3.5 s a MB of dense markup (up to ~18 s for a 5 MB feed, the GIL held). On
the loop's default threads a few such feeds held every one of them, and the store's calls
(work rows, recording matches, alert state) waited behind the parses: a repost on a quiet
feed was recorded only once they were done. A body over LARGE bytes is parsed on one of two
threads kept for them (one huge feed leaves the others one); a smaller one, as most feeds
are, on the default threads, so it never waits behind the large ones.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

LARGE = 256 * 1024  # bytes: dense markup this long takes feedparser ~1 s
_LARGE_BODIES = ThreadPoolExecutor(2, thread_name_prefix="feed-parse")


async def parsed(parse, body: bytes, *args):
    """``parse(body, *args)`` off the loop, on the large bodies' threads where ``body`` is one."""
    if len(body) <= LARGE:
        return await asyncio.to_thread(parse, body, *args)
    return await asyncio.get_running_loop().run_in_executor(_LARGE_BODIES, parse, body, *args)
