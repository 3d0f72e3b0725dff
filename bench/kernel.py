"""Kernel benchmark: our numba kernels vs numpy and faiss IndexBinaryFlat, in one process.

Workloads (issue #2): 1 x N for N = 1e6 and 1e7; M x N for 2,488 x 8,742 (the seed's) and
10,000 x 1,000,000, with the tiled kernel (best match and pairs) and the bit-sliced radius
search (pairs only, what `match` uses). Each runs idle and again with the other core kept busy by a spinning
process. Also measures this machine's single-thread memory read bandwidth.

    python3 bench/kernel.py [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

import numpy as np
from numba import njit

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from monitor.search import bitslice, radius  # noqa: E402
from monitor.search import tiled as kernel  # noqa: E402
from monitor.warmup import warm_up  # noqa: E402

try:
    import faiss
except ImportError:  # pragma: no cover - benchmark-only dependency
    faiss = None


@njit(cache=True)
def _read_all(a):
    s = np.uint64(0)
    for i in range(a.shape[0]):
        s ^= a[i]
    return s


def best_of(fn, repeat=5):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def spin(stop):
    while not stop.is_set():
        pass


def numpy_batch(q, lib, radius, chunk=64):
    best = np.empty(q.size, np.int64)
    pairs = 0
    for s in range(0, q.size, chunk):
        d = np.bitwise_count(q[s:s + chunk, None] ^ lib[None, :])
        best[s:s + chunk] = d.min(axis=1)
        pairs += int((d <= radius).sum())
    return best, pairs


def faiss_index(lib):
    index = faiss.IndexBinaryFlat(64)
    index.add(lib.view(np.uint8).reshape(-1, 8))
    return index


def run(quick: bool, loaded: bool) -> None:
    rng = np.random.default_rng(1)
    tag = "loaded" if loaded else "idle"
    faiss.omp_set_num_threads(1) if faiss else None
    sizes = [10**6] if quick else [10**6, 10**7]
    for n in sizes:
        lib = rng.integers(0, 2**64, n, dtype=np.uint64)
        q = lib[n // 2] ^ np.uint64(0b1011)
        bw = 8 * n / best_of(lambda: _read_all(lib))
        t_ours = best_of(lambda: kernel.nearest(q, lib))
        t_np = best_of(lambda: np.bitwise_count(lib ^ q).argmin(), 3)
        planes, qs = bitslice.to_planes(lib), np.array([q], np.uint64)
        t_bs = best_of(lambda: bitslice.pairs_within(qs, lib, 10, planes=planes, threads=1))
        line = (f"[{tag}] 1 x {n:>10,}: ours nearest {t_ours * 1e3:7.2f} ms = {8 * n / t_ours / 1e9:5.2f} GB/s "
                f"({8 * n / t_ours / bw:4.0%} of read bandwidth {bw / 1e9:.2f} GB/s), bit-sliced within 10 "
                f"{t_bs * 1e3:7.2f} ms ({8 * n / t_bs / bw:4.0%}); "
                f"numpy {t_np * 1e3:7.2f} ms ({t_np / t_ours:4.1f}x)")
        if faiss:
            index = faiss_index(lib)
            qb = np.array([q]).view(np.uint8).reshape(1, 8)
            t_f = best_of(lambda: index.search(qb, 1), 3)
            line += f"; faiss {t_f * 1e3:7.2f} ms ({t_f / t_ours:4.1f}x)"
        print(line, flush=True)
    workloads = [(2488, 8742)] if quick else [(2488, 8742), (10_000, 1_000_000)]
    for m, n in workloads:
        lib = rng.integers(0, 2**64, n, dtype=np.uint64)
        qs = lib[rng.integers(0, n, m)] ^ np.uint64(0b111)
        pairs = m * n
        planes = bitslice.to_planes(lib)
        t_planes = best_of(lambda: bitslice.to_planes(lib), 3 if pairs < 1e9 else 1)
        for threads in (1, 2):
            t_ours = best_of(lambda: kernel.batch(qs, lib, 10, threads=threads),
                             3 if pairs < 1e9 else 1)
            t_bs = best_of(lambda: bitslice.pairs_within(qs, lib, 10, planes=planes, threads=threads),
                           3 if pairs < 1e9 else 1)
            print(f"[{tag}] {m:,} x {n:,} threads={threads}: ours (best + pairs <= 10) "
                  f"{t_ours * 1e3:9.2f} ms = {pairs / t_ours / 1e9:5.2f} G pairs/s | bit-sliced pairs "
                  f"<= 10 {t_bs * 1e3:9.2f} ms = {pairs / t_bs / 1e9:5.2f} G pairs/s (+ {t_planes * 1e3:.1f} "
                  f"ms to build the planes: {(t_bs + t_planes) * 1e3:.2f} ms)", flush=True)
        # Peers on one thread; for the big workload on a query sample, scaled up.
        sample = qs if pairs < 1e9 else qs[:200]
        scale = m / sample.size
        t_np = best_of(lambda: numpy_batch(sample, lib, 10), 1) * scale
        line = f"[{tag}] {m:,} x {n:,} peers (1 thread): numpy {t_np * 1e3:9.1f} ms " \
               f"({t_np / t_ours:5.1f}x ours@2)"
        if faiss:
            index = faiss_index(lib)
            qb = sample.view(np.uint8).reshape(-1, 8)
            t_f = best_of(lambda: index.search(qb, 1), 1) * scale
            t_1 = best_of(lambda: kernel.batch(qs, lib, 10, threads=1), 1)
            t_b1 = best_of(lambda: bitslice.pairs_within(qs, lib, 10, threads=1), 1)  # planes included
            line += (f"; faiss IndexBinaryFlat k=1 {t_f * 1e3:9.1f} ms ({t_f / t_1:5.1f}x the tiled kernel, "
                     f"{t_f / t_b1:5.1f}x the bit-sliced search, each on 1 thread)")
        if sample.size != m:
            line += f" [peers timed on {sample.size} queries, scaled x{scale:.0f}]"
        print(line, flush=True)


def radius_kernels(quick: bool) -> None:
    """The matcher's radius search on both kernels, one thread, radius 16, timed in turns,
    and the one this CPU gets (issue #17's workload: 10,000 x 1,000,000)."""
    rng = np.random.default_rng(2)
    m, n = (1_000, 1_000_000) if quick else (10_000, 1_000_000)
    lib = rng.integers(0, 2**64, n, dtype=np.uint64)
    qs = lib[rng.integers(0, n, m)] ^ np.uint64(0b111)
    planes = bitslice.to_planes(lib)
    best = {name: float("inf") for name in radius.KERNELS}
    for _ in range(3):  # in turns: the VM's speed drifts
        for name in radius.KERNELS:
            t = time.perf_counter()
            radius.pairs_within(qs, lib, 16, planes=planes, threads=1, kernel=name)
            best[name] = min(best[name], time.perf_counter() - t)
    rates = {name: m * n / t / 1e9 for name, t in best.items()}
    avx = "with" if "avx512vpopcntdq" in radius.host_features() else "without"
    print(f"radius search, {m:,} x {n:,} within 16 bits, 1 thread, CPU {radius.host_cpu()} ({avx} AVX-512 "
          f"VPOPCNTDQ): bit-sliced {rates['bitsliced']:.2f} G pairs/s, tiled {rates['tiled']:.2f} G pairs/s "
          f"(tiled/bit-sliced {best['bitsliced'] / best['tiled']:.2f}x); chosen here: {radius.choose()}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small workloads only")
    args = ap.parse_args()
    kernel.warm_up()
    warm_up(None)
    print(f"cores: {os.cpu_count()}, faiss: {'yes' if faiss else 'not installed'}")
    radius_kernels(args.quick)
    run(args.quick, loaded=False)
    stop = mp.Event()
    hog = mp.Process(target=spin, args=(stop,), daemon=True)
    hog.start()
    try:
        run(args.quick, loaded=True)
    finally:
        stop.set()
        hog.join()


if __name__ == "__main__":
    main()
