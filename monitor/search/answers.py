"""What the match decision gives: a :class:`Match`; per post, the hashes' answer
(:class:`HashAnswer`: matches, the unsure ones still to confirm, and the nearest entries
for a second look); and the keypoint pass that turns it into the final matches.

The one-process matcher runs both steps on each post (``Matcher.match_many``). Scaled out,
each shard answers the first for its part of the library; the answers are merged as one
library would have given them (:func:`merged_answers`), and the keypoint pass runs once
per post (a post's keypoints found once, not once per shard that has candidates).
Pure computation: no I/O (``read`` gives entries' stored keypoints).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from monitor.search import detective
from monitor.search.budget import LookBudget


@dataclass(frozen=True, slots=True)
class Match:
    entry_id: int
    tier: str
    dhash_distance: int
    phash_distance: int
    mirrored: bool
    fine_distance: int | None = None  # bits of 512; None: decided without fine hashes
    # The dHashes of the two views that met (a crop, a frame, the mirror), for
    # showing which bits differ; the whole pictures' hashes may be far apart.
    query_dhash: int | None = None
    library_dhash: int | None = None
    # keypoint pairs that agree on one geometry (monitor/search/detective.py): a match by
    # the second look, or a hash match the keypoints confirmed
    inliers: int | None = None

    @property
    def by_second_look(self) -> bool:
        """Found by keypoints alone (the second look scores no fine hashes; every
        hash match the keypoints confirm was scored with them)."""
        return self.inliers is not None and self.fine_distance is None

    @property
    def decided_by(self) -> str:
        if self.by_second_look:
            return "keypoints"
        if self.tier == "threshold":
            return "dhash"
        hashes = "dhash+phash" if self.fine_distance is None else "dhash+phash+fine"
        return hashes if self.inliers is None else hashes + "+keypoints"


Candidate = tuple[int, int, int, bool]  # a second look's: (entry id, dHash, pHash distance, mirrored)


@dataclass(frozen=True, slots=True)
class HashAnswer:
    """What the hashes say of one post (scaled out: of one shard's part of the library):
    its matches, best first, the unsure ones not yet confirmed by keypoints; and, where no
    match is sure, its nearest entries for a second look, nearest first."""
    matches: list[Match]
    candidates: list[Candidate]


def merged_answers(answers: list[HashAnswer], tier_names: list[str]) -> HashAnswer:
    """The shards' answers for one post as one library would have given it: the matches in
    one matcher's order, the CANDIDATES nearest of all the candidates (each shard sent its
    nearest few; their entries are disjoint)."""
    rank = {name: i for i, name in enumerate(tier_names)}
    matches = sorted((m for a in answers for m in a.matches),
                     key=lambda m: (rank.get(m.tier, len(rank)), m.dhash_distance, m.entry_id))
    candidates = sorted((c for a in answers for c in a.candidates), key=lambda c: (c[1] + c[2], c[0]))
    return HashAnswer(matches, candidates[:detective.CANDIDATES])


def second_look_tier(tier_names) -> str | None:
    """The tier a second look's match counts as: near, where near is among the tiers in use;
    None (no second look) where it is not."""
    return "near" if "near" in tier_names else None


def needs_keypoints(answer: HashAnswer) -> bool:
    """Whether the keypoint pass could change this answer: an unsure match to confirm, or
    candidates for a second look (where no match is sure)."""
    return bool(answer.candidates) or any(detective.needs_confirmation(m) for m in answer.matches)


def keypoint_pass(answers: list[HashAnswer], sources: dict, read: Callable[[list[int]], dict[int, bytes]],
                  second_look_tier: str | None = "near", budget: LookBudget | None = None,
                  others: int = 0) -> list[list[Match]]:
    """Each post's final matches: its unsure hash matches kept where the keypoints agree
    (:func:`detective.confirmed`), and for a post left with none a second look at its
    candidates but those just rejected, where the ``budget`` allows it (none: always).
    ``sources``: each post's keypoints, or what finds them (a post without any keeps the
    hashes' answer and gets no second look); ``read``: entries' stored keypoints;
    ``others``: posts of the same batch decided without this pass (the budget counts them)."""
    found = {q: list(a.matches) for q, a in enumerate(answers) if a.matches}
    found, rejected = detective.confirmed(found, sources, read)
    out = [found.get(q, []) for q in range(len(answers))]
    if second_look_tier is not None:
        unmet = {q: [c for c in a.candidates if c[0] not in rejected.get(q, ())]
                 for q, a in enumerate(answers) if a.candidates and not out[q] and q in sources}
        if budget is not None:
            allowed = budget.admit([min(c[1] + c[2] for c in unmet[q]) if unmet.get(q) else None
                                    for q in range(len(answers))] + [None] * others)
            unmet = {q: chosen for q, chosen in unmet.items() if allowed[q]}
        for query, looked in detective.second_look(sources, unmet, read).items():
            out[query] = out[query] + [Match(e, second_look_tier, d, p, m, inliers=n) for e, d, p, m, n in looked]
    return out
