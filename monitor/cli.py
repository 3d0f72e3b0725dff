"""The ``repost-monitor`` command: parse arguments, call one function per command."""

from __future__ import annotations

import argparse
import os
import sys

from monitor.commands import (
    DEFAULT_DB,
    cmd_alerts,
    cmd_audit,
    cmd_calibrate,
    cmd_check_config,
    cmd_dedupe,
    cmd_demo,
    cmd_group,
    cmd_hash,
    cmd_library,
    cmd_match,
    cmd_matches,
    cmd_run,
    cmd_streams,
)
from monitor.search.tiers import TIER_NAMES
from monitor.version import __version__


def _add_scan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", help="fingerprint cache file (default: $REPOST_MONITOR_CACHE or "
                                   "~/.cache/repost-monitor/fingerprints.sqlite)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the cache")
    p.add_argument("--progress", action="store_true", help="always show a progress bar")
    p.add_argument("--no-progress", action="store_true", help="never show a progress bar")


def _db_option(p: argparse.ArgumentParser, *, top: bool) -> None:
    """--db or --config before the verb (``library --db X add``) or after it (``library add --db X``)."""
    if top:
        p.add_argument("--db", help=f"store file or postgresql:// URL (default: {DEFAULT_DB}, "
                                    "or $REPOST_MONITOR_DB)")
        p.add_argument("--config", help="the daemon's config file: the store its [store] names "
                                        "(instead of --db)")
    else:
        p.add_argument("--db", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        p.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


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
                       description="Manage the protected library in a store: a SQLite file (--db), or the one "
                                   "a daemon's config names (--config), so the daemon sees what is added.")
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
    g.add_argument("--tier", choices=TIER_NAMES, default="near",
                   help="preset: report matches up to this tier (default: %(default)s)")
    g.add_argument("--threshold", type=int,
                   help="imagehash's meaning: the whole pictures' dHash within this many bits, no views, no "
                        "verification (mirrored copies only with --mirrored)")
    p.add_argument("--mirrored", action="store_true", help="with --threshold: mirrored copies count too")
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
        p.add_argument("--tier", choices=TIER_NAMES, default=tier,
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
        else:
            p.add_argument("--hashes-only", action="store_true",
                           help="no second look by keypoints for pictures the hashes leave alone (crops from one "
                                "side are then missed): ~3 ms less for each picture near others")
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

    p = sub.add_parser("calibrate", help="measure the near and loose tiers on your own pictures",
                       description="Make reposts of the pictures to protect with common edits, match them and "
                                   "the unrelated pictures against the pictures, and pick each tier's score "
                                   "limit where unrelated pairs match at most at its target rate (95%% upper "
                                   "bound). Prints recall per edit; --write stores the limits in the config's "
                                   "[match] near_score and loose_score, keeping the rest of the file.")
    p.add_argument("library", nargs="+", help="pictures to protect: files or folders (up to --limit)")
    p.add_argument("--unrelated", nargs="+", required=True,
                   help="pictures that are not reposts of them (the more the better: ~120,000 pairs "
                        "show the near tier's rate)")
    p.add_argument("--limit", type=int, default=300, help="pictures to protect used (default: %(default)s)")
    p.add_argument("--unrelated-limit", type=int, default=2000, help="unrelated pictures used (default: %(default)s)")
    p.add_argument("--near-rate", type=float, default=2.5e-5, help="near's pair rate (default: %(default)s)")
    p.add_argument("--loose-rate", type=float, default=1e-4, help="loose's pair rate (default: %(default)s)")
    p.add_argument("--write", metavar="CONFIG", help="store the measured limits in this TOML config")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("demo", help="run the self-contained demo (no network needed)",
                       description="Start a feed host on loopback publishing posts (some are "
                                   "reposts of the sample library), run the real daemon against "
                                   "it and print each detection as it happens.")
    p.add_argument("--posts", type=int, default=40, help="posts to publish (default: %(default)s)")
    p.add_argument("--rate", type=float, default=4.0, help="posts per second (default: %(default)s)")
    p.add_argument("--port", type=int, default=0, help="port for /metrics and /healthz (default: any)")
    p.add_argument("--source", choices=("feeds", "jetstream"), default="feeds",
                   help="where the posts come from: an RSS feed and a JSON Feed (polled), or Bluesky's "
                        "Jetstream firehose replayed on loopback (pushed over a WebSocket); default: %(default)s")
    p.add_argument("--shards", type=int, default=0, metavar="S",
                   help="scaled out: the roles as separate processes over a Redis server and a throwaway "
                        "PostgreSQL cluster the demo starts itself, the library in S shards (two replicas "
                        "each, one killed half-way); needs the Debian packages redis-server and postgresql")
    p.add_argument("--forever", action="store_true", help="keep running after the last post")
    p.add_argument("--batch", action="store_true", help="run `match` on the posts instead of the daemon")
    p.add_argument("--verbose", action="store_true", help="show the daemon's log")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run the monitoring daemon",
                       description="Watch the configured feeds, match new images against the "
                                   "library and record matches. SIGINT/SIGTERM stop it cleanly.")
    p.add_argument("--config", required=True, help="TOML config file")
    p.add_argument("--log-format", choices=("text", "json"), help="override log.format")
    p.add_argument("--port", type=int, help="override server.port (several role processes on one machine)")
    p.add_argument("--role", default="all",
                   help="all (default: the whole daemon in one process), or roles of a scaled-out "
                        "deployment over [transport] (Redis) and [store] url (PostgreSQL): "
                        "intake, worker, shard:K (or shard: every shard), recorder, sender, api, comma-separated")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("streams", help="scale-out: the Redis streams between roles, and dead letters",
                       description="stats: length, consumers, pending and lag of every stream and group. "
                                   "dead: the messages moved to the dead-letter stream after max_deliveries "
                                   "failed deliveries (JSON). replay [ID...]: put them (all, or the given "
                                   "ones) back on their streams.")
    p.add_argument("--config", required=True, help="TOML config file (its [transport])")
    p.add_argument("action", choices=("stats", "dead", "replay"))
    p.add_argument("ids", nargs="*", help="dead-letter ids to replay (default: all)")
    p.set_defaults(func=cmd_streams)

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
