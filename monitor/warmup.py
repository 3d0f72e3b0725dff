"""Compile (or load) the numba kernels before work, and say so when it is slow.

On a machine whose numba cache is empty the first call compiles every kernel:
about 10 s on 2 cores (14 s on one), silent unless told. Loading them from the cache
takes about a second, so the notice fires only when a kernel is not cached and
warming up is still running after ``notice_after`` seconds: the first run on a
machine (a busy one can take longer than that to load a warm cache: no notice then).
"""

from __future__ import annotations

import atexit
import importlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numba
from numba.core.registry import CPUDispatcher as Dispatcher

# The compiled code production runs, and so the only code compiled at start (the tiled
# kernels of monitor/search/tiled.py serve tests and bench/ and compile when first used).
FINGERPRINT_KERNELS = ("monitor.fingerprints.fasthash",   # grids, DCT and the four hashes
                       "monitor.fingerprints.views")      # frame and tilt detection
PRODUCTION_KERNELS = FINGERPRINT_KERNELS + (
    "monitor.search.radius",     # the radius search chosen for this CPU (bit-sliced or tiled)
    "monitor.search.matcher",    # the candidates' verification pass
    "monitor.search.detective",  # keypoint descriptors paired, for the second look
)

# Measured on a 2-core AMD EPYC from an empty NUMBA_CACHE_DIR: every kernel in 14 s
# in one process, 10-11 s compiled in two at once (the notice rounds up).
COLD_START_SECONDS = 15  # rounded up: slower or one-core machines

# Seconds each module's kernels take to compile (same machine): how cold modules
# are shared out between compiler processes.
COMPILE_SECONDS = {"monitor.fingerprints.fasthash": 8.0, "monitor.fingerprints.views": 2.5,
                   "monitor.search.radius": 3.0, "monitor.search.matcher": 1.0,
                   "monitor.search.detective": 0.5}

_compilers: list[subprocess.Popen] = []  # stopped at exit if still running


def cache_dir() -> str:
    return numba.config.CACHE_DIR or str(Path(__file__).resolve().parent / "__pycache__")


def notice(what: str = "matching kernels") -> str:
    return (f"compiling the {what}, first run only, about {COLD_START_SECONDS} s "
            f"(cached in {cache_dir()} for later runs)")


def _kernel_module(name: str) -> str:
    """Where the compiled code a warm-up module loads is defined."""
    if name == "monitor.search.radius":
        from monitor.search import radius
        return "monitor.search.tiled" if radius.active() == "tiled" else "monitor.search.bitslice"
    return name


def is_cached(name: str) -> bool:
    """Whether numba's cache holds compiled code of the kernels warm-up module
    ``name`` loads, for their current source (an edited file or another numba
    version reads as not cached). Any one kernel will do: a module's kernels
    are cached and invalidated together."""
    kernel_module = _kernel_module(name)
    module = importlib.import_module(kernel_module)
    kernels = [v for v in vars(module).values() if isinstance(v, Dispatcher) and v.__module__ == kernel_module]
    for kernel in kernels:
        try:
            if kernel._cache._cache_file._load_index():  # numba's own check, private API
                return True
        except AttributeError:  # a numba without this layout, or cache=False: no opinion
            return True
    return not kernels


def _shares(modules: list[str], processes: int) -> list[list[str]]:
    """Modules split into ``processes`` groups of near equal compile time (longest first)."""
    groups: list[list[str]] = [[] for _ in range(min(processes, len(modules)))]
    loads = [0.0] * len(groups)
    for name in sorted(modules, key=lambda m: -COMPILE_SECONDS.get(m, 1.0)):
        k = loads.index(min(loads))
        groups[k].append(name)
        loads[k] += COMPILE_SECONDS.get(name, 1.0)
    return groups


def _compile_apart(modules: list[str], processes: int) -> None:
    """Compile cold modules in separate interpreters at once, to fill numba's cache.

    numba compiles under the GIL, so threads would not help; on 2 cores this
    takes a cold start from 14 s to ~10 s. A compiler that fails only costs
    time: the caller then compiles what is still missing itself.
    """
    for group in _shares(modules, processes):
        code = "import importlib\n" + "".join(f"importlib.import_module({m!r}).warm_up()\n" for m in group)
        _compilers.append(subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for proc in list(_compilers):
        proc.wait()
        _compilers.remove(proc)


@atexit.register
def _stop_compilers() -> None:
    for proc in _compilers:
        proc.kill()


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def warm_up(say: Callable[[str], None] | None, part: str = "all", notice_after: float = 1.0,
            processes: int | None = None) -> None:
    """Compile or load the kernels ``part`` needs ("all", or "fingerprint" for the
    hash functions alone); calls ``say(notice)`` once if that takes longer than
    ``notice_after`` seconds. On a cold cache the modules are compiled in up to
    ``processes`` interpreters at once (default: the CPUs this process may use)."""
    modules = list(PRODUCTION_KERNELS if part == "all" else FINGERPRINT_KERNELS)
    cold = [m for m in modules if not is_cached(m)]

    def run() -> None:
        count = _cpus() if processes is None else processes
        if len(cold) > 1 and count > 1:
            _compile_apart(cold, count)
        for name in modules:
            importlib.import_module(name).warm_up()

    if say is None or not cold:
        # nothing to compile: no notice, however long a busy machine takes to load them
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
