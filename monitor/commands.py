"""What each command of ``repost-monitor`` does: one function per command, taking the
parsed arguments and returning the exit status. Heavy modules are imported inside the
functions, so ``--help`` and quick commands start fast."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from monitor.isotime import iso
from monitor.safe_text import printable, spreadsheet_cell

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
            print(f"[error] {printable(r.path)}: {printable(r.error)}", file=sys.stderr)
            continue
        fp = r.fingerprint
        if args.format == "jsonl":
            print(json.dumps({"path": str(r.path), "dhash": fp.dhash_hex, "phash": fp.phash_hex,
                              "width": fp.width, "height": fp.height,
                              "degenerate": fp.degenerate}))
        else:
            note = f"  degenerate:{fp.degenerate}" if fp.degenerate else ""
            print(f"{fp.dhash_hex}  {fp.phash_hex}  {fp.width}x{fp.height}  {printable(r.path)}{note}")
    return 3 if failed else 0


def store_location(args) -> str:
    """Where ``--db`` or ``--config`` (the config's [store], as the daemon opens it) points."""
    if getattr(args, "config", None) is None:
        return args.db or DEFAULT_DB
    if args.db is not None:
        raise ValueError("--db and --config both name a store; give one")
    from monitor.config import load_config
    return load_config(args.config).store.location


def _store(args, *, writes: bool = False):
    """The store of ``--db`` or ``--config``; only commands that add to it may create it."""
    from monitor.records.engines import open_store
    return open_store(store_location(args), create=writes)


def cmd_library(args) -> int:
    from monitor.records.library import Library
    from monitor.scan import add_files, import_csv, rehash
    store = _store(args, writes=args.library_cmd in ("add", "import", "rehash"))
    lib = Library(store)
    if args.library_cmd == "add":
        _warm_up("fingerprint")
        report = add_files(lib, args.paths, label=args.label, cache=_cache(args),
                               progress=_progress(args))
        for source, why in report.skipped:
            print(f"[{'weak' if why.startswith('weak') else 'skip'}] {printable(source)}: {printable(why)}",
                  file=sys.stderr)
        present = len(report.added) - report.new
        print(f"[ok] {report.new:,} new, {present:,} already present in {store.path} "
              f"({len(lib.index):,} indexed)")
        return 3 if any(not why.startswith(("degenerate", "weak")) for _, why in report.skipped) else 0
    if args.library_cmd == "import":
        report = import_csv(lib, args.csv, label=args.label)
        for source, why in report.skipped:
            print(f"[skip] {printable(source)}: {printable(why)}", file=sys.stderr)
        print(f"[ok] imported {len(report.added):,} hashes into {store.path}")
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
                print(f"{e.id}\t{e.dhash:016x}\t{e.width}x{e.height}\t{printable(e.label)}\t{printable(e.source)}"
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
            print(f"[skip] {printable(source)}: {printable(why)}", file=sys.stderr)
        print(f"[ok] rehashed {len(report.added):,} entries in {store.path}; "
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
                      f"{printable(al['repost']['image_url'])} -> {printable(al['library']['label'])}"
                      + (f"\terror={printable(a['last_error'])}" if a["last_error"] else ""))
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
        print("\t".join("" if v is None else printable(v) for v in (r[0], iso(r[1]), *r[2:])))
    return 0


def _write_table(rows: list[dict], fmt: str, output: str | None) -> None:
    import csv
    import io
    buf = io.StringIO()
    if fmt == "csv":
        if rows:
            # paths and notes as a spreadsheet cannot run them, and as a terminal shows them
            shown = (lambda v: printable(v) if isinstance(v, str) else v) if not output and sys.stdout.isatty() \
                else (lambda v: v)
            writer = csv.DictWriter(buf, list(rows[0]))
            writer.writeheader()
            writer.writerows({k: spreadsheet_cell(shown(v)) for k, v in r.items()} for r in rows)
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
            m = e.match
            findings.append(Finding(m.tier, str(e.a.path), thumb(e.a.path), str(e.b.path), thumb(e.b.path),
                                    m.query_dhash, m.library_dhash, m.dhash_distance, m.phash_distance,
                                    f"group {g.id}; keep {g.keep.path.name}"
                                    + ("; mirrored" if m.mirrored else "")))
    return findings


def cmd_dedupe(args, grouping: bool = False) -> int:
    from monitor.tools import catalog, report
    _warm_up()
    if grouping:
        groups, images, bad = catalog.group(args.folders, _cache(args), tier=args.tier,
                                            progress=_progress(args), second_look=not args.hashes_only)
    else:
        groups, images, bad = catalog.dedupe(args.folders, _cache(args), tier=args.tier, keep=args.keep,
                                             prefer=args.prefer, progress=_progress(args))
    for b in bad:
        print(f"[skip] {printable(b.path)}: {printable(b.reason)}", file=sys.stderr)
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
            print(f"[{'done' if a.done else 'dry-run'}] {verb if a.done else a.kind}: {printable(a.path)}"
                  + (f" -> {printable(a.target)}" if a.target else ""), file=sys.stderr)
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


def cmd_calibrate(args) -> int:
    from pathlib import Path

    from monitor.config import load_config
    from monitor.tools import calibrate
    _warm_up()
    result = calibrate.calibrate(args.library, args.unrelated, limit=args.limit,
                                 unrelated_limit=args.unrelated_limit, near_rate=args.near_rate,
                                 loose_rate=args.loose_rate, say=_say)
    calibrate.report(result)
    if args.write:
        path = Path(args.write)
        # what is written must still load (ConfigError otherwise, the file as it was)
        if calibrate.write_config(path, result, check=load_config):
            written = ", ".join(f"{t.name}_score" for t in result.tiers if t.measured)
            print(f"[ok] {path}: [match] {written}")
        else:
            print(f"[ok] {path}: [match] nothing measured, nothing written")
    return 0


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
    from monitor.search.matcher import PRESETS, threshold_tiers
    from monitor.tools.batch import run_match
    tiers = threshold_tiers(args.threshold) if args.threshold is not None else PRESETS[args.tier]
    _warm_up()
    # --threshold N: what imagehash users mean by it, the whole pictures' dHash within N bits
    # (the crops and frames the tiers compare would report pairs plain dHash does not).
    whole = args.threshold is not None
    return run_match(args.inputs, args.library, tiers, best=args.best, fmt=args.format,
                     output=args.output, cache=_cache(args), progress=_progress(args),
                     report_path=args.report, whole_pictures=whole, mirrored=args.mirrored or not whole)


def cmd_demo(args) -> int:
    import asyncio

    from monitor.logs import setup_logging
    from monitor.tools.demo import run_batch_demo, run_daemon_demo
    if args.batch:
        _warm_up()
        return run_batch_demo()
    setup_logging("text", "warning" if not args.verbose else "info")
    if args.shards:
        from monitor.tools.demo_scaled import run_scaled_demo
        return asyncio.run(run_scaled_demo(args.shards, args.posts, args.rate, source=args.source,
                                           keep_running=args.forever))
    return asyncio.run(run_daemon_demo(args.posts, args.rate, args.forever, args.port, source=args.source))


def cmd_run(args) -> int:
    import asyncio

    from monitor.config import load_config
    from monitor.daemon import run_daemon
    from monitor.logs import setup_logging
    config = load_config(args.config)
    if args.port is not None:
        config = config.model_copy(update={"server": config.server.model_copy(update={"port": args.port})})
    setup_logging(args.log_format or config.log.format, config.log.level)
    if args.role.strip() == "all":
        asyncio.run(run_daemon(config))
        return 0
    from monitor.scaleout.node import parse_roles, run_node
    try:
        roles = parse_roles(args.role, config.transport.shards)
    except ValueError as exc:
        print(f"repost-monitor run: --role: {exc}", file=sys.stderr)
        return 2
    asyncio.run(run_node(config, roles))
    return 0


def cmd_streams(args) -> int:
    import asyncio

    from monitor.config import load_config
    from monitor.scaleout import admin
    config = load_config(args.config)
    if args.action == "stats":
        print(admin.dumps(asyncio.run(admin.stats(config))))
    elif args.action == "dead":
        print(admin.dumps(asyncio.run(admin.dead(config))))
    else:
        print(f"replayed {asyncio.run(admin.replay(config, args.ids))} dead letters")
    return 0


def cmd_check_config(args) -> int:
    from monitor.config import load_config
    config = load_config(args.config)
    store = config.store.path if config.store.url is None else "PostgreSQL"
    print(f"{args.config}: ok ({len(config.feeds)} feeds, store {store})")
    return 0
