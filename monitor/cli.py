"""The ``repost-monitor`` command: parse arguments, call one function per command."""

from __future__ import annotations

import argparse
from pathlib import Path
import json
import os
import sys
from monitor import __version__
from monitor.isotime import iso

DEFAULT_DB = os.environ.get("REPOST_MONITOR_DB", "repost-monitor.sqlite")


def _cache(args):
    from monitor.records.cache import FingerprintCache, default_cache_path
    if args.no_cache:
        return None
    return FingerprintCache(args.cache or default_cache_path())


def _progress(args):
    return True if args.progress else (False if args.no_progress else None)


def _say(text: str) -> None:
    print(f"[info] {text}", file=sys.stderr, flush=True)


def _warm_up(part: str = "all") -> None:
    """Compile or load the kernels first, saying so when it is the slow first run."""
    from monitor.warmup import warm_up
    warm_up(_say, part)


def cmd_hash(args) -> int:
    from monitor.scan import fingerprint_files, iter_image_files
    _warm_up("fingerprint")
    results = fingerprint_files(list(iter_image_files(args.files)), _cache(args),
                                progress=_progress(args))
    failed = 0
    for r in results:
        if r.fingerprint is None:
            failed += 1
            print(f"[error] {r.path}: {r.error}", file=sys.stderr)
            continue
        fp = r.fingerprint
        if args.format == "jsonl":
            print(json.dumps({"path": str(r.path), "dhash": fp.dhash_hex, "phash": fp.phash_hex,
                              "width": fp.width, "height": fp.height,
                              "degenerate": fp.degenerate}))
        else:
            note = f"  degenerate:{fp.degenerate}" if fp.degenerate else ""
            print(f"{fp.dhash_hex}  {fp.phash_hex}  {fp.width}x{fp.height}  {r.path}{note}")
    return 3 if failed else 0


def _store(args, *, writes: bool = False):
    """The store of ``--db``; only commands that add to it may create it."""
    from monitor.records.store import Store
    return Store(args.db, create=writes)


def cmd_library(args) -> int:
    from monitor.records.library import Library
    from monitor.scan import add_files, rehash
    lib = Library(_store(args, writes=args.library_cmd in ("add", "import", "rehash")))
    if args.library_cmd == "add":
        _warm_up("fingerprint")
        report = add_files(lib, args.paths, label=args.label, cache=_cache(args),
                               progress=_progress(args))
        for source, why in report.skipped:
            print(f"[skip] {source}: {why}", file=sys.stderr)
        present = len(report.added) - report.new
        print(f"[ok] {report.new:,} new, {present:,} already present in {args.db} "
              f"({len(lib.index):,} indexed)")
        return 3 if any(not why.startswith("degenerate") for _, why in report.skipped) else 0
    if args.library_cmd == "import":
        report = lib.import_csv(args.csv, label=args.label)
        for source, why in report.skipped:
            print(f"[skip] {source}: {why}", file=sys.stderr)
        print(f"[ok] imported {len(report.added):,} hashes into {args.db}")
        return 3 if report.skipped else 0
    if args.library_cmd == "remove":
        missing = [i for i in args.ids if not lib.remove(i)]
        for i in missing:
            print(f"[error] no library entry {i}", file=sys.stderr)
        print(f"[ok] removed {len(args.ids) - len(missing)} entries")
        return 1 if missing else 0
    if args.library_cmd == "list":
        for e in lib.entries(limit=args.limit, offset=args.offset):
            added = iso(e.added_at)
            if args.format == "jsonl":
                print(json.dumps({"id": e.id, "source": e.source, "label": e.label,
                                  "width": e.width, "height": e.height,
                                  "dhash": f"{e.dhash:016x}", "phash": f"{e.phash:016x}",
                                  "degenerate": e.degenerate, "added_at": added}))
            else:
                print(f"{e.id}\t{e.dhash:016x}\t{e.width}x{e.height}\t{e.label}\t{e.source}"
                      + (f"\tdegenerate:{e.degenerate}" if e.degenerate else ""))
        return 0
    if args.library_cmd == "stats":
        stats = lib.stats()
        stats.update(first_added=iso(stats["first_added"]), last_added=iso(stats["last_added"]))
        print(json.dumps(stats, indent=2))
        return 0
    if args.library_cmd == "rehash":
        _warm_up("fingerprint")
        report = rehash(lib, every=args.all, cache=_cache(args), progress=_progress(args))
        for source, why in report.skipped:
            print(f"[skip] {source}: {why}", file=sys.stderr)
        print(f"[ok] rehashed {len(report.added):,} entries in {args.db}; "
              f"{len(report.skipped):,} left as they were")
        return 3 if report.skipped else 0
    raise AssertionError(args.library_cmd)


def cmd_alerts(args) -> int:
    from monitor.records.alerts import list_alerts, resend_dead
    store = _store(args)
    if args.alerts_cmd == "list":
        for a in list_alerts(store, args.state, args.limit):
            if args.format == "jsonl":
                print(json.dumps(a))
            else:
                al = a["alert"]
                print(f"{a['id']}\t{a['sink']}\t{a['state']}\tattempts={a['attempts']}\t{al['tier']}\t"
                      f"{al['repost']['image_url']} -> {al['library']['label']}"
                      + (f"\terror={a['last_error']}" if a["last_error"] else ""))
        return 0
    n = resend_dead(store, args.ids or None)
    print(f"[ok] {n} dead alerts queued again; a running daemon delivers them")
    return 0


def cmd_matches(args) -> int:
    from monitor.records.verdicts import set_verdict
    store = _store(args)
    if args.matches_cmd == "verdict":
        if not set_verdict(store, args.id, args.verdict):
            print(f"[error] no match {args.id}", file=sys.stderr)
            return 1
        print(f"[ok] match {args.id}: {args.verdict}")
        return 0
    from monitor.records.matches import latest
    for r in latest(store, args.limit):
        print("\t".join("" if v is None else str(v) for v in (r[0], iso(r[1]), *r[2:])))
    return 0


def _write_table(rows: list[dict], fmt: str, output: str | None) -> None:
    import csv
    import io
    buf = io.StringIO()
    if fmt == "csv":
        if rows:
            writer = csv.DictWriter(buf, list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        for r in rows:
            buf.write(json.dumps(r) + "\n")
    if output:
        Path(output).write_text(buf.getvalue(), encoding="utf-8")
    else:
        sys.stdout.write(buf.getvalue())


def _group_findings(groups):
    from monitor.tools.report import Finding, thumbnail_uri
    thumbs: dict = {}

    def thumb(p):
        if p not in thumbs:
            thumbs[p] = thumbnail_uri(p)
        return thumbs[p]
    findings = []
    for g in groups:
        for e in sorted(g.edges, key=lambda e: (str(e.a.path), str(e.b.path))):
            findings.append(Finding(e.tier, str(e.a.path), thumb(e.a.path), str(e.b.path), thumb(e.b.path),
                                    e.a.fp.dhash, e.b.fp.dhash, e.dhash_distance, e.phash_distance,
                                    f"group {g.id}; keep {g.keep.path.name}"
                                    + ("; mirrored" if e.mirrored else "")))
    return findings


def cmd_dedupe(args, grouping: bool = False) -> int:
    from monitor.tools import catalog
    from monitor.tools import report
    _warm_up()
    if grouping:
        groups, images, bad = catalog.group(args.folders, _cache(args), tier=args.tier,
                                            progress=_progress(args))
    else:
        groups, images, bad = catalog.dedupe(args.folders, _cache(args), tier=args.tier, keep=args.keep,
                                             prefer=args.prefer, progress=_progress(args))
    for b in bad:
        print(f"[skip] {b.path}: {b.reason}", file=sys.stderr)
    rows = []
    for g in groups:
        for im in g.members:
            rows.append({"group": g.id, "path": str(im.path),
                         "role": "keep" if im.path == g.keep.path else ("variant" if grouping else "duplicate"),
                         "width": im.fp.width, "height": im.fp.height, "bytes": im.size,
                         "dhash": im.fp.dhash_hex})
    _write_table(rows, args.format, args.output)
    extra = sum(len(g.members) - 1 for g in groups)
    word = "variant groups" if grouping else "duplicate groups"
    print(f"[done] {len(images):,} images, {len(groups):,} {word}, {extra:,} files beyond one per group"
          + (f", {len(bad):,} unreadable" if bad else ""), file=sys.stderr)
    if not grouping and args.action:
        actions = catalog.apply_actions(groups, args.action, dest=args.move_to, dry_run=not args.apply)
        for a in actions:
            verb = {"move": "moved", "hardlink": "hard-linked", "delete": "deleted"}[a.kind]
            print(f"[{'done' if a.done else 'dry-run'}] {verb if a.done else a.kind}: {a.path}"
                  + (f" -> {a.target}" if a.target else ""), file=sys.stderr)
        if not args.apply:
            print("[dry-run] nothing changed; add --apply to act", file=sys.stderr)
    if args.report:
        report.write(args.report, "repost-monitor " + ("group" if grouping else "dedupe"),
                     f"{len(images):,} images, {len(groups):,} groups", _group_findings(groups))
    return 3 if bad else 0


def cmd_group(args) -> int:
    return cmd_dedupe(args, grouping=True)


def cmd_audit(args) -> int:
    from monitor.tools import catalog
    _warm_up()
    rows, old_root, new_root = catalog.audit(args.old, args.new, _cache(args), progress=_progress(args))
    _write_table([{"status": r.status, "old": r.old or "", "new": r.new or "",
                   "dhash_distance": "" if r.dhash_distance is None else r.dhash_distance,
                   "note": r.note} for r in rows], args.format, args.output)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    order = ("intact", "re-encoded", "moved", "altered", "missing", "new")
    print("[summary] " + ", ".join(f"{k} {counts.get(k, 0):,}" for k in order), file=sys.stderr)
    if args.report:
        _audit_report(args.report, rows, old_root, new_root, counts, order)
    return 1 if counts.get("missing") or counts.get("altered") else 0


# An audit of a big tree is mostly intact files: the report shows problems first, and
# thumbnails of only this many intact ones (a 1,021-image audit was 20.6 MB with all).
AUDIT_INTACT_THUMBNAILS = 50


def _audit_report(path, rows, old_root, new_root, counts, order) -> None:
    from monitor.tools.report import Finding, thumbnail_uri, write
    problems_first = sorted(rows, key=lambda r: (("missing", "altered", "moved", "re-encoded", "new",
                                                   "intact").index(r.status), r.old or r.new or ""))
    findings, intact = [], 0
    for r in problems_first:
        thumbs = r.status != "intact" or intact < AUDIT_INTACT_THUMBNAILS
        intact += r.status == "intact"
        findings.append(Finding(r.status, f"OLD/{r.old}" if r.old else "(none)",
                                thumbnail_uri(old_root / r.old) if r.old and thumbs else None,
                                f"NEW/{r.new}" if r.new else "(none)",
                                thumbnail_uri(new_root / r.new) if r.new and thumbs else None,
                                None, None, r.dhash_distance, None, r.note))
    summary = "[summary] " + ", ".join(f"{k} {counts.get(k, 0)}" for k in order)
    if intact > AUDIT_INTACT_THUMBNAILS:
        summary += f"; thumbnails of the first {AUDIT_INTACT_THUMBNAILS} intact files only"
    write(path, "repost-monitor audit", summary, findings)


def cmd_match(args) -> int:
    from monitor.tools.batch import run_match
    from monitor.search.matcher import PRESETS, threshold_tiers
    tiers = threshold_tiers(args.threshold) if args.threshold is not None else PRESETS[args.tier]
    _warm_up()
    return run_match(args.inputs, args.library, tiers, best=args.best, fmt=args.format,
                     output=args.output, cache=_cache(args), progress=_progress(args),
                     report_path=args.report)


def cmd_demo(args) -> int:
    import asyncio

    from monitor.tools.demo import run_batch_demo, run_daemon_demo
    from monitor.logs import setup_logging
    if args.batch:
        _warm_up()
        return run_batch_demo()
    setup_logging("text", "warning" if not args.verbose else "info")
    return asyncio.run(run_daemon_demo(args.posts, args.rate, args.forever, args.port))


def cmd_run(args) -> int:
    import asyncio

    from monitor.config import load_config
    from monitor.daemon import run_daemon
    from monitor.logs import setup_logging
    config = load_config(args.config)
    setup_logging(args.log_format or config.log.format, config.log.level)
    asyncio.run(run_daemon(config))
    return 0


def cmd_check_config(args) -> int:
    from monitor.config import load_config
    config = load_config(args.config)
    print(f"{args.config}: ok ({len(config.feeds)} feeds, store {config.store.path})")
    return 0


def _add_scan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", help="fingerprint cache file (default: $REPOST_MONITOR_CACHE or "
                                   "~/.cache/repost-monitor/fingerprints.sqlite)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    p.add_argument("--progress", action="store_true", help="always show a progress bar")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")


def _db_option(p: argparse.ArgumentParser, *, top: bool) -> None:
    """--db before the verb (``library --db X add``) or after it (``library add --db X``)."""
    if top:
        p.add_argument("--db", default=DEFAULT_DB, help="store file (default: %(default)s, "
                                                        "or $REPOST_MONITOR_DB)")
    else:
        p.add_argument("--db", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="repost-monitor",
        description="Find reposts of a protected image library: a streaming daemon and "
                    "batch tools built on 64-bit perceptual fingerprints.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("hash", help="print the fingerprints of image files",
                       description="Print dHash and pHash (imagehash's hex form) of each image.")
    p.add_argument("files", nargs="+", help="image files or folders")
    p.add_argument("--format", choices=("text", "jsonl"), default="text")
    _add_scan_options(p)
    p.set_defaults(func=cmd_hash)

    p = sub.add_parser("library", help="manage the protected library",
                       description="Manage the protected library stored in a SQLite file.")
    _db_option(p, top=True)
    lsub = p.add_subparsers(dest="library_cmd", required=True, metavar="ACTION")
    a = lsub.add_parser("add", help="add image files or folders (recursive)")
    a.add_argument("paths", nargs="+")
    a.add_argument("--label", help="label for the added entries (default: file name)")
    _add_scan_options(a)
    a = lsub.add_parser("import", help="import imagehash hex hashes from CSV",
                        description="CSV with a header: source, dhash and optionally phash, "
                                    "label, width, height. Hex as str(imagehash.dhash(img)).")
    a.add_argument("csv")
    a.add_argument("--label")
    a = lsub.add_parser("remove", help="remove entries by id")
    a.add_argument("ids", nargs="+", type=int)
    a = lsub.add_parser("list", help="list entries")
    a.add_argument("--limit", type=int, default=-1)
    a.add_argument("--offset", type=int, default=0)
    a.add_argument("--format", choices=("text", "jsonl"), default="text")
    lsub.add_parser("stats", help="entry counts and index size")
    a = lsub.add_parser("rehash", help="fingerprint older entries again with this version's algorithm",
                        description="Entries fingerprinted by an older version (or imported as "
                                    "imagehash hashes) match on fewer views, some on the 64-bit "
                                    "hashes alone. This fingerprints them again from their source "
                                    "files, in place: ids, labels, matches and alerts stay. "
                                    "Entries whose source is not a file here are reported and kept. "
                                    "Exit 3 when any entry was left as it was.")
    a.add_argument("--all", action="store_true", help="every entry, current ones too")
    _add_scan_options(a)
    for action in lsub.choices.values():
        _db_option(action, top=False)
    p.set_defaults(func=cmd_library)

    p = sub.add_parser("alerts", help="list alerts, re-send dead ones",
                       description="Inspect the alert outbox of a store.")
    _db_option(p, top=True)
    asub = p.add_subparsers(dest="alerts_cmd", required=True, metavar="ACTION")
    a = asub.add_parser("list", help="list alerts, newest first")
    a.add_argument("--state", choices=("pending", "delivered", "dead"))
    a.add_argument("--limit", type=int, default=100)
    a.add_argument("--format", choices=("text", "jsonl"), default="text")
    a = asub.add_parser("resend", help="queue dead-lettered alerts again")
    a.add_argument("ids", nargs="*", type=int, help="alert ids (default: every dead alert)")
    for action in asub.choices.values():
        _db_option(action, top=False)
    p.set_defaults(func=cmd_alerts)

    p = sub.add_parser("matches", help="list recorded matches, record verdicts",
                       description="Review the matches the daemon recorded.")
    _db_option(p, top=True)
    msub = p.add_subparsers(dest="matches_cmd", required=True, metavar="ACTION")
    a = msub.add_parser("list", help="newest first: id, tier, distance, image, entry, feed, verdict")
    a.add_argument("--limit", type=int, default=50)
    a = msub.add_parser("verdict", help="confirmed | false_positive | authorized")
    a.add_argument("id", type=int)
    a.add_argument("verdict", choices=("confirmed", "false_positive", "authorized"))
    for action in msub.choices.values():
        _db_option(action, top=False)
    p.set_defaults(func=cmd_matches)

    p = sub.add_parser(
        "match", help="match input images against a library (all pairs)",
        description="Fingerprint inputs and library, compare all pairs, print matches. "
                    "Distances are bits out of 64. Exit codes: 0 matches found, 1 no match, "
                    "2 error, 3 some inputs could not be read.")
    p.add_argument("inputs", nargs="+", help="image files or folders")
    p.add_argument("--library", required=True, help="store file or folder of images")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tier", choices=("exact", "near", "loose"), default="near",
                   help="preset: report matches up to this tier (default: %(default)s)")
    g.add_argument("--threshold", type=int,
                   help="dHash distance limit in bits, without pHash verification (seed mode)")
    p.add_argument("--best", action="store_true", help="only the nearest library image per input")
    p.add_argument("--format", choices=("table", "csv", "jsonl"), default="table")
    p.add_argument("--output", help="write matches here instead of stdout")
    p.add_argument("--report", metavar="FILE.html", help="also write a visual HTML report")
    _add_scan_options(p)
    p.set_defaults(func=cmd_match)

    from monitor.tools.catalog import KEEP_POLICIES
    for name, func, helptext, tier in (
            ("dedupe", cmd_dedupe, "groups of exact and near duplicates, one file kept per group", "near"),
            ("group", cmd_group, "variant groups at a looser tier (one shoot, edits of one picture)",
             "loose")):
        p = sub.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ". "
                           "Group ids are deterministic whatever the input order.")
        p.add_argument("folders", nargs="+")
        p.add_argument("--tier", choices=("exact", "near", "loose"), default=tier,
                       help="how close counts (default: %(default)s)")
        p.add_argument("--format", choices=("csv", "jsonl"), default="csv")
        p.add_argument("--output", help="write rows here instead of stdout")
        p.add_argument("--report", metavar="FILE.html", help="also write a visual HTML report")
        if name == "dedupe":
            p.add_argument("--keep", choices=KEEP_POLICIES, default="largest-resolution",
                           help="which file of a group to keep (default: %(default)s)")
            p.add_argument("--prefer", metavar="PATH", help="for --keep prefer-prefix")
            p.add_argument("--action", choices=("move", "hardlink", "delete"),
                           help="what to do with the other files (a dry run unless --apply)")
            p.add_argument("--move-to", metavar="DIR", help="for --action move")
            p.add_argument("--apply", action="store_true", help="really act; the kept file is never touched")
        _add_scan_options(p)
        p.set_defaults(func=func)

    p = sub.add_parser("audit", help="did every image of OLD survive the move to NEW?",
                       description="Classify every image of OLD as intact, re-encoded, moved, altered or "
                                   "missing in NEW, and list what NEW has that OLD lacks. Exit code 1 "
                                   "when anything is missing or altered.")
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    p.add_argument("--output", help="write rows here instead of stdout")
    p.add_argument("--report", metavar="FILE.html", help="also write a visual HTML report")
    _add_scan_options(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("demo", help="run the self-contained demo (no network needed)",
                       description="Start a feed host on loopback publishing posts (some are "
                                   "reposts of the sample library), run the real daemon against "
                                   "it and print each detection as it happens.")
    p.add_argument("--posts", type=int, default=40, help="posts to publish (default: %(default)s)")
    p.add_argument("--rate", type=float, default=4.0, help="posts per second (default: %(default)s)")
    p.add_argument("--port", type=int, default=0, help="port for /metrics and /healthz (default: any)")
    p.add_argument("--forever", action="store_true", help="keep running after the last post")
    p.add_argument("--batch", action="store_true", help="run `match` on the posts instead of the daemon")
    p.add_argument("--verbose", action="store_true", help="show the daemon's log")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run the monitoring daemon",
                       description="Watch the configured feeds, match new images against the "
                                   "library and record matches. SIGINT/SIGTERM stop it cleanly.")
    p.add_argument("--config", required=True, help="TOML config file")
    p.add_argument("--log-format", choices=("text", "json"), help="override log.format")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config file",
                       description="Validate a TOML config; each problem names its key.")
    p.add_argument("config")
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    from monitor.records.store import StoreError
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, StoreError) as exc:  # ConfigError is a ValueError
        print(f"repost-monitor: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `... list | head -1`: the reader has what it wanted. Point stdout at devnull
        # so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("repost-monitor: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
