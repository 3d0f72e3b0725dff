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


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels():
    """Compile (or load) the numba kernels once before any test runs.

    On a fresh machine the first compile takes seconds; done here, it lands in
    the on-disk cache before tests that time a daemon's start-up, as the
    Dockerfile does at build time for deployments.
    """
    from monitor.warmup import warm_up
    warm_up(None)
