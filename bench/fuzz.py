"""Fuzz every parser the daemon exposes to the outside, 10,000+ inputs per target.

    python3 bench/fuzz.py [PAYLOADS] [IMAGES] [--examples N] [--only TARGET ...]

PAYLOADS: a folder laid out like tests/payloads (rss2/, atom/, jsonfeed/, reddit/,
mastodon/, malformed/) of real feed payloads to mutate (default: tests/payloads;
../shared/payloads has more). IMAGES: any folder of JPEGs to mutate (default: the
demo's sample pictures). The targets are tests/fuzzing.py's, the same CI runs with a few
hundred inputs each. Prints, per target, the inputs run, how they ended and any finding
(hypothesis' shrunk failing input); exit status 1 if anything was found.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import fuzzing  # noqa: E402

TARGETS = ("rss", "jsonfeed", "reddit", "mastodon", "stream", "urls", "config", "images", "api")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("payloads", nargs="?", default=str(ROOT / "tests" / "payloads"))
    ap.add_argument("images", nargs="?", default=str(ROOT / "monitor" / "demo_images"))
    ap.add_argument("--examples", type=int, default=10_000, help="inputs per target (default: %(default)s)")
    ap.add_argument("--only", nargs="*", choices=TARGETS, default=list(TARGETS))
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="Generating overly large repr")
    seeds = fuzzing.load_seeds(Path(args.payloads))
    images = Path(args.images)
    print(f"seeds: {', '.join(f'{k} {len(v)}' for k, v in sorted(seeds.items()))} payloads from {args.payloads}; "
          f"images from {images}; {args.examples:,} inputs per target")
    found = 0
    for name in args.only:
        tally = fuzzing.Tally()
        daemon = None
        start = time.perf_counter()
        try:
            if name in ("rss", "jsonfeed", "reddit", "mastodon"):
                run = fuzzing.feed_target(seeds, name, tally, args.examples)
            elif name == "stream":
                run = fuzzing.stream_target(seeds, tally, args.examples)
            elif name == "urls":
                run = fuzzing.url_target(tally, args.examples)
            elif name == "config":
                run = fuzzing.config_target(tally, args.examples)
            elif name == "images":
                run = fuzzing.image_target(fuzzing.image_seeds(images, 24), tally, args.examples)
            else:
                tmp = tempfile.mkdtemp(prefix="rm-fuzz-")
                daemon = fuzzing.DaemonThread(Path(tmp) / "m.sqlite", sorted(images.glob("*.jpg"))[:3])
                run = fuzzing.api_target(daemon, tally, args.examples)
            run()
            finding = None
            if daemon is not None:
                pending = fuzzing.pending_work(daemon.db)
                if pending:
                    finding = f"{pending} work rows still pending"
        except Exception:  # noqa: BLE001 - the finding is the report
            finding = traceback.format_exc(limit=6)
        finally:
            if daemon is not None:
                daemon.close()
        took = time.perf_counter() - start
        outcomes = ", ".join(f"{k}: {v:,}" for k, v in sorted(tally.outcomes.items(), key=lambda x: -x[1])[:6])
        print(f"\n[{name}] {tally.inputs:,} inputs in {took:.0f} s; {'FINDING' if finding else 'no finding'}")
        print(f"  outcomes (top 6 of {len(tally.outcomes)}): {outcomes}")
        if finding:
            found += 1
            print("  " + finding.replace("\n", "\n  "))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
