"""Capacity: one library split over 1, 2 and 4 shards, as the shard roles load it.

    python3 bench/shards.py IMAGES [--entries 2000000] [--bases OTHER_IMAGES]

Any folder of JPEG images will do. The library holds 200 of the pictures as `library add`
adds them (their views, fine hashes and keypoints) and ``--entries`` more made from real
pictures (``--bases``, default: the IMAGES folder's pictures past the first 400): each is a
base picture's library fingerprint (its 7-11 views, its fine hashes) with every hash XORed
by a random mask of its own. So each entry keeps a real picture's number of rows and the
distances between its views, and the entries lie as far apart as random ones do; a real
library's clusters of look-alikes (skies, textures) are not reproduced: bench/heldout.py
--extra-entries measures those. Stored in a SQLite store; fine hashes in files, as the daemon
keeps them (``[library] fine_hashes = "file"``).
Queries: the 200 pictures reposted (resized, recompressed) and 200 others. For each split,
every shard loads its part (Library(store, shard=(k, S))) and matches every query, as the
shard role does. Printed per split: entries and rows per shard, resident array memory and
fine-hash file bytes per shard, the first load (from the rows, writing the shard's
snapshot) and a later one (from it), match time per query per shard (median) one at a time
and in batches of 32 (``match_many``, what the shard role does with a backlog), and whether
the union of the shards' matches, both ways, is the unsplit library's match set.
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
from monitor.fingerprints.codec import VIEW_WORDS  # noqa: E402


def base_fingerprints(files: list[Path]) -> list:
    """The library fingerprints (views, fine hashes; no keypoints) of these pictures, as arrays:
    (whole picture's dhash, phash, dhash_mirror, phash_mirror, fine + fine_mirror words, its
    views' packed words (k, VIEW_WORDS), width, height); degenerate and unreadable ones left out."""
    from concurrent.futures import ThreadPoolExecutor

    from monitor.fingerprints import ImageError, fingerprint_bytes
    from monitor.fingerprints.codec import pack_fine, pack_views

    def one(f: Path):
        try:
            fp = fingerprint_bytes(f.read_bytes(), views="library", keypoints=False)
        except (ImageError, OSError):
            return None
        if fp.degenerate is not None or not fp.fine:
            return None
        views = np.frombuffer(pack_views(fp.views) or b"", "<u8").reshape(-1, VIEW_WORDS)
        return (np.array([fp.dhash, fp.phash, fp.dhash_mirror, fp.phash_mirror], "<u8"),
                np.frombuffer(pack_fine(fp), "<u8"), views, fp.width, fp.height)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return [b for b in pool.map(one, files) if b is not None]


def masked_entries(bases: list, start: int, n: int):
    """Rows of ``library_entries`` for entries start..start+n: entry i is base i mod len(bases)
    with each hash XORed by the entry's own random masks (one for each of dhash, phash and
    their mirrors, one for the fine words), the same masks for its views. Yields (source,
    label, width, height, dhash, phash, dhash_mirror, phash_mirror, views, fine) as stored."""
    rng = np.random.default_rng(start)
    masks = rng.integers(0, 2**64, size=(n, VIEW_WORDS), dtype=np.uint64).astype("<u8")
    for j in range(n):
        head, fine, views, width, height = bases[(start + j) % len(bases)]
        mask = masks[j]
        whole = (head ^ mask[:4]).view("<i8")
        yield (f"masked/{start + j}", "masked", width, height, *map(int, whole),
               (views ^ mask).tobytes() if len(views) else None, (fine ^ mask[4:]).tobytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--entries", type=int, default=2_000_000)
    ap.add_argument("--bases", type=Path, help="pictures the entries are made from (default: IMAGES past 400)")
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
        for i, f in enumerate(files[:200]):  # as `library add` adds them
            lib.add_fingerprint(f"corpus/{i}", fingerprint_bytes(f.read_bytes(), views="library"))
        bases = base_fingerprints(sorted(args.bases.glob("*.jpg")) if args.bases
                                  else sorted(args.corpus.glob("*.jpg"))[400:])
        t = time.perf_counter()
        hashes_made = 0
        for start in range(0, args.entries, 100_000):
            batch = list(masked_entries(bases, start, min(100_000, args.entries - start)))
            hashes_made += sum(1 + len(r[8] or b"") // (8 * VIEW_WORDS) for r in batch)
            with store.transaction() as conn:
                conn.executemany(
                    "INSERT INTO library_entries (source, label, width, height, dhash, phash, dhash_mirror, "
                    "phash_mirror, degenerate, added_at, views, fine, algorithm) VALUES (?,?,?,?,?,?,?,?,NULL,0,?,?,?)",
                    [r + (ALGORITHM_VERSION,) for r in batch])
        print(f"library: {args.entries + 200:,} entries ({hashes_made / max(1, args.entries):.1f} hashes each, views "
              f"included) made from {len(bases)} real pictures' fingerprints, written in "
              f"{time.perf_counter() - t:.0f} s")
        store.close()
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "?")
        print(f"CPU: {cpu}; match tier near; {len(queries)} queries (200 reposts of entries, 200 others)")
        reference = None
        for shards in (1, 2, 4):
            found: set = set()
            batched: set = set()
            rows, memory, files_, loads, reloads, times, batch_times = [], [], [], [], [], [], []
            for k in range(shards):
                s = Store(path)
                t = time.perf_counter()
                part = Library(s, shard=None if shards == 1 else (k, shards), spill_dir=tmp)
                loads.append(time.perf_counter() - t)
                t = time.perf_counter()
                Library(s, shard=None if shards == 1 else (k, shards), spill_dir=tmp)  # a later start: its snapshot
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
                files_.append(part.index.file_bytes())
                del part, matcher
                s.close()
            same = "reference" if reference is None else ("identical" if found == reference else
                                                         f"DIFFERENT ({len(found ^ reference)} pairs)")
            reference = reference if reference is not None else found
            print(f"{shards} shard(s): rows per shard {min(rows):,}-{max(rows):,}; arrays per shard "
                  f"{max(memory) / 1e6:.0f} MB ({max(memory) / ((args.entries + 200) / shards):.0f} B/entry), "
                  f"fine-hash files {max(files_) / 1e6:.0f} MB; "
                  f"first load {max(loads):.1f} s, later {max(reloads):.1f} s; "
                  f"match per query per shard {statistics.median(times) * 1e3:.2f} ms one at a time, "
                  f"{statistics.median(batch_times) * 1e3:.2f} ms in batches of 32 "
                  f"({statistics.median(times) / statistics.median(batch_times):.1f}x); "
                  f"{len(found)} matches: {same}{'' if batched == found else ' (BATCHED DIFFER)'}")


if __name__ == "__main__":
    main()
