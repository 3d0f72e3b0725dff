"""Kernels against a plain numpy reference (hypothesis property tests)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from monitor.search import tiled as kernel

u64 = st.integers(0, 2**64 - 1)
libs = arrays(np.uint64, st.integers(0, 300), elements=u64)
radii = st.one_of(st.sampled_from([0, 64]), st.integers(0, 64))


def ref_dist(q, lib):
    return np.bitwise_count(np.asarray(lib, np.uint64) ^ np.uint64(q)).astype(np.int64)


@settings(max_examples=200, deadline=None)
@given(q=u64, lib=libs)
def test_nearest(q, lib):
    j, d = kernel.nearest(np.uint64(q), lib)
    if lib.size == 0:
        assert (j, d) == (-1, kernel.NO_MATCH)
        return
    ref = ref_dist(q, lib)
    assert d == ref.min()
    assert j == int(np.argmin(ref))  # first index among ties


@settings(max_examples=200, deadline=None)
@given(q=u64, lib=libs, radius=radii)
def test_within(q, lib, radius):
    idx, dist = kernel.within(np.uint64(q), lib, radius)
    ref = ref_dist(q, lib)
    want = np.flatnonzero(ref <= radius)
    assert idx.tolist() == want.tolist()
    assert dist.tolist() == ref[want].tolist()


@settings(max_examples=200, deadline=None)
@given(q=u64, lib=libs)
def test_distances(q, lib):
    assert kernel.distances(np.uint64(q), lib).tolist() == ref_dist(q, lib).tolist()


@settings(max_examples=120, deadline=None)
@given(queries=arrays(np.uint64, st.integers(0, 40), elements=u64), lib=libs, radius=radii,
       threads=st.sampled_from([1, 2]))
def test_batch_matches_reference(queries, lib, radius, threads):
    # Plant near copies so small radii have hits too.
    if lib.size and queries.size:
        queries = queries.copy()
        queries[::2] = lib[np.arange(0, queries.size, 2) % lib.size] ^ np.uint64(5)
    best_j, best_d, pq, pl, pd = kernel.batch(queries, lib, radius, threads=threads)
    ref = np.bitwise_count(queries[:, None] ^ lib[None, :]).astype(np.int64).reshape(
        queries.size, lib.size)
    if lib.size == 0:
        assert best_j.tolist() == [-1] * queries.size
        assert best_d.tolist() == [kernel.NO_MATCH] * queries.size
    else:
        assert best_d.tolist() == ref.min(axis=1).tolist()
        assert best_j.tolist() == ref.argmin(axis=1).tolist()
    qi, li = np.nonzero(ref <= radius)
    assert pq.tolist() == qi.tolist()
    assert pl.tolist() == li.tolist()
    assert pd.tolist() == ref[qi, li].tolist()


def test_batch_spans_many_library_blocks_and_threads():
    rng = np.random.default_rng(7)
    lib = rng.integers(0, 2**64, size=3 * kernel.LIB_BLOCK + 17, dtype=np.uint64)
    queries = lib[rng.integers(0, lib.size, 300)] ^ np.uint64(3)
    for threads in (1, 2):
        _best_j, best_d, pq, pl, _pd = kernel.batch(queries, lib, 8, threads=threads)
        ref = np.bitwise_count(queries[:, None] ^ lib[None, :]).astype(np.int64)
        assert best_d.tolist() == ref.min(axis=1).tolist()
        qi, li = np.nonzero(ref <= 8)
        assert (pq.tolist(), pl.tolist()) == (qi.tolist(), li.tolist())


def test_best_only_skips_pairs():
    lib = np.arange(100, dtype=np.uint64)
    _best_j, best_d, pq, _pl, _pd = kernel.batch(lib[:5], lib, -1)
    assert best_d.tolist() == [0] * 5 and pq.size == 0


@settings(max_examples=150, deadline=None)
@given(queries=arrays(np.uint64, st.integers(0, 40), elements=u64),
       lib=arrays(np.uint64, st.integers(0, 1500), elements=u64), radius=radii,
       threads=st.sampled_from([1, 2]))
def test_bitsliced_pairs_match_reference(queries, lib, radius, threads):
    from monitor.search import bitslice
    if lib.size and queries.size:  # near copies, so small radii have hits too
        queries = queries.copy()
        queries[::2] = lib[np.arange(0, queries.size, 2) % lib.size] ^ np.uint64(5)
    pq, pl, pd = bitslice.pairs_within(queries, lib, radius, threads=threads)
    ref = np.bitwise_count(queries[:, None] ^ lib[None, :]).astype(np.int64).reshape(
        queries.size, lib.size)
    qi, li = np.nonzero(ref <= radius)
    assert pq.tolist() == qi.tolist()
    assert pl.tolist() == li.tolist()
    assert pd.tolist() == ref[qi, li].tolist()


def test_bitsliced_planes_hold_every_bit_and_many_hits_grow_the_buffers():
    from monitor.search import bitslice
    rng = np.random.default_rng(11)
    lib = rng.integers(0, 2**64, size=5 * bitslice.BLOCK + 77, dtype=np.uint64)
    planes = bitslice.to_planes(lib).reshape(-1, 64, bitslice.WORDS)
    e = 3 * bitslice.BLOCK + 200  # block 3, word 3, lane 8
    bits = [(int(planes[3, i, 3]) >> 8) & 1 for i in range(64)]
    assert int("".join(map(str, reversed(bits))), 2) == int(lib[e])
    # Radius 40 gives hundreds of hits per query: the output buffers grow several times,
    # and two threads' parts merge back into (query, entry) order.
    queries = lib[:5] ^ np.uint64(1)
    ref = np.bitwise_count(queries[:, None] ^ lib[None, :]).astype(np.int64)
    qi, li = np.nonzero(ref <= 40)
    for threads in (1, 2):
        pq, pl, pd = bitslice.pairs_within(queries, lib, 40, threads=threads)
        assert pq.size > 1000
        assert (pq.tolist(), pl.tolist(), pd.tolist()) == (qi.tolist(), li.tolist(), ref[qi, li].tolist())


@settings(max_examples=120, deadline=None)
@given(queries=arrays(np.uint64, st.integers(0, 30), elements=u64),
       lib=arrays(np.uint64, st.integers(0, 1200), elements=u64),
       radius=st.one_of(st.just(0), st.just(64), radii), name=st.sampled_from(["bitsliced", "tiled"]))
def test_both_radius_kernels_find_the_reference_pairs(queries, lib, radius, name):
    """The matcher's radius search on either kernel, whichever the CPU would choose: the
    same pairs as numpy, in (query, row) order; empty library, one row, radius 0 and 64."""
    from monitor.search import radius as radius_search
    if lib.size and queries.size:
        queries = queries.copy()
        queries[::2] = lib[np.arange(0, queries.size, 2) % lib.size] ^ np.uint64(3)
    pq, pl, pd = radius_search.pairs_within(queries, lib, radius, threads=1, kernel=name)
    ref = np.bitwise_count(queries[:, None] ^ lib[None, :]).astype(np.int64).reshape(queries.size, lib.size)
    qi, li = np.nonzero(ref <= radius)
    assert (pq.tolist(), pl.tolist(), pd.tolist()) == (qi.tolist(), li.tolist(), ref[qi, li].tolist())


@pytest.mark.slow  # ~1-2 s: the fast tier keeps under its minute
def test_the_tiled_radius_search_crosses_its_rounds_blocks_and_sub_blocks():
    """tiled.pairs in more queries than one round (PAIRS_QUERIES) and rows than one block,
    the last sub-block short, dense and sparse radii: numpy's pairs, and the parallel path's."""
    from monitor.search import radius as radius_search
    from monitor.search import tiled
    rng = np.random.default_rng(17)
    lib = rng.integers(0, 2**64, tiled.LIB_BLOCK + 3 * tiled.SUB_BLOCK + 5, dtype=np.uint64)
    queries = rng.integers(0, 2**64, tiled.PAIRS_QUERIES + 77, dtype=np.uint64)
    queries[::3] = lib[rng.integers(0, lib.size, queries[::3].size)] ^ np.uint64(0b1011)
    ref = np.bitwise_count(queries[:, None] ^ lib[None, :]).astype(np.int64)
    for radius in (0, 3, 16, 24, 64):
        qi, li = np.nonzero(ref <= radius)
        want = (qi.tolist(), li.tolist(), ref[qi, li].tolist())
        assert tuple(a.tolist() for a in tiled.pairs(queries, lib, radius)) == want, radius
        both = radius_search.pairs_within(queries, lib, radius, threads=2, kernel="tiled")
        assert tuple(a.tolist() for a in both) == want, radius


def test_the_kernel_is_chosen_for_the_cpu_and_can_be_forced(monkeypatch):
    from monitor.search import radius as radius_search
    monkeypatch.delenv(radius_search.ENV, raising=False)
    auto = radius_search.choose("auto")
    assert auto == ("tiled" if "avx512vpopcntdq" in radius_search.host_features() else "bitsliced")
    assert radius_search.choose("tiled") == "tiled" and radius_search.choose("bitsliced") == "bitsliced"
    monkeypatch.setenv(radius_search.ENV, "tiled")
    assert radius_search.choose("bitsliced") == "tiled"  # the environment wins
    monkeypatch.setenv(radius_search.ENV, "fastest")
    with pytest.raises(ValueError):
        radius_search.choose("auto")
    # a single library row and the empty library, on both
    one = np.array([7], np.uint64)
    for name in radius_search.KERNELS:
        assert [a.tolist() for a in radius_search.pairs_within(one, one, 0, kernel=name, threads=1)] == \
            [[0], [0], [0]]
        assert all(a.size == 0 for a in radius_search.pairs_within(one, np.empty(0, np.uint64), 64,
                                                                   kernel=name, threads=1))
