"""What a feed-parsing process runs (monitor/pipeline/parsing.py): a parse, timed, inside the
process's own limits. A light module: a parsing process imports it and the feed adapters, not
the daemon's matcher, kernels and OpenCV (~30 MB resident, not ~160)."""

from __future__ import annotations

import os
import resource
import signal
import threading
import time

MEMORY_LIMIT = 2 << 30  # bytes of address space a parsing process may take


def parser_started(parent: int) -> None:
    """In a parsing process: bounded memory, no Ctrl-C of its own (the daemon stops it), and
    an end of its own when the daemon is gone (a kill -9 runs no clean-up)."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT if hard == resource.RLIM_INFINITY
                                            else min(MEMORY_LIMIT, hard), hard))
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def orphaned() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)
    threading.Thread(target=orphaned, name="orphaned", daemon=True).start()


def timed(call, *args):
    """``call(*args)``, and the CPU seconds it took on this thread (on an error raised, its
    ``parse_seconds``)."""
    start = time.thread_time()
    try:
        result = call(*args)
    except Exception as exc:  # a body refused after a long parse: its time goes with the error
        exc.parse_seconds = time.thread_time() - start
        raise
    return result, time.thread_time() - start
