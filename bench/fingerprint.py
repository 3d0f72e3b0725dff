"""Fingerprint benchmark: images/s on one core, ours vs imagehash, plus fast-path bit drift.

    python3 bench/fingerprint.py ../shared/corpus [--limit 300]

Three sets: the corpus JPEGs whose longest side is 1024 px (the size the 4x target names), all
of them as they are (up to 1024 px), and 320 px thumbnails made from them in memory. The peer
is imagehash's plain path, `imagehash.dhash(Image.open(f))`; ours computes dHash, pHash and
both mirror hashes from one reduced-size decode.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import imagehash
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from monitor import fingerprint_bytes  # noqa: E402  (the public API)


def thumbnails(blobs: list[bytes], side: int = 320) -> list[bytes]:
    out = []
    for data in blobs:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        img.thumbnail((side, side))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def rates(fns: dict, blobs: list[bytes], rounds: int = 3) -> dict[str, float]:
    """images/s of each function, timed image by image in turns.

    Interleaving puts ours and the peers under the same conditions (a shared
    VM's speed drifts by tens of percent over a minute), so ratios are fair.
    """
    spent = dict.fromkeys(fns, 0.0)
    clock = time.perf_counter
    for _ in range(rounds):
        for data in blobs:
            for name, fn in fns.items():
                start = clock()
                fn(data)
                spent[name] += clock() - start
    return {name: rounds * len(blobs) / t for name, t in spent.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N images")
    args = ap.parse_args()
    files = sorted(args.corpus.glob("*.jpg"))
    if args.limit:
        files = files[:args.limit]
    blobs = [f.read_bytes() for f in files]
    sizes = [Image.open(io.BytesIO(b)).size for b in blobs]
    print(f"{len(blobs)} JPEGs, median size {int(np.median([max(s) for s in sizes]))} px (longest side)")

    def peer_dhash(data):
        return imagehash.dhash(Image.open(io.BytesIO(data)))

    def peer_both(data):
        img = Image.open(io.BytesIO(data))
        return imagehash.dhash(img), imagehash.phash(img)

    big = [b for b, size in zip(blobs, sizes, strict=True) if max(size) >= 1024]
    for label, set_ in ((f"1024 px ({len(big)} images)", big), ("as they are", blobs),
                        ("320 px thumbnails", thumbnails(blobs))):
        if not set_:
            continue
        fingerprint_bytes(set_[0])  # warm imports
        r = rates({"fast": fingerprint_bytes, "full": lambda d: fingerprint_bytes(d, fast=False),
                   "views": lambda d: fingerprint_bytes(d, views="query"), "peer": peer_dhash,
                   "peer2": peer_both}, set_)
        ours_fast, ours_full, ours_views, peer, peer2 = (r[k] for k in ("fast", "full", "views", "peer",
                                                                          "peer2"))
        drift_d, drift_p = [], []
        for data in set_:
            a, b = fingerprint_bytes(data), fingerprint_bytes(data, fast=False)
            drift_d.append((a.dhash ^ b.dhash).bit_count())
            drift_p.append((a.phash ^ b.phash).bit_count())
        print(f"[{label}] ours (fast, 4 hashes) {ours_fast:7.1f} img/s | ours (full decode) "
              f"{ours_full:7.1f} img/s | imagehash dhash {peer:7.1f} img/s | imagehash dhash+phash "
              f"{peer2:7.1f} img/s")
        print(f"[{label}] with the query's frame view (what the daemon computes): {ours_views:7.1f} img/s")
        print(f"[{label}] speed-up vs imagehash dhash: {ours_fast / peer:.2f}x, vs dhash+phash: "
              f"{ours_fast / peer2:.2f}x | fast-path drift vs full decode: dHash mean "
              f"{np.mean(drift_d):.3f} bits (max {max(drift_d)}), pHash mean {np.mean(drift_p):.3f} "
              f"bits (max {max(drift_p)})")


if __name__ == "__main__":
    main()
