"""Batch work over files: the all-pairs ``match`` of inputs against a library."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from monitor.fingerprints import Fingerprint, KeypointFinder
from monitor.records.cache import FingerprintCache
from monitor.records.library import Library
from monitor.records.store import Store
from monitor.safe_text import printable, spreadsheet_cell
from monitor.scan import FileResult, add_files, fingerprint_files, iter_image_files
from monitor.search.index import LibraryIndex
from monitor.search.matcher import Match, Matcher, Tier, query_rows
from monitor.tools.report import Finding, thumbnail_uri, write
from monitor.warmup import warm_up

# Exit codes of `match` (README, "Exit codes").
EXIT_MATCHES = 0
EXIT_NO_MATCH = 1
EXIT_ERROR = 2
EXIT_UNREADABLE = 3


def open_library(spec: str | Path, cache: FingerprintCache | None,
                 progress: bool | None = None, log: TextIO = sys.stderr) -> Library:
    """A library from a store file, or built in memory from a folder."""
    path = Path(spec)
    if path.is_dir():
        lib = Library(Store(":memory:"))
        report = add_files(lib, [path], cache=cache, progress=progress)
        for source, why in report.skipped:
            print(f"[skip] {printable(source)}: {printable(why)}", file=log)
        print(f"[ok] fingerprinted {len(report.added):,} library images", file=log)
        return lib
    if not path.is_file():
        raise FileNotFoundError(f"library not found: {path} (a store file or a folder of images)")
    with open(path, "rb") as fh:
        if fh.read(16) != b"SQLite format 3\x00":
            raise ValueError(f"{path} is neither a folder nor a repost-monitor store")
    lib = Library(Store(path))
    print(f"[ok] loaded {len(lib.index):,} library images from {path}", file=log)
    return lib


@dataclass(frozen=True, slots=True)
class MatchRow:
    """An input file, the library entry it matched, and how (the one Match type)."""
    input: str
    library: str
    label: str
    match: Match


def whole_picture_index(library: Library) -> LibraryIndex:
    """One row per entry, its whole picture's hashes: no crops, frames or turns."""
    index = LibraryIndex()
    for e in library.entries():
        if e.degenerate is None:
            index.add(e.id, Fingerprint(e.dhash, e.phash, e.dhash_mirror, e.phash_mirror, e.width, e.height))
    return index


def match_files(inputs: list[str], library: Library, tiers: tuple[Tier, ...], *,
                best: bool = False, cache: FingerprintCache | None = None,
                progress: bool | None = None, log: TextIO = sys.stderr, whole_pictures: bool = False,
                mirrored: bool = True) -> tuple[list[MatchRow], list[FileResult]]:
    """Fingerprint inputs, compare all pairs, return rows and unreadable files.
    ``whole_pictures`` compares the whole pictures only (no views either side);
    ``mirrored`` False drops matches of a mirrored copy."""
    files = list(iter_image_files(inputs))
    results = fingerprint_files(files, cache, progress=progress, desc="inputs", views="query")
    good = [r for r in results if r.fingerprint is not None and r.fingerprint.degenerate is None]
    bad = [r for r in results if r.fingerprint is None]
    for r in bad:
        print(f"[skip] {printable(r.path)}: {printable(r.error)}", file=log)
    for r in results:
        if r.fingerprint is not None and r.fingerprint.degenerate:
            print(f"[skip] {printable(r.path)}: degenerate image ({r.fingerprint.degenerate}), "
                  "its hash would match anything", file=log)
    print(f"[ok] fingerprinted {len(good):,} input images", file=log)

    matcher = Matcher(whole_picture_index(library) if whole_pictures else library.index, tiers)
    warm_up(None)
    queries = [dataclasses.replace(r.fingerprint, views=()) if whole_pictures else r.fingerprint for r in good]
    rows_in = query_rows(queries)
    start = time.perf_counter()
    pairs = matcher.match_rows(rows_in, best_only=best, mirrored=mirrored)
    elapsed = time.perf_counter() - start
    comparisons = 2 * rows_in.dhash.size * library.index.rows  # every view, plain and mirrored
    print(f"[run] {comparisons:,} pair comparisons in {elapsed:.3f}s", file=log)
    per_query = matcher.matches_of(pairs)
    if not whole_pictures:  # as the daemon: unsure matches confirmed by keypoints, a second look
        start = time.perf_counter()
        sources = {q: KeypointFinder(r.path.read_bytes) for q, r in enumerate(good)}
        per_query = matcher.confirmed(per_query, sources)[0]
        missing = [q for q in range(len(good)) if q not in per_query]
        looked = matcher.match_many([queries[q] for q in missing], [sources[q] for q in missing])
        for q, found in zip(missing, looked, strict=True):
            found = [m for m in found if mirrored or not m.mirrored]
            if found:
                per_query[q] = found[:1] if best else found
        # the keypoints' pass is most of a small run's time: said, not hidden behind the hashes'
        looked = sum(1 for finder in sources.values() if finder.searched)
        print(f"[run] keypoints found for {looked:,} of {len(good):,} inputs (an unsure match, or near an entry) "
              f"in {time.perf_counter() - start:.3f}s", file=log)
    entries = library.entries_by_id([m.entry_id for found in per_query.values() for m in found])
    rows = [MatchRow(str(good[q].path), entries[m.entry_id].source, entries[m.entry_id].label, m)
            for q, found in sorted(per_query.items()) for m in found]
    return rows, bad


def write_rows(rows: list[MatchRow], fmt: str, out: TextIO) -> None:
    if fmt == "table":
        for r in rows:
            m = r.match
            flip = " mirrored" if m.mirrored else ""
            fine = f", fine {m.fine_distance}/512" if m.fine_distance is not None else ""
            fine += f", {m.inliers} keypoints agree" if m.inliers is not None else ""
            print(f"[match] dist={m.dhash_distance}/64 bits (pHash {m.phash_distance}/64{fine}, "
                  f"{m.tier}{flip}) {printable(r.library)} -> {printable(r.input)}", file=out)
    elif fmt == "csv":
        terminal = out.isatty()  # a terminal is shown the file names' control characters escaped
        writer = csv.writer(out)
        writer.writerow(["input", "library", "label", "tier", "dhash_distance",
                         "phash_distance", "mirrored", "fine_distance"])
        for r in rows:
            m = r.match
            texts = [r.input, r.library, r.label]
            texts = [spreadsheet_cell(printable(t) if terminal else t) for t in texts]
            writer.writerow([*texts, m.tier, m.dhash_distance, m.phash_distance,
                             int(m.mirrored), "" if m.fine_distance is None else m.fine_distance])
    elif fmt == "jsonl":
        for r in rows:
            m = r.match
            out.write(json.dumps({"input": r.input, "library": r.library, "label": r.label,
                                  "tier": m.tier, "dhash_distance": m.dhash_distance,
                                  "phash_distance": m.phash_distance, "mirrored": m.mirrored,
                                  "fine_distance": m.fine_distance, "bits": 64,
                                  "fine_bits": 512, "decided_by": m.decided_by,
                                  "keypoint_inliers": m.inliers}) + "\n")
    else:
        raise ValueError(f"unknown format {fmt!r}")


def write_report(path: str, rows: list[MatchRow], bad) -> None:
    thumbs: dict[str, str | None] = {}

    def thumb(p: str) -> str | None:
        if p not in thumbs:
            thumbs[p] = thumbnail_uri(p) if Path(p).exists() else None
        return thumbs[p]
    findings = [Finding(r.match.tier, r.library, thumb(r.library), r.input, thumb(r.input), r.match.library_dhash,
                        r.match.query_dhash, r.match.dhash_distance, r.match.phash_distance,
                        "mirrored copy" if r.match.mirrored else "") for r in rows]
    # Unreadable inputs are named, with why, after the matches.
    findings += [Finding("unreadable", "(not compared)", None, str(b.path), None, note=str(b.error))
                 for b in bad]
    write(path, "repost-monitor match", f"{len(rows):,} matches; {len(bad):,} inputs unreadable", findings)


def run_match(inputs: list[str], library_spec: str, tiers: tuple[Tier, ...], *, best: bool,
              fmt: str, output: str | None, cache: FingerprintCache | None,
              progress: bool | None, log: TextIO = sys.stderr, report_path: str | None = None,
              whole_pictures: bool = False, mirrored: bool = True) -> int:
    library = open_library(library_spec, cache, progress, log)
    rows, bad = match_files(inputs, library, tiers, best=best, cache=cache, progress=progress, log=log,
                            whole_pictures=whole_pictures, mirrored=mirrored)
    if report_path:
        write_report(report_path, rows, bad)
    if output:
        with open(output, "w", encoding="utf-8", newline="") as fh:
            write_rows(rows, fmt, fh)
    else:
        buf = io.StringIO()
        write_rows(rows, fmt, buf)
        sys.stdout.write(buf.getvalue())
    # --threshold N: whole pictures' dHash; a tier: scores over every view, and the second look
    what = f"within {max(t.dhash_max for t in tiers)}/64 bits of dHash" if whole_pictures \
        else f"up to the {tiers[-1].name} tier"
    print(f"[done] {len(rows):,} matches {what}"
          + (f", {len(bad):,} inputs unreadable" if bad else ""), file=log)
    if bad:
        return EXIT_UNREADABLE
    return EXIT_MATCHES if rows else EXIT_NO_MATCH
