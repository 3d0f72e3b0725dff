"""Where the sources' bodies are parsed: a large body in a process of its own, with a time limit.

feedparser takes ~3.5 s a MB of dense markup (up to ~18 s for a 5 MB feed), holding the GIL all
along. On the loop's default threads a few such feeds held every one of them, and the store's
calls (work rows, recording matches, alert state) waited behind the parses; on threads of their
own they still slowed the event loop five-fold while they ran (a 4 MB feed: the loop's turn
1.2 ms -> 6.4 ms for 6 s, up to 98 ms), so downloads, the API and alerts crawled. A body over
LARGE bytes is parsed in one of PARSERS worker processes (pebble's pool, spawned at the first
one): the loop keeps its pace, a parse past PARSE_LIMIT seconds is stopped (its process
replaced), and one that dies or runs out of memory (feeds/isolated.py) fails that body alone. A
smaller body, as most feeds are, is parsed on the default threads: it never waits behind the
large ones, nor pays for a process.
"""

from __future__ import annotations

import asyncio
import atexit
import multiprocessing
import os
import threading
from concurrent.futures.process import BrokenProcessPool

from pebble import ProcessExpired, ProcessPool

from feeds import FeedError
from feeds.isolated import parser_started, timed

LARGE = 256 * 1024      # bytes: dense markup this long takes feedparser ~1 s
PARSERS = 2             # processes: one huge feed leaves the others one
PARSE_LIMIT = 60.0      # seconds a large body's parse may take (5 MB of dense markup: ~18 s of CPU)
RECYCLE = 100           # parses before a process is replaced (what a parse leaves behind goes with it)

_pool: ProcessPool | None = None
_pool_lock = threading.Lock()


async def parsed(parse, body: bytes, *args):
    """``parse(body, *args)`` off the loop: in a parsing process where ``body`` is large
    (then ``parse`` and its arguments must pickle: a source's bound method does)."""
    return (await parsed_timed(parse, body, *args))[0]


async def parsed_timed(parse, body: bytes, *args):
    """:func:`parsed`, and the CPU seconds the parse took (not the wait for a thread or a
    process; on an error raised, its ``parse_seconds``). FeedError ``parse_timeout`` for a
    large body whose parse was stopped at PARSE_LIMIT, ``parse_failed`` for one whose
    process died or ran out of memory."""
    if len(body) <= LARGE:
        return await asyncio.to_thread(timed, parse, body, *args)
    try:
        return await asyncio.wrap_future(_parsers().schedule(timed, (parse, body, *args), timeout=PARSE_LIMIT))
    except TimeoutError:
        exc = FeedError("parse_timeout", f"its {len(body) / 1e6:.1f} MB body took over {PARSE_LIMIT:.0f} s "
                                         "to parse; stopped")
        exc.parse_seconds = PARSE_LIMIT  # spaces the feed's polls as a parse that long would
        raise exc from None
    except (ProcessExpired, BrokenProcessPool, MemoryError) as died:  # the pool starts again at the next
        raise FeedError("parse_failed", f"the process parsing its {len(body) / 1e6:.1f} MB body "
                                        f"{'ran out of memory' if isinstance(died, MemoryError) else 'died'}"
                        ) from None


def _parsers() -> ProcessPool:
    global _pool
    with _pool_lock:
        if _pool is None or not _pool.active:
            # spawn: forking a process that runs threads (the loop's helpers) can deadlock
            _pool = ProcessPool(PARSERS, max_tasks=RECYCLE, initializer=parser_started, initargs=(os.getpid(),),
                                context=multiprocessing.get_context("spawn"))
        return _pool


@atexit.register
def stop_parsers() -> None:
    """Stop the parsing processes (a stopping daemon; a test)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.stop()
        pool.join(timeout=5)
