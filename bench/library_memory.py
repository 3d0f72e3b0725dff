"""RAM per protected image and query cost as the library grows, verification data in RAM
or mapped from a file (the default), each library built in a process of its own.

    python3 bench/library_memory.py IMAGES [--entries 100000,1000000,3000000] [--queries 200]

Any folder of JPEG images will do: the first 300 give the number of index rows a real
entry has (the whole picture and its library views) and the queries (resized and
recompressed, with their query views, as the daemon fingerprints a post). Library rows
are random 64-bit hashes with random fine hashes, each entry having as many rows as a real
one. Printed per library size and mode: resident memory the index adds (VmRSS, after the
load and after the queries), bytes per entry in RAM and mapped, ms per incoming image on
one core (median and p99, one post at a time; and the mean in batches of 8, as the
daemon's match threads take posts under load), candidates (pairs within the radius,
before verification) per image, and the (query, row) pairs the first pass weighs per image
with the rate that makes in batches (all of the matcher's time counted as the scan's: a
lower bound on the scan's own speed).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def one_library(corpus: Path, entries: int, mode: str, queries: int) -> dict:
    """Runs in its own process: build, measure, answer."""
    from PIL import Image

    from monitor.fingerprints import fingerprint_bytes
    from monitor.fingerprints.fasthash import FINE_WORDS
    from monitor.search.first_pass import first_pass
    from monitor.search.index import LibraryIndex
    from monitor.search.matcher import PRESETS, Matcher
    from monitor.warmup import warm_up
    warm_up(None)
    files = sorted(corpus.glob("*.jpg"))[:300]
    per_entry = [1 + len(fingerprint_bytes(f.read_bytes(), views="library").views) for f in files[:100]]

    def repost(path: Path) -> bytes:
        img = Image.open(path).convert("RGB")
        img = img.resize((max(32, img.width // 2), max(32, img.height // 2)))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=70)
        return buf.getvalue()
    fps = [fingerprint_bytes(repost(f), views="query") for f in files[:queries]]
    rng = np.random.default_rng(11)
    counts = rng.choice(per_entry, size=entries)
    rows = int(counts.sum())
    before = rss_bytes()
    with tempfile.TemporaryDirectory(dir=os.environ.get("INDEX_DIR")) as spill:
        index = LibraryIndex(spill_dir=spill if mode == "file" else None)
        ids = np.repeat(np.arange(1, entries + 1), counts)
        dhash = rng.integers(0, 2**64, size=rows, dtype=np.uint64)
        phash = rng.integers(0, 2**64, size=rows, dtype=np.uint64)
        fine = rng.integers(0, 2**64, size=(rows, FINE_WORDS), dtype=np.uint64)
        t = time.perf_counter()
        index.load(ids, {"dhash": dhash, "phash": phash}, fine)
        load_s = time.perf_counter() - t
        del ids, dhash, phash, fine
        after_load = rss_bytes()
        matcher = Matcher(index, PRESETS["near"])
        times, candidates = [], []
        # pairs the first pass weighs per image: each view against every row, its mirror image
        # against the core rows (the scan's work, whatever the radius)
        pairs = statistics.mean((1 + len(fp.views)) * (index.rows + index.core.n) for fp in fps)
        for fp in fps:
            q = np.array([h for v in (fp, *fp.views) for h in (v.dhash, v.dhash_mirror)], np.uint64)
            with index.lock:  # the views against every row, their mirror images against the core rows
                candidates.append(first_pass(index, q, np.arange(q.size) % 2 == 1, matcher.radius)[0].size)
            t = time.perf_counter()
            matcher.match(fp)
            times.append(time.perf_counter() - t)
        t = time.perf_counter()  # as the daemon's match threads take posts under load: 8 at a time
        for i in range(0, len(fps), 8):
            matcher.match_many(fps[i:i + 8])
        batched = (time.perf_counter() - t) / len(fps)
        after_queries = rss_bytes()
        times.sort()
        return {"entries": entries, "rows": rows, "mode": mode, "load_s": load_s,
                "rss_load": after_load - before, "rss_queries": after_queries - before,
                "ram": index.memory_bytes(), "file": index.file_bytes(),
                "ms_median": statistics.median(times) * 1e3, "ms_p99": times[int(0.99 * (len(times) - 1))] * 1e3,
                "candidates": statistics.mean(candidates), "ms_batched": batched * 1e3, "pairs": pairs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--entries", default="100000,1000000,3000000")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_library(args.corpus, int(args.child[0]), args.child[1], args.queries)))
        return
    with open("/proc/cpuinfo") as fh:
        cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "?")
    print(f"CPU: {cpu}; tier near; one core; random library rows, real queries with their views")
    print(f"{'entries':>10} {'rows':>11} {'verification':>12} {'resident after load':>20} {'after queries':>14} "
          f"{'RAM/entry':>10} {'in file/entry':>13} {'ms/image p50':>13} {'p99':>7} {'in 8s':>6} {'candidates':>10} "
          f"{'pairs/image':>11} {'G pairs/s in 8s':>15}")
    for entries in (int(x) for x in args.entries.split(",")):
        for mode in ("memory", "file"):  # in turns at each size
            out = subprocess.run([sys.executable, __file__, str(args.corpus), "--queries", str(args.queries),
                                  "--child", str(entries), mode], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{r['entries']:>10,} {r['rows']:>11,} {r['mode']:>12} "
                  f"{r['rss_load'] / r['entries']:>14.0f} B/img {r['rss_queries'] / r['entries']:>8.0f} B/img "
                  f"{r['ram'] / r['entries']:>8.0f} B {r['file'] / r['entries']:>11.0f} B "
                  f"{r['ms_median']:>13.2f} {r['ms_p99']:>7.2f} {r['ms_batched']:>6.2f} {r['candidates']:>10.1f} "
                  f"{r['pairs'] / 1e6:>10.1f}M {r['pairs'] / r['ms_batched'] / 1e6:>15.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
