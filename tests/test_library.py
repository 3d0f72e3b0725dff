"""The protected library in a real store (a SQLite file; the tests taking ``store_location``
run again on a PostgreSQL database), its arrays and the fingerprint cache."""

import csv
import shutil
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageOps

from monitor.fingerprints import fingerprint_bytes
from monitor.records import snapshots
from monitor.records.cache import FingerprintCache
from monitor.records.engines import open_store
from monitor.records.library import Library, LibraryIndex, mirror_dhash, mirror_phash
from monitor.records.store import Store
from monitor.scan import add_files, fingerprint_files, import_csv, iter_image_files
from monitor.search.matcher import Matcher
from tests.conftest import encode


def test_add_remove_reload_keeps_arrays_in_step(store_location, tmp_path, samples):
    db = store_location
    lib = Library(open_store(db))
    report = add_files(lib, [samples], cache=None, progress=False)
    assert len(report.added) == 16 and not report.skipped
    assert len(lib.index) == 16
    victim = report.added[3].id
    assert lib.remove(victim)
    assert not lib.remove(victim)
    assert len(lib.index) == 15 and victim not in lib.index.ids.tolist()
    # A second process (here: a new Library on the same file) sees the same arrays.
    again = Library(open_store(db))

    def rows(index):  # (entry id, dhash, phash, fine hashes) of every row: whole picture and views
        return sorted(zip(index.ids.tolist(), index.hashes("dhash").tolist(),
                          index.hashes("phash").tolist(), map(tuple, index.fine().tolist()), strict=True))
    assert rows(again.index) == rows(lib.index)
    assert again.index.rows > 15  # centre crops (and content boxes) are indexed too
    assert again.index.fine().any(axis=1).all()  # every row verifiable
    # A third start loads the packed snapshot the second one wrote: the same rows.
    third = Library(open_store(db))
    assert rows(third.index) == rows(lib.index)

    def core(index):  # (entry id, dhash) of the rows a mirror image is compared with
        flags = index.core_flags()
        return sorted(zip(index.ids[flags].tolist(), index.hashes("dhash")[flags].tolist(), strict=True))
    assert len(core(lib.index)) == 4 * 15  # whole, centre crop, left and right crops
    assert core(again.index) == core(third.index) == core(lib.index)  # from the rows, from the snapshot
    stats = again.stats()
    assert stats["entries"] == 15 and stats["indexed"] == 15


def test_index_incremental_add_and_swap_remove():
    index = LibraryIndex(capacity=2)

    class FP:
        def __init__(self, v):
            self.dhash = self.phash = self.dhash_mirror = self.phash_mirror = v

    for i in range(10):
        index.add(i, FP(i * 3))
    assert len(index) == 10
    index.remove(0)
    index.remove(5)
    got = dict(zip(index.ids.tolist(), index.hashes("dhash").tolist(), strict=True))
    assert got == {i: i * 3 for i in range(10) if i not in (0, 5)}


def test_bit_planes_stay_in_step_through_growth_adds_and_removes():
    from monitor.search import bitslice
    rng = np.random.default_rng(5)
    index = LibraryIndex(capacity=4, keep_dhash=False)  # the bit-sliced kernel's layout, whatever this CPU

    class FP:
        def __init__(self, v):
            self.dhash, self.phash = v, v ^ 1
            self.dhash_mirror = self.phash_mirror = v ^ 2

    live = []
    for step in range(1500):  # grows past several 512-entry blocks, removes from anywhere
        if live and rng.random() < 0.3:
            index.remove(live.pop(int(rng.integers(len(live)))))
        else:
            index.add(step, FP(int(rng.integers(0, 2**63))))
            live.append(step)
    store = index.core  # (a whole picture, no views: every entry's one row is there)
    assert store.n == len(live) and not index.other.n
    assert (store.scan_planes() == bitslice.to_planes(store.dhash())).all()
    # and the radius search over them agrees with a plain scan
    q = store.dhash()[:7] ^ np.uint64(3)
    pq, pl, _ = bitslice.pairs_within(q, store.dhash(), 6, planes=store.scan_planes())
    ref = np.bitwise_count(q[:, None] ^ store.dhash()[None, :]) <= 6
    assert (pq.tolist(), pl.tolist()) == tuple(x.tolist() for x in np.nonzero(ref))


@pytest.mark.parametrize("keep_dhash", [False, True], ids=["bit-planes", "plain dHash array"])
def test_core_rows_stay_in_step_through_adds_removes_and_loads(keep_dhash):
    """Each entry's whole picture and its views at CORE_POSITIONS are kept in a row store
    of their own, through growth, removals from anywhere and a reload; the first pass
    compares mirror images with those rows only, and plain views with every row. In either
    layout: bit-planes (the bit-sliced kernel's), or a plain dHash array alone (the tiled
    kernel's: no planes kept)."""
    from monitor.search import bitslice, radius
    from monitor.search.core_rows import CORE_POSITIONS
    from monitor.search.first_pass import first_pass
    rng = np.random.default_rng(7)
    index = LibraryIndex(capacity=4, keep_dhash=keep_dhash)

    class FP:
        def __init__(self, v, views=()):
            self.dhash, self.phash = v, v ^ 1
            self.dhash_mirror = self.phash_mirror = v ^ 2
            self.views = views

    live, expected = [], {}
    for step in range(1200):
        if live and rng.random() < 0.3:
            gone = live.pop(int(rng.integers(len(live))))
            index.remove(gone)
            del expected[gone]
        else:
            values = [int(v) for v in rng.integers(0, 2**63, int(rng.integers(1, 12)))]
            index.add(step, FP(values[0], tuple(FP(v) for v in values[1:])))
            live.append(step)
            expected[step] = {(step, v) for k, v in enumerate(values) if k in CORE_POSITIONS}

    def check(ix):
        flags = ix.core_flags()
        got = set(zip(ix.ids[flags].tolist(), ix.hashes("dhash")[flags].tolist(), strict=True))
        assert got == set().union(*expected.values()) and len(got) == flags.sum()
        for store in (ix.core, ix.other):  # the planes kept in step with the rows, or none kept
            if keep_dhash:
                assert store.planes is None and store.scan_planes() is None
            else:
                assert (bitslice.from_planes(store.scan_planes(), store.n) == store.dhash()).all()
        lib = ix.hashes("dhash")
        queries = np.concatenate([lib[:5], lib[-5:], lib[:5]]) ^ np.uint64(0x10101)
        mirrored = np.arange(15) >= 10
        near = np.bitwise_count(queries[:, None] ^ lib[None, :]) <= 6
        near[10:, ~flags] = False
        chosen = radius.active()
        try:
            for kernel in radius.KERNELS:  # either kernel on either layout, whatever this CPU chose
                radius.use(kernel)
                with ix.lock:
                    pq, pl, pd = first_pass(ix, queries, mirrored, 6)
                assert (pq.tolist(), pl.tolist()) == tuple(x.tolist() for x in np.nonzero(near)), kernel
                assert (pd == np.bitwise_count(queries[pq] ^ lib[pl])).all()
        finally:
            radius.use(chosen)

    check(index)
    again = LibraryIndex(keep_dhash=keep_dhash)
    again.load(index.ids, {f: index.hashes(f) for f in ("dhash", "phash")}, index.fine(), index.core_flags())
    check(again)


def test_degenerate_entries_are_stored_but_not_indexed(store_location, tmp_path):
    img = tmp_path / "flat.png"
    Image.new("RGB", (300, 200), (90, 90, 90)).save(img)
    lib = Library(open_store(store_location))
    report = add_files(lib, [img], progress=False)
    assert report.added[0].degenerate == "flat"
    assert len(lib.index) == 0
    assert "degenerate" in report.skipped[0][1]


def test_bad_files_are_skipped_with_reason(tmp_path, samples):
    (tmp_path / "broken.jpg").write_bytes((samples / "other-home.jpg").read_bytes()[:3000])
    (tmp_path / "page.png").write_text("<html>404</html>")
    shutil.copy(samples / "library-rocket.jpg", tmp_path / "ok.jpg")
    lib = Library(Store(":memory:"))
    report = add_files(lib, [tmp_path], progress=False)
    assert [e.label for e in report.added] == ["ok"]
    reasons = {src.rsplit("/", 1)[-1]: why for src, why in report.skipped}
    assert reasons["broken.jpg"].startswith("truncated")
    assert reasons["page.png"].startswith("not_an_image")


def test_import_imagehash_csv_matches_reposts(tmp_path, library_images):
    rows = []
    for path in library_images:
        with Image.open(path) as img:
            rows.append({"source": f"https://example.org/{path.name}",
                         "dhash": str(imagehash.dhash(img)), "phash": str(imagehash.phash(img))})
    csv_path = tmp_path / "hashes.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["source", "dhash", "phash"])
        writer.writeheader()
        writer.writerows(rows)
        fh.write("bad,zz,\n")
    lib = Library(Store(tmp_path / "lib.sqlite"))
    report = import_csv(lib, csv_path)
    assert len(report.added) == len(library_images) and len(report.skipped) == 1
    matcher = Matcher(lib.index)
    with Image.open(library_images[0]) as img:
        small = img.convert("RGB").resize((img.width // 2, img.height // 2))
        mirrored = ImageOps.mirror(small)
    hit = matcher.match(fingerprint_bytes(encode(small, "JPEG", quality=70)))
    assert hit and lib.get(hit[0].entry_id).source.endswith(library_images[0].name)
    hit = matcher.match(fingerprint_bytes(encode(mirrored, "JPEG", quality=70)))
    assert hit and hit[0].mirrored


def test_mirror_from_hash_alone(library_images):
    for path in library_images:
        fp = fingerprint_bytes(path.read_bytes())
        # Equal neighbours are "not rising" both ways round, so ties differ.
        assert (mirror_dhash(fp.dhash) ^ fp.dhash_mirror).bit_count() <= 4
        assert (mirror_phash(fp.phash) ^ fp.phash_mirror).bit_count() <= 8


def test_cache_makes_rerun_cheap_and_notices_changes(tmp_path, samples):
    folder = tmp_path / "imgs"
    shutil.copytree(samples, folder)
    cache = FingerprintCache(tmp_path / "cache.sqlite")
    files = list(iter_image_files([folder]))
    first = fingerprint_files(files, cache, progress=False)
    assert not any(r.cached for r in first)
    cache.close()
    cache = FingerprintCache(tmp_path / "cache.sqlite")  # a new run, same file
    second = fingerprint_files(files, cache, progress=False)
    assert all(r.cached for r in second)
    assert [r.fingerprint for r in first] == [r.fingerprint for r in second]
    # Rewrite one file with other content: its key (size, mtime) changes.
    target = folder / "library-coffee.jpg"
    target.write_bytes((samples / "other-baboon.jpg").read_bytes())
    third = {r.path.name: r for r in fingerprint_files(files, cache, progress=False)}
    assert not third["library-coffee.jpg"].cached
    assert third["library-coffee.jpg"].fingerprint == \
        fingerprint_bytes((samples / "other-baboon.jpg").read_bytes())


def test_cached_query_views_are_made_again_when_only_the_query_side_changed(tmp_path, samples, monkeypatch):
    """A new query view (QUERY_VIEWS_VERSION) re-fingerprints cached `match` inputs; the
    library's fingerprints (ALGORITHM_VERSION) stay cached, and no entry goes stale."""
    import monitor.records.cache as cache_module
    files = list(iter_image_files([samples]))[:3]
    cache = FingerprintCache(tmp_path / "cache.sqlite")
    for views in ("query", "library"):
        fingerprint_files(files, cache, progress=False, views=views)
    monkeypatch.setattr(cache_module, "QUERY_VIEWS_VERSION", "a-later-one")
    assert not any(r.cached for r in fingerprint_files(files, cache, progress=False, views="query"))
    assert all(r.cached for r in fingerprint_files(files, cache, progress=False, views="library"))
    assert all(r.cached for r in fingerprint_files(files, cache, progress=False, views="query"))


def test_interrupted_run_resumes_from_committed_batches(tmp_path, samples):
    cache = FingerprintCache(tmp_path / "cache.sqlite")
    files = list(iter_image_files([samples]))
    fingerprint_files(files[:9], cache, progress=False)
    # No close(): the batch was committed by fingerprint_files itself.
    again = FingerprintCache(tmp_path / "cache.sqlite")
    results = fingerprint_files(files, again, progress=False)
    assert [r.cached for r in results] == [True] * 9 + [False] * (len(files) - 9)


def _as_written_before_fine_hashes(store):
    """Every entry as a version without fine hashes and the algorithm column
    wrote it: NULL fine and algorithm, 4-word views."""
    import dataclasses

    from monitor.fingerprints.codec import pack_views, unpack_views
    with store.transaction() as conn:
        for eid, blob in conn.execute("SELECT id, views FROM library_entries").fetchall():
            views = [dataclasses.replace(v, fine=b"", fine_mirror=b"")
                     for v in unpack_views(blob, with_fine=True)]
            conn.execute("UPDATE library_entries SET fine=NULL, views=?, algorithm=NULL WHERE id=?",
                         (pack_views(views), eid))


def test_entries_stored_before_fine_hashes_load_and_match_on_64_bits(store_location, tmp_path, library_images):
    """Rows written by a version without fine hashes (NULL fine, 4-word views)."""
    db = store_location
    lib = Library(open_store(db))
    add_files(lib, library_images, cache=None, progress=False)
    store = open_store(db)
    _as_written_before_fine_hashes(store)
    old = Library(store)
    assert old.index.rows == lib.index.rows and not old.index.fine().any()
    assert sorted(old.index.hashes("dhash").tolist()) == sorted(lib.index.hashes("dhash").tolist())
    repost = fingerprint_bytes(encode(Image.open(library_images[0]).resize((200, 150)), quality=60),
                               views="query")
    [m] = Matcher(old.index).match(repost)
    assert m.entry_id == lib.entries()[0].id and m.fine_distance is None


@pytest.mark.slow  # a few seconds: the fast tier stays under a minute
def test_rehash_brings_older_entries_up_to_date_in_place(store_location, tmp_path, library_images):
    """`library rehash` (the real CLI) on rows written before fine hashes and the
    algorithm column: same ids and labels, fine hashes and views back, matches
    decided by the fine hashes again; an entry whose file is gone is kept and
    reported (exit 3)."""
    import subprocess
    import sys

    from monitor.fingerprints import ALGORITHM_VERSION
    db = store_location
    files = [shutil.copy(p, tmp_path / p.name) for p in library_images[:3]]
    lib = Library(open_store(db))
    add_files(lib, files, cache=None, progress=False, label="portfolio")
    before = {e.id: e for e in lib.entries()}
    _as_written_before_fine_hashes(lib.store)
    assert Library(open_store(db)).stats()["stale"] == 3
    gone = tmp_path / files[2].name
    gone.unlink()

    out = subprocess.run([sys.executable, "-m", "monitor", "library", "--db", str(db), "rehash",
                          "--no-cache"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 3, out.stderr
    assert "rehashed 2 entries" in out.stdout
    assert str(gone) in out.stderr and "re-add" in out.stderr

    lib = Library(open_store(db))
    after = {e.id: e for e in lib.entries()}
    assert after.keys() == before.keys()  # in place: ids (and what links to them) stay
    assert all(after[i].label == "portfolio" and after[i].dhash == before[i].dhash for i in after)
    rows = dict(lib.store.query("SELECT source, algorithm FROM library_entries"))
    assert rows == {str(Path(f).resolve()): ALGORITHM_VERSION for f in files[:2]} | {str(gone.resolve()): None}
    assert lib.stats()["stale"] == 1
    fresh = np.isin(lib.index.ids, list(after)[:2])
    assert lib.index.fine()[fresh].any(axis=1).all() and not lib.index.fine()[~fresh].any()
    img = Image.open(files[0])
    w, h = img.size
    cropped = img.crop((w // 8, h // 8, w - w // 8, h - h // 8)).resize((220, 160))
    [m] = Matcher(lib.index).match(fingerprint_bytes(encode(cropped, quality=40), views="query"))
    assert m.entry_id == min(after) and m.tier == "near" and m.fine_distance is not None


def test_adding_the_same_files_again_keeps_their_entries(store_location, tmp_path, library_images):
    """The daemon adds its configured library paths at every start: unchanged
    files keep their ids (matches stay linked, nothing is new to retro-match);
    a changed file is a new entry."""
    files = [shutil.copy(p, tmp_path / p.name) for p in library_images[:3]]
    lib = Library(open_store(store_location))
    first = [e.id for e in add_files(lib, files, cache=None, progress=False).added]
    version = lib.version()
    again = Library(open_store(store_location))
    assert [e.id for e in add_files(again, files, cache=None, progress=False).added] == first
    assert again.version() == version and len(again.index) == 3
    # An entry from an older version: the same picture, updated in place.
    with again.store.transaction() as conn:
        conn.execute("UPDATE library_entries SET fine=NULL, views=NULL, algorithm=NULL WHERE id=?", (first[0],))
    assert Library(open_store(store_location)).stale_count() == 1
    assert [e.id for e in add_files(again, files, cache=None, progress=False).added] == first
    assert again.stale_count() == 0 and again.index.fine()[again.index.ids == first[0]].any(axis=1).all()
    Image.open(library_images[4]).save(files[1])  # another picture under the same name
    ids = [e.id for e in add_files(again, files, cache=None, progress=False).added]
    assert ids[0] == first[0] and ids[2] == first[2] and ids[1] > max(first)
    assert len(again.index) == 3 and first[1] not in again.index.ids.tolist()


def test_shards_split_the_library_and_reload_from_their_own_snapshots(store_location, samples):
    """Two shards index disjoint halves (by entry id) whose union is the whole library; each
    writes its own packed snapshot, and a second start of either loads the same rows."""
    whole = Library(open_store(store_location))
    add_files(whole, [samples], cache=None, progress=False)

    def rows(index):
        return sorted(zip(index.ids.tolist(), index.hashes("dhash").tolist(), strict=True))
    parts = [Library(open_store(store_location), shard=(k, 2)) for k in range(2)]
    assert all(e % 2 == k for k, part in enumerate(parts) for e in part.index.ids.tolist())
    assert sorted(rows(parts[0].index) + rows(parts[1].index)) == rows(whole.index)
    assert {(2, 0), (2, 1)} <= set(whole.store.query("SELECT shards, shard FROM index_snapshots"))
    again = Library(open_store(store_location), shard=(1, 2))
    assert rows(again.index) == rows(parts[1].index)
    assert Library(open_store(store_location)).index.rows == whole.index.rows


def test_a_snapshot_of_more_rows_than_a_part_is_stored_in_parts_and_loads_whole(store_location, samples, tmp_path,
                                                                                 monkeypatch):
    """A snapshot is stored in parts of PART_ROWS rows: as one value, a 2M-picture library's
    fine hashes (1.3 GB) were more than either engine takes ("string or blob too big", and
    the daemon did not start). Every part loads back: ids, hashes, fine hashes (read from
    the index's file, and written to the new index's a part at a time) and core rows, in
    order. A snapshot replaced while a start reads it makes that start read the rows."""
    monkeypatch.setattr(snapshots, "PART_ROWS", 16)
    whole = Library(open_store(store_location), spill_dir=str(tmp_path))
    add_files(whole, [samples], cache=None, progress=False)
    snapshots.save(whole.store, (0, 1), whole.index, whole.version(), whole.checkpoint)  # as a start saves it
    rows = whole.index.rows
    parts = whole.store.query("SELECT part, parts FROM index_snapshots WHERE shards=1 AND shard=0 ORDER BY part")
    assert len(parts) == -(-rows // 16) >= 3 and parts == [(i, len(parts)) for i in range(len(parts))]
    snap = snapshots.load(whole.store, (0, 1))
    assert snap is not None and snap.ids.tolist() == whole.index.ids.tolist()
    assert (snap.dhash == whole.index.hashes("dhash")).all() and (snap.phash == whole.index.hashes("phash")).all()
    fine = list(snapshots.fine_parts(whole.store, (0, 1), snap))  # a part at a time, as a start writes them
    assert [start for start, _ in fine] == list(range(0, rows, 16))
    assert (np.concatenate([part for _, part in fine]) == whole.index.fine()).all() and whole.index.fine().any()
    assert (snap.core == whole.index.core_flags()).all() and 0 < snap.core.sum() < rows
    again = Library(open_store(store_location), spill_dir=str(tmp_path))

    def with_fine(library):  # in a stable order: a start replaying the change log may lay rows out otherwise
        ix = library.index
        return sorted(zip(ix.ids.tolist(), ix.hashes("dhash").tolist(), map(tuple, ix.fine().tolist()), strict=True))
    assert with_fine(again) == with_fine(whole)
    # another start replaces the snapshot between the reads of its hashes and of its fine
    # hashes: that part no longer fits, and this start reads the rows instead
    real_parts, reads = snapshots.fine_parts, []

    def replaced_meanwhile(store, shard, snap):
        with store.transaction() as conn:
            conn.execute("UPDATE index_snapshots SET version = version + 1")
        return real_parts(store, shard, snap)
    monkeypatch.setattr(snapshots, "fine_parts", replaced_meanwhile)
    real_rows = Library._reload_rows
    monkeypatch.setattr(Library, "_reload_rows", lambda self: (reads.append(1), real_rows(self))[1])
    raced = Library(open_store(store_location), spill_dir=str(tmp_path))
    assert reads == [1] and with_fine(raced) == with_fine(whole)


def test_rows_read_while_library_add_writes_are_of_one_moment(store_location, samples, monkeypatch):
    """A start (or reload) that reads the rows while `library add` writes beside it gets the
    entries of one moment, each with all its views (PostgreSQL then replays its change log
    from that moment): the rows are one statement's, read a few at a time. (Read in three
    statements, an entry added between them made the whole rows and the fine hashes
    disagree in number: IndexError, seen at 2M entries.)"""
    lib = Library(open_store(store_location))
    files = sorted(samples.glob("*.jpg"))
    add_files(lib, files[:8], cache=None, progress=False)
    before = _index_rows(lib)
    writer = Library(open_store(store_location), indexed=False)  # another process's `library add`
    monkeypatch.setattr(snapshots, "ROWS_READ_AT_ONCE", 2)
    add_entries, added = snapshots._add_entries, []

    def add_entries_while_writing(*args):
        if not added:  # after the first few entries were read, before the rest
            added.extend(add_files(writer, files[8:], cache=None, progress=False).added)
        add_entries(*args)
    monkeypatch.setattr(snapshots, "_add_entries", add_entries_while_writing)
    with lib.store.transaction() as conn:  # no snapshot: this start reads the rows
        conn.execute("DELETE FROM index_snapshots")
    read = Library(open_store(store_location))
    monkeypatch.setattr(snapshots, "_add_entries", add_entries)
    after = Library(open_store(store_location))
    assert len(added) == len(files) - 8 and {e.id for e in added} <= set(after.index.ids.tolist())
    # the moment the read began, then the change log replayed up to now after it
    assert _index_rows(read) == _index_rows(after) != before


async def test_a_start_and_a_running_daemon_replay_the_change_log_instead_of_reading_every_row(
        store_location, samples, monkeypatch):
    """Either engine: a start after `library add`, `remove` and a changed picture loads its
    snapshot and replays the changes after it (no row read again: at 2M pictures, reading
    them took SQLite 70 s), the same index as a fresh read; a start that replayed many
    stores a new snapshot; a running daemon's watcher applies another process's removal and
    addition by the log."""
    import asyncio
    import time

    import monitor.records.library as library_module
    from monitor.metrics import Metrics
    from monitor.pipeline.recorder import Recorder
    from monitor.pipeline.retro import LibraryWatcher
    images = sorted(samples.glob("library-*.jpg"))
    writer = Library(open_store(store_location), indexed=False)  # `library add` in another process
    add_files(writer, images[:4], progress=False)
    assert Library(open_store(store_location)).checkpoint > 0  # the first start reads the rows, stores a snapshot
    entries = writer.entries()
    add_files(writer, images[4:], progress=False)
    writer.remove(entries[0].id)
    writer.replace_hashes(entries[1].id, fingerprint_bytes((samples / "other-apple.jpg").read_bytes(),
                                                           views="library"))
    reads = []
    real = Library._reload_rows
    monkeypatch.setattr(Library, "_reload_rows", lambda self: (reads.append(1), real(self))[1])
    replayed = Library(open_store(store_location))
    assert reads == [], "the rows were read again: the snapshot and the log were not used"
    truth = Library(open_store(store_location))
    truth._reload_rows()
    assert _index_rows(replayed) == _index_rows(truth) and len(replayed.index) == len(writer.entries())
    # a start that replayed many changes stores a snapshot as of the last, so the next replays none
    monkeypatch.setattr(library_module, "RESNAPSHOT_AFTER_CHANGES", 1)
    Library(open_store(store_location))
    last = max(r for (r,) in writer.store.query("SELECT id FROM library_changes"))
    assert {c for (c,) in writer.store.query("SELECT change_id FROM index_snapshots")} == {last}
    # a running daemon: another process removes one entry and adds one; no row is read again
    reads.clear()
    running = Library(open_store(store_location))
    metrics = Metrics()
    recorder = Recorder(running.store, running, metrics)
    watcher = LibraryWatcher(running.store, running, Matcher(running.index), recorder, metrics,
                             check_seconds=0.1, retro_window=3600)
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    gone = writer.entries()[0].id
    await asyncio.to_thread(writer.remove, gone)
    [new] = (await asyncio.to_thread(add_files, writer, [samples / "other-baboon.jpg"], progress=False)).added
    start = time.monotonic()
    while gone in running.index.ids.tolist() or new.id not in running.index.ids.tolist():
        assert time.monotonic() - start < 5.0, "the changes were not applied"
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert reads == []
    truth = Library(open_store(store_location))
    truth._reload_rows()
    assert _index_rows(running) == _index_rows(truth)


async def test_the_change_log_is_pruned_and_a_reader_behind_the_prune_reads_the_rows(
        store_location, samples, monkeypatch):
    """Either engine: the running daemon deletes changes older than change_log_days (its
    watcher, hourly), storing its snapshot again first where its checkpoint lay among them,
    so its next start still reads no row (nor another shard's, which stores its own again at
    its next prune); a process whose checkpoint was behind the deleted
    changes (loaded before them) notices, reads the rows, and holds what they hold."""
    import asyncio
    import time

    from monitor.metrics import Metrics
    from monitor.pipeline.recorder import Recorder
    from monitor.pipeline.retro import LibraryWatcher
    from monitor.records import changes, snapshots
    from monitor.records.library import prune_change_log
    images = sorted(samples.glob("library-*.jpg"))
    writer = Library(open_store(store_location), indexed=False)  # `library add` in another process
    add_files(writer, images[:3], progress=False)
    behind = Library(open_store(store_location))  # loaded now: its checkpoint is before what follows
    running = Library(open_store(store_location))
    other_shard = Library(open_store(store_location), (1, 2))  # its snapshot too
    add_files(writer, images[3:], progress=False)
    writer.remove(writer.entries()[0].id)
    running.catch_up()
    snapshot_at = snapshots.checkpoint(writer.store, (0, 1))
    assert snapshot_at < running.checkpoint and changes.pruned_upto(writer.store) == 0
    with writer.store.transaction() as conn:  # everything so far happened 40 days ago
        conn.execute("UPDATE library_changes SET at = at - ?", (40 * 86400,))
    fresh = [eid for (eid,) in writer.store.query("SELECT id FROM library_changes")]
    monkeypatch.setattr(changes, "PRUNE_CHUNK", 3)  # deleted in several transactions
    # the running daemon's watcher prunes at its first look
    metrics = Metrics()
    watcher = LibraryWatcher(running.store, running, Matcher(running.index), Recorder(running.store, running, metrics),
                             metrics, check_seconds=0.1, retro_window=3600, log_keep=30 * 86400)
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    start = time.monotonic()
    while changes.pruned_upto(writer.store) == 0:
        assert time.monotonic() - start < 5.0, "the change log was not pruned"
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert changes.pruned_upto(writer.store) == changes.last_change(writer.store) == max(fresh)
    assert writer.store.query("SELECT COUNT(*) FROM library_changes")[0][0] == 0
    assert snapshots.checkpoint(writer.store, (0, 1)) == running.checkpoint == max(fresh)  # stored again first
    assert prune_change_log(running, time.time()) == 0  # nothing more to delete
    # another process (a shard of its own) stores its snapshot again at its own next prune,
    # although the changes were deleted by the first (which deleted the snapshot it could no
    # longer start from): its next start reads no row either
    other_shard.catch_up()
    assert snapshots.checkpoint(writer.store, (1, 2)) is None and other_shard.checkpoint == max(fresh)
    assert prune_change_log(other_shard, time.time()) == 0
    assert snapshots.checkpoint(writer.store, (1, 2)) == max(fresh)
    truth = Library(open_store(store_location))
    truth._reload_rows()
    reads = []
    real = Library._reload_rows
    monkeypatch.setattr(Library, "_reload_rows", lambda self: (reads.append(1), real(self))[1])
    assert _index_rows(Library(open_store(store_location))) == _index_rows(truth) and reads == []
    Library(open_store(store_location), (1, 2))
    assert reads == []
    # the process loaded before the deleted changes reads the rows instead of missing them
    assert _index_rows(behind) != _index_rows(truth)
    behind.catch_up()
    assert reads == [1] and _index_rows(behind) == _index_rows(truth)
    # a change after the prune is replayed as usual, by both
    add_files(writer, [samples / "other-baboon.jpg"], progress=False)
    behind.catch_up(), running.catch_up()
    truth._reload_rows()
    assert reads == [1, 1] and _index_rows(behind) == _index_rows(running) == _index_rows(truth)


def _index_rows(library):
    """The index's (id, dhash, phash) rows, in a stable order: two indexes hold the same iff equal."""
    ix = library.index
    return sorted(zip(ix.ids.tolist(), ix.hashes("dhash").tolist(), ix.hashes("phash").tolist(), strict=True))


@pytest.mark.slow
async def test_a_shard_replays_the_change_log_after_its_snapshot_and_hears_changes_at_once(
        postgres_cluster, samples, monkeypatch):
    """PostgreSQL: a shard starts from its snapshot and replays the change log after it
    (inserts, a removal, an update; no rows read again), and a running shard hears a change
    by NOTIFY at once, not at its next look (30 s here)."""
    import asyncio
    import time
    import uuid

    from monitor.metrics import Metrics
    from monitor.pipeline.recorder import Recorder
    from monitor.pipeline.retro import LibraryWatcher
    url = postgres_cluster.create_database(f"log_{uuid.uuid4().hex[:12]}")
    images = sorted(samples.glob("library-*.jpg"))
    writer = Library(open_store(url))
    add_files(writer, images[:4], progress=False)
    for k in (0, 1):  # each shard reads its rows and stores a snapshot with its checkpoint
        first = Library(open_store(url), (k, 2))
        assert first.checkpoint > 0 and len(first.index)
    # changes after the snapshot: two new entries, one removed, one given another picture
    entries = writer.entries()
    add_files(writer, images[4:], progress=False)
    writer.remove(entries[0].id)
    other = fingerprint_bytes((samples / "other-apple.jpg").read_bytes(), views="library")
    writer.replace_hashes(entries[1].id, other)
    reads = []
    real = Library._reload_rows
    monkeypatch.setattr(Library, "_reload_rows", lambda self: (reads.append(1), real(self))[1])
    for k in (0, 1):
        replayed = Library(open_store(url), (k, 2))
        assert reads == [], "the rows were read again: the snapshot and the log were not used"
        monkeypatch.setattr(Library, "_reload_rows", real)
        fresh = Library(open_store(url), (k, 2))
        fresh.index.load(fresh.index.ids[:0], {"dhash": fresh.index.hashes("dhash")[:0],
                                               "phash": fresh.index.hashes("phash")[:0]}, fresh.index.fine()[:0])
        fresh._reload_rows()  # the truth: this shard's rows as they are now
        assert _index_rows(replayed) == _index_rows(fresh) and len(fresh.index)
        assert {i for i in replayed.index.ids.tolist()} == {e.id for e in writer.entries()
                                                           if e.id % 2 == k and e.degenerate is None}
        monkeypatch.setattr(Library, "_reload_rows", lambda self: (reads.append(1), real(self))[1])
    # a bulk import since the snapshot (more changes than SNAPSHOT_AFTER_CHANGES): the rows are
    # read, much faster than replaying the entries one by one, and a new snapshot is stored
    import monitor.records.library as library_module
    monkeypatch.setattr(library_module, "SNAPSHOT_AFTER_CHANGES", 2)
    add_files(writer, [samples / "other-apple.jpg", samples / "other-baboon.jpg", samples / "other-coins.jpg"],
              progress=False)
    reads.clear()
    bulk = Library(open_store(url), (0, 2))
    assert reads == [1] and bulk.checkpoint == max(r for (r,) in bulk.store.query("SELECT id FROM library_changes"))
    reads.clear()
    Library(open_store(url), (0, 2))
    assert reads == [], "the new snapshot was not stored"
    monkeypatch.setattr(Library, "_reload_rows", real)
    # a running shard: a NOTIFY wakes it (its own look is 30 s away)
    shard = Library(open_store(url), (0, 2))
    metrics = Metrics()
    watcher = LibraryWatcher(shard.store, shard, Matcher(shard.index), Recorder(shard.store, shard, metrics),
                             metrics, check_seconds=30, retro_window=0)
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    await asyncio.sleep(1.0)  # listening
    while True:  # an entry this shard owns (even id)
        added = writer.add_fingerprint(f"probe-{uuid.uuid4().hex}", fingerprint_bytes(
            (samples / "other-baboon.jpg").read_bytes(), views="library"))
        if added.id % 2 == 0:
            break
    start = time.monotonic()
    while added.id not in shard.index.ids.tolist():
        assert time.monotonic() - start < 2.0, "the change was not heard within 2 s"
        await asyncio.sleep(0.02)
    # a bulk import while running (more changes than SNAPSHOT_AFTER_CHANGES): the rows read, the index swapped
    monkeypatch.setattr(library_module, "SNAPSHOT_AFTER_CHANGES", 0)
    report = await asyncio.to_thread(add_files, writer, [samples / f"other-{n}.jpg" for n in
                                                         ("building", "graf1", "home", "messi5")], progress=False)
    owned = {e.id for e in report.added if e.id % 2 == 0 and e.degenerate is None}
    start = time.monotonic()
    while not owned <= set(shard.index.ids.tolist()):
        assert time.monotonic() - start < 5.0, "the bulk import was not indexed"
        await asyncio.sleep(0.05)
    assert _index_rows(shard) == _index_rows(Library(open_store(url), (0, 2)))
    stop.set()
    await asyncio.wait_for(task, 10)


def _soft_art(x: int, y: int = 100, contrast: int = 30) -> Image.Image:
    """A minimalist picture: a soft disc on a gentle gradient (most dHash steps flat)."""
    from PIL import ImageDraw, ImageFilter
    g = np.linspace(0, 1, 360)[:, None] * np.ones((1, 480))
    base = 150 + 60 * g
    img = Image.fromarray(np.dstack([base, base * 0.95, base * 0.9]).clip(0, 255).astype(np.uint8))
    ImageDraw.Draw(img).ellipse((x, y, x + 160, y + 160), fill=(150 + contrast, 140 + contrast, 120 + contrast))
    return img.filter(ImageFilter.GaussianBlur(2))


@pytest.mark.slow
def test_low_detail_entries_are_weakly_protected_and_the_owner_is_told(tmp_path, library_images, other_images):
    """A low-detail picture is indexed with a flag: its near-identical copies match (as
    exact, decided on the fine hashes too), a similar low-detail picture does not, nor do
    unrelated ones; `library add` says [weak] and `stats` counts it; a start from the
    snapshot keeps the flag."""
    import subprocess
    import sys
    art = tmp_path / "art"
    art.mkdir()
    for name, img in (("disc-left.jpg", _soft_art(100)), ("disc-right.jpg", _soft_art(260, contrast=40))):
        img.save(art / name, quality=92)
    db = tmp_path / "lib.sqlite"
    out = subprocess.run([sys.executable, "-m", "monitor", "library", "--db", str(db), "add", str(art),
                          *map(str, library_images), "--no-cache"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("[weak]") == 2 and "matched only on near-identical copies" in out.stderr
    lib = Library(Store(db))
    assert lib.stats()["weak_protection"] == 2
    assert len(lib.index) == 2 + len(library_images)
    entries = {Path(e.source).name: e.id for e in lib.entries()}
    for index in (lib.index, Library(Store(db)).index):  # built from the rows, then from the snapshot
        low = set(index.ids[index.low_detail() == 1].tolist())
        assert low == {entries["disc-left.jpg"], entries["disc-right.jpg"]}
        matcher = Matcher(index)  # loose: the widest tiers

        def found(img: Image.Image, quality: int, matcher=matcher) -> list:
            return matcher.match(fingerprint_bytes(encode(img, quality=quality), views="query"))
        [m] = found(_soft_art(100), 70)
        assert m.entry_id == entries["disc-left.jpg"] and m.tier == "exact" and m.fine_distance is not None
        assert [m.entry_id for m in found(_soft_art(100).resize((432, 324)), 85)] == [entries["disc-left.jpg"]]
        assert found(_soft_art(180), 90) == []  # the same style, another picture
        for path in other_images:
            assert all(m.entry_id not in low for m in matcher.match(fingerprint_bytes(path.read_bytes(),
                                                                                       views="query")))


def test_entries_keypoints_are_read_once_until_they_may_have_changed(store_location, samples):
    """The second look reads a candidate's keypoints from the store once: later looks at
    the same entry take them from memory, until the entry is re-indexed (a rehash writes new
    keypoints), the index is reloaded, or more entries than the cache holds were read since."""
    from monitor.records import keypoints as keypoint_rows
    from monitor.search import index as index_module
    lib = Library(open_store(store_location))
    a = lib.add_fingerprint("a", fingerprint_bytes((samples / "library-chelsea.jpg").read_bytes(), views="library"))
    b = lib.add_fingerprint("b", fingerprint_bytes((samples / "library-coffee.jpg").read_bytes(), views="library"))
    reads: list[list[int]] = []

    def reader(ids):  # the store's own read, observed
        reads.append(sorted(ids))
        return keypoint_rows.read(lib.store, ids)
    lib.index.keypoints_reader = reader
    first = lib.index.keypoints_of([a.id, b.id])
    assert set(first) == {a.id, b.id} and all(first.values())
    assert lib.index.keypoints_of([a.id, b.id]) == first and reads == [[a.id, b.id]]
    rehashed = fingerprint_bytes((samples / "library-astronaut.jpg").read_bytes(), views="library")
    lib.replace_hashes(a.id, rehashed)  # new keypoints for a: read again, b's still held
    assert lib.index.keypoints_of([a.id, b.id]) == {a.id: rehashed.keypoints, b.id: first[b.id]}
    assert reads[1:] == [[a.id]]
    lib.reload()
    lib.index.keypoints_reader = reader
    lib.index.keypoints_of([b.id])
    assert reads[2:] == [[b.id]]
    small = index_module.RecentKeypoints(reader, size=1)
    small([a.id]), small([b.id]), small([a.id])
    assert reads[3:] == [[a.id], [b.id], [a.id]]  # only the last one entry kept
    lib.store.close()


def test_a_store_location_that_is_no_path_is_refused_and_creates_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for wrong in (object(), 42, None, b"m.sqlite"):
        with pytest.raises(TypeError, match="a path or a postgresql:// URL"):
            open_store(wrong)
    assert not list(tmp_path.iterdir())
    open_store(tmp_path / "m.sqlite").close()  # a Path, as a str, still opens
    open_store(str(tmp_path / "n.sqlite")).close()
