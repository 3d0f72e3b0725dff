"""The second look: keypoints of a post that no tier met, against its nearest entries',
verified geometrically; stored with the library in a real store (SQLite file; the tests
taking ``store_location`` run again on PostgreSQL)."""

import dataclasses
import io
import json
import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from monitor.fingerprints import fingerprint_bytes
from monitor.fingerprints.keypoints import KEY_BYTES, is_packed_picture, unpack_keypoints
from monitor.pipeline.worker import fingerprint_query
from monitor.records.engines import open_store
from monitor.records.library import Library
from monitor.scaleout.wire import fingerprint_fields, fingerprint_from
from monitor.scan import add_files
from monitor.search.index import LibraryIndex
from monitor.search.matcher import PRESETS, Matcher


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _side_and_top(img: Image.Image) -> Image.Image:
    """18% cut off the left and 8% off the top: every cell of the hashes' grids moves."""
    return img.crop((int(img.width * 0.18), int(img.height * 0.08), img.width, img.height))


def _turned_and_cut(img: Image.Image) -> Image.Image:
    return img.rotate(4, Image.BICUBIC).crop((int(img.width * 0.1), int(img.height * 0.05), img.width,
                                             int(img.height * 0.95)))


def _found(matcher: Matcher, data: bytes, keypoints: bool) -> dict[int, object]:
    return {m.entry_id: m for m in matcher.match(fingerprint_bytes(data, views="query", keypoints=keypoints))}


def test_the_second_look_finds_cut_and_turned_reposts_the_hashes_miss(library_images, other_images):
    index = LibraryIndex()
    for i, path in enumerate(library_images):
        fp = fingerprint_bytes(path.read_bytes(), views="library")
        assert len(fp.keypoints) // KEY_BYTES >= 100, path.name  # every entry has its keypoints
        index.add(i, fp)
    matcher = Matcher(index, PRESETS["near"])
    for edit in (_side_and_top, _turned_and_cut):
        missed = caught = 0
        for i, path in enumerate(library_images):
            data = _jpeg(edit(Image.open(path)))
            if i in _found(matcher, data, keypoints=False):
                continue
            missed += 1
            found = _found(matcher, data, keypoints=True)
            if i in found:
                caught += 1
                m = found[i]
                assert m.tier == "near" and m.decided_by == "keypoints" and m.inliers >= 15, m
                assert 0 <= m.dhash_distance <= 16 and m.phash_distance >= 0
            assert set(found) <= {i}, (path.name, found)  # never another entry
        assert missed >= 4 and caught >= missed - 1, (edit.__name__, missed, caught)
    for path in other_images:  # unrelated pictures, whole and cut: no second look passes
        for data in (path.read_bytes(), _jpeg(_side_and_top(Image.open(path)))):
            assert not _found(matcher, data, keypoints=True), path.name
    # an exact-only matcher never looks twice: a keypoint match counts as near
    exact = Matcher(index, PRESETS["exact"])
    assert not exact.match(fingerprint_bytes(_jpeg(_side_and_top(Image.open(library_images[0]))),
                                             views="query", keypoints=True))


def _in_frame(picture: Image.Image, frame: Image.Image) -> Image.Image:
    """``picture`` inside a wide ornate border cut from ``frame`` (a museum's gilt frame,
    an app's template): the border is 30% of the result."""
    w, h = 400, 500
    out = frame.convert("RGB").resize((w, h))
    out.paste(picture.convert("RGB").resize((int(w * 0.7), int(h * 0.7))), (int(w * 0.15), int(h * 0.15)))
    return out


def test_two_pictures_in_one_frame_are_not_one_picture(library_images, other_images):
    """The frame's keypoints agree on one geometry, but none in the middle of the entry
    does: the second look turns the pair down."""
    frame = Image.open(next(p for p in other_images if "baboon" in p.name))
    index = LibraryIndex()
    for i, path in enumerate(library_images):
        index.add(i, fingerprint_bytes(_jpeg(_in_frame(Image.open(path), frame)), views="library"))
    matcher = Matcher(index, PRESETS["near"])
    for i, path in enumerate(library_images):
        other = library_images[(i + 1) % len(library_images)]
        framed = _in_frame(Image.open(other), frame)
        assert i not in _found(matcher, _jpeg(_side_and_top(framed)), keypoints=True), (path.name, other.name)
    # while the same framed picture, cut, is found
    hits = [i in _found(matcher, _jpeg(_side_and_top(_in_frame(Image.open(p), frame))), keypoints=True)
            for i, p in enumerate(library_images)]
    assert sum(hits) >= len(hits) - 1, hits


def test_keypoints_are_stored_with_the_library_and_read_for_candidates(store_location, tmp_path, library_images):
    files = [shutil.copy(p, tmp_path / p.name) for p in library_images]
    lib = Library(open_store(store_location))
    ids = [e.id for e in add_files(lib, files, cache=None, progress=False).added]
    stored = lib.index.keypoints_of(ids)
    assert sorted(stored) == sorted(ids) and all(len(b) % KEY_BYTES == 0 and b for b in stored.values())
    xy, descriptors = unpack_keypoints(stored[ids[0]])
    assert xy.shape[1] == 2 and descriptors.shape[1] == 32 and (xy >= 0).all()
    reposts = [_jpeg(_side_and_top(Image.open(p))) for p in library_images]
    # a new process: the index from the snapshot, the keypoints from the store
    again = Library(open_store(store_location))
    matcher = Matcher(again.index, PRESETS["near"])
    found = [again_id in _found(matcher, data, keypoints=True) for again_id, data in zip(ids, reposts, strict=True)]
    assert sum(found) >= len(found) - 1, found
    # entries added before keypoints get them when their files are added again (the daemon
    # adds its library paths at every start); the library's version does not move
    with again.store.transaction() as conn:
        conn.execute("DELETE FROM entry_keypoints WHERE entry_id = ?", (ids[0],))
    version = again.version()
    assert again.stats()["without_keypoints"] == 1  # `library stats` tells, and the daemon warns
    add_files(again, files, cache=None, progress=False)
    assert ids[0] in again.index.keypoints_of([ids[0]]) and again.version() == version
    assert again.stats()["without_keypoints"] == 0
    # a removed entry's keypoints go with it
    again.remove(ids[1])
    assert again.index.keypoints_of(ids).keys() == set(ids) - {ids[1]}


def test_keypoints_cross_the_wire_and_are_found_only_when_asked(library_images, caplog):
    """A scaled-out fetch worker keeps the small copy keypoints are found on, or the encoded
    image itself where that is shorter (a feed's thumbnail), beside the fingerprint (not in
    it: every shard reads every fingerprint); the keypoint pass finds them from it only for
    a post that needs them, of its mirror image too, and answers as the one-process daemon
    does."""
    index = LibraryIndex()
    for i, path in enumerate(library_images):
        index.add(i, fingerprint_bytes(path.read_bytes(), views="library"))
    matcher = Matcher(index, PRESETS["near"])
    cut = _jpeg(_side_and_top(Image.open(library_images[2])))
    flipped = _jpeg(ImageOps.mirror(_side_and_top(Image.open(library_images[2]))))
    big = _side_and_top(Image.open(library_images[2])).convert("RGB")
    buf = io.BytesIO()  # larger than its copy: the copy goes
    big.resize((big.width * 3, big.height * 3), Image.BICUBIC).save(buf, "PNG")
    for data, mirrored, packed in ((cut, False, False), (flipped, True, False), (buf.getvalue(), False, True)):
        fp, _ = fingerprint_query(data, None, True)
        assert fp.keypoint_picture and not fp.keypoints
        assert (fp.keypoint_picture != data) == packed == is_packed_picture(fp.keypoint_picture)
        assert len(fp.keypoint_picture) <= 2 + 320 * 320
        fields = fingerprint_fields(fp, True)
        assert list(fields) == ["fp"]  # the picture is kept beside the stream, for the recorder
        back, fetched = fingerprint_from({k.encode(): v.encode() for k, v in fields.items()})  # as Redis gives them
        assert not back.keypoint_picture and back.dhash == fp.dhash and fetched
        # the picture as the recorder reads it back: the keypoint pass finds what one process finds
        shard = [(m.entry_id, m.decided_by, m.mirrored, m.inliers) for m in matcher.match(
            dataclasses.replace(back, keypoint_picture=fp.keypoint_picture))]
        lazily = [(m.entry_id, m.decided_by, m.mirrored, m.inliers) for m in matcher.match(
            fingerprint_bytes(data, views="query"), _lazily([])(data))]
        assert shard == lazily and (2, "keypoints", mirrored) == shard[0][:3], (shard, lazily)
    # a message with the picture inside (a fetch worker of an earlier version) still reads
    old = {b"fp": fields["fp"].encode(), b"picture": fp.keypoint_picture}
    assert fingerprint_from(old)[0].keypoint_picture == fp.keypoint_picture
    # a post met surely by its hashes: its picture is never unpacked (a damaged one is not noticed)
    same, _ = fingerprint_query(library_images[0].read_bytes(), None, True)
    assert 0 in {m.entry_id for m in matcher.match(dataclasses.replace(same, keypoint_picture=b"\x07" * 9))}
    # a damaged picture where keypoints are needed: the hashes' answer (none) stands
    damaged = dataclasses.replace(fingerprint_query(cut, None, True)[0], keypoint_picture=b"\x07" * 9)
    with caplog.at_level(logging.WARNING, logger="repost_monitor.search"):
        assert matcher.match(damaged) == []
    assert "not_an_image" in caplog.text and "the hashes' answer stands" in caplog.text
    caplog.clear()  # ... a damaged copy too
    with caplog.at_level(logging.WARNING, logger="repost_monitor.search"):
        assert matcher.match(dataclasses.replace(damaged, keypoint_picture=b"\x40\x01" + b"\x07" * 9)) == []
    assert "not a keypoint picture (11 bytes)" in caplog.text and "the hashes' answer stands" in caplog.text
    assert fingerprint_query(cut, None, False)[0].keypoint_picture == b""  # [match] keypoints = false
    # a message from a worker of the version before keypoints still reads
    old = fingerprint_fields(fp, False)
    old["fp"] = json.dumps(json.loads(old["fp"])[:10])
    assert fingerprint_from(old)[0].keypoints == b"" and fingerprint_from(old)[0].keypoint_picture == b""


def test_shards_answers_merge_as_one_library_would_answer():
    from monitor.search.answers import HashAnswer, Match, merged_answers
    by_hashes = Match(3, "near", 9, 12, False, 90)
    exact = Match(2, "exact", 2, 1, False, 10)
    merged = merged_answers([HashAnswer([by_hashes], []),
                             HashAnswer([exact], [(8, 10, 14, False), (6, 12, 12, True)]),
                             HashAnswer([], [(5, 11, 13, False), (7, 20, 10, False), (9, 3, 4, False)])],
                            ["exact", "near"])
    assert merged.matches == [exact, by_hashes]  # in one matcher's order: tier, dHash distance, entry
    # the four nearest of all by dHash + pHash (entry ids break ties), as one library picks them
    assert merged.candidates == [(9, 3, 4, False), (5, 11, 13, False), (6, 12, 12, True), (8, 10, 14, False)]
    assert merged_answers([], ["exact", "near"]) == HashAnswer([], [])


@pytest.mark.slow  # ~4 s: 21 posts through one library and through 2 and 3 shards
def test_shards_answers_with_one_keypoint_pass_are_one_librarys_matches(library_images, other_images):
    """The library split over 2 and 3 shards: each shard's hash answers, merged, then one
    keypoint pass per post, give exactly one matcher's matches over the whole library, for
    cut and flipped reposts (second looks), unsure hash matches (confirmations) and
    unrelated posts; each post's keypoints are found at most once each way."""
    from monitor.search.answers import keypoint_pass, merged_answers
    whole = LibraryIndex()
    entries = [*library_images, IMAGES / "texture-rustpipes.jpg"]
    fps = {i: fingerprint_bytes(p.read_bytes(), views="library") for i, p in enumerate(entries)}
    for i, fp in fps.items():
        whole.add(i, fp)
    posts = [(IMAGES / "texture-rivets.jpg").read_bytes(), *(p.read_bytes() for p in other_images[:4])]
    for path in library_images[:4]:
        img = Image.open(path).convert("RGB")
        posts += [_jpeg(_side_and_top(img)), _jpeg(ImageOps.mirror(_side_and_top(img))), _jpeg(_turned_and_cut(img)),
                  _jpeg(ImageEnhance.Contrast(img.crop((0, int(img.height * 0.07), img.width, img.height)))
                        .enhance(1.5))]
    queries = [fingerprint_bytes(d, views="query") for d in posts]
    one = Matcher(whole, PRESETS["near"]).match_many(queries, [_lazily([])(d) for d in posts])
    assert sum(1 for m in one if m) >= 12 and any(m and m[0].decided_by == "keypoints" for m in one)
    for shards in (2, 3):
        parts = [LibraryIndex() for _ in range(shards)]
        for i, fp in fps.items():
            parts[i % shards].add(i, fp)
        looks = {q: True for q in range(len(posts))}
        answers = [Matcher(part, PRESETS["near"]).hash_answers(queries, looks) for part in parts]
        merged = [merged_answers([a[q] for a in answers], ["exact", "near"]) for q in range(len(posts))]
        calls: list[list[bool]] = [[] for _ in posts]
        sources = {q: _lazily(calls[q])(d) for q, d in enumerate(posts)}
        split = keypoint_pass(merged, sources, whole.keypoints_of, "near")
        assert split == one, shards
        assert all(c.count(False) <= 1 and c.count(True) <= 1 for c in calls)


def _lazily(calls: list[bool]):
    """What the one-process daemon passes (a KeypointFinder): finds a post's keypoints (or
    its mirror image's) when asked, noting each call in ``calls``."""
    from monitor.fingerprints import KeypointFinder

    def lazily(data: bytes):
        finder = KeypointFinder(data)

        def find(mirrored=False, limit=1024):
            calls.append(mirrored)
            return finder(mirrored=mirrored, limit=limit)
        return find
    return lazily


def test_keypoints_are_found_only_for_posts_that_need_a_second_look(library_images, other_images):
    """The one-process daemon passes the image, not its keypoints: a post the hashes
    match, or one far from every entry, never pays for them."""
    index = LibraryIndex()
    for i, path in enumerate(library_images):
        index.add(i, fingerprint_bytes(path.read_bytes(), views="library"))
    matcher = Matcher(index, PRESETS["near"])
    calls: list[bool] = []
    lazily = _lazily(calls)

    same = library_images[0].read_bytes()
    assert 0 in {m.entry_id for m in matcher.match(fingerprint_bytes(same, views="query"), lazily(same))}
    assert not calls  # met by its hashes
    cut = _jpeg(_side_and_top(Image.open(library_images[2])))
    found = matcher.match(fingerprint_bytes(cut, views="query"), lazily(cut))
    assert [m.decided_by for m in found if m.entry_id == 2] == ["keypoints"] and len(calls) == 1
    far = 0
    for path in other_images:
        before = len(calls)
        assert not matcher.match(fingerprint_bytes(path.read_bytes(), views="query"), lazily(path.read_bytes()))
        far += len(calls) == before
    assert far >= len(other_images) // 2  # most unrelated pictures are near no entry at all
    broken = matcher.match(fingerprint_bytes(cut, views="query"), lambda mirrored, limit: b"\x00" * 7)  # not keypoints
    assert broken == []
    # cut and mirrored: the candidate met the post's mirror image, whose keypoints are found then
    calls.clear()
    flipped = _jpeg(ImageOps.mirror(_side_and_top(Image.open(library_images[2]))))
    found = matcher.match(fingerprint_bytes(flipped, views="query"), lazily(flipped))
    assert [(m.decided_by, m.mirrored) for m in found if m.entry_id == 2] == [("keypoints", True)]
    assert True in calls


IMAGES = Path(__file__).resolve().parent / "images"


def test_unsure_hash_matches_stand_only_where_the_keypoints_agree(library_images):
    """Two real unrelated textures (tests/images: riveted plate, rusty pipes) meet at near
    by their hashes alone; their keypoints share no geometry, so the match is dropped. A
    repost scoring as high is kept, with its inliers; a close copy never asks for keypoints;
    where the geometry cannot be told (an eagerly sent post's mirror image, an entry stored
    without keypoints) the hashes' answer stands."""
    from monitor.search import detective
    index = LibraryIndex()
    rocket = next(p for p in library_images if p.name == "library-rocket.jpg")
    index.add(5, fingerprint_bytes(rocket.read_bytes(), views="library"))
    index.add(9, fingerprint_bytes((IMAGES / "texture-rustpipes.jpg").read_bytes(), views="library"))
    matcher = Matcher(index, PRESETS["near"])
    rivets = (IMAGES / "texture-rivets.jpg").read_bytes()
    alone = matcher.match(fingerprint_bytes(rivets, views="query", keypoints=False))
    assert [(m.entry_id, m.tier, m.decided_by) for m in alone] == [(9, "near", "dhash+phash+fine")]
    assert detective.needs_confirmation(alone[0])
    assert matcher.match(fingerprint_bytes(rivets, views="query", keypoints=True)) == []
    calls: list[bool] = []
    lazily = _lazily(calls)

    assert matcher.match(fingerprint_bytes(rivets, views="query"), lazily(rivets)) == [] and calls == [False]
    img = Image.open(rocket).convert("RGB")
    edited = ImageEnhance.Contrast(img.crop((0, int(img.height * 0.07), img.width, img.height))).enhance(1.5)
    repost = _jpeg(edited)
    kept = matcher.match(fingerprint_bytes(repost, views="query", keypoints=True))
    assert [(m.entry_id, m.decided_by) for m in kept] == [(5, "dhash+phash+fine+keypoints")]
    assert kept[0].fine_distance is not None and kept[0].inliers >= detective.CONFIRM_INLIERS
    assert kept[0].dhash_distance + kept[0].phash_distance + kept[0].fine_distance > detective.CONFIRM_ABOVE
    calls.clear()
    close = _jpeg(img)
    assert [(m.entry_id, m.inliers) for m in matcher.match(fingerprint_bytes(close, views="query"), lazily(close))] \
        == [(5, None)] and calls == []
    flipped = _jpeg(ImageOps.mirror(edited))
    eager = matcher.match(fingerprint_bytes(flipped, views="query", keypoints=True))
    assert [(m.entry_id, m.mirrored, m.inliers) for m in eager] == [(5, True, None)]  # cannot be told: stands
    lazy = matcher.match(fingerprint_bytes(flipped, views="query"), lazily(flipped))
    assert [(m.entry_id, m.mirrored) for m in lazy] == [(5, True)] and lazy[0].inliers >= 10 and True in calls
    bare = LibraryIndex()  # entries from before keypoints were stored: the hashes decide
    fp = fingerprint_bytes((IMAGES / "texture-rustpipes.jpg").read_bytes(), views="library", keypoints=False)
    bare.add(9, fp)
    assert [m.entry_id for m in Matcher(bare, PRESETS["near"]).match(
        fingerprint_bytes(rivets, views="query", keypoints=True))] == [9]
    calls.clear()  # ... and the post's own keypoints are not found for nothing
    assert [m.entry_id for m in Matcher(bare, PRESETS["near"]).match(
        fingerprint_bytes(rivets, views="query"), lazily(rivets))] == [9] and calls == []


async def test_the_daemon_records_a_second_look_match_and_says_so(store_location, samples):
    """End to end: a feed host posts a picture cut from one side; the daemon's hashes miss
    it, its second look finds it; the match row, the listing, /review's rows and the
    records read back by another process all say it was decided by keypoints."""
    from monitor.alerts.outbox import alert_payload
    from monitor.records import matches as match_rows
    from tests.hosts import serve
    from tests.test_daemon import PhotoSite, daemon_until, make_library, query
    site = PhotoSite(samples)
    site.add_image("cut-fruits.jpg", _jpeg(_side_and_top(Image.open(samples / "library-fruits.jpg"))),
                   "library-fruits")
    make_library(store_location, samples)
    site.post("rss", 1, ["cut-fruits.jpg", "other-apple.jpg"])
    async with serve(site.app()) as base:
        records = await daemon_until(base, store_location, lambda: query(
            store_location, "SELECT COUNT(*) FROM work WHERE state='done'")[0][0] >= 2)
    assert [(r.entry.label, r.match.tier, r.match.decided_by) for r in records] == [
        ("library-fruits", "near", "keypoints")]
    inliers = records[0].match.inliers
    assert inliers >= 15 and alert_payload(records[0], "k")["keypoint_inliers"] == inliers
    store = open_store(store_location)
    try:
        listed, total = match_rows.list_matches(store, {}, 10, 0)
        assert total == 1 and listed[0]["keypoint_inliers"] == inliers
        assert match_rows.review_rows(store, 10, 0)[0].keypoint_inliers == inliers
        assert match_rows.records_after(store, 0)[0].match.decided_by == "keypoints"
    finally:
        store.close()


def test_a_damaged_stored_keypoint_row_skips_its_entry_not_the_batch(library_images, caplog):
    index = LibraryIndex()
    for i, path in enumerate(library_images):
        index.add(i, fingerprint_bytes(path.read_bytes(), views="library"))
    good = index.keypoints_of(list(range(len(library_images))))
    index.keypoints_reader = lambda ids: {e: (b"\x01" * 7 if e == 2 else good[e]) for e in ids if e in good}
    matcher = Matcher(index, PRESETS["near"])
    cuts = [_jpeg(_side_and_top(Image.open(library_images[i]))) for i in (2, 3)]
    found = matcher.match_many([fingerprint_bytes(c, views="query", keypoints=True) for c in cuts])
    assert [m.entry_id for m in found[0]] == []  # its entry's row is damaged: no second look there
    assert 3 in {m.entry_id for m in found[1]}  # the post beside it still gets one
    assert "library entry 2: its stored keypoints are damaged" in caplog.text


def test_second_look_candidates_must_be_near_on_the_fine_hashes_too():
    """A post's candidate pairs (one per view pair): an entry within dHash + pHash 36 is
    looked at only if dHash + pHash + fine is within CANDIDATE_SCORE as well (where both
    sides have fine hashes); the nearest four per post, mirror-image pairs held to 30."""
    import numpy as np

    from monitor.search import detective

    owner = np.array([0, 0, 0, 0, 1, 1, 2])
    entry = np.array([10, 11, 11, 12, 10, 13, 14])
    dhash = np.array([10, 12, 12, 14, 8, 14, 10])
    phash = np.array([14, 20, 20, 20, 20, 15, 10])
    fine = np.array([200, 300, 180, -1, 250, 150, 150])  # -1: no fine hashes on one side
    mirrored = np.array([False, False, False, False, False, True, True])
    got = detective.nearest_candidates(owner, entry, dhash, phash, fine, mirrored, {0, 1, 2}, {1})
    # entry 11 passes by its second view pair; 12 on the 64-bit limit alone
    assert got[0] == [(10, 10, 14, False), (11, 12, 20, False), (12, 14, 20, False)]
    assert got[1] == [(13, 14, 15, True)]  # 10 is too far on the fine hashes; 13 met the mirror image at 29
    assert 2 not in got  # its only pair met the mirror image, whose keypoints are not at hand
    assert detective.CANDIDATE_SCORE == 240 and detective.CANDIDATE_SUM == 36


def _keypoints_of(img: Image.Image, limit: int):
    from monitor.fingerprints.keypoints import find_keypoints
    from monitor.search.detective import Keypoints
    return Keypoints.of(find_keypoints(Image.open(io.BytesIO(_jpeg(img))).convert("L"), limit=limit))


def test_a_repost_stretched_or_sheared_agrees_on_an_affine_fit_where_a_similarity_fails(library_images,
                                                                                         other_images):
    """A picture resized to another shape (a platform's crop-and-fill) or sheared is no
    rotation + scale + shift: the second look also fits a bounded stretch. A building's
    long straight edges, stretched by a quarter, defeat the similarity fit everywhere;
    unrelated pictures agree on no stretch either."""
    from monitor.search.detective import MIN_INLIERS, SECOND_LOOK_KEYPOINTS, inliers
    building = Image.open(next(p for p in other_images if "building" in p.name)).convert("RGB")
    entry = _keypoints_of(building, 256)
    w, h = building.size
    # (x, y) of the edit read from (a x + b y + c, d x + e y + f) of the picture
    for name, (a, b) in {"a quarter wider": (0.8, 0.0), "wider and sheared": (1 / 1.15, 0.25)}.items():
        edited = building.transform((w, h), Image.AFFINE, (a, b, -b * h / 2, 0, 1, 0), Image.BICUBIC)
        query = _keypoints_of(edited, SECOND_LOOK_KEYPOINTS)
        plain, stretched = inliers(query, entry), inliers(query, entry, stretched=True)
        assert plain < MIN_INLIERS <= stretched, (name, plain, stretched)
    for path in library_images:
        query = _keypoints_of(Image.open(path).convert("RGB"), SECOND_LOOK_KEYPOINTS)
        assert inliers(query, entry, stretched=True) < MIN_INLIERS, path.name
        entry_of_other = _keypoints_of(Image.open(path).convert("RGB"), 256)
        for other in other_images:
            query = _keypoints_of(Image.open(other).convert("RGB"), SECOND_LOOK_KEYPOINTS)
            assert inliers(query, entry_of_other, stretched=True) < MIN_INLIERS, (path.name, other.name)


def test_a_sticker_over_the_middle_leaves_enough_agreement_around_it(library_images):
    """A frame shared by two pictures agrees only within its own width of the edges (15%
    in the test above); a repost with a sticker over its middle agrees around the sticker,
    nearer the middle than any frame: that suffices."""
    from monitor.search.detective import MIN_INLIERS, SECOND_LOOK_KEYPOINTS, inliers
    picture = Image.open(next(p for p in library_images if "fruits" in p.name)).convert("RGB")
    w, h = picture.size
    stickered = picture.copy()
    ImageDraw.Draw(stickered).ellipse((w * 0.275, h * 0.275, w * 0.725, h * 0.725), fill=(200, 150, 120))
    found = inliers(_keypoints_of(stickered, SECOND_LOOK_KEYPOINTS), _keypoints_of(picture, 256), stretched=True)
    assert found >= MIN_INLIERS, found


def test_descriptor_pairing_finds_the_nearest_two_as_a_plain_distance_matrix_does():
    """The compiled pairing (one vectorised loop per post descriptor) against numpy's whole
    distance matrix: the nearest entry descriptor (the first where two tie), its distance and
    the second nearest's (the nearest's own where two share it)."""
    import numpy as np

    from monitor.search.detective import _nearest_two
    rng = np.random.default_rng(5)
    for _ in range(50):
        n, m = int(rng.integers(1, 300)), int(rng.integers(2, 300))
        query = rng.integers(0, 2**63, size=(n, 4), dtype=np.uint64)
        entry = rng.integers(0, 2**63, size=(m, 4), dtype=np.uint64)
        k = min(n, m) // 2
        entry[:k] = query[:k] ^ rng.integers(0, 2**12, size=(k, 4), dtype=np.uint64)  # near pairs
        entry[m - 1] = entry[0]  # a tie
        d = np.bitwise_count(query[:, None, :] ^ entry[None, :, :]).sum(axis=2)
        nearest, first, second = _nearest_two(query, np.ascontiguousarray(entry.T))
        assert (nearest == d.argmin(axis=1)).all()
        assert (first == d.min(axis=1)).all()
        assert (second == np.sort(d, axis=1)[:, 1]).all()
