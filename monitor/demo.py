"""The self-contained demo: sample library, generated reposts, real matching."""

from __future__ import annotations

import io
import random
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps


def sample_dir() -> Path:
    return Path(str(resources.files("monitor") / "demo_images"))


def sample_library() -> list[Path]:
    return sorted(sample_dir().glob("library-*.jpg"))


def sample_others() -> list[Path]:
    return sorted(sample_dir().glob("other-*.jpg"))


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _caption(img: Image.Image) -> Image.Image:
    band = max(24, img.height // 7)
    out = Image.new("RGB", (img.width, img.height + band), "white")
    out.paste(img, (0, band))
    ImageDraw.Draw(out).text((10, band // 3), "when you see it", fill="black")
    return out


def _crop(img: Image.Image, share: float) -> Image.Image:
    dx, dy = int(img.width * share / 2), int(img.height * share / 2)
    return img.crop((dx, dy, img.width - dx, img.height - dy))


# What people do to a picture before reposting it.
REPOST_KINDS = {
    "resized": lambda im: _jpeg(im.resize((im.width * 3 // 5, im.height * 3 // 5)), 85),
    "recompressed": lambda im: _jpeg(im, 35),
    "cropped": lambda im: _jpeg(_crop(im, 0.06), 80),
    "flipped": lambda im: _jpeg(ImageOps.mirror(im), 85),
    "captioned": lambda im: _jpeg(_caption(im), 85),
}


@dataclass(frozen=True, slots=True)
class DemoImage:
    name: str
    data: bytes
    repost_of: str | None  # library file name, or None for an unrelated picture
    kind: str


def demo_stream(count: int, seed: int = 7, repost_share: float = 0.3) -> list[DemoImage]:
    """A stream of posts: mostly unrelated pictures, some reposts of library images."""
    rng = random.Random(seed)
    library = [(p.name, Image.open(p).convert("RGB")) for p in sample_library()]
    others = [(p.name, Image.open(p).convert("RGB")) for p in sample_others()]
    kinds = list(REPOST_KINDS)
    out = []
    for i in range(count):
        if rng.random() < repost_share:
            name, img = rng.choice(library)
            kind = kinds[i % len(kinds)]
            out.append(DemoImage(f"post-{i:04d}-{kind}.jpg", REPOST_KINDS[kind](img), name, kind))
        else:
            name, img = rng.choice(others)
            # Unrelated pictures, each one a new encode so no two posts share bytes.
            scale = rng.uniform(0.5, 1.0)
            small = img.resize((max(32, int(img.width * scale)), max(32, int(img.height * scale))))
            out.append(DemoImage(f"post-{i:04d}.jpg", _jpeg(small, rng.randint(60, 92)), None,
                                 "unrelated"))
    return out


def run_batch_demo() -> int:
    """`match` over generated reposts: the engine on its own, no daemon."""
    from .batch import run_match
    from .matcher import PRESETS
    with tempfile.TemporaryDirectory(prefix="repost-monitor-demo-") as tmp:
        library, posts = Path(tmp) / "library", Path(tmp) / "posts"
        library.mkdir()
        posts.mkdir()
        for path in sample_library():
            (library / path.name).write_bytes(path.read_bytes())
        for item in demo_stream(30):
            (posts / item.name).write_bytes(item.data)
        return run_match([str(posts)], str(library), PRESETS["near"], best=True,
                         fmt="table", output=None, cache=None, progress=False)
