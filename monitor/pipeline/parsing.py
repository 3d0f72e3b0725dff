"""Where the sources' bodies are parsed: a large body on threads of its own, its CPU time told.

feedparser takes ~3.5 s a MB of dense markup (up to ~18 s for a 5 MB feed, the GIL held). On
the loop's default threads a few such feeds held every one of them, and the store's calls
(work rows, recording matches, alert state) waited behind the parses: a repost on a quiet
feed was recorded only once they were done. A body over LARGE bytes is parsed on one of two
threads kept for them (one huge feed leaves the others one); a smaller one, as most feeds
are, on the default threads, so it never waits behind the large ones.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

LARGE = 256 * 1024  # bytes: dense markup this long takes feedparser ~1 s
_LARGE_BODIES = ThreadPoolExecutor(2, thread_name_prefix="feed-parse")


async def parsed(parse, body: bytes, *args):
    """``parse(body, *args)`` off the loop, on the large bodies' threads where ``body`` is one."""
    return (await parsed_timed(parse, body, *args))[0]


async def parsed_timed(parse, body: bytes, *args):
    """:func:`parsed`, and the CPU seconds the parse took (its thread's, not the wait for one;
    on an error raised, its ``parse_seconds``)."""
    if len(body) <= LARGE:
        return await asyncio.to_thread(_timed, parse, body, *args)
    return await asyncio.get_running_loop().run_in_executor(_LARGE_BODIES, _timed, parse, body, *args)


def _timed(call, *args):
    start = time.thread_time()
    try:
        result = call(*args)
    except Exception as exc:  # a body refused after a long parse: its time goes with the error
        exc.parse_seconds = time.thread_time() - start
        raise
    return result, time.thread_time() - start
