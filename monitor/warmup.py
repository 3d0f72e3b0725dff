"""Compile (or load) the numba kernels before work, and say so when it is slow.

On a machine whose numba cache is empty the first call compiles every kernel:
about 30 s on a 2-core Xeon, silent unless told. Loading them from the cache
takes about a second, so the notice fires only when warming up is still
running after ``notice_after`` seconds: the first run on a machine.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from pathlib import Path

import numba

# The compiled code production runs, and so the only code compiled at start (the tiled
# kernels of monitor/search/tiled.py serve tests and bench/ and compile when first used).
FINGERPRINT_KERNELS = ("monitor.fingerprints.fasthash",   # grids, DCT and the four hashes
                       "monitor.fingerprints.views")      # frame and tilt detection
PRODUCTION_KERNELS = FINGERPRINT_KERNELS + (
    "monitor.search.radius",     # the radius search chosen for this CPU (bit-sliced or tiled)
    "monitor.search.matcher",    # the candidates' verification pass
)

# Measured: all kernels from an empty NUMBA_CACHE_DIR in 29-31 s on a 2-core Xeon @ 2.5 GHz.
COLD_START_SECONDS = 30


def cache_dir() -> str:
    return numba.config.CACHE_DIR or str(Path(__file__).resolve().parent / "__pycache__")


def notice(what: str = "matching kernels") -> str:
    return (f"compiling the {what}, first run only, about {COLD_START_SECONDS} s "
            f"(cached in {cache_dir()} for later runs)")


def warm_up(say: Callable[[str], None] | None, part: str = "all", notice_after: float = 1.0) -> None:
    """Compile or load the kernels ``part`` needs ("all", or "fingerprint" for the
    hash functions alone); calls ``say(notice)`` once if that takes longer than
    ``notice_after`` seconds."""
    def run() -> None:
        for kernels in (PRODUCTION_KERNELS if part == "all" else FINGERPRINT_KERNELS):
            importlib.import_module(kernels).warm_up()

    if say is None:
        run()
        return
    what = "fingerprint kernels" if part == "fingerprint" else "matching kernels"
    timer = threading.Timer(notice_after, say, args=(notice(what),))
    timer.daemon = True
    timer.start()
    try:
        run()
    finally:
        timer.cancel()
