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


@pytest.fixture(scope="session")
def postgres_cluster():
    """A PostgreSQL cluster of the tests' own (initdb in a temp dir, a free loopback port),
    started on first use and stopped at the end of the session."""
    from monitor.tools.services import throwaway
    with throwaway(postgres=True, redis=False) as (pg, _):
        yield pg


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def store_location(request, tmp_path) -> str:
    """Where a store lives, for the repository tests that run on both engines: a SQLite
    file, or a fresh database in the tests' PostgreSQL cluster (the slow tier: the cluster
    takes seconds to start)."""
    if request.param == "sqlite":
        return str(tmp_path / "m.sqlite")
    import uuid
    return request.getfixturevalue("postgres_cluster").create_database(f"t_{uuid.uuid4().hex[:16]}")
