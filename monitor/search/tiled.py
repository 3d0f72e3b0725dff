"""XOR+popcount Hamming kernels over uint64 fingerprint arrays (numba).

No I/O and no Python objects in the loops. Every kernel is compiled with
``cache=True`` so a process pays compilation once per machine, and
:func:`warm_up` compiles (or loads) them all at start-up so no request ever
waits for the compiler.

Single queries always run on the calling thread: a ``prange`` kernel answering
one query slowed 133x here when another process kept the second core busy.
Batches use all cores only when ``M x N`` is large enough to pay for it.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from monitor.search.popcount import PARALLEL_MIN_PAIRS, popcount64

NO_MATCH = 65  # distance reported when the library is empty
# Library block: 2048 hashes = 16 KiB, stays in L1 while a query tile runs.
LIB_BLOCK = 2048
QUERY_TILE = 16


@njit(cache=True, nogil=True)
def distances(query, library):
    """Hamming distance from one query to every library hash (uint8[N])."""
    out = np.empty(library.shape[0], np.uint8)
    for j in range(library.shape[0]):
        out[j] = popcount64(query ^ library[j])
    return out


@njit(cache=True, nogil=True)
def nearest(query, library):
    """(index, distance) of the closest library hash; (-1, 65) when empty."""
    best = NO_MATCH
    best_j = -1
    n = library.shape[0]
    # Scan in blocks with a branch-free min so LLVM vectorises the block;
    # the index is recovered only for a block that improved the best.
    # Loops index a slice from 0: a loop from a non-zero start makes numba
    # keep its negative-index wraparound check and runs 3x slower.
    for start in range(0, n, LIB_BLOCK):
        block = library[start:start + LIB_BLOCK]
        block_min = NO_MATCH
        for j in range(block.shape[0]):
            block_min = min(block_min, popcount64(query ^ block[j]))
        if block_min < best:
            best = block_min
            for j in range(block.shape[0]):
                if popcount64(query ^ block[j]) == best:
                    best_j = start + j
                    break
    return best_j, best


@njit(cache=True, nogil=True)
def _hits(query, rows, radius):
    """How many of ``rows`` lie within ``radius`` bits of ``query`` (a loop LLVM vectorises)."""
    hits = 0
    for j in range(rows.shape[0]):
        hits += np.int64(popcount64(query ^ rows[j]) <= radius)
    return hits


@njit(cache=True, nogil=True)
def _grown(values, count, size):
    """``values`` in a new array of ``size``, its first ``count`` kept."""
    out = np.empty(size, values.dtype)
    out[:count] = values[:count]
    return out


@njit(cache=True, nogil=True)
def within(query, library, radius):
    """(indices, distances) of every library hash within ``radius`` bits."""
    n = library.shape[0]
    idx = np.empty(16, np.int64)
    dist = np.empty(16, np.uint8)
    count = 0
    for start in range(0, n, LIB_BLOCK):
        block = library[start:start + LIB_BLOCK]
        hits = _hits(query, block, radius)
        if hits == 0:
            continue
        if count + hits > idx.shape[0]:
            size = max(idx.shape[0] * 2, count + hits)
            idx, dist = _grown(idx, count, size), _grown(dist, count, size)
        for j in range(block.shape[0]):
            d = popcount64(query ^ block[j])
            if d <= radius:
                idx[count] = start + j
                dist[count] = d
                count += 1
    return idx[:count], dist[:count]


@njit(cache=True, nogil=True)
def _scan_tile(queries, block, l0, q0, q1, radius, best_d, best_j, counts, bi):
    """One query tile x one library block: best match and hit counts."""
    for q in range(q0, q1):
        qv = queries[q]
        # Min only: the cheapest vectorised loop. Hits are rare, so they are
        # counted in a second pass only for a block whose min is in range.
        block_min = NO_MATCH
        for j in range(block.shape[0]):
            block_min = min(block_min, popcount64(qv ^ block[j]))
        if block_min <= radius:
            counts[q, bi] = _hits(qv, block, radius)
        if block_min < best_d[q]:
            best_d[q] = block_min
            for j in range(block.shape[0]):
                if popcount64(qv ^ block[j]) == block_min:
                    best_j[q] = l0 + j
                    break


@njit(cache=True, nogil=True)
def _scan_queries(queries, library, q0, q1, radius, best_d, best_j, counts):
    n = library.shape[0]
    # Library block outermost inside a query chunk: each 16 KiB block is
    # reused by every query of the chunk while it is hot in cache.
    for bi in range((n + LIB_BLOCK - 1) // LIB_BLOCK):
        l0 = bi * LIB_BLOCK
        block = library[l0:l0 + LIB_BLOCK]
        for t0 in range(q0, q1, QUERY_TILE):
            _scan_tile(queries, block, l0, t0, min(t0 + QUERY_TILE, q1),
                       radius, best_d, best_j, counts, bi)


@njit(cache=True, nogil=True)
def _emit_pairs(queries, library, counts, offsets, radius, q0, q1, out_q, out_l, out_d):
    for q in range(q0, q1):
        k = offsets[q]
        qv = queries[q]
        for bi in range(counts.shape[1]):
            if counts[q, bi] == 0:
                continue
            l0 = bi * LIB_BLOCK
            block = library[l0:l0 + LIB_BLOCK]
            for j in range(block.shape[0]):
                d = popcount64(qv ^ block[j])
                if d <= radius:
                    out_q[k] = q
                    out_l[k] = l0 + j
                    out_d[k] = d
                    k += 1


@njit(cache=True, nogil=True)
def _batch_state(m, n):
    """best distance, best index and per-(query, library block) hit counts."""
    nblocks = (n + LIB_BLOCK - 1) // LIB_BLOCK
    return np.full(m, NO_MATCH, np.int64), np.full(m, -1, np.int64), np.zeros((m, nblocks), np.int32)


@njit(cache=True, nogil=True)
def _pair_buffers(counts, want_pairs):
    """Exact-size output arrays: each query's pairs start at offsets[q]."""
    m = counts.shape[0]
    offsets = np.zeros(m + 1, np.int64)
    if want_pairs:
        offsets[1:] = np.cumsum(counts.sum(axis=1))
    total = offsets[m]
    return offsets, np.empty(total, np.int64), np.empty(total, np.int64), np.empty(total, np.uint8)


@njit(cache=True, nogil=True)
def _batch_serial(queries, library, radius, want_pairs):
    m = queries.shape[0]
    best_d, best_j, counts = _batch_state(m, library.shape[0])
    _scan_queries(queries, library, 0, m, radius, best_d, best_j, counts)
    offsets, out_q, out_l, out_d = _pair_buffers(counts, want_pairs)
    if want_pairs:
        _emit_pairs(queries, library, counts, offsets, radius, 0, m, out_q, out_l, out_d)
    return best_j, best_d.astype(np.uint8), out_q, out_l, out_d


SUB_BLOCK = 256     # rows a query keeps its nearest distance over, in the radius search's first pass
EMIT_CHUNK = 64     # rows a sub-block in range is scanned again in, for its pairs
PAIRS_QUERIES = 1024  # queries per round of the radius search (their minima: 1 byte per SUB_BLOCK rows)


@njit(cache=True, nogil=True)
def _sub_minima(queries, sub, r0, r1, minima, col):
    """Each query's nearest distance over the SUB_BLOCK rows ``sub`` (column ``col`` of
    ``minima``, row ``q - r0``): the cheapest loop LLVM vectorises, a min, four queries at
    a time so each row loaded serves four (~15% faster than one at a time on znver4)."""
    r4 = r1 - (r1 - r0) % 4
    for q in range(r0, r4, 4):
        a, b, c, d = queries[q], queries[q + 1], queries[q + 2], queries[q + 3]
        low_a = low_b = low_c = low_d = NO_MATCH
        for j in range(sub.shape[0]):
            row = sub[j]
            low_a = min(low_a, popcount64(a ^ row))
            low_b = min(low_b, popcount64(b ^ row))
            low_c = min(low_c, popcount64(c ^ row))
            low_d = min(low_d, popcount64(d ^ row))
        minima[q - r0, col] = low_a
        minima[q + 1 - r0, col] = low_b
        minima[q + 2 - r0, col] = low_c
        minima[q + 3 - r0, col] = low_d
    for q in range(r4, r1):
        qv = queries[q]
        low = NO_MATCH
        for j in range(sub.shape[0]):
            low = min(low, popcount64(qv ^ sub[j]))
        minima[q - r0, col] = low


@njit(cache=True, nogil=True)
def pairs(queries, library, radius):
    """``(pair_query, pair_library, pair_distance)`` of every (query, library) pair within
    ``radius``, ordered by query then library index, on one thread: the matcher's radius
    search on CPUs with a vectorised popcount. A first pass keeps each query's nearest
    distance per SUB_BLOCK rows; only the EMIT_CHUNK-row chunks of the sub-blocks in range
    are read again, and only those with a hit are walked for their pairs (the best match
    and the per-block recounts of :func:`batch` cost a third of the speed at radius 16)."""
    m, n = queries.shape[0], library.shape[0]
    subs = (n + SUB_BLOCK - 1) // SUB_BLOCK
    size = 1024
    out_q = np.empty(size, np.int64)
    out_l = np.empty(size, np.int64)
    out_d = np.empty(size, np.uint8)
    k = 0
    for r0 in range(0, m, PAIRS_QUERIES):
        r1 = min(r0 + PAIRS_QUERIES, m)
        minima = np.empty((r1 - r0, subs), np.uint8)
        for si in range(subs):  # each sub-block (2 KiB) read by every query of the round from L1
            _sub_minima(queries, library[si * SUB_BLOCK:(si + 1) * SUB_BLOCK], r0, r1, minima, si)
        for q in range(r0, r1):
            qv = queries[q]
            for si in range(subs):
                if minima[q - r0, si] > radius:
                    continue
                s0 = si * SUB_BLOCK
                sub = library[s0:s0 + SUB_BLOCK]
                for c0 in range(0, sub.shape[0], EMIT_CHUNK):
                    chunk = sub[c0:c0 + EMIT_CHUNK]
                    hits = _hits(qv, chunk, radius)
                    if hits == 0:
                        continue
                    if k + hits > size:
                        size = max(size * 2, k + hits)
                        out_q, out_l, out_d = _grown(out_q, k, size), _grown(out_l, k, size), _grown(out_d, k, size)
                    for j in range(chunk.shape[0]):
                        d = popcount64(qv ^ chunk[j])
                        if d <= radius:
                            out_q[k] = q
                            out_l[k] = s0 + c0 + j
                            out_d[k] = d
                            k += 1
    return out_q[:k], out_l[:k], out_d[:k]


@njit(cache=True, nogil=True, parallel=True)
def _batch_parallel(queries, library, radius, want_pairs, chunk):
    m = queries.shape[0]
    best_d, best_j, counts = _batch_state(m, library.shape[0])
    nchunks = (m + chunk - 1) // chunk
    for c in prange(nchunks):
        _scan_queries(queries, library, c * chunk, min(c * chunk + chunk, m),
                      radius, best_d, best_j, counts)
    offsets, out_q, out_l, out_d = _pair_buffers(counts, want_pairs)
    if want_pairs:
        for c in prange(nchunks):
            _emit_pairs(queries, library, counts, offsets, radius, c * chunk,
                        min(c * chunk + chunk, m), out_q, out_l, out_d)
    return best_j, best_d.astype(np.uint8), out_q, out_l, out_d


def batch(queries: np.ndarray, library: np.ndarray, radius: int = -1, *,
          pairs: bool = True, threads: int | None = None):
    """All-pairs search of M queries against N library hashes.

    Returns ``(best_index[M], best_distance[M], pair_query, pair_library,
    pair_distance)``; pairs are every (query, entry) within ``radius``,
    ordered by query then library index. ``radius=-1`` asks for best only.
    ``threads`` None picks one thread for small batches and all cores for
    big ones.
    """
    queries = np.ascontiguousarray(queries, dtype=np.uint64)
    library = np.ascontiguousarray(library, dtype=np.uint64)
    m, n = queries.shape[0], library.shape[0]
    want_pairs = bool(pairs and radius >= 0)
    threads = _threads(m, n, threads)
    if threads <= 1:
        return _batch_serial(queries, library, radius, want_pairs)
    previous = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        chunk = max(QUERY_TILE, (m + 4 * threads - 1) // (4 * threads))
        return _batch_parallel(queries, library, radius, want_pairs, chunk)
    finally:
        numba.set_num_threads(previous)


def _threads(m: int, n: int, threads: int | None) -> int:
    """``threads``, or where None: one for small batches, all cores for big ones."""
    if threads is not None:
        return threads
    return numba.config.NUMBA_NUM_THREADS if m * n >= PARALLEL_MIN_PAIRS and m > 1 else 1


def radius_pairs(queries: np.ndarray, library: np.ndarray, radius: int, *, threads: int | None = None):
    """``(pair_query, pair_library, pair_distance)`` within ``radius``, ordered by query then
    row: :func:`pairs` on one thread, :func:`batch`'s parallel scan on more."""
    queries = np.ascontiguousarray(queries, dtype=np.uint64)
    library = np.ascontiguousarray(library, dtype=np.uint64)
    if _threads(queries.shape[0], library.shape[0], threads) <= 1:
        return pairs(queries, library, radius)  # the radius alone: no best match kept
    _, _, pq, pl, pd = batch(queries, library, radius, threads=threads)
    return pq, pl, pd


def warm_up() -> None:
    """Compile these kernels now (bench/ times them; production never calls them)."""
    lib = np.arange(3, dtype=np.uint64)
    q = np.uint64(1)
    distances(q, lib)
    nearest(q, lib)
    within(q, lib, 4)
    _batch_serial(lib, lib, 4, True)
    _batch_parallel(lib, lib, 4, True, QUERY_TILE)
    pairs(lib, lib, 4)
