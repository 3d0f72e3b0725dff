"""The match tiers: how close counts, per hash, and the presets users choose by name.
Plain data (no compiled code), so the config, the command line and the API read the
names from here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Tier:
    name: str
    dhash_max: int      # bits out of 64
    phash_max: int      # bits out of 64; 64 disables verification
    sum_max: int = 128  # dHash + pHash bits
    # dHash + pHash + fine bits (of 64 + 64 + 512), for pairs where both sides
    # have fine hashes; None decides on the 64-bit limits only.
    score_max: int | None = None


# dHash + pHash bound on candidates that the fine hashes then verify: looser
# than any 64-bit tier (bench/quality.py: widening it further adds nothing).
FINE_CANDIDATE_SUM = 36


# From bench/quality.py on the corpus (200 library pictures, 7,800 reposts, 300
# distractors; README "Match tiers"). With fine hashes: near is the score where
# unrelated pairs match at <= 2.5e-5 (so <= 0.5% of unrelated posts alarm
# against 200 entries), loose at ~1e-4. Without them (imported hashes): the
# dHash + pHash limits, near at ~1e-4, loose at ~1e-3; the per-hash caps keep
# one hash from carrying a match alone. Exact is decided on the 64-bit hashes
# alone: a few bits apart in both is a copy (no false pair measured).
# Near keeps a 16-bit dHash radius: at 20 the kernel hands back ~70x more
# random candidates and the daemon's match time doubles, for 0.2% of recall.
EXACT = Tier("exact", 4, 8, 10)
NEAR = Tier("near", 16, 20, 24, score_max=139)
LOOSE = Tier("loose", 20, 24, 28, score_max=153)
PRESETS: dict[str, tuple[Tier, ...]] = {
    "exact": (EXACT,),
    "near": (EXACT, NEAR),
    "loose": (EXACT, NEAR, LOOSE),
}


def threshold_tiers(threshold: int) -> tuple[Tier, ...]:
    """The seed's matcher: dHash distance only, no verification."""
    if not 0 <= threshold <= 64:
        raise ValueError(f"threshold must be 0..64 bits, got {threshold}")
    return (Tier("exact", min(threshold, EXACT.dhash_max), 64, 128), Tier("threshold", threshold, 64, 128))


TIER_NAMES = tuple(PRESETS)  # exact, near, loose: the names users pick

# Low-detail pictures (a minimalist artwork, a wallpaper: most dHash steps flat) have
# hashes made of small differences a re-encode can flip, and would meet unrelated plain
# pictures at the usual limits. A pair with such a picture on either side matches only
# this close, on the fine hashes too, and counts as exact. Measured on the 47 low-detail
# pictures of shared/corpus-large + corpus: 0 false pairs of 315,000 against the other
# 6,700 pictures, and 23% of their mild re-encodes (JPEG q40-70, 50-100% size) found
# (none found at all before): weaker protection, which the owner is told of.
LOW_DETAIL_DHASH_MAX = 8
LOW_DETAIL_PHASH_MAX = 10
LOW_DETAIL_FINE_MAX = 60   # bits of 512


def protection_of(degenerate: str | None) -> str:
    """How an entry is protected: "full"; "weak" (low detail: near-identical copies
    only); "none" (flat or tiny: its hashes would match anything, never matched)."""
    if degenerate is None:
        return "full"
    return "weak" if degenerate == "low_detail" else "none"


def preset(name: str, *, near_score: int | None = None, loose_score: int | None = None) -> tuple[Tier, ...]:
    """The tiers up to ``name``, with the near and loose score limits replaced where
    given (`repost-monitor calibrate` measures them on a user's own pictures)."""
    scores = {"near": near_score, "loose": loose_score}
    return tuple(t if scores.get(t.name) is None else dataclasses.replace(t, score_max=scores[t.name])
                 for t in PRESETS[name])
