"""The second look's budget: at most a share of the recent posts get one, the nearest
candidates first; real pictures through the real matcher, keypoints found by ORB."""

import io

import pytest
from PIL import Image

from monitor.config import ConfigError, load_config
from monitor.fingerprints import KeypointFinder, fingerprint_bytes
from monitor.search.answers import HashAnswer, keypoint_pass
from monitor.search.batcher import MatchBatcher
from monitor.search.budget import ALWAYS, WARM, WINDOW, LookBudget
from monitor.search.index import LibraryIndex
from monitor.search.matcher import PRESETS, Matcher


def _cut(path) -> bytes:
    """18% off the left and 8% off the top, as JPEG: the hashes miss it, the keypoints do not."""
    img = Image.open(path)
    buf = io.BytesIO()
    img.crop((int(img.width * 0.18), int(img.height * 0.08), img.width, img.height)).convert("RGB").save(
        buf, "JPEG", quality=80)
    return buf.getvalue()


@pytest.fixture(scope="module")
def cut_reposts(library_images):
    """A matcher over the demo library, cut reposts of each entry (the hashes miss most), their
    fingerprints and the hashes' answers (with each post's nearest candidates)."""
    index = LibraryIndex()
    for i, path in enumerate(library_images):
        index.add(i, fingerprint_bytes(path.read_bytes(), views="library"))
    matcher = Matcher(index, PRESETS["near"])
    reposts = [_cut(p) for p in library_images]
    fps = [fingerprint_bytes(d, views="query") for d in reposts]
    answers = matcher.hash_answers(fps, {i: True for i in range(len(fps))})
    return matcher, reposts, fps, answers


def test_the_budget_keeps_the_looks_to_its_share_the_nearest_first():
    skipped_told = []
    budget = LookBudget(0.1, skipped_told.append)
    # 60% of posts want no look; the rest are spread over dHash + pHash 25..36
    stream = [None if k % 5 < 3 else 25 + (k * 7) % 12 for k in range(3000)]
    allowed = []
    for start in range(0, len(stream), 8):
        allowed += budget.admit(stream[start:start + 8])
    assert all(allowed[k] for k in range(WARM) if stream[k] is not None)  # nothing known yet: all allowed
    later = range(1000, 3000)
    looked = [stream[k] for k in later if allowed[k]]
    skipped = [stream[k] for k in later if stream[k] is not None and not allowed[k]]
    assert 0.05 <= len(looked) / len(later) <= 0.1
    assert max(looked) <= min(skipped)  # the nearest candidates first
    assert budget.skipped == sum(skipped_told) == sum(1 for s, ok in zip(stream, allowed, strict=True)
                                                       if s is not None and not ok)
    assert not any(allowed[k] for k in range(len(stream)) if stream[k] is None)


def test_near_candidates_always_get_their_look_and_a_full_share_every_one():
    budget = LookBudget(0.01)
    budget.admit([ALWAYS] * 1000)
    assert budget.admit([ALWAYS, ALWAYS - 5, ALWAYS + 1]) == [True, True, False]
    everything = LookBudget(1.0)
    assert all(everything.admit([36] * 1000))
    for share in (0, -0.5, 1.5):
        with pytest.raises(ValueError):
            LookBudget(share)


def test_the_share_is_a_config_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[match]\nsecond_look_share = 0.25\n")
    assert load_config(path).match.second_look_share == 0.25
    path.write_text("[match]\nsecond_look_share = 0\n")
    with pytest.raises(ConfigError, match="second_look_share"):
        load_config(path)


def test_a_stream_of_posts_spends_the_budget_on_the_nearest(cut_reposts, other_images):
    """Cut reposts the hashes miss, each near its entry by a different dHash + pHash, again
    and again with unrelated posts between: once the budget knows the stream, only the
    nearest of them are looked at (and found); the rest are not searched at all."""
    matcher, reposts, fps, answers = cut_reposts
    nearest = {i: min(c[1] + c[2] for c in a.candidates) for i, a in enumerate(answers)
               if a.candidates and not a.matches}
    assert len(nearest) >= 3, nearest  # reposts that need the look
    unrelated = [fingerprint_bytes(p.read_bytes(), views="query") for p in other_images]

    budget = LookBudget(0.15)
    found, searched = {}, {}
    rounds = WARM // (len(nearest) + len(unrelated)) + 8
    for r in range(rounds):
        finders = [KeypointFinder(reposts[i]) for i in nearest]
        batch = [fps[i] for i in nearest] + unrelated
        results = matcher.match_many(batch, finders + [None] * len(unrelated), budget=budget)
        if r == rounds - 1:  # the budget has seen the stream
            for i, finder, matches in zip(nearest, finders, results, strict=False):
                searched[i] = finder.searched
                found[i] = [m.entry_id for m in matches]
    looked = [i for i in nearest if searched[i]]
    skipped = [i for i in nearest if not searched[i]]
    assert skipped and any(nearest[i] > ALWAYS for i in looked), (nearest, searched)
    assert max(nearest[i] for i in looked) <= min(nearest[i] for i in skipped)
    assert all(found[i] == [i] for i in looked), found
    assert all(found[i] == [] for i in skipped)
    assert budget.skipped > 0

    unlimited = [KeypointFinder(reposts[i]) for i in nearest]
    results = matcher.match_many([fps[i] for i in nearest], unlimited)
    assert [[m.entry_id for m in ms] for ms in results] == [[i] for i in nearest]


def test_every_post_of_a_batch_is_counted_also_those_decided_without_the_pass():
    """Scaled out, the recorder runs the keypoint pass over the posts that need it and names
    how many it recorded beside them: the share is of all of them."""
    budget = LookBudget(0.5)
    keypoint_pass([HashAnswer([], []) for _ in range(3)], {}, lambda ids: {}, "near", budget, others=5)
    assert budget.seen == 8
    budget.admit([None] * (2 * WINDOW))
    assert budget.seen == WINDOW


def test_a_check_someone_asked_for_gets_its_look_when_the_feeds_have_spent_the_budget(cut_reposts):
    """The daemon's match threads: a feed's post waits on the budget, a check (``budgeted=False``:
    /v1/check, a checked URL) is looked at whenever it needs it, and spends none of the share."""
    matcher, reposts, fps, answers = cut_reposts
    far = [i for i, a in enumerate(answers) if a.candidates and not a.matches
           and min(c[1] + c[2] for c in a.candidates) > ALWAYS]
    assert far
    budget = LookBudget(0.05)
    budget.admit([ALWAYS + 1] * WINDOW)  # feeds full of near look-alikes: the share is spent
    skipped = budget.skipped
    batcher = MatchBatcher(matcher, budget=budget)
    try:
        for i in far:
            feed_post = KeypointFinder(reposts[i])
            assert batcher.submit(fps[i], feed_post).result(30) == [] and not feed_post.searched
            check = KeypointFinder(reposts[i])
            assert [m.entry_id for m in batcher.submit(fps[i], check, budgeted=False).result(30)] == [i]
            assert check.searched
    finally:
        batcher.close()
    assert budget.skipped - skipped == len(far)  # the feeds' posts; the checks skipped nothing
