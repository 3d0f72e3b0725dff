"""Catalog benchmark: dedupe / group cost on a folder of real images.

    python3 bench/catalog.py ../shared/corpus [--copies 3]

Builds a tree of the corpus plus re-encoded copies (so there are duplicates to find), then
times: fingerprinting (cold cache, then warm cache: the resumable path), the all-pairs
comparison and union-find, and reports images/s and peak memory. The all-pairs cost is
extrapolated to 100,000 images from the measured pair rate.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    from PIL import Image

    from monitor.records.cache import FingerprintCache
    from monitor.search import tiled as kernel
    from monitor.search.matcher import PRESETS
    from monitor.tools.catalog import group_images, load_images
    from monitor.warmup import warm_up

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--copies", type=int, default=3, help="re-encoded copies of every 10th image")
    args = ap.parse_args()
    warm_up(None)
    kernel.warm_up()  # compiled before timing
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "tree"
        shutil.copytree(args.corpus, root / "originals",
                        ignore=shutil.ignore_patterns("*.csv", "*.md", "licenses"))
        for i, p in enumerate(sorted((root / "originals").glob("*.jpg"))):
            if i % 10 == 0:
                with Image.open(p) as img:
                    for c in range(args.copies):
                        out = root / f"copies{c}"
                        out.mkdir(exist_ok=True)
                        img.convert("RGB").resize((img.width * (3 - c) // 4 or 1, img.height * (3 - c) // 4 or 1)) \
                            .save(out / p.name, quality=60 + 10 * c)
        cache = FingerprintCache(Path(tmp) / "cache.sqlite")
        t = time.perf_counter()
        images, bad = load_images([root], cache, progress=False)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        images, bad = load_images([root], cache, progress=False)
        warm = time.perf_counter() - t
        t = time.perf_counter()
        groups = group_images(images, PRESETS["near"], mirrored=False)
        pairs_time = time.perf_counter() - t
        n = len(images)
        pairs = 2 * n * n  # plain and mirrored hashes
        rate = pairs / pairs_time
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{n:,} images ({len(bad)} unreadable), {len(groups):,} duplicate groups")
        print(f"fingerprint, cold cache: {n / cold:,.0f} images/s (2 threads); warm cache: {n / warm:,.0f} images/s")
        print(f"all pairs + verification + union-find: {pairs_time * 1e3:.0f} ms for {pairs:,} comparisons "
              f"({rate / 1e9:.2f} G/s end to end)")
        for look in (False, True):  # `group`: the loose tier, mirrored copies, and the second look
            t = time.perf_counter()
            variants = group_images(images, PRESETS["loose"], mirrored=True, second_look=look)
            print(f"group{' with the second look' if look else ', hashes only'}: {len(variants):,} groups, "
                  f"{sum(len(g.members) - 1 for g in variants):,} pictures beyond one a group, "
                  f"{time.perf_counter() - t:.1f} s")
        big = 100_000
        import numpy as np
        hashes = np.random.default_rng(1).integers(0, 2**64, big, dtype=np.uint64)
        t = time.perf_counter()
        kernel.batch(np.concatenate([hashes, hashes]), hashes, PRESETS["near"][-1].dhash_max)
        kern = time.perf_counter() - t
        print(f"measured at {big:,} random hashes: all-pairs kernel pass (plain + mirrored, "
              f"{2 * big * big:,} comparisons) {kern:.1f} s; fingerprinting projected "
              f"{big / (n / cold) / 60:.1f} min cold, {big / (n / warm):.0f} s with a warm cache; "
              f"peak RSS here {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB "
              f"(was {peak:.0f} MB before the 100k pass)")


if __name__ == "__main__":
    main()
