import io
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "monitor" / "demo_images"
PAYLOADS = Path(__file__).resolve().parent / "payloads"


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def library_images() -> list[Path]:
    return sorted(SAMPLES.glob("library-*.jpg"))


@pytest.fixture(scope="session")
def other_images() -> list[Path]:
    return sorted(SAMPLES.glob("other-*.jpg"))


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()
