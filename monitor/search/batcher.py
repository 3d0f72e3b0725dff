"""Posts matched together: one pass over the library for every post waiting.

The first pass reads the whole library per call; a post's few query hashes use little
of what it reads. Matched one at a time, a post costs the pass, and two threads
matching at once contend for memory. So the daemon hands fingerprints to match threads
of their own, each taking every post waiting (up to ``max_batch``) into one
:meth:`Matcher.match_many` call. Idle, a post is matched at once, as before; under load
the batches grow by themselves (bench/quality.py's library, 100,000 entries: 1.4 ms a
post alone, 0.7 ms in batches of 8; a million entries: 8.5 and 4.7 ms). The same
answers as :meth:`Matcher.match` (tests/test_matcher.py: match_many is match of each).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

from monitor.fingerprints import Fingerprint
from monitor.search.budget import LookBudget
from monitor.search.matcher import Match, Matcher

log = logging.getLogger("repost_monitor.search")

MAX_BATCH = 32


class MatchBatcher:
    """``submit(fp, keypoints)`` -> a Future of ``matcher.match(fp, keypoints)``.

    ``on_batch(size, seconds)`` is told of each batch (metrics). A batch that fails as a
    whole (a bug, not a bad post: a post's keypoints that cannot be found are logged and
    its hashes' answer stands) is matched again post by post, so one post's failure is
    its own.
    """

    def __init__(self, matcher: Matcher, threads: int = 1, max_batch: int = MAX_BATCH,
                 on_batch: Callable[[int, float], None] | None = None, budget: LookBudget | None = None):
        self.matcher, self.budget = matcher, budget
        self.max_batch = max_batch
        self.on_batch = on_batch
        self._waiting: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"match-{i}", daemon=True)
                         for i in range(max(1, threads))]
        for t in self._threads:
            t.start()

    def submit(self, fp: Fingerprint, keypoints: Callable[..., bytes] | None = None, budgeted: bool = True) -> Future:
        """``budgeted``: the post's second look is the budget's to allow (a feed's post); false:
        it gets one whenever it needs one (a check someone asked for)."""
        future: Future = Future()
        self._waiting.put((fp, keypoints, future, budgeted))
        return future

    def close(self) -> None:
        """Match what is waiting, then stop the threads."""
        for _ in self._threads:
            self._waiting.put(None)
        for t in self._threads:
            t.join()

    def _run(self) -> None:
        while True:
            first = self._waiting.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._waiting.get_nowait()
                except queue.Empty:
                    break
                if item is None:  # closing: this batch first, then stop
                    self._waiting.put(None)
                    break
                batch.append(item)
            self._match(batch)

    def _match(self, batch: list) -> None:
        # A post whose caller was cancelled (asyncio's wrap_future cancels this future) is
        # skipped; the others are marked running, which no cancel undoes, so setting their
        # results cannot raise here and end this thread (every later post would wait forever).
        batch = [item for item in batch if item[2].set_running_or_notify_cancel()]
        if not batch:
            return
        start = time.perf_counter()
        exempt = {i for i, item in enumerate(batch) if not item[3]}
        budget = _Exempting(self.budget, exempt) if self.budget is not None and exempt else self.budget
        try:
            answers: list[list[Match] | BaseException] = list(
                self.matcher.match_many([item[0] for item in batch], [item[1] for item in batch], budget=budget))
        except Exception:  # noqa: BLE001 - each post again alone: one failure stays its own
            log.exception("matching a batch of %d posts failed; matching them one by one", len(batch))
            answers = []
            for fp, keypoints, *_ in batch:
                try:
                    answers.append(self.matcher.match(fp, keypoints))
                except Exception as exc:  # noqa: BLE001 - handed to the post's caller
                    answers.append(exc)
        if self.on_batch is not None:
            self.on_batch(len(batch), time.perf_counter() - start)
        for (_, _, future, _), answer in zip(batch, answers, strict=True):
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)


class _Exempting:
    """A budget for a batch where some posts (``exempt``, by position) get their look whenever
    they need one: counted as wanting none, so they spend none of the feeds' share."""

    def __init__(self, budget: LookBudget, exempt: set[int]):
        self.budget, self.exempt = budget, exempt

    def admit(self, nearest: list[int | None]) -> list[bool]:
        allowed = self.budget.admit([None if i in self.exempt else s for i, s in enumerate(nearest)])
        return [ok or (i in self.exempt and s is not None)
                for i, (ok, s) in enumerate(zip(allowed, nearest, strict=True))]
