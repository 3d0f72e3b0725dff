"""Old history is deleted (monitor/records/retention.py), on both engines: finished work rows
that recorded no match and the images no work row names any more go; what a match names, what
is still pending, what is recent and what a later work row names stay; a retro-match still
finds the recent images' work rows. Items no feed lists any more go too, while a feed's last
listing stays (an item listed again is still known)."""

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
    work_rows.record_items(store, "g", [FeedItem("g", "z", ())], old)  # an item "g" no longer lists
    with store.transaction() as conn:  # a store that has kept items' listing times for months
        conn.execute("UPDATE store_meta SET value=? WHERE key='seen_at_listed_since'", (str(now - 100 * 86400),))
    metrics = Metrics()
    watcher = LibraryWatcher(store, library, Matcher(library.index), Recorder(store, library, metrics), metrics,
                             check_seconds=0.1, retro_window=7 * 86400, history_keep=30 * 86400)
    monkeypatch.setattr(retention, "CHUNK", 2)  # walked in several transactions
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))  # its first look does the hourly housekeeping
    start = time.monotonic()
    while len(_state(store)[0]) > 4 or ("g", "z") in _seen(store):
        assert time.monotonic() - start < 5, "nothing was deleted"
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert _state(store) == ([("f", "0"), ("f", "6"), ("g", "x"), ("g", "y")],
                             ["http://h/0.jpg", "http://h/1.jpg", "http://h/new.jpg"])
    assert retention.prune_history(store, now - 30 * 86400, chunk=2) == (0, 0)
    assert not retention.claim(store, time.time(), 3000)  # the watcher has pruned this hour
    # the items "f" listed last stay (it has not been read since)
    assert _seen(store) == sorted([("f", str(k)) for k in range(7)] + [("g", "x"), ("g", "y")])
    # the match keeps its context; the recent image is still there for a retro-match
    assert store.query("SELECT feed, item_id FROM matches") == [("f", "0")]
    [(url, _)], position = work_rows.recent_images(store, now - 7 * 86400)
    assert url == "http://h/new.jpg" and position is not None
    assert work_rows.first_for_url(store, url).item_id == "y"
    # an old item its feed lists again is still known: nothing to do
    assert work_rows.record_items(store, "f", [FeedItem("f", "3", ("http://h/3.jpg",))], now) == ([], 0)
    store.close()


def _seen(store):
    return sorted((feed, item) for feed, item in store.query("SELECT feed, item_id FROM seen_items"))


def test_items_no_feed_lists_any_more_are_deleted_and_a_feeds_last_listing_is_kept(store_location):
    store = open_store(store_location)
    now = time.time()
    day = 86400

    def listing(feed, ids, at):
        return work_rows.record_items(store, feed, [FeedItem(feed, i, (f"http://h/{feed}/{i}.jpg",)) for i in ids],
                                      at)

    listing("f", ["kept", "dropped"], now - 40 * day)
    listing("f", ["kept"], now - 20 * day)    # listed again: its seen_at moves on
    listing("f", ["kept"], now - 20 * day + 60)  # and again a minute later: no write needed
    listing("f", ["kept", "new"], now - 3600)
    listing("quiet", ["a", "b"], now - 40 * day)  # a feed not read since: its last listing stays
    listing("stream", ["1"], now - 40 * day)
    listing("stream", ["2"], now - 2 * day)   # a stream never lists an item twice
    everything = _seen(store)
    # a store upgraded lately: its rows' seen_at may be first-seen times, so none is old yet
    assert retention.prune_seen_items(store, now - 30 * day, chunk=1) == 0
    with store.transaction() as conn:  # a store that has kept listing times for months
        conn.execute("UPDATE store_meta SET value=? WHERE key='seen_at_listed_since'", (str(now - 100 * day),))
    assert retention.prune_seen_items(store, now - 30 * day, chunk=1) == 2
    assert _seen(store) == sorted(set(everything) - {("f", "dropped"), ("stream", "1")})
    assert retention.prune_seen_items(store, now - 30 * day, chunk=1) == 0
    # a dropped item listed again is new again; a kept one is still known
    assert listing("f", ["dropped"], now)[1] == 1
    assert listing("f", ["kept"], now) == ([], 0)
    store.close()


def test_one_process_an_hour_prunes_the_history(store_location):
    first, second = open_store(store_location), open_store(store_location)  # two processes' connections
    now = time.time()
    assert retention.claim(first, now, 3600)
    assert not retention.claim(second, now + 1, 3600) and not retention.claim(first, now + 1, 3600)
    assert retention.claim(second, now + 3600, 3600)
    assert not retention.claim(first, now + 3601, 3600)
    first.close(), second.close()
