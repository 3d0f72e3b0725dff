"""The match decision: 64-bit candidates verified by the 256-bit fine hashes."""

import io

import numpy as np
from PIL import Image, ImageDraw

from monitor.fingerprints import Fingerprint, fingerprint_bytes
from monitor.records.library import LibraryIndex
from monitor.search.matcher import PRESETS, Matcher, query_rows


def _flip(value: int, bits: int, rng) -> int:
    for b in rng.choice(64, bits, replace=False):
        value ^= 1 << int(b)
    return value


def _flip_fine(fine: bytes, bits: int, rng) -> bytes:
    words = np.frombuffer(fine, "<u8").copy()
    for b in rng.choice(512, bits, replace=False):
        words[b // 64] ^= np.uint64(1) << np.uint64(b % 64)
    return words.tobytes()


def _fp(d, p, fine=b"", fine_mirror=b""):
    return Fingerprint(d, p, 0, 0, 64, 64, fine=fine, fine_mirror=fine_mirror)


def test_fine_hashes_decide_between_lookalikes_and_copies():
    rng = np.random.default_rng(3)
    d, p = (int(x) for x in rng.integers(0, 2**63, 2))
    fine = rng.integers(0, 2**63, 8).astype("<u8").tobytes()
    index = LibraryIndex()
    index.add(1, _fp(d, p, fine, fine))
    matcher = Matcher(index, PRESETS["near"])
    # 10 + 10 bits apart: the 64-bit near tier alone would call this a match.
    qd, qp = _flip(d, 10, rng), _flip(p, 10, rng)
    unrelated_fine = rng.integers(0, 2**63, 8).astype("<u8").tobytes()
    assert matcher.match(_fp(qd, qp, unrelated_fine, unrelated_fine)) == []
    [m] = matcher.match(_fp(qd, qp, _flip_fine(fine, 60, rng), unrelated_fine))
    assert (m.tier, m.fine_distance, m.decided_by) == ("near", 60, "dhash+phash+fine")
    # Without fine hashes on one side (imagehash imports), the 64-bit limits decide.
    [m] = matcher.match(_fp(qd, qp))
    assert (m.tier, m.fine_distance, m.decided_by) == ("near", None, "dhash+phash")
    # Fine hashes let a pair further apart in 64 bits through when the detail agrees...
    far_d, far_p = _flip(d, 14, rng), _flip(p, 16, rng)
    assert matcher.match(_fp(far_d, far_p)) == []
    [m] = matcher.match(_fp(far_d, far_p, _flip_fine(fine, 40, rng), unrelated_fine))
    assert m.tier == "near" and m.fine_distance == 40
    # ... and the batch path decides exactly like the single one.
    queries = [_fp(qd, qp, unrelated_fine, unrelated_fine), _fp(qd, qp, _flip_fine(fine, 60, rng), unrelated_fine),
               _fp(qd, qp), _fp(far_d, far_p, _flip_fine(fine, 40, rng), unrelated_fine)]
    found = matcher.match_rows(query_rows(queries))
    assert found.query.tolist() == [1, 2, 3]
    assert found.fine_distance.tolist() == [60, -1, 40]


def _emoji(img: Image.Image) -> bytes:
    out = img.convert("RGB")
    d = ImageDraw.Draw(out)
    r = min(out.size) // 6
    cx, cy = out.width // 3, out.height // 2
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(255, 210, 0))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=70)
    return buf.getvalue()


def test_real_reposts_verified_and_unrelated_pictures_refused(library_images, other_images):
    index = LibraryIndex()
    for i, path in enumerate(library_images):
        index.add(i, fingerprint_bytes(path.read_bytes(), views="library"))
    matcher = Matcher(index, PRESETS["near"])
    for i, path in enumerate(library_images):
        repost = fingerprint_bytes(_emoji(Image.open(path)), views="query")
        matches = matcher.match(repost)
        assert matches and matches[0].entry_id == i, path
        assert matches[0].decided_by in ("dhash+phash", "dhash+phash+fine")
    for path in other_images:
        assert matcher.match(fingerprint_bytes(path.read_bytes(), views="query")) == [], path
    # single and batch decisions agree on every (query, entry) pair
    fps = [fingerprint_bytes(_emoji(Image.open(p)), views="query") for p in library_images + other_images]
    found = matcher.match_rows(query_rows(fps))
    single = sorted((q, m.entry_id, m.tier, m.fine_distance or -1)
                    for q, fp in enumerate(fps) for m in matcher.match(fp))
    batch = sorted(zip(found.query.tolist(), found.entry_id.tolist(),
                       [matcher.tiers[t].name for t in found.tier.tolist()], found.fine_distance.tolist(),
                       strict=True))
    assert single == batch


def test_fine_hashes_of_the_mirror_and_of_unrelated_pictures(library_images, other_images):
    words = {}
    for path in library_images + other_images:
        img = Image.open(path)
        fp = fingerprint_bytes(path.read_bytes())
        assert len(fp.fine) == len(fp.fine_mirror) == 64
        buf = io.BytesIO()
        img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(buf, "JPEG", quality=95)
        flipped = fingerprint_bytes(buf.getvalue())
        mirror_gap = np.bitwise_count(np.frombuffer(flipped.fine, "<u8")
                                      ^ np.frombuffer(fp.fine_mirror, "<u8")).sum()
        assert mirror_gap <= 48, path  # of 512: the mirror's hashes come from the same grids
        words[path] = np.frombuffer(fp.fine, "<u8")
    paths = list(words)
    gaps = [np.bitwise_count(words[a] ^ words[b]).sum() for i, a in enumerate(paths) for b in paths[i + 1:]]
    assert min(gaps) > 180 and 230 < np.mean(gaps) < 280  # unrelated: about half of 512 bits


def test_the_matcher_decides_the_same_on_either_radius_kernel(library_images, other_images):
    from monitor.search import radius as radius_search
    from monitor.search.index import LibraryIndex
    queries = [fingerprint_bytes(p.read_bytes(), views="query") for p in library_images + other_images]
    before = radius_search.active()
    results = {}
    try:
        # the dHash rows as planes only (what the bit-sliced search needs), or also as a
        # plain array (kept where the tiled kernel is chosen): either index, either kernel
        for keep in (False, True):
            index = LibraryIndex(keep_dhash=keep)
            for i, p in enumerate(library_images):
                index.add(i + 1, fingerprint_bytes(p.read_bytes(), views="library"))
            index.remove(2)
            assert all((store.dhash_array() is not None) == keep for store in (index.core, index.other))
            matcher = Matcher(index, PRESETS["loose"])
            for name in radius_search.KERNELS:
                radius_search.use(name)
                results[name, keep] = [matcher.match(q) for q in queries]
    finally:
        radius_search.use(before)
    first = results["tiled", True]
    assert all(r == first for r in results.values())
    assert sum(bool(r) for r in first) >= len(library_images) - 1


def test_threshold_mode_means_what_imagehash_users_expect(tmp_path, library_images):
    """--threshold N: the whole pictures' dHash within N bits, as imagehash compares them; a
    crop that only a library view would catch is not reported, a mirror only when asked."""
    import imagehash
    from PIL import Image, ImageOps

    from monitor.records.library import Library
    from monitor.records.store import Store
    from monitor.scan import add_files
    from monitor.search.matcher import threshold_tiers
    from monitor.tools.batch import match_files
    lib = Library(Store(tmp_path / "lib.sqlite"))
    add_files(lib, library_images, progress=False)
    inputs = tmp_path / "in"
    inputs.mkdir()
    expected_plain, expected_mirrored = set(), set()
    for p in library_images:
        with Image.open(p) as img:
            img = img.convert("RGB")
            w, h = img.size
            crop = img.crop((w * 3 // 20, h * 3 // 20, w - w * 3 // 20, h - h * 3 // 20))
            crop.save(inputs / f"crop-{p.stem}.png")
            ImageOps.mirror(img).save(inputs / f"mirror-{p.stem}.png")
            for name, im in ((f"crop-{p.stem}.png", crop), (f"mirror-{p.stem}.png", ImageOps.mirror(img))):
                for q in library_images:
                    with Image.open(q) as lib_img:
                        d = imagehash.dhash(im) - imagehash.dhash(lib_img)
                        dm = imagehash.dhash(ImageOps.mirror(im)) - imagehash.dhash(lib_img)
                    if d <= 10:
                        expected_plain.add((name, q.name))
                    if min(d, dm) <= 10:
                        expected_mirrored.add((name, q.name))
    null = open(tmp_path / "log", "w")
    for mirrored, expected in ((False, expected_plain), (True, expected_mirrored)):
        rows, _ = match_files([str(inputs)], lib, threshold_tiers(10), whole_pictures=True, mirrored=mirrored,
                              progress=False, log=null)
        found = {(r.input.rsplit("/", 1)[-1], r.library.rsplit("/", 1)[-1]) for r in rows}
        # imagehash decodes whole, we on the reduced-size fast path: a pair on the edge may differ
        assert len(found ^ expected) <= 2, (mirrored, found ^ expected)
    plain, _ = match_files([str(inputs)], lib, threshold_tiers(10), whole_pictures=True, mirrored=False,
                           progress=False, log=null)
    assert not any(r.match.mirrored for r in plain)
    with_views, _ = match_files([str(inputs)], lib, threshold_tiers(10), progress=False, log=null)
    assert len(with_views) > len(plain)  # the views find the crops: that is the tiers' job, not --threshold's


def _library_and_posts(library_images, other_images) -> tuple[Matcher, list[Fingerprint]]:
    """A matcher over the library pictures, and posts: each picture (library or other)
    halved at JPEG q40, and cut 10% on the right."""
    from tests.conftest import encode
    index = LibraryIndex()
    for i, p in enumerate(library_images):
        index.add(i + 1, fingerprint_bytes(p.read_bytes(), views="library"))
    queries = []
    for p in library_images + other_images:
        img = Image.open(p).convert("RGB")
        queries.append(fingerprint_bytes(encode(img.resize((img.width // 2, img.height // 2)), quality=40)))
        queries.append(fingerprint_bytes(encode(img.crop((0, 0, img.width * 9 // 10, img.height)))))
    return Matcher(index, PRESETS["near"]), queries


def test_match_many_is_match_of_each(library_images, other_images):
    """A shard's batch (one pass over the library) answers exactly what one-by-one matching does."""
    from tests.conftest import encode
    matcher, queries = _library_and_posts(library_images, other_images)
    queries.append(fingerprint_bytes(encode(Image.new("RGB", (64, 64), "white"))))  # degenerate
    many = matcher.match_many(queries)
    assert many == [matcher.match(q) for q in queries]
    assert sum(1 for m in many if m) >= len(library_images) and many[-1] == []
    assert matcher.match_many([]) == []


def test_posts_waiting_are_matched_together_with_the_same_answers(library_images, other_images):
    """The daemon's match threads take every post waiting into one pass: the answers are
    match()'s, the batches grow under load, and a post that breaks matching fails alone."""
    import dataclasses
    import threading

    from monitor.search.batcher import MatchBatcher
    matcher, queries = _library_and_posts(library_images, other_images)
    broken = dataclasses.replace(queries[0], fine=b"\x01" * 3)  # fine hashes of no valid length
    batches, lock = [], threading.Lock()

    def on_batch(size, seconds):
        with lock:
            batches.append(size)
    batcher = MatchBatcher(matcher, on_batch=on_batch)
    try:
        futures = [batcher.submit(q) for q in queries[:3] + [broken] + queries[3:]]
        answers = [f.exception(timeout=60) or f.result() for f in futures]
    finally:
        batcher.close()
    assert isinstance(answers[3], ValueError)  # its own failure, not its neighbours'
    del answers[3]
    assert answers == [matcher.match(q) for q in queries]
    assert sum(1 for a in answers if a) >= len(library_images)
    assert sum(batches) >= len(queries) + 1 and max(batches) > 1  # (a failed batch is matched again alone)


def test_a_caller_cancelled_while_its_post_waits_never_stops_the_match_thread(library_images, other_images):
    """A post whose caller is cancelled (a daemon stopping, a request gone: asyncio's
    wrap_future cancels the thread's future) is skipped; the posts beside it and after it
    are still matched. The match thread once set the result of the cancelled future, which
    raises, and died: every later post waited forever."""
    from monitor.search.batcher import MatchBatcher
    matcher, queries = _library_and_posts(library_images, other_images)
    batcher = MatchBatcher(matcher, threads=1)
    try:
        busy = [batcher.submit(q) for q in queries * 4]  # the thread is kept at work meanwhile
        gone = batcher.submit(queries[0])
        assert gone.cancel()  # still waiting
        later = batcher.submit(queries[1])
        assert later.result(timeout=60) == matcher.match(queries[1])
        assert all(f.result(timeout=60) == matcher.match(q) for f, q in zip(busy, queries * 4, strict=True))
    finally:
        batcher.close()


def test_fine_hashes_kept_in_a_file_match_as_in_ram(tmp_path, library_images, other_images):
    """The index can keep each row's fine hashes (64 of 96 bytes) in an unlinked file,
    read only for the candidates past the dHash + pHash gate: the same matches as in RAM
    through adds, growth, removes and a load, and nothing left in the folder."""
    from tests.conftest import encode
    fps = [fingerprint_bytes(p.read_bytes(), views="library") for p in library_images]
    in_ram, in_file = LibraryIndex(capacity=2), LibraryIndex(capacity=2, spill_dir=str(tmp_path))
    for index in (in_ram, in_file):
        for i, fp in enumerate(fps):
            index.add(i + 1, fp)  # grows from 2 rows many times over
        index.remove(3)
    assert list(tmp_path.iterdir()) == []  # unlinked: nothing left behind, even after a kill -9
    queries = []
    for p in library_images + other_images:
        img = Image.open(p).convert("RGB")
        queries.append(fingerprint_bytes(encode(img.resize((img.width // 2, img.height // 2)), quality=40)))
        queries.append(fingerprint_bytes(encode(img.crop((0, 0, img.width * 9 // 10, img.height)), quality=60)))
    matches = Matcher(in_ram, PRESETS["near"]).match_many(queries)
    assert Matcher(in_file, PRESETS["near"]).match_many(queries) == matches
    assert sum(1 for m in matches if m) >= len(library_images) - 1
    assert any(m.fine_distance is not None for ms in matches for m in ms)  # decided with the file's rows
    assert np.array_equal(in_file.fine(), in_ram.fine())
    assert in_file.file_bytes() >= in_file.rows * 64 and in_ram.file_bytes() == 0
    assert in_ram.memory_bytes() - in_file.memory_bytes() >= in_ram.rows * 64
    # a load (a snapshot read at start) writes the file at once
    loaded = LibraryIndex(spill_dir=str(tmp_path))
    loaded.load(in_ram.ids, {f: in_ram.hashes(f) for f in ("dhash", "phash")}, in_ram.fine(), in_ram.core_flags())
    assert Matcher(loaded, PRESETS["near"]).match_many(queries) == matches
    assert np.array_equal(loaded.fine(), in_ram.fine()) and np.array_equal(loaded.ids, in_ram.ids)
    # ids are int32 while they fit, widened when one does not
    assert in_file.core.ids.dtype == in_file.other.ids.dtype == np.int32
    in_file.add(2**40, fps[2])
    assert in_file.core.ids.dtype == in_file.other.ids.dtype == np.int64 and in_file.ids[-1] == 2**40
    assert 2**40 in {m.entry_id for m in Matcher(in_file, PRESETS["near"]).match(queries[4])}  # image 2 resized
