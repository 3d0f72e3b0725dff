"""Fingerprint files on disk: folder walking, a resumable cache, all cores.

The cache is keyed by (path, size, mtime, algorithm version): a re-run over
the same folder reads nothing but directory entries, and an interrupted run
resumes where it stopped because results are committed in small batches.
"""

from __future__ import annotations

import csv
import os
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from monitor.fingerprints import (
    DEFAULT_MAX_PIXELS,
    Fingerprint,
    ImageError,
    fingerprint_bytes,
    from_hex,
)
from monitor.fingerprints.core import AVIF
from monitor.records.cache import FingerprintCache
from monitor.records.library import IMPORTED, AddReport, Library, mirror_dhash, mirror_phash
from monitor.records.store import Store

IMAGE_SUFFIXES = ({".jpg", ".jpeg", ".jpe", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
                  | ({".avif"} if AVIF else set()))


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


def fingerprint_file(path: str | Path, *, views: str | None = "query",
                     max_pixels: int = DEFAULT_MAX_PIXELS, keypoint_picture: bool | None = None) -> Fingerprint:
    """The fingerprint of an image file: with the views a repost may need to be matched
    (``views="query"``; ``"library"`` for an entry's; None for the whole picture only).
    A query's keeps the small grey copy its keypoints are found on (at most 100 KB; the
    file's bytes where they are fewer; ``keypoint_picture=False``: none), so that
    ``Matcher.match`` decides as the daemon does: an unsure match stands only where the
    keypoints agree, and a post the hashes miss gets the second look (a crop from one side).
    Raises :class:`ImageError` for a file that is not a readable image."""
    if keypoint_picture is None:
        keypoint_picture = views == "query"
    result = _fingerprint_path(Path(path).expanduser(), None, max_pixels=max_pixels, views=views,
                               keypoint_picture=keypoint_picture)
    if result.fingerprint is None:
        raise result.error
    return result.fingerprint


def open_library(path: str | Path) -> Library:
    """The protected library stored in the SQLite file ``path`` (created if missing)."""
    return Library(Store(Path(path).expanduser()))


def add_images(library: Library, paths: Iterable[str | Path], *, label: str | None = None,
               cache: FingerprintCache | None = None) -> AddReport:
    """Add image files and folders (recursively) to ``library``; see :func:`add_files`."""
    return add_files(library, [Path(p).expanduser() for p in paths], label=label, cache=cache, progress=False)


def _fingerprint_path(path: Path, cache: FingerprintCache | None = None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                      views: str | None = None, keypoint_picture: bool = False) -> FileResult:
    """Fingerprint one file, from the cache when its key still matches (none with
    ``keypoint_picture``: the cache keeps no pictures)."""
    cache = None if keypoint_picture else cache
    try:
        if cache is not None:
            hit = cache.get(path, views)
            if hit is not None:
                return FileResult(path, hit, cached=True)
        fp = fingerprint_bytes(path.read_bytes(), max_pixels=max_pixels, views=views,
                               keypoint_picture=keypoint_picture)
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
        for result in pool.map(lambda p: _fingerprint_path(p, cache, max_pixels=max_pixels, views=views),
                               paths, chunksize=16):
            results.append(result)
            bar.update(1)
    if cache is not None:
        cache.flush()
    return results


def add_files(library: Library, paths: Iterable[str | Path], *, label: str | None = None,
              cache: FingerprintCache | None = None, progress: bool | None = None) -> AddReport:
    """Fingerprint image files and folders (recursively) into the library; re-adding an
    unchanged file keeps its entry (``AddReport.new`` counts the entries that are new)."""
    files = list(iter_image_files(paths))
    results = fingerprint_files(files, cache, progress=progress, desc="library", views="library")
    added, skipped = [], []
    start = time.time()
    for r in results:
        source = str(r.path.resolve())
        if r.fingerprint is None:
            skipped.append((source, str(r.error)))
            continue
        entry = library.add_fingerprint(source, r.fingerprint, label)
        added.append(entry)
        if entry.degenerate == "low_detail":
            skipped.append((source, "weak protection (low detail): matched only on near-identical copies, "
                                    "not on edited reposts"))
        elif entry.degenerate:
            skipped.append((source, f"degenerate ({entry.degenerate}): stored, never matched"))
    return AddReport(added, skipped, sum(e.added_at >= start for e in added))


def rehash(library: Library, *, every: bool = False, cache: FingerprintCache | None = None,
           progress: bool | None = None) -> AddReport:
    """Fingerprint entries again from their source files with this version's
    algorithm, in place: ids, labels and the matches and alerts that name
    them stay. ``every`` redoes current entries too. An entry whose source
    is not a readable image file (a URL, a file moved away) is left as it
    is and reported."""
    rows = library.sources(every=every)
    files = {i: Path(source) for i, source in rows if Path(source).is_file()}
    skipped = [(source, "source is not a readable file here: re-add the image to rehash it")
               for i, source in rows if i not in files]
    ids = list(files)
    results = fingerprint_files([files[i] for i in ids], cache, progress=progress,
                                desc="rehash", views="library")
    updated = []
    for entry_id, r in zip(ids, results, strict=True):
        if r.fingerprint is None:
            skipped.append((str(files[entry_id]), str(r.error)))
            continue
        updated.append(library.replace_hashes(entry_id, r.fingerprint))
    return AddReport(updated, skipped)


def import_csv(library: Library, path: str | Path, label: str | None = None) -> AddReport:
    """Import imagehash hex hashes: columns source, dhash[, phash, label].

    Hashes made elsewhere carry no mirror hashes, so mirrors are derived:
    a mirrored picture's dHash is its own dHash with each row reversed
    and inverted, its pHash flips the sign of odd DCT columns (both
    exact up to ties, checked in tests).
    """
    added, skipped = [], []
    with open(path, newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.DictReader(fh), start=2):
            try:
                source = (row.get("source") or row.get("path") or "").strip()
                if not source:
                    raise ValueError("missing 'source' column value")
                dhash = from_hex(row["dhash"])
                phash = from_hex(row["phash"]) if row.get("phash") else 0
                fp = Fingerprint(dhash, phash, mirror_dhash(dhash),
                                 mirror_phash(phash) if row.get("phash") else 0,
                                 int(row.get("width") or 0), int(row.get("height") or 0))
            except (KeyError, ValueError) as exc:
                skipped.append((f"{path}:{lineno}", f"bad row: {exc}"))
                continue
            added.append(library.add_fingerprint(source, fp, row.get("label") or label,
                                                 algorithm=IMPORTED))
    return AddReport(added, skipped)
