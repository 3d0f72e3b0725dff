"""False alarms at the scale of real libraries: every image of one or more folders of
unrelated pictures against all the others, through the shipped matcher.

    python3 bench/false_alarms.py ../shared/corpus-large [../shared/corpus] [--limit N]

Any folders of distinct pictures will do (near-duplicates inside them count as false
pairs: the pairs found are printed for review). Every picture is a library entry (with its
library views) and, in turn, an incoming image (with its query views) matched against all
the other entries: n x (n - 1) unrelated pairs. Printed per tier: false pairs, pair
false-positive rate (with its 95% upper bound when few or none are seen), the share of
pictures that would alarm against this library, and that share projected to libraries of
100,000 and 1,000,000 entries from the pair rate; then the same for the pairs across sources
only. A picture's source is its file name's first word (up to the first "-" or "_"; in
shared/corpus-large and shared/corpus, the Debian package's project: `nexuiz`, `0ad`,
`wesnoth`): pictures of one game share textures and their variants, so pairs inside one
source hold derivatives, while pairs across sources are unrelated by construction, not by
our matcher's say. `--pairs FILE` writes every false pair to
a CSV for review. Looked at side by side (one picture's derivatives, or different pictures):
`bench/cross_source_review.csv`, every near pair across sources; `bench/within_source_review.csv`,
24 near pairs inside one source drawn at random; `bench/false_alarm_review.csv`, 48 near pairs
of an earlier version (before unsure matches were confirmed by keypoints).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from monitor.tools.calibrate import upper_95  # noqa: E402  (the one the calibrate command reports)


def fingerprints(files: list[Path], views: str, keypoints: bool) -> list:
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        return list(pool.map(_fp, [(f, views, keypoints) for f in files], chunksize=32))


def source_of(path: Path) -> str:
    return re.split(r"[-_]", path.name, maxsplit=1)[0]


def _fp(args):
    from monitor import fingerprint_bytes
    path, views, keypoints = args
    return fingerprint_bytes(path.read_bytes(), views=views, keypoints=keypoints)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", type=Path, nargs="+")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N pictures of each folder")
    ap.add_argument("--halves", action="store_true", help="every other picture is a library entry, the rest "
                    "come in: no picture meets its own entry, so each gets the second look (keypoints) "
                    "that a post no tier met gets")
    ap.add_argument("--no-keypoints", action="store_true", help="the hashes alone: no second look at the "
                    "nearest entries' keypoints ([match] keypoints = false)")
    ap.add_argument("--pairs", type=Path, help="write every false pair of every tier to this CSV, for review")
    ap.add_argument("--tiers", default="exact,near,loose", help="the tiers to measure, comma-separated")
    args = ap.parse_args()
    from monitor.fingerprints import KeypointFinder
    from monitor.search.index import LibraryIndex
    from monitor.search.matcher import PRESETS, Matcher
    from monitor.warmup import warm_up
    warm_up(lambda text: print(text, file=sys.stderr))
    files = []
    for folder in args.folders:
        found = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
        files += found[:args.limit] if args.limit else found
    t = time.perf_counter()
    library = fingerprints(files, "library", True)
    incoming = fingerprints(files, "query", False)
    # keypoints found only for a post that needs them, its mirror image's too: the daemon's way
    found_later = None if args.no_keypoints else [KeypointFinder(f.read_bytes) for f in files]
    print(f"{len(files):,} pictures from {', '.join(map(str, args.folders))}: fingerprinted "
          f"(library and query views) in {time.perf_counter() - t:.0f} s")
    index = LibraryIndex()
    skipped = 0
    low = set()
    entry_ids: list[int] = []
    for i, fp in enumerate(library):
        if args.halves and i % 2:
            continue
        if fp.degenerate in (None, "low_detail"):  # low detail: indexed, matched near-identically only
            index.add(i, fp)
            entry_ids.append(i)
            if fp.degenerate:
                low.add(i)
        else:
            skipped += 1
    entries = len(index)
    queries = [i for i, fp in enumerate(incoming) if fp.degenerate in (None, "low_detail")
               and not (args.halves and i % 2 == 0)]
    pairs = len(queries) * (entries - (0 if args.halves else 1))
    sources = [source_of(f) for f in files]
    by_source = Counter(sources[i] for i in queries)
    entry_sources = Counter(sources[i] for i in entry_ids)
    cross = sum(n * (len(entry_ids) - entry_sources[s]) for s, n in by_source.items())
    print(f"library: {entries:,} entries ({index.rows:,} rows; {len(low)} low-detail, weakly protected; "
          f"{skipped} flat or tiny left out); "
          f"{len(queries):,} incoming pictures; {pairs:,} unrelated pairs")
    rows = []
    for tier in args.tiers.split(","):
        matcher = Matcher(index, PRESETS[tier])
        t = time.perf_counter()
        found = matcher.match_many([incoming[i] for i in queries],
                                   None if found_later is None else [found_later[i] for i in queries])
        spent = time.perf_counter() - t
        false = [(queries[k], m) for k, ms in enumerate(found) for m in ms if m.entry_id != queries[k]]
        alarming = len({q for q, _ in false})
        rate = len(false) / pairs
        bound = upper_95(len(false), pairs)
        proj = [1 - (1 - rate) ** n for n in (100_000, 1_000_000)]
        low_pairs = sum(1 for q, m in false if q in low or m.entry_id in low)
        print(f"up to {tier:5s}: {len(false)} false pairs ({low_pairs} with a low-detail side); "
              f"pair FPR {rate:.2e} (95% upper bound {bound:.1e}); "
              f"pictures alarming {alarming / len(queries):.2%}; projected at 100k / 1M entries "
              f"{proj[0]:.1%} / {proj[1]:.1%}; {spent / len(queries) * 1e3:.2f} ms per picture")
        apart = [(q, m) for q, m in false if sources[q] != sources[m.entry_id]]
        confirmed = sum(1 for _, m in false if m.inliers is not None)
        print(f"    across sources: {len(apart)} false pairs of {cross:,} (pair FPR {len(apart) / cross:.2e}, "
              f"95% upper bound {upper_95(len(apart), cross):.1e}); by keypoints (confirmed or second look) "
              f"{confirmed} of all {len(false)}")
        for q, m in apart[:30]:
            print(f"      {files[q].name} -> {files[m.entry_id].name} ({m.tier} by {m.decided_by}, "
                  f"score {_score(m)}, inliers {m.inliers})")
        rows += [(tier, files[q], files[m.entry_id], m) for q, m in false]
        if tier == "near":
            scores = np.array([_score(m) for _, m in false])
            print("    false pairs by score (dHash + pHash + fine; exact pairs count 0-10 + fine): " + ", ".join(
                f"<= {t}: {int((scores <= t).sum())}" for t in (40, 60, 80, 100, 120, 139)))
            for q, m in false[:20]:
                print(f"    {files[q].name} -> {files[m.entry_id].name} ({m.tier} by {m.decided_by}: "
                      f"dHash {m.dhash_distance}, pHash {m.phash_distance}, fine {m.fine_distance}, "
                      f"inliers {m.inliers})")
    if args.pairs:
        import csv
        with args.pairs.open("w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["up_to_tier", "incoming", "entry", "tier", "dhash", "phash", "fine", "inliers"])
            for tier, query, entry, m in rows:
                writer.writerow([tier, query, entry, m.tier, m.dhash_distance, m.phash_distance, m.fine_distance,
                                 m.inliers])
        print(f"false pairs written to {args.pairs}")


def _score(m) -> int:
    return m.dhash_distance + m.phash_distance + (m.fine_distance or 0)


if __name__ == "__main__":
    main()
