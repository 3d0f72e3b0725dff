"""Fingerprint files on disk: folder walking, a resumable cache, all cores.

The cache is keyed by (path, size, mtime, algorithm version): a re-run over
the same folder reads nothing but directory entries, and an interrupted run
resumes where it stopped because results are committed in small batches.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .fasthash import FINE_WORDS
from .fingerprint import (
    ALGORITHM_VERSION,
    DEFAULT_MAX_PIXELS,
    Fingerprint,
    ImageError,
    fingerprint_bytes,
)
from .store import sql_to_u64, u64_to_sql

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
COMMIT_EVERY = 200


def default_cache_path() -> Path:
    env = os.environ.get("REPOST_MONITOR_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "repost-monitor" / "fingerprints.sqlite"


def iter_image_files(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Image files named directly or found recursively under folders, sorted."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = []
            for root, dirs, files in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found.extend(Path(root) / f for f in files
                             if Path(f).suffix.lower() in IMAGE_SUFFIXES and not f.startswith("."))
            yield from sorted(found)
        elif path.exists():
            yield path
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")


@dataclass(frozen=True, slots=True)
class FileResult:
    path: Path
    fingerprint: Fingerprint | None
    error: ImageError | None = None
    cached: bool = False


class FingerprintCache:
    """SQLite cache of fingerprints of files; safe to share between threads."""

    def __init__(self, path: str | Path | None):
        self.path = str(path) if path else ":memory:"
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        self._lock = threading.Lock()
        self._pending: list[tuple] = []
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS fingerprints_v3 (path TEXT, size INTEGER, mtime_ns INTEGER, "
                "algorithm TEXT, dhash INTEGER, phash INTEGER, dhash_mirror INTEGER, "
                "phash_mirror INTEGER, width INTEGER, height INTEGER, degenerate TEXT, views BLOB, "
                "fine BLOB, PRIMARY KEY (path, size, mtime_ns, algorithm))")
            self._conn.commit()

    @staticmethod
    def _key(path: Path, views: str | None) -> tuple:
        st = path.stat()
        return (str(path.resolve()), st.st_size, st.st_mtime_ns, f"{ALGORITHM_VERSION}/{views}")

    def get(self, path: Path, views: str | None = None) -> Fingerprint | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT dhash, phash, dhash_mirror, phash_mirror, width, height, degenerate, views, "
                "fine FROM fingerprints_v3 WHERE path=? AND size=? AND mtime_ns=? AND algorithm=?",
                self._key(path, views)).fetchone()
        if row is None:
            return None
        fine, fine_mirror = unpack_fine(row[8])
        return Fingerprint(*(sql_to_u64(v) for v in row[:4]), row[4], row[5], row[6],
                           unpack_views(row[7], with_fine=bool(fine)), fine, fine_mirror)

    def put(self, path: Path, fp: Fingerprint, views: str | None = None) -> None:
        row = self._key(path, views) + (u64_to_sql(fp.dhash), u64_to_sql(fp.phash),
                                        u64_to_sql(fp.dhash_mirror), u64_to_sql(fp.phash_mirror),
                                        fp.width, fp.height, fp.degenerate, pack_views(fp.views),
                                        pack_fine(fp))
        with self._lock:
            self._pending.append(row)
            if len(self._pending) >= COMMIT_EVERY:
                self._flush_locked()

    def _flush_locked(self) -> None:
        if self._pending:
            self._conn.executemany("INSERT OR REPLACE INTO fingerprints_v3 VALUES "
                                   "(?,?,?,?,?,?,?,?,?,?,?,?,?)", self._pending)
            self._conn.commit()
            self._pending.clear()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._conn.close()


VIEW_WORDS = 4 + 2 * FINE_WORDS  # a view packed with its fine hashes


def pack_fine(fp: Fingerprint) -> bytes | None:
    """The fine hashes of a fingerprint and of its mirror (NULL where unknown)."""
    return fp.fine + fp.fine_mirror if fp.fine else None


def unpack_fine(blob: bytes | None) -> tuple[bytes, bytes]:
    half = FINE_WORDS * 8
    return (blob[:half], blob[half:]) if blob else (b"", b"")


def pack_views(views) -> bytes | None:
    """Views as packed little-endian uint64 words: dhash, phash, dhash_mirror,
    phash_mirror, then the fine hashes and their mirror (VIEW_WORDS per view)
    when the views have them (and so does the whole fingerprint, whose fine
    column tells :func:`unpack_views` which layout a blob has)."""
    if not views:
        return None
    head = np.array([[v.dhash, v.phash, v.dhash_mirror, v.phash_mirror] for v in views], dtype="<u8")
    if not all(v.fine for v in views):
        return head.tobytes()
    fine = np.frombuffer(b"".join(v.fine + v.fine_mirror for v in views), dtype="<u8")
    return np.hstack([head, fine.reshape(len(views), 2 * FINE_WORDS)]).tobytes()


def unpack_views(blob: bytes | None, with_fine: bool = False) -> tuple[Fingerprint, ...]:
    """Inverse of :func:`pack_views`; ``with_fine`` when the blob has fine hashes."""
    if not blob:
        return ()
    words = np.frombuffer(blob, dtype="<u8").reshape(-1, VIEW_WORDS if with_fine else 4)
    half = 4 + FINE_WORDS
    return tuple(Fingerprint(*(int(x) for x in w[:4]), 0, 0,
                             fine=w[4:half].tobytes() if with_fine else b"",
                             fine_mirror=w[half:].tobytes() if with_fine else b"")
                 for w in words)


def fingerprint_file(path: Path, cache: FingerprintCache | None = None, *,
                     max_pixels: int = DEFAULT_MAX_PIXELS, views: str | None = None) -> FileResult:
    """Fingerprint one file, from the cache when its key still matches."""
    try:
        if cache is not None:
            hit = cache.get(path, views)
            if hit is not None:
                return FileResult(path, hit, cached=True)
        fp = fingerprint_bytes(path.read_bytes(), max_pixels=max_pixels, views=views)
    except ImageError as exc:
        return FileResult(path, None, exc)
    except OSError as exc:
        return FileResult(path, None, ImageError("unreadable", f"{path}: {exc.strerror or exc}"))
    if cache is not None:
        cache.put(path, fp, views)
    return FileResult(path, fp)


def fingerprint_files(paths: list[Path], cache: FingerprintCache | None = None, *,
                      workers: int | None = None, progress: bool | None = None,
                      desc: str = "fingerprinting", max_pixels: int = DEFAULT_MAX_PIXELS,
                      views: str | None = None) -> list[FileResult]:
    """Fingerprint many files on all cores (Pillow releases the GIL while
    decoding and resizing, so threads scale). Results keep input order."""
    workers = workers or os.cpu_count() or 1
    if progress is None:
        progress = sys.stderr.isatty()
    results: list[FileResult] = []
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(paths), desc=desc, unit="img", disable=not progress,
                 file=sys.stderr) as bar:
        for result in pool.map(lambda p: fingerprint_file(p, cache, max_pixels=max_pixels, views=views),
                               paths, chunksize=16):
            results.append(result)
            bar.update(1)
    if cache is not None:
        cache.flush()
    return results
