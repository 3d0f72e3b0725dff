"""Bit-sliced radius search: every (query, entry) pair within r bits, 512 entries at a time.

The plain kernel (monitor/kernel.py) XORs a query with one hash and counts the
bits: a POPCNT per pair, or on CPUs without AVX-512 VPOPCNTDQ a vpshufb nibble
lookup that tops out near 2 G pairs/s per core here. Bit slicing turns the
layout around: the library is stored as 64 bit-planes per block of 512 entries
(plane i holds bit i of every entry, one 512-bit vector), so a query's 64 XORs
give 64 vectors whose per-lane sum is the distance of 512 entries at once. The
sum is a carry-save adder tree of plain AND/OR/XOR (three-input XOR and
majority fuse into single VPTERNLOG instructions on AVX-512), and a bit-sliced
compare against r leaves a 512-bit mask of hits. Hits are rare, so their exact
distances come from the ordinary hash array afterwards.

The block routine is emitted as LLVM vector IR from a numba ``@intrinsic``:
numba's loop vectoriser would not vectorise the tree (aliasing, register
pressure), while explicit ``<8 x i64>`` values are portable (LLVM splits them
into narrower registers on CPUs without AVX-512) and compile once with
``cache=True`` like every other kernel.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from monitor.search.popcount import PARALLEL_MIN_PAIRS, popcount64

WORDS = 8                 # 64-bit words per block vector
BLOCK = 64 * WORDS        # entries per block: 512
BLOCK_WORDS = 64 * WORDS  # uint64 words per block in the plane array
CHUNK_BLOCKS = 64         # blocks per library chunk: 256 KiB of planes stays in L2


def _adder_tree():
    """Straight-line carry-save sum of 64 one-bit inputs -> 7 bit-planes.

    Returns ``(ops, outputs)``: ops are ``(dst, kind, args)`` with kind "xor3",
    "maj", "xor" or "and" over names ``x0..x63`` and temporaries; outputs are the
    names of the sum's bit-planes, least significant first. A streaming
    (Harley-Seal style) order keeps few values alive at once.
    """
    ops: list[tuple[str, str, tuple[str, ...]]] = []
    acc: list[str | None] = [None] * 7
    pending: dict[int, list[str]] = {}
    count = [0]

    def tmp() -> str:
        count[0] += 1
        return f"t{count[0]}"

    def add(k: int, v: str) -> None:
        if k >= 7:
            return
        queue = pending.setdefault(k, [])
        queue.append(v)
        if acc[k] is None and len(queue) == 1:
            acc[k] = queue.pop()
        elif len(queue) == 2:
            a, b = queue.pop(), queue.pop()
            s, c = tmp(), tmp()
            ops.append((s, "xor3", (a, b, acc[k])))
            ops.append((c, "maj", (a, b, acc[k])))
            acc[k] = s
            add(k + 1, c)

    for i in range(64):
        add(0, f"x{i}")
    for k in range(7):
        while pending.get(k):
            a = pending[k].pop()
            if acc[k] is None:
                acc[k] = a
                continue
            s, c = tmp(), tmp()
            ops.append((s, "xor", (a, acc[k])))
            ops.append((c, "and", (a, acc[k])))
            acc[k] = s
            add(k + 1, c)
    return ops, acc


_TREE_OPS, _TREE_OUT = _adder_tree()
_I64 = ir.IntType(64)
_I32 = ir.IntType(32)
_VEC = ir.VectorType(_I64, WORDS)


def _splat(builder, scalar):
    v = builder.insert_element(ir.Constant(_VEC, ir.Undefined), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, ir.Constant(_VEC, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, WORDS), [0] * WORDS))


@intrinsic
def _block_hits(typingctx, planes, block, qmask, tmask, out, slot):
    """out[slot:slot+8] = lanes of ``block`` whose distance to the query is <= r.

    ``qmask[i]`` is all ones where bit i of the query is set, ``tmask[k]`` all
    ones where bit k of r is set. Returns the OR of the eight words (0: no hit).
    """
    sig = types.uint64(planes, block, qmask, tmask, out, slot)

    def codegen(context, builder, signature, args):
        data = [context.make_array(signature.args[i])(context, builder, args[i]).data
                for i in (0, 2, 3, 4)]
        plane_ptr, q_ptr, t_ptr, out_ptr = data
        base = builder.mul(args[1], ir.Constant(_I64, BLOCK_WORDS))
        values: dict[str, ir.Value] = {}

        def value(name: str):
            if name not in values:  # x_i: plane i of the block XOR bit i of the query
                i = int(name[1:])
                p = builder.gep(plane_ptr, [builder.add(base, ir.Constant(_I64, i * WORDS))])
                v = builder.load(builder.bitcast(p, _VEC.as_pointer()), align=8)
                q = builder.load(builder.gep(q_ptr, [ir.Constant(_I64, i)]))
                values[name] = builder.xor(v, _splat(builder, q))
            return values[name]

        for dst, kind, names in _TREE_OPS:
            a = [value(n) for n in names]
            if kind == "xor3":  # a full adder's sum; its carry (the next op) reuses a ^ b
                half, half_of = builder.xor(a[0], a[1]), names
                values[dst] = builder.xor(half, a[2])
            elif kind == "maj":  # (a & b) | (c & (a ^ b)): one op fewer than with a | b
                assert names == half_of, "a carry follows the sum of the same three inputs"
                values[dst] = builder.or_(builder.and_(a[0], a[1]), builder.and_(a[2], half))
            elif kind == "xor":
                values[dst] = builder.xor(a[0], a[1])
            else:
                values[dst] = builder.and_(a[0], a[1])
        # sum <= r, most significant bit first: lt = some higher bit already
        # smaller, eq = all higher bits equal so far.
        ones = ir.Constant(_VEC, [-1] * WORDS)
        lt = ir.Constant(_VEC, [0] * WORDS)
        eq = ones
        for k in range(6, -1, -1):
            ck = value(_TREE_OUT[k])
            tk = _splat(builder, builder.load(builder.gep(t_ptr, [ir.Constant(_I64, k)])))
            lt = builder.or_(lt, builder.and_(builder.and_(eq, tk), builder.xor(ck, ones)))
            eq = builder.and_(eq, builder.xor(builder.xor(ck, tk), ones))
        hits = builder.or_(lt, eq)
        dst = builder.gep(out_ptr, [args[5]])
        builder.store(hits, builder.bitcast(dst, _VEC.as_pointer()), align=8)
        any_hit = builder.extract_element(hits, ir.Constant(_I32, 0))
        for w in range(1, WORDS):
            any_hit = builder.or_(any_hit, builder.extract_element(hits, ir.Constant(_I32, w)))
        return any_hit

    return sig, codegen


@njit(cache=True, nogil=True)
def _transpose64(a):
    """In place: afterwards bit l of a[i] is bit i of the original a[l].

    The recursive block swap of Hacker's Delight (7-3): 6 rounds of 32 word
    operations instead of 4,096 single-bit moves.
    """
    j = 32
    m = np.uint64(0x00000000FFFFFFFF)
    while j != 0:
        k = 0
        while k < 64:
            t = ((a[k] >> np.uint64(j)) ^ a[k + j]) & m
            a[k] ^= t << np.uint64(j)
            a[k + j] ^= t
            k = (k + j + 1) & ~j
        j >>= 1
        m ^= m << np.uint64(j)


def plane_words(rows: int) -> int:
    """Length of the plane array that holds ``rows`` entries (whole blocks)."""
    return (rows + BLOCK - 1) // BLOCK * BLOCK_WORDS


@njit(cache=True, nogil=True)
def _fill_planes(hashes, planes):
    n = hashes.shape[0]
    group = np.empty(64, np.uint64)
    for g in range((n + 63) // 64):  # 64 entries = one word of every plane
        k = min(64, n - g * 64)
        # a loop, not slice assignment, whose error path is seconds of compiling
        for i in range(64):
            group[i] = hashes[g * 64 + i] if i < k else np.uint64(0)
        _transpose64(group)
        base = (g // WORDS) * BLOCK_WORDS + g % WORDS
        for i in range(64):
            planes[base + i * WORDS] = group[i]


def to_planes(hashes: np.ndarray, capacity: int = 0) -> np.ndarray:
    """The bit-plane layout of ``hashes``: block b, plane i, word w at [(b*64 + i)*8 + w].

    ``capacity`` reserves zeroed room for more entries (see :func:`set_lane`).
    """
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    planes = np.zeros(plane_words(max(capacity, hashes.shape[0])), np.uint64)
    _fill_planes(hashes, planes)
    return planes


@njit(cache=True, nogil=True)
def set_lane(planes, e, h):
    """Write hash ``h`` into entry slot ``e`` (0 clears the slot)."""
    base = (e // BLOCK) * BLOCK_WORDS + (e % BLOCK) // 64
    lane = np.uint64(1) << np.uint64(e % 64)
    for i in range(64):
        if (h >> np.uint64(i)) & np.uint64(1):
            planes[base + i * WORDS] |= lane
        else:
            planes[base + i * WORDS] &= ~lane


@njit(cache=True, nogil=True)
def _masks(q, radius, qmask, tmask):
    for i in range(64):
        qmask[i] = np.uint64(0) - ((q >> np.uint64(i)) & np.uint64(1))
    for k in range(7):
        tmask[k] = np.uint64(0) - ((np.uint64(radius) >> np.uint64(k)) & np.uint64(1))


@njit(cache=True, nogil=True)
def lane_value(planes, e):
    """The hash in entry slot ``e`` (set_lane's inverse): bit i from plane i."""
    base = (e // BLOCK) * BLOCK_WORDS + (e % BLOCK) // 64
    shift = np.uint64(e % 64)
    h = np.uint64(0)
    for i in range(64):
        h |= ((planes[base + i * WORDS] >> shift) & np.uint64(1)) << np.uint64(i)
    return h


@njit(cache=True, nogil=True)
def _from_planes(planes, out):
    n = out.shape[0]
    group = np.empty(64, np.uint64)
    for g in range((n + 63) // 64):
        base = (g // WORDS) * BLOCK_WORDS + g % WORDS
        for i in range(64):
            group[i] = planes[base + i * WORDS]
        _transpose64(group)
        for i in range(min(64, n - g * 64)):
            out[g * 64 + i] = group[i]


def from_planes(planes: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` hashes held in ``planes`` (to_planes' inverse)."""
    out = np.empty(n, np.uint64)
    _from_planes(planes, out)
    return out


@njit(cache=True, nogil=True)
def _scan(queries, n, planes, radius, q0, q1):
    """Every pair within ``radius`` for queries [q0, q1), grouped by library chunk.

    Library chunks are the outer loop so a chunk's planes stay in L2 while
    every query passes over it; within a chunk pairs come query by query in
    entry order, so a stable sort by query restores (query, entry) order.
    """
    nblocks = planes.shape[0] // BLOCK_WORDS
    qmask = np.empty(64, np.uint64)
    tmask = np.empty(7, np.uint64)
    words = np.empty(WORDS, np.uint64)
    out_q = np.empty(256, np.int64)
    out_l = np.empty(256, np.int64)
    out_d = np.empty(256, np.uint8)
    k = 0
    for c0 in range(0, nblocks, CHUNK_BLOCKS):
        c1 = min(nblocks, c0 + CHUNK_BLOCKS)
        for q in range(q0, q1):
            qv = queries[q]
            _masks(qv, radius, qmask, tmask)
            for b in range(c0, c1):
                if _block_hits(planes, b, qmask, tmask, words, 0) == 0:
                    continue
                if k + BLOCK > out_q.shape[0]:  # room for a whole block: no check per hit
                    size = 2 * out_q.shape[0] + BLOCK
                    out_q = np.concatenate((out_q[:k], np.empty(size - k, np.int64)))
                    out_l = np.concatenate((out_l[:k], np.empty(size - k, np.int64)))
                    out_d = np.concatenate((out_d[:k], np.empty(size - k, np.uint8)))
                k = _emit_block(words, b, n, q, qv, planes, out_q, out_l, out_d, k)
    return out_q[:k], out_l[:k], out_d[:k]


@njit(cache=True, nogil=True)
def _emit_block(words, b, n, q, qv, planes, out_q, out_l, out_d, k):
    """Append the hits of block ``b`` (its mask in ``words``); returns the new count.
    A hit's distance is taken from the planes themselves (the block is in cache), so
    the library needs no separate array of its hashes."""
    for w in range(WORDS):
        bits = words[w]
        while bits:
            lane = popcount64((bits & (np.uint64(0) - bits)) - np.uint64(1))
            bits &= bits - np.uint64(1)
            e = b * BLOCK + w * 64 + lane
            if e < n:  # not a padding lane of the last block
                out_q[k] = q
                out_l[k] = e
                out_d[k] = popcount64(qv ^ lane_value(planes, e))
                k += 1
    return k


def pairs_within(queries: np.ndarray, library: np.ndarray | None, radius: int, *,
                 planes: np.ndarray | None = None, threads: int | None = None, rows: int | None = None):
    """Every (query, entry) pair within ``radius`` bits, ordered by query then entry.

    Returns ``(pair_query, pair_library, pair_distance)``, the same pairs as
    ``kernel.batch(queries, library, radius)``. ``planes`` is
    ``to_planes(library)`` (or a longer array with zeroed room after it) when
    the caller keeps it; with ``planes``, ``library`` may be None and ``rows``
    its length. ``threads`` None uses one thread for small batches and
    every core for big ones; the scan releases the GIL, so plain threads run it
    in parallel (no numba ``parallel=True``, whose compile costs seconds).
    """
    if not 0 <= radius <= 64:
        raise ValueError(f"radius must be 0..64 bits, got {radius}")
    queries = np.ascontiguousarray(queries, dtype=np.uint64)
    if library is not None:
        library = np.ascontiguousarray(library, dtype=np.uint64)
        rows = library.shape[0]
        if planes is None:
            planes = to_planes(library)
    elif planes is None or rows is None:
        raise ValueError("pairs_within needs the library's hashes, or its planes and rows")
    planes = planes[:plane_words(rows)]  # blocks past the last entry hold nothing
    m, n = queries.shape[0], rows
    if threads is None:
        threads = (os.cpu_count() or 1) if m * n >= PARALLEL_MIN_PAIRS and m > 1 else 1
    if threads <= 1 or m < 2:
        parts = [_scan(queries, n, planes, radius, 0, m)]
    else:
        step = (m + threads - 1) // threads
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(lambda q0: _scan(queries, n, planes, radius, q0, min(m, q0 + step)),
                                  range(0, m, step)))
    pq, pl, pd = (np.concatenate(x) for x in zip(*parts, strict=True)) if len(parts) > 1 else parts[0]
    if m > 1 and pq.size:
        order = np.argsort(pq, kind="stable")
        pq, pl, pd = pq[order], pl[order], pd[order]
    return pq, pl, pd


def warm_up() -> None:
    lib = np.arange(3, dtype=np.uint64)
    planes = to_planes(lib)
    set_lane(planes, 1, lib[1])
    pairs_within(lib, None, 4, planes=planes, threads=1, rows=3)
    from_planes(planes, 3)
