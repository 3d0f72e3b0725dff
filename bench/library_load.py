"""Library load benchmark: N entries from SQLite into the kernel's arrays.

    python3 bench/library_load.py [--entries 1000000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from monitor.records.library import Library  # noqa: E402
from monitor.records.store import Store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    args = ap.parse_args()
    n = args.entries
    rng = np.random.default_rng(3)
    hashes = rng.integers(-(2**63), 2**63 - 1, size=(n, 4), dtype=np.int64)
    # Every real entry also carries ~3 extra views (centre crops, content box), 32 bytes each.
    views = rng.integers(0, 2**64, size=(n, 3 * 4), dtype=np.uint64).astype("<u8")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lib.sqlite")
        store = Store(path)
        t = time.perf_counter()
        with store.transaction() as conn:
            conn.executemany(
                "INSERT INTO library_entries (source, label, width, height, dhash, phash, "
                "dhash_mirror, phash_mirror, degenerate, added_at, views) VALUES (?,?,?,?,?,?,?,?,NULL,?,?)",
                ((f"/photos/{i:07d}.jpg", "bench", 1024, 768, *map(int, hashes[i]), 1.7e9, views[i].tobytes())
                 for i in range(n)))
        print(f"wrote {n:,} entries in {time.perf_counter() - t:.1f}s "
              f"({os.path.getsize(path) / n:.0f} bytes/entry on disk)")
        store.close()
        t = time.perf_counter()
        lib = Library(Store(path))
        elapsed = time.perf_counter() - t
        assert len(lib.index) == n and lib.index.rows == 4 * n
        assert lib.index.hashes("dhash")[5] == hashes[5:6, 0].view(np.uint64)[0]
        print(f"first load (rows, then a snapshot written): {n:,} entries ({lib.index.rows:,} rows with "
              f"their views) in {elapsed:.2f}s; {lib.index.rows * 24 / 1e6:.0f} MB of arrays")
        t = time.perf_counter()
        again = Library(Store(path))
        elapsed = time.perf_counter() - t
        assert again.index.rows == lib.index.rows
        print(f"every later load (from the snapshot): {n:,} entries into the arrays in {elapsed:.2f}s "
              f"(target < 2 s)")
        t = time.perf_counter()
        for _ in range(1000):
            lib.index.remove(int(lib.index.ids[-1]))  # all rows of the entry
        print(f"1,000 incremental removes in {(time.perf_counter() - t) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
