"""The radius search the matcher runs, chosen for the CPU at run time.

Two kernels find every (query, library row) pair within a radius of dHash bits:

- ``bitsliced`` (``bitslice.py``): the library as 64 bit-planes per 512 rows, one pass of
  AND/OR/XOR sums 512 distances at once. Wins where popcount is not vectorised.
- ``tiled`` (``tiled.py``): XOR + popcount per pair over cache-sized tiles. With
  AVX-512 VPOPCNTDQ, LLVM vectorises the popcount 8 rows at a time and this kernel runs
  about twice as fast as the bit-sliced one (13.3 vs 7.5 G pairs/s on a 2-core EPYC).

``choose`` picks from the features LLVM (and so numba) targets on this host; the
``REPOST_MONITOR_KERNEL`` environment variable or ``match.kernel`` in the config forces
either. Both return the same pairs in the same order (tests/test_kernel.py).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from monitor.search import bitslice, tiled

log = logging.getLogger("repost_monitor.search")

KERNELS = ("bitsliced", "tiled")
ENV = "REPOST_MONITOR_KERNEL"
_active: str | None = None


def host_features() -> set[str]:
    """CPU features of this host as LLVM names them (``avx512vpopcntdq``, ``avx2``...)."""
    import llvmlite.binding as llvm
    return {name for name, on in llvm.get_host_cpu_features().items() if on}


def host_cpu() -> str:
    import llvmlite.binding as llvm
    return llvm.get_host_cpu_name()


def choose(setting: str | None = "auto") -> str:
    """The kernel for this host: ``setting`` ("auto", or a kernel name), overridden by
    $REPOST_MONITOR_KERNEL when set."""
    wanted = os.environ.get(ENV) or setting or "auto"
    if wanted != "auto":
        if wanted not in KERNELS:
            raise ValueError(f"kernel must be auto or one of {', '.join(KERNELS)}, got {wanted!r}")
        return wanted
    return "tiled" if "avx512vpopcntdq" in host_features() else "bitsliced"


def use(kernel: str) -> str:
    """Make ``kernel`` the one the matcher runs; returns it."""
    global _active
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}")
    _active = kernel
    return kernel


def active() -> str:
    """The kernel in use (chosen for this host on first use)."""
    return _active or use(choose())


def pairs_within(queries: np.ndarray, library: np.ndarray | None, radius: int, *, planes: np.ndarray | None = None,
                 threads: int | None = None, kernel: str | None = None, rows: int | None = None):
    """Every (query, row) pair within ``radius`` bits, ordered by query then row:
    ``(pair_query, pair_library, pair_distance)``. ``planes`` serves the bit-sliced kernel,
    which needs no ``library`` array with them (``rows``: its length)."""
    if (kernel or active()) == "tiled":
        if not 0 <= radius <= 64:
            raise ValueError(f"radius must be 0..64 bits, got {radius}")
        if library is None:
            library = bitslice.from_planes(planes, rows)
        return tiled.radius_pairs(queries, library, radius, threads=threads)
    return bitslice.pairs_within(queries, library, radius, planes=planes, threads=threads, rows=rows)


def warm_up() -> None:
    """Compile (or load) the kernel in use, and say which it is."""
    kernel = active()
    if kernel == "tiled":
        lib = np.arange(3, dtype=np.uint64)
        tiled.pairs(lib, lib, 4)
    else:
        bitslice.warm_up()
