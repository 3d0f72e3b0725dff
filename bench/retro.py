"""Retroactive matching per library change: the window's images read from the store each
time against their dHashes held in memory (monitor/search/recent.py), in turns.

    python3 bench/retro.py IMAGES [--images 300000] [--turns 2]

Any folder of JPEG images will do: up to 300 of them are fingerprinted as posts are (their
views), and each stored image takes one of those fingerprints with fresh random dHashes
(plain, mirrored, each view's), spread over 69 hours in recorded batches of 100, in a
throwaway SQLite store. The library is the demo's six pictures; each pass matches one new
entry. Printed per turn: the pass reading the store (``retro_memory_mb = 0``), the first
pass holding the window (it reads it all), and a later pass (it reads what is new: here,
nothing), with the memory held and how many images the test in memory left to be read
whole. Random dHashes meet a new entry less often than real pictures do: on 3,000 of
corpus-large's, 0.16% of the images met one of 200 entries on average (0.07% median, 2.7%
the most), against 8.8% for the dHashes alone: each such image costs ~50 us more.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from monitor.fingerprints import fingerprint_bytes  # noqa: E402
from monitor.metrics import Metrics  # noqa: E402
from monitor.pipeline.recorder import Recorder  # noqa: E402
from monitor.pipeline.retro import RECENT_BYTES, LibraryWatcher  # noqa: E402
from monitor.records import work as work_rows  # noqa: E402
from monitor.records.engines import open_store  # noqa: E402
from monitor.records.library import Library  # noqa: E402
from monitor.scan import add_files  # noqa: E402
from monitor.search.matcher import Matcher  # noqa: E402

DEMO = Path(__file__).resolve().parent.parent / "monitor" / "demo_images"


def fill(store, images: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    base = [fingerprint_bytes(p.read_bytes(), views="query") for p in sorted(images.glob("*.jpg"))[:300]]
    start = time.time() - 70 * 3600
    for first in range(0, n, 10_000):
        rows = []
        for i in range(first, min(n, first + 10_000)):
            fp = base[i % len(base)]
            r = rng.integers(0, 2**64 - 1, size=2 + 2 * len(fp.views), dtype=np.uint64).tolist()
            rows.append((f"http://feed.example/{i}.jpg", dataclasses.replace(
                fp, dhash=r[0], dhash_mirror=r[1], views=tuple(
                    dataclasses.replace(v, dhash=r[2 + 2 * k], dhash_mirror=r[3 + 2 * k])
                    for k, v in enumerate(fp.views)))))
        with store.transaction() as conn:
            for j in range(0, len(rows), 100):  # a recorded batch shares its time
                work_rows.images_ok(conn, rows[j:j + 100], start + (first + j) * (69 * 3600 / n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", type=Path)
    ap.add_argument("--images", dest="count", type=int, default=300_000)
    ap.add_argument("--turns", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        library = Library(open_store(os.path.join(tmp, "retro.sqlite")))
        fill(library.store, args.images, args.count)
        add_files(library, sorted(DEMO.glob("library-*.jpg")), progress=False)
        ids = [e.id for e in library.entries()]
        metrics = Metrics()

        def watcher(bound: int) -> LibraryWatcher:
            return LibraryWatcher(library.store, library, Matcher(library.index),
                                  Recorder(library.store, library, metrics), metrics, recent_bytes=bound)

        whole = []  # images read whole by a held pass: those its test in memory left
        fetched_at = work_rows.images_fetched_at

        def counted(*args):
            found = fetched_at(*args)
            whole.append(len(found))
            return found
        work_rows.images_fetched_at = counted

        def timed(w: LibraryWatcher, entry: int) -> float:
            whole.clear()
            start = time.perf_counter()
            w._retro_pairs(None, [entry])
            return time.perf_counter() - start
        print(f"{args.count:,} recent images, one new entry a pass:", flush=True)
        for turn in range(args.turns):
            read = timed(watcher(0), ids[turn % len(ids)])
            held = watcher(RECENT_BYTES)
            first = timed(held, ids[turn % len(ids)])
            later = timed(held, ids[(turn + 1) % len(ids)])
            print(f"  turn {turn + 1}: read from the store {read:.2f} s; held: first pass {first:.2f} s, later "
                  f"{later:.2f} s ({read / later:.1f}x faster; {sum(whole):,} images read whole), "
                  f"{held.recent.images:,} images in {held.recent.nbytes / 2**20:.1f} MB", flush=True)
        library.store.close()


if __name__ == "__main__":
    main()
