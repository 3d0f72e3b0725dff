"""Capacity: one library split over 1, 2 and 4 shards, as the shard roles load it.

    python3 bench/shards.py IMAGES [--entries 2000000] [--views 3]

Any folder of JPEG images will do. The library holds the fingerprints of 200 of the
pictures (with their views and fine hashes) and ``--entries`` random entries with
``--views`` extra views each (what a real entry carries), in a SQLite store. Queries: the
200 pictures reposted (resized, recompressed) and 200 others. For each split, every shard
loads its part (Library(store, shard=(k, S))) and matches every query, as the shard role
does. Printed per split: entries and rows per shard, array memory per shard, the first
load (from the rows, writing the shard's snapshot) and a later one (from it), match time
per query per shard (median) one at a time and in batches of 32 (``match_many``, what
the shard role does with a backlog), and whether the union of the shards' matches, both
ways, is the unsplit library's match set.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--entries", type=int, default=2_000_000)
    ap.add_argument("--views", type=int, default=3)
    args = ap.parse_args()
    from PIL import Image

    from monitor.fingerprints import ALGORITHM_VERSION, fingerprint_bytes
    from monitor.records.library import Library
    from monitor.records.store import Store
    from monitor.search.matcher import PRESETS, Matcher
    from monitor.warmup import warm_up
    warm_up(lambda text: print(text, file=sys.stderr))
    files = sorted(args.corpus.glob("*.jpg"))[:400]

    def jpeg(path: Path, scale: float, quality: int) -> bytes:
        img = Image.open(path).convert("RGB")
        img = img.resize((max(32, int(img.width * scale)), max(32, int(img.height * scale))))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        return buf.getvalue()
    queries = [fingerprint_bytes(jpeg(f, 0.5, 70), views="query") for f in files]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "lib.sqlite")
        store = Store(path)
        lib = Library(store)
        for i, f in enumerate(files[:200]):
            lib.add_fingerprint(f"corpus/{i}", fingerprint_bytes(f.read_bytes()))
        rng = np.random.default_rng(7)
        t = time.perf_counter()
        chunk = 200_000
        for start in range(0, args.entries, chunk):
            n = min(chunk, args.entries - start)
            hashes = rng.integers(-(2**63), 2**63 - 1, size=(n, 4), dtype=np.int64)
            views = rng.integers(0, 2**64, size=(n, args.views * 4), dtype=np.uint64).astype("<u8")
            with store.transaction() as conn:
                conn.executemany(
                    "INSERT INTO library_entries (source, label, width, height, dhash, phash, dhash_mirror, "
                    "phash_mirror, degenerate, added_at, views, algorithm) VALUES (?,?,?,?,?,?,?,?,NULL,0,?,?)",
                    ((f"random/{start + i}", "random", 1024, 768, *map(int, hashes[i]), views[i].tobytes(),
                      ALGORITHM_VERSION) for i in range(n)))
        print(f"library: {args.entries + 200:,} entries ({args.views} extra views each) written in "
              f"{time.perf_counter() - t:.0f} s")
        store.close()
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "?")
        print(f"CPU: {cpu}; match tier near; {len(queries)} queries (200 reposts of entries, 200 others)")
        reference = None
        for shards in (1, 2, 4):
            found: set = set()
            batched: set = set()
            rows, memory, loads, reloads, times, batch_times = [], [], [], [], [], []
            for k in range(shards):
                s = Store(path)
                t = time.perf_counter()
                part = Library(s, shard=None if shards == 1 else (k, shards))
                loads.append(time.perf_counter() - t)
                t = time.perf_counter()
                Library(s, shard=None if shards == 1 else (k, shards))  # a later start: its own snapshot
                reloads.append(time.perf_counter() - t)
                matcher = Matcher(part.index, PRESETS["near"])
                matcher.match(queries[0])
                per = []
                for q_i, q in enumerate(queries):
                    t = time.perf_counter()
                    got = matcher.match(q)
                    per.append(time.perf_counter() - t)
                    found |= {(q_i, m.entry_id, m.tier) for m in got}
                times.append(statistics.median(per))
                t = time.perf_counter()
                for b in range(0, len(queries), 32):
                    for q_i, got in enumerate(matcher.match_many(queries[b:b + 32]), start=b):
                        batched |= {(q_i, m.entry_id, m.tier) for m in got}
                batch_times.append((time.perf_counter() - t) / len(queries))
                rows.append(part.index.rows)
                memory.append(part.index.memory_bytes())
                del part, matcher
                s.close()
            same = "reference" if reference is None else ("identical" if found == reference else
                                                         f"DIFFERENT ({len(found ^ reference)} pairs)")
            reference = reference if reference is not None else found
            print(f"{shards} shard(s): rows per shard {min(rows):,}-{max(rows):,}; arrays per shard "
                  f"{max(memory) / 1e6:.0f} MB ({max(memory) / ((args.entries + 200) / shards):.0f} B/entry); "
                  f"first load {max(loads):.1f} s, later {max(reloads):.1f} s; "
                  f"match per query per shard {statistics.median(times) * 1e3:.2f} ms one at a time, "
                  f"{statistics.median(batch_times) * 1e3:.2f} ms in batches of 32 "
                  f"({statistics.median(times) / statistics.median(batch_times):.1f}x); "
                  f"{len(found)} matches: {same}{'' if batched == found else ' (BATCHED DIFFER)'}")


if __name__ == "__main__":
    main()
