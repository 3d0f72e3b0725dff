"""The pipeline's stages built directly, each with a real store (a SQLite file in a temp
folder, and again a PostgreSQL database in the tests' own cluster), a real fetcher against
a loopback photo site and the in-process transport: fast, and without the whole daemon
around them."""

import asyncio
import time

import numpy as np
import pytest
from aiohttp import web

from feeds import FeedItem, make_source
from monitor.alerts.outbox import Outbox
from monitor.config import AlertSinkConfig
from monitor.daemon import make_sink
from monitor.fetch import Fetcher, FetchLimits
from monitor.metrics import Metrics
from monitor.pipeline.intake import FeedSettings, Intake
from monitor.pipeline.recorder import Recorder
from monitor.pipeline.retro import LibraryWatcher
from monitor.pipeline.transport import InProcessTransport
from monitor.pipeline.worker import Worker
from monitor.records import work as work_rows
from monitor.records.engines import open_store
from monitor.records.library import Library
from monitor.records.verdicts import set_verdict
from monitor.scan import add_files
from monitor.search.matcher import PRESETS, Matcher
from tests.hosts import serve
from tests.test_daemon import PhotoSite, until

LIMITS = FetchLimits(allowed_networks=("127.0.0.0/8",), retries=0, read_timeout=2)


@pytest.fixture
def library(store_location, samples):
    lib = Library(open_store(store_location))
    add_files(lib, [p for p in sorted(samples.glob("library-*.jpg")) if "rocket" not in p.name], progress=False)
    yield lib
    lib.store.close()


class Stages:
    def __init__(self, library, site_url):
        self.store, self.library = library.store, library
        self.metrics = Metrics()
        self.transport = InProcessTransport(100)
        self.matcher = Matcher(library.index, PRESETS["near"])
        self.recorded = []
        self.recorder = Recorder(self.store, library, self.metrics, on_match=self.recorded.append)
        self.site = site_url

    def intake(self, fetcher):
        return Intake(self.store, fetcher, self.metrics, self.transport)

    def worker(self, fetcher):
        return Worker(self.store, fetcher, self.matcher, self.recorder, self.metrics, self.transport, workers=2)


async def test_intake_stores_before_it_queues_and_polls_conditionally(library, samples):
    site = PhotoSite(samples)
    site.post("rss", 1, ["small-chelsea.jpg", "other-apple.jpg"])
    async with serve(site.app()) as base, Fetcher(LIMITS) as fetcher:
        s = Stages(library, base)
        intake = s.intake(fetcher)
        rss = make_source("rss", "rss", f"{base}/rss.xml")
        work = await intake.poll_once(rss)
        assert [w.image_url.rsplit("/", 1)[-1] for w in work] == ["small-chelsea.jpg", "other-apple.jpg"]
        assert [w.id for w in work_rows.pending(s.store)] == [w.id for w in work]  # stored first
        assert await intake.poll_once(rss) == []  # the same items again: nothing new
        assert work_rows.feed_validators(s.store, "rss") == (None, None)  # the host sends no ETag
        # pushed items go the same way, and onto the transport
        pushed = await intake.submit("ingest", [FeedItem("ingest", "x1", (f"{base}/img/flip-rocket.jpg",))])
        assert s.transport.depth() == 1 and (await s.transport.get(asyncio.Event())) == pushed[0]
        # what a stopped run left pending comes back at the next start
        stop = asyncio.Event()
        tasks = intake.tasks(stop)
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert s.transport.depth() == 3


async def test_intake_backs_off_a_failing_feed_and_records_why(library, samples):
    site = PhotoSite(samples)
    site.feed_status["rss"] = 500
    async with serve(site.app()) as base, Fetcher(LIMITS) as fetcher:
        s = Stages(library, base)
        intake = s.intake(fetcher)
        intake.add_source(make_source("rss", "rss", f"{base}/rss.xml"), FeedSettings(interval=0.05, jitter=0))
        stop = asyncio.Event()
        tasks = intake.tasks(stop)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    row = s.store.query("SELECT consecutive_failures, last_error FROM feed_state WHERE feed='rss'")[0]
    # 0.05, 0.1, 0.2, 0.4 s apart: backing off, not hammering
    assert 2 <= row[0] <= 4 and "http_5xx" in row[1] and site.hits["rss"] == row[0]


async def test_worker_fetches_a_url_once_and_records_in_one_transaction(library, samples):
    site = PhotoSite(samples)
    async with serve(site.app()) as base, Fetcher(LIMITS) as fetcher:
        s = Stages(library, base)
        url = f"{base}/img/small-chelsea.jpg"
        work, _ = work_rows.record_items(s.store, "a", [FeedItem("a", "1", (url,))], time.time())
        again, _ = work_rows.record_items(s.store, "b", [FeedItem("b", "1", (url, f"{base}/img/nope.jpg"))],
                                          time.time())
        worker = s.worker(fetcher)
        records = await asyncio.gather(*(worker.process(w) for w in work + again))
        # /v1/check of the same URL takes the stored fingerprint: no third download
        fp, matches = await worker.check_url(url)
        assert [library.get(x.entry_id).label for x in matches] == ["library-chelsea"]
    assert site.hits["small-chelsea.jpg"] == 1  # two feeds and a check, one download
    assert [len(r) for r in records] == [1, 0, 0]  # one match per image URL and entry
    assert s.recorded[0].entry.label == "library-chelsea"
    states = dict(s.store.query("SELECT image_url, state FROM work"))
    assert states[url] == "done" and states[f"{base}/img/nope.jpg"] == "failed"
    assert s.store.query("SELECT state FROM images WHERE url=?", (url,)) == [("ok",)]
    await worker.close()


async def test_recorder_queues_alerts_in_the_match_transaction_but_not_for_a_false_positive(
        library, samples, tmp_path):
    site = PhotoSite(samples)
    async with serve(site.app()) as base, Fetcher(LIMITS) as fetcher:
        s = Stages(library, base)
        sink = AlertSinkConfig(name="archive", type="file", path=str(tmp_path / "alerts.jsonl"))
        s.recorder.outbox = Outbox(s.store, [make_sink(sink)], s.metrics)

        def enqueued():
            return [m for (m,) in s.store.query("SELECT match_id FROM alerts ORDER BY id")]
        worker = s.worker(fetcher)
        first, _ = work_rows.record_items(s.store, "a", [FeedItem("a", "1", (f"{base}/img/small-chelsea.jpg",))],
                                          time.time())
        [rec] = await worker.process(first[0])
        assert enqueued() == [rec.id]
        assert set_verdict(s.store, rec.id, "false_positive")
        # the same picture under another URL: recorded, suppressed, never alerted
        site.add_image("copy.jpg", site.images["small-chelsea.jpg"][0])
        second, _ = work_rows.record_items(s.store, "a", [FeedItem("a", "2", (f"{base}/img/copy.jpg",))],
                                           time.time())
        [quiet] = await worker.process(second[0])
        assert quiet.suppressed == "false_positive" and enqueued() == [rec.id]
        await worker.close()


async def test_library_watcher_matches_recent_images_against_new_entries(library, samples):
    site = PhotoSite(samples)
    async with serve(site.app()) as base, Fetcher(LIMITS) as fetcher:
        s = Stages(library, base)
        worker = s.worker(fetcher)
        work, _ = work_rows.record_items(s.store, "a", [FeedItem("a", "1", (f"{base}/img/flip-rocket.jpg",))],
                                         time.time())
        assert await worker.process(work[0]) == []  # the rocket is not protected yet
        before = max(library.index.ids.tolist(), default=0)
        add_files(library, [samples / "library-rocket.jpg"], progress=False)
        watcher = LibraryWatcher(s.store, library, s.matcher, s.recorder, s.metrics, check_seconds=0.05)
        records = await watcher.retro_match(after_entry_id=before)
        await worker.close()
    assert [r.entry.label for r in records] == ["library-rocket"] and records[0].match.mirrored
    assert s.recorded[-1].id == records[0].id


def test_recent_images_come_a_page_at_a_time_each_once(store_location):
    """Retroactive matching reads the window's images in pages (a busy feed's three days are
    millions): each usable image once, in fetch order, ties of fetched_at split across pages
    by URL; older, failed and low-detail images left out."""
    import dataclasses

    from monitor.fingerprints import Fingerprint
    store = open_store(store_location)
    fp = Fingerprint(1, 2, 3, 4, 64, 48)
    with store.transaction() as conn:
        work_rows.images_ok(conn, [(f"http://h/old/{i}.jpg", fp) for i in range(3)], 10.0)
        work_rows.images_ok(conn, [(f"http://h/tie/{i}.jpg", fp) for i in range(7)], 20.0)
        work_rows.images_ok(conn, [("http://h/flat.jpg", dataclasses.replace(fp, degenerate="low_detail"))], 20.0)
        for k in range(5):
            work_rows.image_ok(conn, f"http://h/later/{k}.jpg", dataclasses.replace(fp, dhash=k), 30.0 + k)
    work_rows.image_failed(store, "http://h/broken.jpg", "truncated", 25.0)
    want = [f"http://h/tie/{i}.jpg" for i in range(7)] + [f"http://h/later/{k}.jpg" for k in range(5)]
    for size in (1, 3, 5, 100):
        seen, pages = [], 0
        page, after = work_rows.recent_images(store, 15.0, None, size)
        while after is not None:
            assert len(page) <= size
            seen, pages = seen + page, pages + 1
            page, after = work_rows.recent_images(store, 15.0, after, size)
        assert [url for url, _ in seen] == want and pages == -(-len(want) // size)
        assert [fp.dhash for url, fp in seen if "later" in url] == list(range(5))
    # a filter on the dHashes a page holds picks the rows that get a fingerprint; the pages go on
    asked = []

    def near(owners, dhashes, phashes, mirrored, rows):
        asked.append(rows)
        return np.isin(np.arange(rows), owners[~mirrored & (dhashes == 3)])
    page, after, kept = *work_rows.recent_images(store, 15.0, None, 5, near), []
    while after is not None:
        kept += page
        page, after = work_rows.recent_images(store, 15.0, after, 5, near)
    assert [url for url, _ in kept] == ["http://h/later/3.jpg"] and asked == [5, 5, 2]
    store.close()


def test_stored_hashes_are_every_dhash_a_stored_fingerprint_holds_with_its_phash(samples):
    """The retro-match's filter reads each row's dHashes (its views', plain and mirrored),
    each with the pHash of the same view and side, from the stored columns directly: the
    same as the fingerprints made from them, with and without fine hashes, with and without
    views."""
    import dataclasses

    from monitor.fingerprints import fingerprint_bytes
    from monitor.fingerprints.codec import pack_fine, pack_views, stored_fingerprint, stored_hashes, u64_to_sql
    fps = [fingerprint_bytes(p.read_bytes(), views="library" if k % 2 else "query")  # library: many views
           for k, p in enumerate(sorted(samples.glob("*.jpg"))[:6])]
    fps += [dataclasses.replace(fps[0], views=()), dataclasses.replace(fps[1], fine=b"", fine_mirror=b"",
                                                                       views=tuple(dataclasses.replace(
                                                                           v, fine=b"", fine_mirror=b"")
                                                                           for v in fps[1].views))]
    assert sum(len(fp.views) for fp in fps) > 10
    rows = [(*map(u64_to_sql, (fp.dhash, fp.phash, fp.dhash_mirror, fp.phash_mirror)), pack_fine(fp),
             pack_views(fp.views)) for fp in fps]
    owners, dhashes, phashes, mirrored = stored_hashes(rows)
    got = sorted(zip(owners.tolist(), dhashes.tolist(), phashes.tolist(), mirrored.tolist(), strict=True))
    want = []
    for i, (d, p, dm, pm, fine, views) in enumerate(rows):
        back = stored_fingerprint(d, p, dm, pm, 0, 0, None, fine, views)
        for v in (back, *back.views):
            want += [(i, v.dhash, v.phash, False), (i, v.dhash_mirror, v.phash_mirror, True)]
    assert got == sorted(want)


def test_a_poll_is_recorded_in_a_few_statements_with_every_item_once(store_location):
    """record_items writes a poll in multi-row statements: new items get a work row per
    image URL, in the poll's order; an item seen before, an id twice in one poll and a URL
    twice in one item add nothing; more items than one statement takes still all count.
    cached_images answers many URLs at once, as cached_image does each."""
    from datetime import UTC, datetime

    from monitor.fingerprints import Fingerprint
    store = open_store(store_location)
    when = datetime(2026, 5, 1, tzinfo=UTC)
    first, new = work_rows.record_items(store, "f", [FeedItem("f", "1", ("http://h/1.jpg",))], 1.0)
    assert new == 1 and [w.item_id for w in first] == ["1"]
    poll = [FeedItem("f", "1", ("http://h/1.jpg",)),                                  # seen before
            FeedItem("f", "2", ("http://h/2a.jpg", "http://h/2b.jpg", "http://h/2a.jpg"), "http://h/p2", "ann", when),
            FeedItem("f", "2", ("http://h/other.jpg",)),                              # the same id again
            *(FeedItem("f", f"n{i}", (f"http://h/n{i}.jpg",)) for i in range(work_rows.RECORD_CHUNK + 50))]
    work, new = work_rows.record_items(store, "f", poll, 2.0)
    assert new == 1 + work_rows.RECORD_CHUNK + 50
    assert [(w.item_id, w.image_url) for w in work] == [
        ("2", "http://h/2a.jpg"), ("2", "http://h/2b.jpg"),
        *((f"n{i}", f"http://h/n{i}.jpg") for i in range(work_rows.RECORD_CHUNK + 50))]
    assert [w.id for w in work] == sorted(w.id for w in work) and work[0].id > first[0].id
    assert (work[0].page_url, work[0].author, work[0].published) == ("http://h/p2", "ann", when.timestamp())
    rows = store.query("SELECT id, feed, item_id, image_url FROM work ORDER BY id")
    assert [tuple(r) for r in rows] == [(w.id, "f", w.item_id, w.image_url) for w in first + work]
    assert work_rows.record_items(store, "f", poll, 3.0) == ([], 0)  # all seen now
    # the other feed's item of the same id is its own
    assert work_rows.record_items(store, "g", poll[:1], 4.0)[1] == 1

    fp = Fingerprint(1, 2, 3, 4, 64, 48)
    with store.transaction() as conn:
        work_rows.image_ok(conn, "http://h/1.jpg", fp, 5.0)
    work_rows.image_failed(store, "http://h/2a.jpg", "http_4xx: HTTP 404", 5.0)
    known = work_rows.cached_images(store, ["http://h/1.jpg", "http://h/2a.jpg", "http://h/none.jpg",
                                            "http://h/1.jpg"])
    assert set(known) == {"http://h/1.jpg", "http://h/2a.jpg"}
    assert (known["http://h/1.jpg"].dhash, known["http://h/1.jpg"].width) == (1, 64)
    assert isinstance(known["http://h/2a.jpg"], work_rows.CachedFailure)
    assert known["http://h/2a.jpg"].reason == "http_4xx"
    assert work_rows.cached_image(store, "http://h/1.jpg") == known["http://h/1.jpg"]
    with pytest.raises(work_rows.CachedFailure):
        work_rows.cached_image(store, "http://h/2a.jpg")
    store.close()



@pytest.mark.slow  # a PostgreSQL cluster
def test_a_sql_ascii_postgresql_database_gives_back_text(postgres_cluster):
    """A database made in the C locale (SQL_ASCII, as initdb gives without a UTF-8 locale)
    handed text columns back as bytes: every new post's work rows were lost (found running
    dashboards/compose with such a server). The store asks for UTF8 whatever the database's
    encoding, so text, non-ASCII included, comes back as written."""
    import uuid
    store = open_store(postgres_cluster.create_database(f"a_{uuid.uuid4().hex[:12]}", encoding="SQL_ASCII"))
    assert store.query("SHOW server_encoding")[0][0] == "SQL_ASCII"
    work, new = work_rows.record_items(store, "f", [FeedItem("f", "post-é", ("http://h/1.jpg", "http://h/2.jpg"),
                                                             author="Zoë")], 1.0)
    assert new == 1 and [(w.item_id, w.image_url, w.author) for w in work] == [
        ("post-é", "http://h/1.jpg", "Zoë"), ("post-é", "http://h/2.jpg", "Zoë")]
    assert [tuple(r) for r in store.query("SELECT item_id, author FROM work ORDER BY id")] == [("post-é", "Zoë")] * 2
    store.close()


@pytest.mark.slow  # a PostgreSQL cluster
@pytest.mark.parametrize("analysed", [False, True])
def test_a_look_up_of_known_images_reads_the_index_however_the_table_has_grown(postgres_cluster, analysed):
    """A new deployment's images table grows from empty with the posts. The server kept the
    generic plan of the fetch workers' look-up, made while the table was small, a sequential
    scan, as it grew (until autovacuum's next ANALYZE, a minute or more later): each batch's
    look-up read every image row so far, most of the cluster's CPU in bench/scaleout.py. So
    too where the tables were analysed empty (a VACUUM ANALYZE after loading the library).
    Each look-up is planned for the table as it is."""
    import os
    import uuid

    from monitor.fingerprints import Fingerprint
    store = open_store(postgres_cluster.create_database(f"p_{uuid.uuid4().hex[:12]}"))
    if analysed:
        with store.transaction() as conn:
            conn.execute("ANALYZE")

    def scans() -> tuple[int, int]:  # this session's sequential and index scans of images so far
        store.query("SELECT pg_stat_force_next_flush()")
        return tuple(store.query("SELECT seq_scan, COALESCE(idx_scan, 0) FROM pg_stat_user_tables "
                                 "WHERE relname = 'images'")[0])

    fp = Fingerprint(1, 2, 3, 4, 64, 48, fine=os.urandom(64), fine_mirror=os.urandom(64))
    for n in range(300):  # as fetch workers go: a batch's look-up, then its images stored
        urls = [f"http://h/{n}/{k}.jpg" for k in range(4)]
        assert work_rows.cached_images(store, urls) == {}
        with store.transaction() as conn:
            work_rows.images_ok(conn, [(u, fp) for u in urls], 1.0)
    with store.transaction() as conn:
        work_rows.images_ok(conn, [(f"http://h/more/{i}.jpg", fp) for i in range(5000)], 1.0)
    before = scans()
    for n in range(20):
        urls = [f"http://h/{n}/1.jpg", f"http://h/more/{n}.jpg", f"http://h/none/{n}.jpg", f"http://h/new/{n}.jpg"]
        assert set(work_rows.cached_images(store, urls)) == set(urls[:2])
    assert work_rows.cached_image(store, "http://h/more/7.jpg").dhash == 1
    after = scans()
    assert after[0] == before[0] and after[1] >= before[1] + 21, (before, after)
    store.close()


@pytest.mark.parametrize("shards", [1, 2])
def test_a_recorder_batch_records_each_image_once_whatever_is_repeated(library, samples, shards):
    """The scaled-out recorder's batch (RecorderRole._store_answers, on both engines): an
    image is recorded, once, with the answer that completes its set of shards; a repeated
    answer, in the same batch or a later one, changes nothing; partial answers are kept
    until the set is complete, then cleared; the new images' rows and the work rows are
    written for the whole batch."""
    from monitor.fingerprints import fingerprint_bytes
    from monitor.records import shard_answers
    from monitor.scaleout.recorder import RecorderRole
    from monitor.scaleout.wire import answer_from, answer_json
    from monitor.search.answers import HashAnswer
    store = library.store
    metrics = Metrics()
    role = RecorderRole(store, shards, None, Recorder(store, library, metrics))
    fp = fingerprint_bytes((samples / "library-chelsea.jpg").read_bytes(), views="query")
    [hit] = Matcher(library.index, PRESETS["near"]).match(fp)
    urls = [f"http://h/{i}.jpg" for i in range(3)]
    work, _ = work_rows.record_items(store, "f", [FeedItem("f", str(i), (u,)) for i, u in enumerate(urls)], 1.0)
    a, b, c = work
    met, none = answer_json(HashAnswer([hit], [])), answer_json(HashAnswer([], []))

    def answers(*pairs):
        return [(w, fp, True, shard, text, answer_from(text)) for w, shard, text in pairs]
    last = shards - 1
    first, _, _ = role._store_answers(answers((a, 0, met), (a, last, none), (a, last, none), (b, 0, none)))
    states = dict(store.query("SELECT id, state FROM work"))
    if shards == 1:
        assert [r.work.id for r in first] == [a.id] and states == {a.id: "done", b.id: "done", c.id: "pending"}
    else:
        assert [r.work.id for r in first] == [a.id] and states == {a.id: "done", b.id: "pending", c.id: "pending"}
        assert shard_answers.waiting(store, 2.0)[0] == 1  # b: shard 0 of 2 so far
        assert role._store_answers(answers((b, 1, none), (b, 1, none)))[0] == []
    assert role._store_answers(answers((a, 0, met), (c, last, none)))[0] == []  # a repeat; c's last shard only
    states = dict(store.query("SELECT id, state FROM work"))
    assert states[a.id] == states[b.id] == "done"
    assert states[c.id] == ("done" if shards == 1 else "pending")
    assert store.query("SELECT work_id, entry_id FROM matches") == [(a.id, hit.entry_id)]
    recorded = {u for (u,) in store.query("SELECT url FROM images WHERE state='ok'")}
    assert recorded == ({*urls} if shards == 1 else {urls[0], urls[1]})
    assert shard_answers.waiting(store, 2.0)[0] == (0 if shards == 1 else 1)  # c waits for shard 0


async def test_the_in_process_queue_hands_out_rows_in_order_and_none_once_stopped():
    """A worker takes rows in order, straight from a queue that holds some and by waiting
    on an empty one; once stopping, None, the rows left waiting in the store for the next
    start."""
    transport, stop = InProcessTransport(4), asyncio.Event()
    rows = [work_rows.WorkItem(i, "f", str(i), f"http://h/{i}.jpg", None, None, None) for i in range(3)]
    for w in rows[:2]:
        await transport.put(w)
    assert [await transport.get(stop), await transport.get(stop)] == rows[:2] and transport.depth() == 0
    waiting = asyncio.ensure_future(transport.get(stop))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    await transport.put(rows[2])
    assert await waiting == rows[2]
    waiting = asyncio.ensure_future(transport.get(stop))
    await asyncio.sleep(0.01)
    stop.set()
    assert await waiting is None
    await transport.put(rows[0])
    assert await transport.get(stop) is None and transport.depth() == 1


async def test_an_unsure_match_is_confirmed_however_the_image_comes_back(store_location, samples):
    """The keypoints' confirmation of an unsure hash match holds on every path, not only
    for a fresh download: an image seen before the entry existed (retro-matching), and a
    URL fetched already (from the store, by another feed) are fetched again when, and only
    when, a match needs confirming. Two real unrelated textures (tests/images: riveted
    plate, rusty pipes) meet by their hashes and are rejected each time; a repost cut and
    brightened, as unsure by its hashes, is confirmed by its keypoints each time."""
    from PIL import Image, ImageEnhance

    from tests.test_detective import IMAGES, _jpeg
    site = PhotoSite(samples)
    site.add_image("rivets.jpg", (IMAGES / "texture-rivets.jpg").read_bytes())
    rocket = Image.open(samples / "library-rocket.jpg").convert("RGB")
    site.add_image("cut-rocket.jpg", _jpeg(ImageEnhance.Contrast(
        rocket.crop((0, int(rocket.height * 0.07), rocket.width, rocket.height))).enhance(1.5)))
    library = Library(open_store(store_location))
    async with serve(site.app()) as base, Fetcher(LIMITS) as fetcher:
        s = Stages(library, base)
        worker = s.worker(fetcher)
        urls = [f"{base}/img/rivets.jpg", f"{base}/img/cut-rocket.jpg"]
        first, _ = work_rows.record_items(s.store, "a", [FeedItem("a", str(k), (u,)) for k, u in enumerate(urls)],
                                          time.time())
        assert [await worker.process(w) for w in first] == [[], []]  # nothing protected yet
        assert site.hits["rivets.jpg"] == site.hits["cut-rocket.jpg"] == 1
        before = max(library.index.ids.tolist(), default=0)
        add_files(library, [IMAGES / "texture-rustpipes.jpg", samples / "library-rocket.jpg"], progress=False)
        watcher = LibraryWatcher(s.store, library, s.matcher, s.recorder, s.metrics, check_seconds=30,
                                 fetch_image=fetcher.fetch_image, page=2)  # the recent images read in two pages
        records = await watcher.retro_match(after_entry_id=before)
        assert [(r.entry.label, r.match.decided_by) for r in records] \
            == [("library-rocket", "dhash+phash+fine+keypoints")]
        assert site.hits["rivets.jpg"] == site.hits["cut-rocket.jpg"] == 2  # fetched again to confirm
        # the same URLs from another feed: the stored fingerprints, confirmed the same way
        again, _ = work_rows.record_items(s.store, "b", [FeedItem("b", str(k), (u,)) for k, u in enumerate(urls)],
                                          time.time())
        assert [await worker.process(w) for w in again] == [[], []]  # rivets rejected, the rocket's recorded
        assert site.hits["rivets.jpg"] == site.hits["cut-rocket.jpg"] == 3
        fp, matches = await worker.check_url(urls[0])
        assert matches == [] and site.hits["rivets.jpg"] == 4
        # a URL that is gone by then: the hashes' answer stands (the geometry cannot be told)
        del site.images["rivets.jpg"]
        fp, matches = await worker.check_url(urls[0])
        assert [library.get(m.entry_id).label for m in matches] == ["texture-rustpipes"]
        assert s.metrics.unsure_refetches.labels("unreachable")._value.get() == 1
        # each confirmation found the post's keypoints once, and the metrics say so
        searches = s.metrics.keypoint_searches
        assert (searches.labels("upright")._value.get(), searches.labels("mirrored")._value.get()) == (5, 0)
        assert s.metrics.keypoint_search_seconds._sum.get() > 0
        await worker.close()
    assert [r.entry.label for r in s.recorded] == ["library-rocket"]
    library.store.close()


async def test_a_crop_seen_before_its_picture_was_protected_is_found_by_a_retro_second_look(store_location, samples):
    """An image seen before its picture became a library entry gets, when the entry is
    added, the second look a fresh download would: its hashes meet no new entry (turned
    4 degrees and cut on three sides), but it lies near one, so it is
    fetched again and its keypoints decide. An unrelated image that meets nothing near
    is not fetched again; one whose URL is gone by then is counted and left."""
    from PIL import Image

    from tests.test_detective import _jpeg, _turned_and_cut
    site = PhotoSite(samples)
    for name in ("rocket", "coffee"):
        site.add_image(f"cut-{name}.jpg", _jpeg(_turned_and_cut(Image.open(samples / f"library-{name}.jpg")
                                                                .convert("RGB"))))
    library = Library(open_store(store_location))
    async with serve(site.app()) as base, Fetcher(LIMITS) as fetcher:
        s = Stages(library, base)
        worker = s.worker(fetcher)
        urls = [f"{base}/img/{name}" for name in ("cut-rocket.jpg", "cut-coffee.jpg", "other-baboon.jpg")]
        seen, _ = work_rows.record_items(s.store, "a", [FeedItem("a", str(k), (u,)) for k, u in enumerate(urls)],
                                         time.time())
        assert [await worker.process(w) for w in seen] == [[], [], []]  # nothing protected yet
        assert Matcher(library.index).match(work_rows.cached_image(s.store, urls[0])) == []  # (empty library)
        del site.images["cut-coffee.jpg"]  # gone by the time its picture is protected
        before = max(library.index.ids.tolist(), default=0)
        add_files(library, [samples / "library-rocket.jpg", samples / "library-coffee.jpg"], progress=False)
        rocket = next(e for e in library.entries() if e.label == "library-rocket")
        hashes_only = Matcher(library.index, s.matcher.tiers).match(work_rows.cached_image(s.store, urls[0]))
        assert rocket.id not in [m.entry_id for m in hashes_only], "the hashes alone find it: no look is tested"
        watcher = LibraryWatcher(s.store, library, s.matcher, s.recorder, s.metrics, check_seconds=30,
                                 fetch_image=fetcher.fetch_image, page=2)  # the recent images read in two pages
        records = await watcher.retro_match(after_entry_id=before)
        await worker.close()
    assert [(r.entry.label, r.match.decided_by, r.match.inliers >= 15) for r in records] \
        == [("library-rocket", "keypoints", True)]
    assert site.hits["cut-rocket.jpg"] == 2 and site.hits["other-baboon.jpg"] == 1  # fetched again: the crop only
    assert s.metrics.unsure_refetches.labels("unreachable")._value.get() == 1  # the coffee crop, gone
    assert s.metrics.retro_images._value.get() == 3 and s.metrics.retro_seconds._sum.get() > 0
    assert [r.entry.label for r in s.recorded] == ["library-rocket"]
    library.store.close()


async def test_grouped_calls_go_together_and_each_caller_gets_its_own_answer():
    from monitor.pipeline.grouped import Grouped
    groups = []

    def run_many(items):
        groups.append(list(items))
        time.sleep(0.05)  # a transaction: meanwhile further calls wait for the next group
        return [ValueError(f"bad {i}") if i == 3 else i * 10 for i in items]

    grouped = Grouped(run_many)
    first = asyncio.ensure_future(grouped(0))
    await asyncio.sleep(0.01)  # the first group is running
    rest = [asyncio.ensure_future(grouped(i)) for i in range(1, 6)]
    await asyncio.sleep(0)  # all five asked
    rest[1].cancel()  # a caller gone: its call is made all the same, the others get their answers
    done = await asyncio.gather(first, *rest, return_exceptions=True)
    assert groups == [[0], [1, 2, 3, 4, 5]]  # two hops for six calls
    assert done[:2] == [0, 10] and isinstance(done[2], asyncio.CancelledError)
    assert isinstance(done[3], ValueError) and str(done[3]) == "bad 3" and done[4:] == [40, 50]

    def broken(items):
        raise OSError("store away")
    assert isinstance((await asyncio.gather(Grouped(broken)(1), return_exceptions=True))[0], OSError)


async def test_posts_recorded_together_are_each_recorded_once_and_a_bad_one_fails_alone(library, samples, tmp_path):
    """Posts finishing while a transaction runs are recorded in the next one, together; a
    post whose record fails (here: an image row without its fingerprint) fails alone."""
    from monitor.fingerprints import fingerprint_bytes
    site = PhotoSite(samples)
    s = Stages(library, "http://127.0.0.1:9")
    sink = AlertSinkConfig(name="archive", type="file", path=str(tmp_path / "alerts.jsonl"))
    s.recorder.outbox = Outbox(s.store, [make_sink(sink)], s.metrics)
    fp = fingerprint_bytes(site.images["small-chelsea.jpg"][0], views="query")
    matches = s.matcher.match(fp)
    assert matches
    items = [FeedItem("f", str(i), (f"http://127.0.0.1:9/img/{i}.jpg",)) for i in range(12)]
    work, _ = work_rows.record_items(s.store, "f", items, time.time())
    calls = [s.recorder.record(w, matches, None if i == 5 else fp, new_image=True) for i, w in enumerate(work)]
    done = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(done[5], Exception)
    assert all(len(r) == len(matches) for i, r in enumerate(done) if i != 5)
    assert s.store.query("SELECT COUNT(*) FROM matches")[0][0] == 11 * len(matches)
    assert s.store.query("SELECT COUNT(*) FROM alerts")[0][0] == 11 * len(matches)
    assert dict(s.store.query("SELECT state, COUNT(*) FROM work GROUP BY state")) == {"done": 11, "pending": 1}
    # a group with no bad post: one transaction; an image URL recorded already adds no match
    more, _ = work_rows.record_items(s.store, "g", items[:8], time.time())
    done = await asyncio.gather(*(s.recorder.record(w, matches, fp, new_image=True) for w in more))
    assert [len(r) for r in done] == [0] * 5 + [len(matches)] + [0] * 2  # 5 was the one that failed
    assert s.store.query("SELECT COUNT(*) FROM alerts")[0][0] == 12 * len(matches)
    assert dict(s.store.query("SELECT state, COUNT(*) FROM work GROUP BY state")) == {"done": 19, "pending": 1}


async def test_alerts_held_back_by_flood_control_are_counted_once_when_a_group_is_retried(library, samples, tmp_path):
    """A group with a bad post fails, and its posts are recorded again one by one: the
    alerts flood control held back are counted once, for the transactions that committed."""
    from monitor.fingerprints import fingerprint_bytes
    site = PhotoSite(samples)
    s = Stages(library, "http://127.0.0.1:9")
    sink = AlertSinkConfig(name="archive", type="file", path=str(tmp_path / "alerts.jsonl"))
    s.recorder.outbox = Outbox(s.store, [make_sink(sink)], s.metrics, flood_max=1)
    fp = fingerprint_bytes(site.images["small-chelsea.jpg"][0], views="query")
    matches = s.matcher.match(fp)
    items = [FeedItem("f", str(i), (f"http://127.0.0.1:9/img/{i}.jpg",)) for i in range(12)]
    work, _ = work_rows.record_items(s.store, "f", items, time.time())
    done = await asyncio.gather(*(s.recorder.record(w, matches, None if i == 5 else fp, new_image=True)
                                  for i, w in enumerate(work)), return_exceptions=True)
    assert isinstance(done[5], Exception) and sum(isinstance(d, Exception) for d in done) == 1
    recorded = s.store.query("SELECT COUNT(*) FROM matches")[0][0]
    queued = s.store.query("SELECT COUNT(*) FROM alerts")[0][0]
    assert recorded == 11 * len(matches) and queued == 2 * len(matches)  # per entry: one alert, one summary
    held = s.metrics.registry.get_sample_value("repost_monitor_alert_deliveries_total",
                                               {"sink": "archive", "outcome": "flood_suppressed"})
    assert held == recorded - queued


async def seen_before_protected(library, samples, names: list[str]) -> None:
    """Each image posted on a feed, fetched and matched: none meets an entry (their
    pictures are not protected yet)."""
    site = PhotoSite(samples)
    async with serve(site.app()) as base, Fetcher(LIMITS) as fetcher:
        s = Stages(library, base)
        worker = s.worker(fetcher)
        items = [FeedItem("a", str(k), (f"{base}/img/{name}",)) for k, name in enumerate(names)]
        seen, _ = work_rows.record_items(s.store, "a", items, time.time())
        assert [await worker.process(w) for w in seen] == [[] for _ in names]
        await worker.close()


async def test_an_entry_added_while_no_daemon_ran_is_retro_matched_at_the_next_start_once(library, samples,
                                                                                         caplog):
    """The store keeps how far the library's new entries were retro-matched: an entry added
    while the daemon was stopped (`library add` from a shell) is matched against the images
    seen before, when the daemon next starts, and only then; the first start takes the
    library as it stands."""
    from monitor.records import changes
    await seen_before_protected(library, samples, ["flip-rocket.jpg"])

    async def start(lib):
        """A daemon's library watcher, from its start until it has looked once."""
        stages = Stages(lib, "")
        watcher = LibraryWatcher(lib.store, lib, stages.matcher, stages.recorder, stages.metrics, check_seconds=0.05)
        stop = asyncio.Event()
        task = asyncio.create_task(watcher.run(stop))
        await until(lambda: 0 < (lib.checkpoint or 0) == watcher._retro_upto, 10)
        stop.set()
        await asyncio.wait_for(task, 10)
        return [r.entry.label for r in stages.recorded], stages.metrics.retro_seconds._sum.get()

    first = Library(library.store)
    assert await start(first) == ([], 0)  # the first start: nothing retro-matched
    assert changes.retro_mark(library.store, (0, 1)) == first.checkpoint
    add_files(library, [samples / "library-rocket.jpg"], progress=False)  # the daemon stopped
    again = Library(library.store)  # the next start: its index loaded with the new entry
    labels, seconds = await start(again)
    assert labels == ["library-rocket"] and seconds > 0
    assert await start(Library(library.store)) == ([], 0)  # and not again at the start after
    # stopped longer than the change log is kept: what was added meanwhile is said, not matched
    add_files(library, [samples / "other-apple.jpg"], progress=False)
    changes.prune(library.store, changes.last_change(library.store))
    with caplog.at_level("WARNING", logger="repost_monitor.pipeline"):
        assert await start(Library(library.store)) == ([], 0)
    assert "change log was pruned past the last retro-match" in caplog.text


@pytest.mark.slow  # 2,500 items polled four times: ~1 s
async def test_a_poll_records_at_most_max_new_items_and_the_next_polls_take_the_rest(store_location):
    """A feed that suddenly lists thousands of new items (an archive, rotating ids) is taken
    max_new_items a poll, the first listed first; the rest are listed again by the next
    poll, which is not conditional until every item is recorded; nothing is lost."""
    listed = [{"id": f"i{k}", "url": f"http://example.org/{k}", "image": f"http://img.example/{k}.jpg"}
              for k in range(2500)]
    conditional = []

    async def feed(request):
        conditional.append(request.headers.get("If-None-Match"))
        etag = f'"v{len(listed)}"'
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304)
        return web.json_response({"version": "https://jsonfeed.org/version/1.1", "title": "t", "items": listed},
                                 headers={"ETag": etag})
    app = web.Application()
    app.router.add_get("/feed.json", feed)
    store = open_store(store_location)
    try:
        async with serve(app) as base, Fetcher(LIMITS) as fetcher:
            metrics = Metrics()
            intake = Intake(store, fetcher, metrics, InProcessTransport(100))
            source = make_source("jsonfeed", "big", f"{base}/feed.json")
            await intake.poll_once(source, max_new=1000)  # rows of a feed seen before keep their places
            taken = [[w.item_id for w in await intake.poll_once(source, max_new=1000)] for _ in range(3)]
            # the first poll, above, took i0..i999; then the next 1,000, the last 500, and nothing
            assert taken[0] == [f"i{k}" for k in range(1000, 2000)]
            assert taken[1] == [f"i{k}" for k in range(2000, 2500)] and taken[2] == []
            assert conditional == [None, None, None, '"v2500"']  # no 304 hid what was left out
            assert store.query("SELECT COUNT(*) FROM seen_items")[0][0] == 2500
            assert store.query("SELECT COUNT(DISTINCT item_id) FROM work")[0][0] == 2500
            deferred = metrics.registry.get_sample_value("repost_monitor_feed_items_skipped_total",
                                                         {"feed": "ingest", "reason": "deferred"})
            assert deferred == 1500 + 500
            # new items among 2,500 seen: the cap counts the new ones only
            listed[:0] = [{"id": f"n{k}", "image": f"http://img.example/n{k}.jpg"} for k in range(3)]
            assert [w.item_id for w in await intake.poll_once(source, max_new=2)] == ["n0", "n1"]
            assert [w.item_id for w in await intake.poll_once(source, max_new=2)] == ["n2"]
    finally:
        store.close()


async def test_the_last_runs_pending_work_is_resumed_page_by_page_and_once(library):
    """2,500 rows left pending (2.5 pages), a queue of 100 drained slowly: every row comes back
    once, oldest first; rows the polls add meanwhile are theirs to queue, not the resume's."""
    s = Stages(library, "http://127.0.0.1:1")
    items = [FeedItem("rss", f"i{k}", (f"http://127.0.0.1:1/img/{k}.jpg",)) for k in range(2500)]
    left = await asyncio.to_thread(lambda: Intake(s.store, None, s.metrics, s.transport).record_items(
        "rss", items, time.time()))
    finished = left[:300:3]  # some the last run finished
    with s.store.transaction() as conn:
        conn.execute("UPDATE work SET state='done' WHERE id IN (" + ",".join(str(w.id) for w in finished) + ")")
    intake = s.intake(None)
    stop = asyncio.Event()
    [resume] = intake.tasks(stop)
    got = []

    async def take():
        work = await asyncio.wait_for(s.transport.get(stop), 10)
        s.transport.done(work)  # one host's rows: the next is handed out once this one is done
        got.append(work.id)

    while len(got) < 300:
        await take()
    newer = await asyncio.to_thread(intake.record_items, "rss", [FeedItem("rss", "new", ("http://127.0.0.1:1/n.jpg",))],
                                    time.time())
    while len(got) < len(left) - len(finished):
        await take()
    await asyncio.wait_for(resume, 10)
    assert got == [w.id for w in left if w not in finished]
    assert s.transport.depth() == 0 and newer[0].id > got[-1]
    assert work_rows.pending(s.store, after=left[1000].id, upto=left[1999].id, limit=10) == \
        [w for w in left[1001:1011] if w not in finished]
