"""Catalog tools over folders: dedupe, variant grouping, migration audit.

All three fingerprint with the resumable cache (so 100,000+ images are
cheap to re-run) and compare all pairs with the same kernel and tiers as
the monitor. Results are plain dataclasses; the CLI writes CSV / JSON lines
and, with ``--report``, an HTML page (monitor/report.py).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from monitor.fingerprints import ENTRY_KEYPOINTS, Fingerprint, KeypointFinder
from monitor.records.cache import FingerprintCache
from monitor.records.library import LibraryIndex
from monitor.scan import fingerprint_files, iter_image_files
from monitor.search.matcher import PRESETS, Match, Matcher, Tier, query_rows

log = logging.getLogger("repost_monitor.catalog")

KEEP_POLICIES = ("largest-resolution", "largest-file", "newest", "oldest", "prefer-prefix")


@dataclass(frozen=True, slots=True)
class Image_:
    path: Path
    fp: Fingerprint
    size: int
    mtime: float

    @property
    def pixels(self) -> int:
        return self.fp.width * self.fp.height


@dataclass(frozen=True, slots=True)
class Pair:
    """Two images by index (a query, b target) and how they matched."""
    a: int
    b: int
    match: Match


@dataclass(frozen=True, slots=True)
class Edge:
    """Two images of a group and how they matched (the views that met included)."""
    a: Image_
    b: Image_
    match: Match


@dataclass
class Group:
    id: int
    members: list[Image_]
    keep: Image_
    edges: list[Edge] = field(default_factory=list)  # the similar pairs that joined it


@dataclass
class Unreadable:
    path: Path
    reason: str


def load_images(paths, cache: FingerprintCache | None, progress=None, desc="fingerprinting"
                ) -> tuple[list[Image_], list[Unreadable]]:
    files = list(iter_image_files(paths))
    results = fingerprint_files(files, cache, progress=progress, desc=desc)
    good, bad = [], []
    for r in results:
        if r.fingerprint is None:
            bad.append(Unreadable(r.path, str(r.error)))
            continue
        st = r.path.stat()
        good.append(Image_(r.path, r.fingerprint, st.st_size, st.st_mtime))
    return good, bad


def _index(images: list[Image_]) -> LibraryIndex:
    index = LibraryIndex(max(1, len(images)))
    for i, im in enumerate(images):
        if im.fp.degenerate is None:
            index.add(i, im.fp)
    return index


def _file_keypoints(images: list[Image_], ids: list[int]) -> dict[int, bytes]:
    """The keypoints of these images as a library entry keeps them; an unreadable file has
    none (its pairs then stand by their hashes, as an entry without keypoints does)."""
    out = {}
    for i in ids:
        try:
            out[i] = KeypointFinder(images[i].path.read_bytes)(limit=ENTRY_KEYPOINTS)
        except (OSError, ValueError) as exc:
            log.warning("%s: keypoints not found (%s); its unsure pairs stand by their hashes", images[i].path, exc)
    return out


def similar_pairs(queries: list[Image_], targets: list[Image_], tiers: tuple[Tier, ...], *,
                  mirrored: bool, second_look: bool = False) -> list[Pair]:
    """Every (query, target) pair within the tiers (indices into the lists). ``second_look``
    (a self-join: ``queries is targets``): as the daemon, a picture no other one meets by its
    hashes gets the keypoints' look at its nearest ones, so a crop from one side, a rotation
    or a screenshot of it is found too (its pairs count as near)."""
    if not queries or not targets:
        return []
    matcher = Matcher(_index(targets), tiers)
    # As the daemon: an unsure pair stands only where the two pictures' keypoints agree
    # (two grass tiles are not duplicates), found from the files for such pairs alone.
    matcher.index.keypoints_reader = functools.partial(_file_keypoints, targets)
    sources = [KeypointFinder(q.path.read_bytes) for q in queries]  # a file read only if asked
    if second_look:
        if queries is not targets:
            raise ValueError("the second look of a catalog is a self-join")
        found = matcher.match_many([q.fp for q in queries], sources, exclude_self=True)
        per_query = {q: matches for q, matches in enumerate(found) if matches}
    else:
        per_query = matcher.matches_of(matcher.match_rows(query_rows([q.fp for q in queries])))
        per_query, _ = matcher.confirmed(per_query, {q: sources[q] for q in per_query})
    return [Pair(q, m.entry_id, m) for q, found in sorted(per_query.items()) for m in found
            if (mirrored or not m.mirrored) and not queries[q].fp.degenerate]


def _choose(members: list[Image_], policy: str, prefix: str | None) -> Image_:
    def by_resolution(im):
        return (-im.pixels, -im.size, str(im.path))
    if policy == "largest-resolution":
        return min(members, key=by_resolution)
    if policy == "largest-file":
        return min(members, key=lambda im: (-im.size, -im.pixels, str(im.path)))
    if policy == "newest":
        return min(members, key=lambda im: (-im.mtime, str(im.path)))
    if policy == "oldest":
        return min(members, key=lambda im: (im.mtime, str(im.path)))
    if policy == "prefer-prefix":
        if not prefix:
            raise ValueError("--keep prefer-prefix needs --prefer PATH")
        pref = str(Path(prefix).resolve())
        return min(members, key=lambda im: (not str(im.path.resolve()).startswith(pref),)
                   + by_resolution(im))
    raise ValueError(f"unknown keep policy {policy!r}; one of {', '.join(KEEP_POLICIES)}")


def group_images(images: list[Image_], tiers: tuple[Tier, ...], *, mirrored: bool,
                 keep: str = "largest-resolution", prefer: str | None = None,
                 second_look: bool = False) -> list[Group]:
    """Union-find over similar pairs. Group ids are deterministic whatever the
    input order: groups are numbered by their smallest path, members sorted."""
    order = sorted(range(len(images)), key=lambda i: str(images[i].path))
    images = [images[i] for i in order]
    pairs = similar_pairs(images, images, tiers, mirrored=mirrored, second_look=second_look)
    if second_look:  # each pair once, whichever way the look found it: a crop finds its original,
        # which took no look where it met another copy by its hashes
        pairs = list({(min(p.a, p.b), max(p.a, p.b)): p for p in reversed(pairs) if p.a != p.b}.values())
    else:  # the hashes find each pair both ways
        pairs = [p for p in pairs if p.a < p.b]
    parent = list(range(len(images)))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in pairs:
        ra, rb = find(p.a), find(p.b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the root is the smallest (sorted) path
    members: dict[int, list[int]] = {}
    for i in range(len(images)):
        members.setdefault(find(i), []).append(i)
    edges: dict[int, list[Pair]] = {}
    for p in pairs:
        edges.setdefault(find(p.a), []).append(p)
    groups = []
    for gid, root in enumerate(sorted(r for r, m in members.items() if len(m) > 1), start=1):
        ims = [images[i] for i in members[root]]
        groups.append(Group(gid, ims, _choose(ims, keep, prefer),
                            [Edge(images[p.a], images[p.b], p.match) for p in edges.get(root, [])]))
    return groups


def dedupe(paths, cache, *, tier="near", keep="largest-resolution", prefer=None, progress=None):
    images, bad = load_images(paths, cache, progress)
    return group_images(images, PRESETS[tier], mirrored=False, keep=keep, prefer=prefer), images, bad


def group(paths, cache, *, tier="loose", progress=None, second_look=True):
    """Variants: the tier's pairs, mirrored copies, and (``second_look``) what the keypoints
    find (crops, rotations, screenshots). dedupe takes no second look: a crop is a variant,
    and its --apply would remove one where the photographer made it on purpose."""
    images, bad = load_images(paths, cache, progress)
    return group_images(images, PRESETS[tier], mirrored=True, second_look=second_look), images, bad


@dataclass(frozen=True, slots=True)
class Action:
    kind: str       # move | hardlink | delete
    path: Path      # the duplicate acted on (never the kept file)
    target: Path | None
    done: bool


def apply_actions(groups: list[Group], action: str, *, dest: str | None = None,
                  dry_run: bool = True) -> list[Action]:
    """Act on every non-kept member. A dry run (the default) only reports."""
    out = []
    for g in groups:
        for im in g.members:
            if im.path == g.keep.path:
                continue
            target = None
            if action == "move":
                if not dest:
                    raise ValueError("--action move needs --move-to DIR")
                target = Path(dest) / f"group-{g.id:05d}" / im.path.name
            elif action == "hardlink":
                target = g.keep.path
            elif action != "delete":
                raise ValueError(f"unknown action {action!r}")
            if not dry_run:
                if action == "move":
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(im.path), str(target))
                elif action == "hardlink":
                    tmp = im.path.with_name(f".{im.path.name}.rm-link")
                    os.link(g.keep.path, tmp)
                    os.replace(tmp, im.path)  # atomic: the duplicate is never missing
                else:
                    im.path.unlink()
            out.append(Action(action, im.path, target, not dry_run))
    return out


# -- audit -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AuditRow:
    status: str            # intact | re-encoded | moved | altered | missing | new
    old: str | None        # path relative to OLD
    new: str | None        # path relative to NEW
    dhash_distance: int | None = None
    note: str = ""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def audit(old_root, new_root, cache, *, tier="near", progress=None):
    """Did every image of OLD survive the move to NEW, intact and in place?"""
    old_root, new_root = Path(old_root).resolve(), Path(new_root).resolve()
    old, old_bad = load_images([old_root], cache, progress, "old")
    new, new_bad = load_images([new_root], cache, progress, "new")
    old_rel = [str(im.path.resolve().relative_to(old_root)) for im in old]
    new_rel = [str(im.path.resolve().relative_to(new_root)) for im in new]
    new_at = {r: i for i, r in enumerate(new_rel)}
    sha_new: dict[str, list[int]] = {}
    new_sha = [_sha256(im.path) for im in new]
    for i, h in enumerate(new_sha):
        sha_new.setdefault(h, []).append(i)
    near = {}
    for p in similar_pairs(old, new, PRESETS[tier], mirrored=False):
        near.setdefault(p.a, []).append(p)
    used: set[int] = set()
    rows: list[AuditRow] = []
    for i, im in enumerate(old):
        rel = old_rel[i]
        sha = _sha256(im.path)
        same_place = new_at.get(rel)
        visual = {p.b: p for p in near.get(i, [])}
        if same_place is not None and new_sha[same_place] == sha:
            rows.append(AuditRow("intact", rel, rel, 0))
            used.add(same_place)
        elif same_place is not None and same_place in visual:
            rows.append(AuditRow("re-encoded", rel, rel, visual[same_place].match.dhash_distance,
                                 "same picture, different bytes"))
            used.add(same_place)
        elif sha in sha_new:
            j = sha_new[sha][0]
            rows.append(AuditRow("moved", rel, new_rel[j], 0, "same bytes at another path"))
            used.add(j)
        elif visual:
            j, p = min(visual.items(), key=lambda kv: (kv[1].match.dhash_distance, new_rel[kv[0]]))
            rows.append(AuditRow("moved", rel, new_rel[j], p.match.dhash_distance,
                                 "re-encoded at another path"))
            used.add(j)
        elif same_place is not None:
            d = (im.fp.dhash ^ new[same_place].fp.dhash).bit_count()
            rows.append(AuditRow("altered", rel, rel, d, "visually changed beyond the near tier"))
            used.add(same_place)
        else:
            rows.append(AuditRow("missing", rel, None))
    for r in old_bad:
        rows.append(AuditRow("missing", str(r.path.resolve().relative_to(old_root)), None, None,
                             f"unreadable in OLD: {r.reason}"))
    for j, rel in enumerate(new_rel):
        if j not in used:
            rows.append(AuditRow("new", None, rel, None, "in NEW only"))
    for r in new_bad:
        rows.append(AuditRow("new", None, str(r.path.resolve().relative_to(new_root)), None,
                             f"unreadable in NEW: {r.reason}"))
    rows.sort(key=lambda r: (r.old or "~", r.new or ""))
    return rows, old_root, new_root
