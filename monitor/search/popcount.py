"""The one instruction every kernel is built on, and when a batch is worth both cores."""

from __future__ import annotations

from numba import types
from numba.extending import intrinsic

# Below this many pair comparisons a batch runs on one thread.
PARALLEL_MIN_PAIRS = 50_000_000


@intrinsic
def popcount64(typingctx, x):
    """LLVM ctpop: one POPCNT instruction, vectorised where the CPU can."""
    # int64 result: mixing uint64 and int64 in numba silently promotes to float64.
    sig = types.int64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen
