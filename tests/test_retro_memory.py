"""Retroactive matching holds the window's dHashes in memory (monitor/search/recent.py): a
library change reads only what was stored since the last one, a row committed late is still
read, and past the memory bound the oldest images are read from the store as before; the
matches are the same whichever way an image was tested."""

import io
import time

import numpy as np
from PIL import Image, ImageOps

from feeds import FeedItem
from monitor.fingerprints import fingerprint_bytes
from monitor.metrics import Metrics
from monitor.pipeline.recorder import Recorder
from monitor.pipeline.retro import LibraryWatcher
from monitor.records import work as work_rows
from monitor.records.engines import open_store
from monitor.records.library import Library
from monitor.scan import add_files
from monitor.search import recent as recent_module
from monitor.search.matcher import Matcher
from monitor.search.recent import SLACK, RecentHashes


def _page(times, urls, per_image=2):
    """A page as work.recent_hashes gives it: ``per_image`` dHashes an image."""
    n = len(times)
    owners = np.repeat(np.arange(n), per_image)
    dhashes = np.arange(owners.size, dtype=np.uint64) + np.uint64(1000 * n)
    return np.array(times, np.float64), list(urls), owners, dhashes, ~dhashes, np.zeros(owners.size, bool)


def _held(recent, since=float("-inf")):
    times, keys, tested = recent.near(lambda owners, dhashes, phashes, mirrored, rows: np.ones(rows, bool), since)
    assert keys.size == times.size
    return np.unique(times), tested


def test_held_images_are_each_read_once_and_the_bound_lets_the_oldest_go():
    recent = RecentHashes(max_bytes=10**9)
    assert recent.read_from(5.0) == 5.0  # nothing held: from the window's start
    recent.add(*_page([10.0, 20.0, 20.0], ["a", "b", "c"]))
    assert recent.read_from(5.0) == 5.0 and recent.read_from(19.0) == 19.0  # SLACK before the newest held
    # read again from SLACK back: what is held already is left out, a late row is taken
    recent.add(*_page([10.0, 15.0, 20.0, 20.0, 30.0], ["a", "late", "b", "c", "d"]))
    times, tested = _held(recent)
    assert times.tolist() == [10.0, 15.0, 20.0, 30.0] and tested == recent.images == 5
    assert _held(recent, since=15.0)[0].tolist() == [20.0, 30.0]  # only the window
    recent.add(*_page([20.0, 30.0, 31.0], ["c", "d", "b"]))  # "b" fetched again since: held anew
    assert _held(recent)[0].tolist() == [10.0, 15.0, 20.0, 30.0, 31.0] and recent.images == 6
    # the images a test keeps, by their dHashes' owners
    times, keys, _ = recent.near(lambda owners, dhashes, phashes, mirrored, rows: np.isin(
        np.arange(rows), owners[(dhashes == 5008) & (phashes == ~np.uint64(5008))]), float("-inf"))
    assert times.tolist() == [30.0] and keys.tolist() == [hash("d")]  # the second page's fifth image's dHash
    recent.forget_before(25.0)
    assert recent.images == 6  # a block with an image in the window stays whole
    recent.forget_before(31.0)  # the blocks wholly out of the window go
    assert recent.images == recent.nbytes == 0
    # bounded: the oldest blocks go, and every held image fetched no later than theirs
    small = RecentHashes(max_bytes=10**9)
    for k in range(4):
        small.add(*_page([100.0 + k, 100.0 + k], [f"{k}a", f"{k}b"], per_image=recent_module.BLOCK_HASHES // 2))
    one_block = small.nbytes // 4
    small.max_bytes = 2 * one_block
    small.add(*_page([103.0, 104.0], ["tie", "e"], per_image=recent_module.BLOCK_HASHES // 2))  # a late tie
    assert small.held_after == 102.0 and small.nbytes <= small.max_bytes
    assert _held(small)[0].tolist() == [103.0, 104.0]
    # what is fetched at or before the mark is the store's to read, not held again
    small.add(*_page([101.0, 105.0], ["old", "f"], per_image=recent_module.BLOCK_HASHES // 2))
    assert _held(small)[0].tolist() == [104.0, 105.0] and small.held_after == 103.0
    # a bound too small for one block lets everything go, and reads on from there
    small.max_bytes = 1
    small.add(*_page([1000.0], ["g"]))
    assert small.images == 0 and small.held_after == 1000.0 and small.read_from(0.0) == 1000.0 - SLACK


def _jpeg(img) -> bytes:
    out = io.BytesIO()
    img.convert("RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


async def test_retro_matching_reads_what_is_new_and_finds_the_same_as_reading_the_window(
        store_location, samples, monkeypatch):
    library = Library(open_store(store_location))
    store = library.store
    now = time.time()
    flipped = {name: fingerprint_bytes(_jpeg(ImageOps.mirror(Image.open(samples / f"library-{name}.jpg"))),
                                       views="query") for name in ("rocket", "coffee", "fruits")}
    others = [(f"http://h/{p.stem}.jpg", fingerprint_bytes(p.read_bytes(), views="query"))
              for p in sorted(samples.glob("other-*.jpg"))]

    def seen(images, at):  # images a feed posted and the daemon fingerprinted
        work, _ = work_rows.record_items(store, "f", [FeedItem("f", url, (url,)) for url, _ in images], at)
        with store.transaction() as conn:
            work_rows.images_ok(conn, images, at)
            work_rows.close_many(conn, [w.id for w in work], at)
    seen(others[:5], now - 7200)  # unrelated images, then the rocket's repost
    seen([("http://h/rocket.jpg", flipped["rocket"])], now - 3600)
    read = []
    real = work_rows.recent_hashes

    def counting(*args, **kw):
        page = real(*args, **kw)
        read.append(0 if page is None else len(page[1]))
        return page
    monkeypatch.setattr(work_rows, "recent_hashes", counting)
    metrics = Metrics()
    watcher = LibraryWatcher(store, library, Matcher(library.index), Recorder(store, library, metrics), metrics,
                             check_seconds=30, page=4)

    async def protect(name):
        before = max(library.index.ids.tolist(), default=0)
        add_files(library, [samples / f"library-{name}.jpg"], progress=False)
        return [(r.entry.label, r.work.image_url) for r in await watcher.retro_match(after_entry_id=before)]

    assert await protect("rocket") == [("library-rocket", "http://h/rocket.jpg")]
    assert sum(read) == 6 and watcher.recent.images == 6 and metrics.retro_images._value.get() == 6
    assert metrics.retro_held_bytes._value.get() == watcher.recent.nbytes > 0
    seen([("http://h/coffee.jpg", flipped["coffee"]), *others[5:7]], now)  # stored since
    read.clear()
    assert await protect("coffee") == [("library-coffee", "http://h/coffee.jpg")]
    # only what was new was read (and the rocket's, within SLACK of the newest held)
    assert sum(read) == 4 and watcher.recent.images == 9
    # a row committed late: its fetch time before the newest held one, within SLACK of it
    seen([("http://h/fruits.jpg", flipped["fruits"])], now - SLACK / 2)
    read.clear()
    assert await protect("fruits") == [("library-fruits", "http://h/fruits.jpg")]
    assert sum(read) == 4 and watcher.recent.images == 10  # the SLACK's rows again, one of them new
    # bounded memory: the oldest images are read from the store instead, with the same answers
    monkeypatch.setattr(recent_module, "BLOCK_HASHES", 8)  # a block an image or two
    # what every recent image's whole answer finds: the filters in front of it drop none of it
    everything = work_rows.recent_images(store, now - 86400, limit=100)[0]
    answers = Matcher(library.index).hash_answers([fp for _, fp in everything])
    truth = sorted(url for (url, _), answer in zip(everything, answers, strict=True) if answer.matches)
    for bound in (0, 1, 300, 10**9):
        capped = LibraryWatcher(store, library, Matcher(library.index), Recorder(store, library, metrics), metrics,
                                check_seconds=30, page=3, recent_bytes=bound)
        _, found, near, _ = capped._retro_pairs(None, [e.id for e in library.entries()])
        assert sorted(found) == truth == ["http://h/coffee.jpg", "http://h/fruits.jpg", "http://h/rocket.jpg"], bound
        assert capped.recent.nbytes <= bound
        if bound == 300:
            assert 0 < capped.recent.images < 10 and capped.recent.held_after >= now - 7200
    store.close()
