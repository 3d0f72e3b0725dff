"""`repost-monitor calibrate`: the near and loose tiers' score limits measured on a
user's own pictures, and written into their config.

From the pictures to protect it makes reposts with common edits (:data:`EDITS`), and
scores, through the shipped matcher's own gates, every reachable pair of a repost or an
unrelated picture (the user's folder of pictures that are not theirs) with every entry:
dHash + pHash + fine-hash bits. Each tier's limit is the largest score at which unrelated
pairs (a repost against the other entries, an unrelated picture against every entry)
match at no more than its target rate; recall is the share of reposts within it.
"""

from __future__ import annotations

import io
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from monitor.fingerprints import ImageError, fingerprint_bytes
from monitor.safe_text import printable
from monitor.scan import iter_image_files
from monitor.search.index import LibraryIndex
from monitor.search.matcher import Matcher, query_rows
from monitor.search.tiers import EXACT, LOOSE, NEAR, Tier

# Targets: the shipped tiers' pair rates (monitor/search/tiers.py).
NEAR_PAIR_RATE = 2.5e-5
LOOSE_PAIR_RATE = 1e-4


def _probe(tier: Tier) -> tuple[Tier, ...]:
    """Every pair ``tier`` can reach (its dHash radius, the dHash + pHash gate), scored;
    the exact tier first, which matches whatever the score."""
    return EXACT, Tier("probe", tier.dhash_max, 64, 128, score_max=640)


def _jpeg(img: Image.Image, quality: int = 80) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _crop(img: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = img.size
    return img.crop((int(w * left), int(h * top), w - int(w * right), h - int(h * bottom)))


def _caption(img: Image.Image) -> Image.Image:
    band = max(16, img.height // 6)
    out = Image.new("RGB", (img.width, img.height + band), "white")
    out.paste(img, (0, band))
    return out


def _pad(img: Image.Image, ratio: float) -> Image.Image:
    w, h = img.size
    cw, ch = (w, int(w / ratio)) if w / h > ratio else (int(h * ratio), h)
    out = Image.new("RGB", (cw, ch), "black")
    out.paste(img, ((cw - w) // 2, (ch - h) // 2))
    return out


# Common repost edits, each to an encoded image.
EDITS: dict[str, Callable[[Image.Image], bytes]] = {
    "jpeg q40": lambda im: _jpeg(im, 40),
    "half size": lambda im: _jpeg(im.resize((max(16, im.width // 2), max(16, im.height // 2)))),
    "centre crop 10%": lambda im: _jpeg(_crop(im, 0.05, 0.05, 0.05, 0.05)),
    "one side 10%": lambda im: _jpeg(_crop(im, 0.1, 0, 0, 0)),
    "white border": lambda im: _jpeg(ImageOps.expand(im, max(4, min(im.size) // 16), "white")),
    "caption band": lambda im: _jpeg(_caption(im)),
    "letterbox 9:16": lambda im: _jpeg(_pad(im, 9 / 16)),
    "brighter": lambda im: _jpeg(ImageEnhance.Brightness(im).enhance(1.25)),
    "greyscale": lambda im: _jpeg(ImageOps.grayscale(im)),
    "blur": lambda im: _jpeg(im.filter(ImageFilter.GaussianBlur(1.5))),
    "rotate 3": lambda im: _jpeg(im.rotate(3, Image.BICUBIC, expand=True, fillcolor="white")),
    "mirrored": lambda im: _jpeg(ImageOps.mirror(im)),
}


@dataclass(frozen=True)
class TierResult:
    name: str
    target: float
    score: int                # the limit: pairs scoring at most this match
    recall: float
    pair_rate: float          # measured on the unrelated pairs
    pair_rate_bound: float    # its one-sided 95% upper bound
    by_edit: dict[str, float]
    measured: bool            # False: too few unrelated pairs; ``score`` is the shipped limit


@dataclass(frozen=True)
class Calibration:
    entries: int
    reposts: int
    unrelated: int
    unrelated_pairs: int
    tiers: tuple[TierResult, ...]
    skipped: tuple[tuple[str, str], ...]


def upper_95(k: int, n: int) -> float:
    """One-sided 95% upper bound on a rate after k events in n trials."""
    if n == 0:
        return 1.0
    if k == 0:
        return 1 - 0.05 ** (1 / n)
    p = (k + 0.5) / n
    return min(1.0, p + 1.645 * math.sqrt(p * (1 - p) / n))


def _load(paths: list[Path], max_side: int, skipped: list) -> list[tuple[Path, Image.Image]]:
    out = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                img.thumbnail((max_side, max_side))
                out.append((path, img))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            skipped.append((str(path), f"unreadable: {exc}"))
    return out


def _fingerprint(data: bytes, views: str):
    try:
        fp = fingerprint_bytes(data, views=views)
    except ImageError:
        return None
    return None if fp.degenerate else fp


def calibrate(library: list[str | Path], unrelated: list[str | Path], *, limit: int = 300,
              unrelated_limit: int = 2000, max_side: int = 512, near_rate: float = NEAR_PAIR_RATE,
              loose_rate: float = LOOSE_PAIR_RATE, say: Callable[[str], None] = lambda s: None) -> Calibration:
    """Measure the near and loose limits on these pictures (see the module's note)."""
    skipped: list[tuple[str, str]] = []
    lib = _load(list(iter_image_files(library))[:limit], max_side, skipped)
    others = _load(list(iter_image_files(unrelated))[:unrelated_limit], max_side, skipped)
    if len(lib) < 2 or not others:
        raise ValueError("calibrate needs at least 2 pictures to protect and 1 unrelated picture")
    say(f"fingerprinting {len(lib)} pictures, {len(lib) * len(EDITS)} reposts and {len(others)} unrelated")
    index = LibraryIndex()
    for i, (path, img) in enumerate(lib):
        fp = _fingerprint(_jpeg(img, 92), "library")
        if fp is None:
            skipped.append((str(path), "flat, tiny or low detail: left out of the calibration"))
        else:
            index.add(i, fp)
    reposts, truth, kinds = [], [], []
    indexed = set(index.ids.tolist())
    for i, (_, img) in enumerate(lib):
        if i not in indexed:
            continue
        for name, edit in EDITS.items():
            fp = _fingerprint(edit(img), "query")
            if fp is not None:
                reposts.append(fp)
                truth.append(i)
                kinds.append(name)
    strangers = [fp for _, img in others if (fp := _fingerprint(_jpeg(img, 85), "query")) is not None]
    entries = len(index)
    pairs = len(reposts) * (entries - 1) + len(strangers) * entries
    results = []
    for tier, rate in ((NEAR, near_rate), (LOOSE, loose_rate)):
        probe = Matcher(index, _probe(tier))
        score_of = _scores(probe, reposts)
        positives = np.array([score_of[k].get(truth[k], 10_000) for k in range(len(reposts))])
        negatives = np.array([s for k in range(len(reposts)) for e, s in score_of[k].items() if e != truth[k]]
                             + [s for row in _scores(probe, strangers) for s in row.values()], np.int64)
        measured = _limit(negatives, pairs, rate)
        score = tier.score_max if measured is None else measured
        hit = positives <= score
        false = int((negatives <= score).sum())
        by_edit = {name: float(np.mean([h for h, k in zip(hit, kinds, strict=True) if k == name]))
                   for name in EDITS if name in kinds}
        results.append(TierResult(tier.name, rate, score, float(hit.mean()), false / pairs,
                                  upper_95(false, pairs), by_edit, measured is not None))
    return Calibration(entries, len(reposts), len(strangers), pairs, tuple(results), tuple(skipped))


def _scores(matcher: Matcher, fps: list) -> list[dict[int, int]]:
    """Per fingerprint: {entry: best score} over the pairs the probe tiers reach; -1 for
    an exact pair, 10,000 for one without fine hashes (decided on 64-bit limits)."""
    out: list[dict[int, int]] = [{} for _ in fps]
    for start in range(0, len(fps), 256):
        chunk = fps[start:start + 256]
        res = matcher.match_rows(query_rows(chunk))
        score = res.dhash_distance + res.phash_distance + np.where(res.fine_distance >= 0, res.fine_distance, 10_000)
        score = np.where(res.tier == 0, -1, score)
        for q, e, s in zip(res.query.tolist(), res.entry_id.tolist(), score.tolist(), strict=True):
            out[start + q][e] = min(s, out[start + q].get(e, s))
    return out


def _limit(negatives: np.ndarray, pairs: int, rate: float) -> int | None:
    """The largest score at which the unrelated pairs that match keep the 95% upper bound
    of their rate within ``rate``; None when there are too few pairs to show even 0
    false pairs is within it (then nothing is measured: add unrelated pictures)."""
    if upper_95(0, pairs) > rate:
        return None
    ordered = np.sort(negatives)
    k = 0  # the largest count of false pairs whose bound stays within the rate
    while k < ordered.size and upper_95(k + 1, pairs) <= rate:
        k += 1
    if k >= ordered.size:
        return 640
    return int(ordered[k]) - 1  # the (k+1)-th closest unrelated pair does not match


def write_config(path: Path, calibration: Calibration, check=None) -> bool:
    """Set [match] near_score and loose_score in the TOML file, keeping everything else;
    False (the file untouched) where no tier was measured. The new text goes to a file
    beside it, which ``check`` (a config loader) must accept before it replaces the old one:
    a crash or a refused value never leaves the user's config half written."""
    import tomlkit
    measured = [t for t in calibration.tiers if t.measured]
    if not measured:
        return False
    doc = tomlkit.parse(path.read_text()) if path.exists() else tomlkit.document()
    match = doc.get("match")
    if match is None:
        match = tomlkit.table()
        doc["match"] = match
    for tier in measured:
        match[f"{tier.name}_score"] = tier.score
        match[f"{tier.name}_score"].comment(
            f"calibrate: recall {tier.recall:.1%}, pair rate {tier.pair_rate:.1e} "
            f"(95% bound {tier.pair_rate_bound:.1e}) on {calibration.entries} entries")
    fresh = path.with_name(f".{path.name}.calibrate")  # same folder: relative paths in it resolve alike
    try:
        fresh.write_text(tomlkit.dumps(doc))
        if check is not None:
            try:
                check(fresh)
            except ValueError as exc:  # the loader's problems, named by the user's file
                raise ValueError(f"{path} left as it was: with the measured limits it would not load: "
                                 + str(exc).replace(str(fresh), str(path))) from None
        fresh.replace(path)
    finally:
        fresh.unlink(missing_ok=True)
    return True


def report(cal: Calibration, out=None) -> None:
    out = out or sys.stdout  # looked up now: a default bound at import outlives a redirected stdout
    print(f"{cal.entries} entries, {cal.reposts} reposts ({len(EDITS)} edits), {cal.unrelated} unrelated "
          f"pictures: {cal.unrelated_pairs:,} unrelated pairs", file=out)
    shipped = {"near": NEAR.score_max, "loose": LOOSE.score_max}
    for t in cal.tiers:
        if not t.measured:
            print(f"{t.name:5s}: not measured: {cal.unrelated_pairs:,} unrelated pairs cannot show a pair rate "
                  f"of {t.target:.1e} (at least {math.ceil(math.log(0.05) / math.log(1 - t.target)):,} are "
                  f"needed); at the shipped score <= {t.score}:", file=out)
        print(f"{t.name:5s}: score <= {t.score} (shipped {shipped[t.name]}); recall {t.recall:.1%}; pair rate "
              f"{t.pair_rate:.1e} (95% upper bound {t.pair_rate_bound:.1e}; target {t.target:.1e})", file=out)
        print("       " + ", ".join(f"{k} {v:.0%}" for k, v in t.by_edit.items()), file=out)
    for source, why in cal.skipped:
        print(f"[skip] {printable(source)}: {printable(why)}", file=out)


