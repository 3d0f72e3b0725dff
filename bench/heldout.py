"""Match quality on edits we did not design, on pictures we did not tune on.

    python3 bench/heldout.py ../shared/corpus --distractors-from ../shared/corpus-large [--part report]

The edits come from another toolkit than bench/quality.py's Pillow edits: albumentations
(crops from one or two sides, aspect-changing crops, rotations of 2-8 degrees, shear,
perspective, padding and letterboxing, dropout patches, colour, blur, noise) and OpenCV
(text bands and watermarks, stickers, three app-like screenshot layouts, encoding). Each
edit draws its parameters per picture from a seeded generator. The screenshot frames are
drawn here after common app layouts; they are not captures of real apps.

Held out: the pictures are split in two halves of a seeded shuffle. `--part tune` uses the
first half and seed 101; `--part report` (the default, the figures to quote) uses the other
half and seed 202, and should stay out of any tuning loop.

``--small-turns`` measures turns under 2.5 degrees instead; ``--app-frames`` the false pairs
between screenshots of different pictures in one app's frame, where the library's entries are
such screenshots too.

Printed: recall of the shipped matcher (near, the default tier, and loose) per family and
per edit, against imagehash pHash and dHash at the thresholds where their pair
false-positive rate is <= 1e-4 on the same pairs; false pairs among the reposts and the
share of unrelated pictures (`--distractors-from`, any folder of other pictures) that
alarm.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

try:
    import albumentations as A
    import cv2
except ImportError:  # pragma: no cover - bench-only dependencies
    sys.exit("bench/heldout.py needs albumentations and opencv: pip install -e '.[bench]'")


def jpeg(img: np.ndarray, quality: int = 85) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def webp(img: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".webp", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_WEBP_QUALITY, quality])
    assert ok
    return buf.tobytes()


def run(transforms: list, img: np.ndarray, rng: random.Random) -> np.ndarray:
    return A.Compose(transforms, seed=rng.randrange(2**31))(image=img)["image"]


def colour(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randrange(256) for _ in range(3))


# -- edits: (family, name) -> fn(img RGB uint8, rng) -> encoded bytes ---------------------
def one_side_crop(img, rng):
    h, w = img.shape[:2]
    share = rng.uniform(0.08, 0.2)
    side = rng.choice("lrtb")
    box = {"l": (int(w * share), 0, w, h), "r": (0, 0, w - int(w * share), h),
           "t": (0, int(h * share), w, h), "b": (0, 0, w, h - int(h * share))}[side]
    return run([A.Crop(*box)], img, rng)


def aspect_crop(ratio):
    def fn(img, rng):
        h, w = img.shape[:2]
        if w / h > ratio:
            cw, ch = int(h * ratio), h
        else:
            cw, ch = w, int(w / ratio)
        return run([A.CenterCrop(ch, cw)], img, rng)
    return fn


def pad_to(ratio):
    def fn(img, rng):
        h, w = img.shape[:2]
        if w / h > ratio:
            ph, pw = int(w / ratio), w
        else:
            ph, pw = h, int(h * ratio)
        return run([A.PadIfNeeded(ph, pw, border_mode=cv2.BORDER_CONSTANT, fill=colour(rng))], img, rng)
    return fn


def pad_one_side(img, rng):
    h, w = img.shape[:2]
    share = rng.uniform(0.1, 0.25)
    side = rng.choice("lrtb")
    pad = {"l": (0, 0, int(w * share), 0), "r": (0, 0, 0, int(w * share)),
           "t": (int(h * share), 0, 0, 0), "b": (0, int(h * share), 0, 0)}[side]
    return cv2.copyMakeBorder(img, *pad, cv2.BORDER_CONSTANT, value=colour(rng))


def text(img, words, origin, scale, rgb, thickness=2):
    cv2.putText(img, words, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, rgb, thickness, cv2.LINE_AA)


def caption_band(img, rng):
    h, w = img.shape[:2]
    band = int(h * rng.uniform(0.12, 0.25))
    out = np.full((h + band, w, 3), 255 if rng.random() < 0.7 else 0, np.uint8)
    top = rng.random() < 0.6
    if top:
        out[band:] = img
    else:
        out[:h] = img
    ink = (0, 0, 0) if out[0 if top else -1, 0, 0] == 255 else (255, 255, 255)
    text(out, "when you finally see it", (10, (band // 2 if top else h + band // 2) + 8), w / 700, ink)
    return out


def watermark(img, rng):
    out = img.copy()
    layer = img.copy()
    h, w = img.shape[:2]
    for k in range(rng.randint(1, 3)):
        text(layer, "@reposter_" + str(rng.randrange(1000)), (rng.randrange(max(1, w // 2)), int(h * (k + 1) / 4)),
             w / 500, (255, 255, 255), 2)
    return cv2.addWeighted(layer, 0.6, out, 0.4, 0)


def sticker(img, rng):
    out = img.copy()
    h, w = img.shape[:2]
    r = int(min(h, w) * rng.uniform(0.1, 0.18))
    cx, cy = rng.randrange(r, w - r), rng.randrange(r, h - r)
    cv2.circle(out, (cx, cy), r, colour(rng), -1, cv2.LINE_AA)
    cv2.circle(out, (cx - r // 3, cy - r // 4), r // 6, (0, 0, 0), -1)
    cv2.circle(out, (cx + r // 3, cy - r // 4), r // 6, (0, 0, 0), -1)
    return out


def fit(img, width):
    h, w = img.shape[:2]
    return cv2.resize(img, (width, max(1, int(h * width / w))), interpolation=cv2.INTER_AREA)


def feed_post(img, rng):
    """A phone feed: status bar, account row, the picture full width, actions, text."""
    width = rng.choice((360, 390, 412))
    pic = fit(img, width)
    bg = 255 if rng.random() < 0.6 else 18
    ink = (0, 0, 0) if bg == 255 else (240, 240, 240)
    canvas = np.full((max(pic.shape[0] + 320, int(width * 2.1)), width, 3), bg, np.uint8)
    text(canvas, "9:41", (14, 22), 0.5, ink, 1)
    text(canvas, "5G", (width - 70, 22), 0.5, ink, 1)
    cv2.circle(canvas, (28, 70), 16, colour(rng), -1)
    text(canvas, "someone.photos", (54, 76), 0.5, ink, 1)
    top = 100
    canvas[top:top + pic.shape[0]] = pic
    y = top + pic.shape[0] + 30
    for x in (16, 56, 96):
        cv2.circle(canvas, (x + 10, y), 10, ink, 2)
    text(canvas, "1,204 likes", (16, y + 40), 0.5, ink, 1)
    text(canvas, "golden hour never misses", (16, y + 66), 0.5, ink, 1)
    return canvas


def story(img, rng):
    """A 9:16 story: the picture centred over a blurred, enlarged copy of itself, UI on top."""
    width = rng.choice((360, 405))
    height = width * 16 // 9
    bg = cv2.GaussianBlur(cv2.resize(img, (width, height)), (0, 0), 25)
    pic = fit(img, int(width * rng.uniform(0.85, 1.0)))
    if pic.shape[0] > height * 0.8:
        pic = cv2.resize(pic, (int(pic.shape[1] * height * 0.8 / pic.shape[0]), int(height * 0.8)))
    y, x = (height - pic.shape[0]) // 2, (width - pic.shape[1]) // 2
    bg[y:y + pic.shape[0], x:x + pic.shape[1]] = pic
    cv2.rectangle(bg, (8, 8), (width - 8, 11), (255, 255, 255), -1)
    text(bg, "your_story", (40, 40), 0.5, (255, 255, 255), 1)
    cv2.rectangle(bg, (12, height - 52), (width - 60, height - 16), (255, 255, 255), 1)
    text(bg, "Send message", (24, height - 28), 0.45, (255, 255, 255), 1)
    return bg


def browser(img, rng):
    """A desktop browser window: tab strip and address bar, the picture in a page with text."""
    width = rng.choice((1024, 1280))
    pic = fit(img, int(width * rng.uniform(0.45, 0.65)))
    height = pic.shape[0] + 260
    canvas = np.full((height, width, 3), 255, np.uint8)
    canvas[:80] = (222, 225, 230)
    cv2.rectangle(canvas, (90, 44), (width - 90, 70), (255, 255, 255), -1)
    text(canvas, "https://example.blog/posts/found-this", (100, 62), 0.5, (60, 60, 60), 1)
    text(canvas, "Look what I found today", (60, 130), 1.0, (20, 20, 20), 2)
    x = (width - pic.shape[1]) // 2
    canvas[160:160 + pic.shape[0], x:x + pic.shape[1]] = pic
    text(canvas, "Posted in Inspiration - 12 comments", (60, 200 + pic.shape[0]), 0.6, (90, 90, 90), 1)
    return canvas


def rotate_in_place(img, rng):
    """Turned 6-10 degrees inside its own frame with black corners (an editor's rotate that
    keeps the canvas), by OpenCV; the angle from the picture's own pixels, not ``rng``."""
    own = random.Random(int(img[::7, ::7].sum()))
    angle = own.choice((-1, 1)) * own.uniform(6, 10)
    h, w = img.shape[:2]
    turn = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    return cv2.warpAffine(img, turn, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def build_edits() -> dict[str, tuple[str, object]]:
    E: dict[str, tuple[str, object]] = {}

    def add(family, name, fn, codec=None):
        E[name] = (family, fn, codec)
    add("codec", "jpeg q20-40", lambda im, r: im, lambda im, r: jpeg(im, r.randint(20, 40)))
    add("codec", "webp q30-60", lambda im, r: im, lambda im, r: webp(im, r.randint(30, 60)))
    add("resize", "longest side 160-320", lambda im, r: run([A.LongestMaxSize(r.randint(160, 320))], im, r))
    add("resize", "stretch 10-20%", lambda im, r: cv2.resize(
        im, (int(im.shape[1] * r.uniform(1.1, 1.2)), im.shape[0]) if r.random() < 0.5
        else (im.shape[1], int(im.shape[0] * r.uniform(1.1, 1.2)))))
    add("colour", "colour jitter", lambda im, r: run([A.ColorJitter((0.7, 1.3), (0.7, 1.3), (0.5, 1.5),
                                                                    (-0.03, 0.03), p=1)], im, r))
    add("colour", "grey", lambda im, r: run([A.ToGray(p=1)], im, r))
    add("colour", "gamma", lambda im, r: run([A.RandomGamma((60, 160), p=1)], im, r))
    add("colour", "planckian", lambda im, r: run([A.PlanckianJitter(p=1)], im, r))
    add("filter", "gaussian blur", lambda im, r: run([A.GaussianBlur((3, 7), p=1)], im, r))
    add("filter", "motion blur", lambda im, r: run([A.MotionBlur((5, 9), p=1)], im, r))
    add("filter", "gauss noise", lambda im, r: run([A.GaussNoise((0.03, 0.08), p=1)], im, r))
    add("filter", "downscale-upscale", lambda im, r: run([A.Downscale((0.35, 0.6), p=1)], im, r))
    add("filter", "sharpen", lambda im, r: run([A.Sharpen(p=1)], im, r))
    add("crop", "one side 8-20%", one_side_crop)
    add("crop", "two sides 4-12%", lambda im, r: run([A.RandomCropFromBorders(0.12, 0.12, 0.12, 0.12)], im, r))
    add("crop", "square", aspect_crop(1.0))
    add("crop", "4:5", aspect_crop(0.8))
    add("crop", "16:9", aspect_crop(16 / 9))
    add("crop", "random resized 70-90%", lambda im, r: run([A.RandomResizedCrop(
        (im.shape[0], im.shape[1]), scale=(0.7, 0.9), ratio=(0.8, 1.25))], im, r))
    add("geometry", "rotate 2-8, fill", lambda im, r: run([A.Rotate(
        r.choice((-1, 1)) * r.uniform(2, 8), border_mode=cv2.BORDER_CONSTANT, fill=colour(r), p=1)], im, r))
    add("geometry", "rotate 2-8, cropped", lambda im, r: run([A.Rotate(
        r.choice((-1, 1)) * r.uniform(2, 8), crop_border=True, p=1)], im, r))
    add("geometry", "shear 3-8", lambda im, r: run([A.Affine(shear=r.choice((-1, 1)) * r.uniform(3, 8),
                                                             border_mode=cv2.BORDER_REFLECT_101, p=1)], im, r))
    add("geometry", "perspective", lambda im, r: run([A.Perspective((0.02, 0.05), p=1)], im, r))
    add("geometry", "shift-scale", lambda im, r: run([A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05),
                                                               border_mode=cv2.BORDER_CONSTANT, p=1)], im, r))
    add("pad", "pad to square", pad_to(1.0))
    add("pad", "letterbox 16:9", pad_to(16 / 9))
    add("pad", "pillarbox 9:16", pad_to(9 / 16))
    add("pad", "pad one side", pad_one_side)
    add("pad", "reflect pad", lambda im, r: cv2.copyMakeBorder(im, *([int(min(im.shape[:2]) * r.uniform(0.05, 0.1))]
                                                                      * 4), cv2.BORDER_REFLECT))
    add("overlay", "dropout patches", lambda im, r: run([A.CoarseDropout((1, 3), (0.08, 0.15), (0.08, 0.15),
                                                                          fill="random", p=1)], im, r))
    add("overlay", "caption band", caption_band)
    add("overlay", "text watermark", watermark)
    add("overlay", "sticker", sticker)
    add("screenshot", "feed post", feed_post)
    add("screenshot", "story 9:16", story)
    add("screenshot", "browser page", browser)
    add("compound", "one side + rotate + jpeg", lambda im, r: run([A.Rotate(r.uniform(-4, 4), p=1)],
                                                                   one_side_crop(im, r), r),
        lambda im, r: jpeg(im, 50))
    add("compound", "pad + colour + small", lambda im, r: run([A.ColorJitter(p=1), A.LongestMaxSize(240)],
                                                               pad_to(1.0)(im, r), r))
    add("compound", "sticker + crop + webp", lambda im, r: aspect_crop(0.8)(sticker(im, r), r),
        lambda im, r: webp(im, 50))
    add("compound", "screenshot + jpeg 40", feed_post, lambda im, r: jpeg(im, 40))
    # Added last, drawing from its own generator: the edits above keep their draws (and figures).
    add("geometry", "rotate 6-10 in place, black", rotate_in_place, lambda im, r: jpeg(im, 85))
    return E


def small_turns() -> dict[str, tuple[str, object]]:
    """``--small-turns``: turns under the held-out set's 2 degrees (a scan, a phone photo of a
    print, an editor's straighten), filled, cropped and in place; one step past 2 to join them."""
    def turn(lo, hi, **how):
        return lambda im, r: run([A.Rotate(r.choice((-1, 1)) * r.uniform(lo, hi), p=1, **how)], im, r)

    def in_place(img, r):
        h, w = img.shape[:2]
        rotation = cv2.getRotationMatrix2D((w / 2, h / 2), r.choice((-1, 1)) * r.uniform(0.3, 1.5), 1.0)
        return cv2.warpAffine(img, rotation, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT,
                              borderValue=0)
    fill = {"border_mode": cv2.BORDER_CONSTANT}
    return {"rotate 0.3-0.8, fill": ("geometry", lambda im, r: turn(0.3, 0.8, fill=colour(r), **fill)(im, r), None),
            "rotate 0.8-1.5, fill": ("geometry", lambda im, r: turn(0.8, 1.5, fill=colour(r), **fill)(im, r), None),
            "rotate 0.3-1.5, cropped": ("geometry", turn(0.3, 1.5, crop_border=True), None),
            "rotate 0.3-1.5 in place, black": ("geometry", in_place, None),
            "rotate 1.5-2.5, fill": ("geometry", lambda im, r: turn(1.5, 2.5, fill=colour(r), **fill)(im, r), None)}


def with_random_entries(index, count: int, first_id: int):
    """``index`` with ``count`` more entries of random dHash, pHash and fine rows (as many
    rows each as its entries have on average), bulk-loaded (a load keeps the keypoints of
    the entries it still holds)."""
    rows = max(1, round(index.rows / max(1, len(index))))
    rng = np.random.default_rng(5)
    n = count * rows
    ids = np.concatenate([index.ids, np.repeat(np.arange(first_id, first_id + count), rows)])
    dhash = np.concatenate([index.hashes("dhash"), rng.integers(0, 2**64 - 1, n, dtype=np.uint64)])
    phash = np.concatenate([index.hashes("phash"), rng.integers(0, 2**64 - 1, n, dtype=np.uint64)])
    fine = np.concatenate([index.fine(), rng.integers(0, 2**64 - 1, (n, index.fine().shape[1]), dtype=np.uint64)])
    from monitor.search.core_rows import CORE_POSITIONS
    core = np.concatenate([index.core_flags(), np.tile(np.isin(np.arange(rows), CORE_POSITIONS), count)])
    index.load(ids, {"dhash": dhash, "phash": phash}, fine, core)
    print(f"library: + {count:,} random entries ({n:,} rows); {index.rows:,} rows in all", flush=True)
    return index


def views_in_use() -> tuple[str, ...]:
    from monitor.fingerprints import crops
    return crops.LIBRARY_CROPS


def app_frames(corpus: Path, entries: int = 100, posts: int = 300, max_side: int = 512) -> None:
    """``--app-frames``: false pairs where the library's entries are themselves app screenshots
    (a feed post, a 9:16 story, a browser page, drawn here) and the posts are other pictures in
    the same frame: the frame's text and bars are the same pixels in both."""
    from PIL import Image

    from monitor import fingerprint_bytes
    from monitor.fingerprints import KeypointFinder
    from monitor.search.index import LibraryIndex
    from monitor.search.matcher import PRESETS, Matcher
    files = sorted(corpus.glob("*.jpg"))
    random.Random(3).shuffle(files)

    def load(p: Path) -> np.ndarray:
        img = Image.open(p).convert("RGB")
        img.thumbnail((max_side, max_side))
        return np.asarray(img).copy()
    rng = random.Random(5)
    for name, frame in (("feed post", feed_post), ("story 9:16", story), ("browser page", browser)):
        index = LibraryIndex()
        for i, path in enumerate(files[:entries]):
            fp = fingerprint_bytes(jpeg(frame(load(path), rng), 90), views="library")
            if fp.degenerate is None:
                index.add(i, fp)
        shots = [jpeg(frame(load(path), rng), 85) for path in files[entries:entries + posts]]
        found = Matcher(index, PRESETS["near"]).match_many([fingerprint_bytes(b, views="query") for b in shots],
                                                           [KeypointFinder(b) for b in shots])
        by: dict[str, int] = {}
        for m in (m for ms in found for m in ms):
            by[m.decided_by] = by.get(m.decided_by, 0) + 1
        print(f"{name}: {len(index)} framed entries x {len(shots)} other pictures in the same frame: "
              f"{sum(by.values())} near pairs ({', '.join(f'{k} {n}' for k, n in sorted(by.items())) or 'none'})",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--distractors-from", type=Path, required=True)
    ap.add_argument("--part", choices=("tune", "report"), default="report")
    ap.add_argument("--library", type=int, default=200)
    ap.add_argument("--distractors", type=int, default=1000)
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--library-crops", help="comma-separated library crop views to index instead of the "
                    "shipped ones (monitor.fingerprints.crops.CROPS names): what each view earns")
    ap.add_argument("--no-peers", action="store_true", help="skip imagehash")
    ap.add_argument("--extra-entries", type=int, default=0, help="also index this many further pictures of "
                    "--distractors-from (not among the unrelated posts) as library entries: recall and "
                    "false pairs against a larger library")
    ap.add_argument("--random-entries", type=int, default=0, help="also index this many entries of random "
                    "hashes (as many rows each as a real entry, no keypoints): how the nearest candidates "
                    "of the second look crowd as the library grows to millions")
    ap.add_argument("--look-share", type=float, help="the near tier under the daemon's second-look budget "
                    "([match] second_look_share, e.g. 0.1), set by the unrelated posts")
    ap.add_argument("--lazy-keypoints", action="store_true", help="find a post's keypoints (and its mirror "
                    "image's) only when it needs a second look, as the one-process daemon does")
    ap.add_argument("--no-keypoints", action="store_true", help="the hashes alone: no second look at the "
                    "nearest entries' keypoints ([match] keypoints = false)")
    ap.add_argument("--small-turns", action="store_true", help="instead of the held-out edits, turns of "
                    "0.3-2.5 degrees (filled, cropped, in place)")
    ap.add_argument("--app-frames", action="store_true", help="instead: false pairs between app screenshots "
                    "of different pictures, the library's entries screenshots too")
    args = ap.parse_args()
    if args.app_frames:
        return app_frames(args.corpus)
    if args.library_crops is not None:
        from monitor.fingerprints import crops
        crops.LIBRARY_CROPS = tuple(n for n in args.library_crops.split(",") if n)
    import imagehash
    from PIL import Image

    from monitor import fingerprint_bytes
    from monitor.fingerprints import KeypointFinder
    from monitor.search.budget import WARM, LookBudget, Unrecorded
    from monitor.search.index import LibraryIndex
    from monitor.search.matcher import PRESETS, Matcher
    from monitor.warmup import warm_up
    warm_up(lambda s: print(s, file=sys.stderr))
    files = sorted(args.corpus.glob("*.jpg"))
    random.Random(7).shuffle(files)
    half = files[:len(files) // 2] if args.part == "tune" else files[len(files) // 2:]
    seed = 101 if args.part == "tune" else 202
    rng = random.Random(seed)
    lib_files = rng.sample(half, min(args.library, len(half)))
    others = sorted(args.distractors_from.glob("*.jpg"))
    dis_files = rng.sample(others, min(args.distractors, len(others)))
    taken = set(dis_files)
    extra_files = [p for p in others if p not in taken][:args.extra_entries]

    def load(p: Path) -> np.ndarray:
        img = Image.open(p).convert("RGB")
        img.thumbnail((args.max_side, args.max_side))
        return np.asarray(img).copy()

    edits = small_turns() if args.small_turns else build_edits()
    t = time.perf_counter()
    lib_imgs = [load(p) for p in lib_files]
    lib_bytes = [jpeg(im, 92) for im in lib_imgs]
    queries, truth, kinds = [], [], []
    for i, im in enumerate(lib_imgs):
        for name, (_, fn, codec) in edits.items():
            out = fn(im, rng)
            queries.append((codec or (lambda x, r: jpeg(x, r.randint(75, 90))))(out, rng))
            truth.append(i)
            kinds.append(name)
    distractors = [jpeg(load(p), 85) for p in dis_files]
    print(f"part {args.part} (seed {seed}): library {len(lib_bytes)} pictures, {len(queries)} reposts "
          f"({len(edits)} edits), {len(distractors)} unrelated pictures; made in {time.perf_counter() - t:.0f} s",
          flush=True)

    index = LibraryIndex(keep_dhash=True)
    for i, b in enumerate(lib_bytes):
        fp = fingerprint_bytes(b, views="library")
        if fp.degenerate is None:
            index.add(i, fp)
    for k, path in enumerate(extra_files):  # ids after the library's: never a repost's truth
        fp = fingerprint_bytes(path.read_bytes(), views="library")
        if fp.degenerate is None:
            index.add(len(lib_bytes) + k, fp)
    if extra_files:
        print(f"library: {len(lib_bytes)} pictures with reposts + {len(extra_files):,} further entries")
    if args.random_entries:
        index = with_random_entries(index, args.random_entries, len(lib_bytes) + len(extra_files))
    print(f"library crops {','.join(views_in_use())}: {index.rows / max(1, len(index)):.2f} rows per entry")
    # keypoints found with the hashes (a scaled-out fetch worker), or as the one-process
    # daemon finds them: only for a post that needs a second look, of its mirror image too
    kp = not args.no_keypoints and not args.lazy_keypoints
    q_fps = [fingerprint_bytes(b, views="query", keypoints=kp) for b in queries]
    d_fps = [fingerprint_bytes(b, views="query", keypoints=kp) for b in distractors]
    q_lazy = [KeypointFinder(b) for b in queries] if args.lazy_keypoints else None
    d_lazy = [KeypointFinder(b) for b in distractors] if args.lazy_keypoints else None
    truth_a = np.array(truth)
    families = {name: fam for name, (fam, _, _) in edits.items()}
    results: dict[str, np.ndarray] = {}
    for tier in ("near", "loose"):
        matcher = Matcher(index, PRESETS[tier])
        # --look-share: the daemon's budget, set by the unrelated posts (most of a feed's), then
        # each repost decided by it as one rare post among them (not counted in the budget)
        budget = LookBudget(args.look_share) if args.look_share and tier == "near" else None
        started = time.perf_counter()
        d_found = matcher.match_many(d_fps, d_lazy, budget=budget)
        d_seconds = time.perf_counter() - started
        found = matcher.match_many(q_fps, q_lazy, budget=budget and Unrecorded(budget))
        hit = np.array([any(m.entry_id == truth[k] for m in ms) for k, ms in enumerate(found)])
        wrong = sum(1 for k, ms in enumerate(found) for m in ms if m.entry_id != truth[k])
        d_pairs = sum(len(ms) for ms in d_found)
        entries = len(index)
        pairs = len(queries) * (entries - 1) + len(distractors) * entries
        results[f"ours {tier}"] = hit
        print(f"ours, {tier:5s}: recall {hit.mean():.1%}; false pairs {wrong + d_pairs} of {pairs:,} "
              f"(pair FPR {(wrong + d_pairs) / pairs:.1e}); unrelated pictures alarming "
              f"{sum(1 for ms in d_found if ms) / len(distractors):.2%}", flush=True)
        if d_lazy is not None and tier == "near":  # the keypoints are found once, on the first tier's run
            looked = sum(1 for finder in d_lazy if finder.searched)
            if budget is not None:
                print(f"    second looks at most {args.look_share:.0%} of the posts (after the first {WARM}): "
                      f"{budget.skipped} unrelated posts' looks skipped", flush=True)
            print(f"    unrelated posts given a second look: {looked / len(distractors):.1%} "
                  f"({sum(finder.searched for finder in d_lazy)} keypoint searches); matcher "
                  f"{d_seconds / len(distractors) * 1e3:.2f} ms per unrelated post", flush=True)
    # peers at pair FPR <= 1e-4 on the same pairs
    for name, fn in () if args.no_peers else (("imagehash pHash", imagehash.phash),
                                              ("imagehash dHash", imagehash.dhash)):
        def h(data, fn=fn):
            return int(str(fn(Image.open(io.BytesIO(data)))), 16)
        lib_h = np.array([h(b) for b in lib_bytes], np.uint64)
        q_h = np.array([h(b) for b in queries], np.uint64)
        d_h = np.array([h(b) for b in distractors], np.uint64)
        qd = np.bitwise_count(q_h[:, None] ^ lib_h[None, :])
        dd = np.bitwise_count(d_h[:, None] ^ lib_h[None, :])
        mask = np.ones_like(qd, bool)
        mask[np.arange(len(queries)), truth_a] = False
        neg = np.sort(np.concatenate([qd[mask], dd.ravel()]))
        threshold = max(t for t in range(65) if (neg <= t).mean() <= 1e-4) if (neg <= 0).mean() <= 1e-4 else -1
        results[f"{name} @1e-4 (t={threshold})"] = qd[np.arange(len(queries)), truth_a] <= threshold
    names = list(results)
    print(f"\n{'':28s}" + "".join(f"{n:>26s}" for n in names))
    print(f"{'overall':28s}" + "".join(f"{results[n].mean():>26.1%}" for n in names))
    kinds_a = np.array(kinds)
    for fam in dict.fromkeys(families.values()):
        sel = np.array([families[k] == fam for k in kinds])
        print(f"{'  ' + fam:28s}" + "".join(f"{results[n][sel].mean():>26.1%}" for n in names))
    print()
    for name in edits:
        sel = kinds_a == name
        print(f"{'    ' + name:28s}" + "".join(f"{results[n][sel].mean():>26.1%}" for n in names))


if __name__ == "__main__":
    main()
