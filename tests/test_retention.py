"""Old history is deleted (monitor/records/retention.py), on both engines: finished work rows
that recorded no match and the images no work row names any more go; what a match names, what
is still pending, what is recent and what a later work row names stay; a retro-match still
finds the recent images' work rows; an old item listed again is still known."""

import asyncio
import time

from feeds import FeedItem
from monitor.fingerprints import Fingerprint
from monitor.metrics import Metrics
from monitor.pipeline.recorder import Recorder
from monitor.pipeline.retro import LibraryWatcher
from monitor.records import retention
from monitor.records import work as work_rows
from monitor.records.engines import open_store
from monitor.records.library import Library
from monitor.records.matches import record_in
from monitor.scan import add_files
from monitor.search.answers import Match
from monitor.search.matcher import Matcher


def _state(store):
    work = sorted((feed, item) for feed, item in store.query("SELECT feed, item_id FROM work"))
    images = sorted(url for (url,) in store.query("SELECT url FROM images"))
    return work, images


async def test_old_history_is_deleted_and_what_a_match_names_is_kept(store_location, samples, monkeypatch):
    library = Library(open_store(store_location))
    store = library.store
    add_files(library, [samples / "library-rocket.jpg"], progress=False)
    [entry] = library.entries()
    fp = Fingerprint(1, 2, 3, 4, 64, 48)
    now = time.time()
    old, recent = now - 40 * 86400, now - 3600
    work, _ = work_rows.record_items(store, "f", [FeedItem("f", str(k), (f"http://h/{k}.jpg",)) for k in range(7)],
                                     old)
    with store.transaction() as conn:  # 0 matched; 1-4 done with no match; 5 failed; 6 still pending
        record_in(conn, work[0], [Match(entry.id, "near", 3, 4, False)], fp, {entry.id: entry}, old, new_image=True)
        for w in work[1:5]:
            work_rows.image_ok(conn, w.image_url, fp, old)
            work_rows.close(conn, w.id, None, old)
        work_rows.close(conn, work[5].id, "truncated", old)
    work_rows.image_failed(store, work[5].image_url, "truncated", old)
    # image 1 again, lately, through another feed; and a recent image of its own
    later, _ = work_rows.record_items(store, "g", [FeedItem("g", "x", ("http://h/1.jpg",)),
                                                  FeedItem("g", "y", ("http://h/new.jpg",))], recent)
    with store.transaction() as conn:
        work_rows.image_ok(conn, "http://h/new.jpg", fp, recent)
        work_rows.close_many(conn, [w.id for w in later], recent)
    metrics = Metrics()
    watcher = LibraryWatcher(store, library, Matcher(library.index), Recorder(store, library, metrics), metrics,
                             check_seconds=0.1, retro_window=7 * 86400, history_keep=30 * 86400)
    monkeypatch.setattr(retention, "CHUNK", 2)  # walked in several transactions
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))  # its first look does the hourly housekeeping
    start = time.monotonic()
    while len(_state(store)[0]) > 4:
        assert time.monotonic() - start < 5, "nothing was deleted"
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert _state(store) == ([("f", "0"), ("f", "6"), ("g", "x"), ("g", "y")],
                             ["http://h/0.jpg", "http://h/1.jpg", "http://h/new.jpg"])
    assert retention.prune_history(store, now - 30 * 86400, chunk=2) == (0, 0)
    # the match keeps its context; the recent image is still there for a retro-match
    assert store.query("SELECT feed, item_id FROM matches") == [("f", "0")]
    [(url, _)], position = work_rows.recent_images(store, now - 7 * 86400)
    assert url == "http://h/new.jpg" and position is not None
    assert work_rows.first_for_url(store, url).item_id == "y"
    # an old item its feed lists again is still known: nothing to do
    assert work_rows.record_items(store, "f", [FeedItem("f", "3", ("http://h/3.jpg",))], now) == ([], 0)
    store.close()
