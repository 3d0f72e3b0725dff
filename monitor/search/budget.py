"""How many posts get the second look: a share of the recent posts, the likeliest reposts first.

A second look costs ~3-4 ms of CPU (a larger decode, ORB, pairing, RANSAC); the hashes
cost ~1 ms. Most posts need none, but the share that does grows with the library: an
unrelated post lies within the look's limits (dHash + pHash 36) of some entry ~7% of the
time against 200 real pictures, 26% where the feed holds look-alikes of them (a photo
series), ~40% against 4,200 (bench/quality.py, bench/heldout.py). Left alone, the cost per
post would grow with the library until every post paid for a look.

The budget keeps the looks to ``share`` of the recent posts, spent on the nearest
candidates: the reposts a look finds are nearer their entry (dHash + pHash: median 23,
bench/quality.py's edits) than the look-alikes it rejects are to theirs (median 30-34). A
candidate within ALWAYS bits gets its look whatever the budget (a burst of such reposts is
what the look is for). Skipped posts keep the hashes' answer (no match), counted by the
caller's ``on_skip``. Pure computation (a lock for the match threads), no I/O.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from monitor.search.detective import CANDIDATE_SUM

ALWAYS = 24        # dHash + pHash at or below: a look whatever the budget
WINDOW = 2000      # the recent posts the share is counted over
WARM = 200         # below this many posts seen, every look is allowed
_NONE = CANDIDATE_SUM + 1  # a post with no candidate (no look wanted)


class LookBudget:
    """Which posts with candidates get their second look. ``share``: of the last WINDOW
    posts (with or without candidates), at most this share looked at (those within ALWAYS
    always are, and count against it); 1.0 allows every look."""

    def __init__(self, share: float, on_skip: Callable[[int], None] | None = None):
        if not 0 < share <= 1:
            raise ValueError(f"a second-look share is in (0, 1], not {share}")
        self.share, self.on_skip = share, on_skip
        self._recent: deque[int] = deque()
        self._counts = [0] * (_NONE + 1)  # the recent posts by their nearest candidate's dHash + pHash
        self._lock = threading.Lock()
        self.skipped = 0

    def admit(self, nearest: list[int | None], record: bool = True) -> list[bool]:
        """For each post in a batch, by its nearest candidate's dHash + pHash (None: it has
        none, and wants no look), whether it gets its look. Every post is counted, unless
        ``record`` is false (a bench's reposts, decided as if rare among the posts seen)."""
        out = []
        with self._lock:
            for sums in nearest:
                bucket = _NONE if sums is None else min(int(sums), _NONE - 1)
                out.append(sums is not None and self._allowed(bucket))
                if record:
                    self._see(bucket)
            skipped = sum(1 for sums, ok in zip(nearest, out, strict=True) if sums is not None and not ok)
            self.skipped += skipped
        if skipped and self.on_skip is not None:
            self.on_skip(skipped)
        return out

    @property
    def seen(self) -> int:
        """The recent posts counted (WINDOW at most)."""
        return len(self._recent)

    def _allowed(self, sums: int) -> bool:
        if sums <= ALWAYS or self.share >= 1 or len(self._recent) < WARM:
            return True
        # the recent posts nearer than this one, and half those as near: within the share,
        # the look is allowed (a tie neither all in nor all out)
        nearer = sum(self._counts[:sums]) + self._counts[sums] / 2
        return nearer < self.share * len(self._recent)

    def _see(self, sums: int) -> None:
        self._recent.append(sums)
        self._counts[sums] += 1
        if len(self._recent) > WINDOW:
            self._counts[self._recent.popleft()] -= 1


class Unrecorded:
    """A budget's decisions for posts it does not count: a bench's reposts, each decided as
    one rare post among the unrelated ones the budget has seen."""

    def __init__(self, budget: LookBudget):
        self.budget = budget

    def admit(self, nearest: list[int | None]) -> list[bool]:
        return self.budget.admit(nearest, record=False)
