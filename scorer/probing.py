"""Probing detection: submissions built to read single labels off the feedback.

Two patterns, both about a run's earlier scored submissions (refused ones got no feedback, so
nothing can be read by comparing with them):
- near duplicate: fewer than `min_distance` answers differ from some earlier submission, as in
  "flip one answer and watch the score";
- walk: a chain of submissions, each within `walk_distance` answers of its nearest earlier one,
  reaching `walk_length` links: the same attack taking a few answers per step.

The comparison is one XOR and popcount per earlier submission on packed answers
(aar_scorer.packing), so hundreds of earlier 2,567-answer submissions take well under a
millisecond.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from aar_scorer.tasks import Probing


class ProbeReason(StrEnum):
    NEAR_DUPLICATE = "near_duplicate"
    WALK = "walk"


@dataclass(frozen=True)
class Verdict:
    """How a new submission relates to the run's earlier ones."""

    nearest: int | None  # id of the closest earlier submission
    distance: int | None  # answers that differ from it
    walk_length: int  # links in the chain of close submissions ending here (1: no chain)
    reason: ProbeReason | None  # why this looks like a probe, or None


@dataclass
class ProbeIndex:
    """One run's scored submissions, packed, with the walk length each one ended."""

    settings: Probing
    ids: list[int] = field(default_factory=list)
    packed: list[int] = field(default_factory=list)
    walks: list[int] = field(default_factory=list)

    def check(self, candidate: int) -> Verdict:
        if not self.packed:
            return Verdict(nearest=None, distance=None, walk_length=1, reason=None)
        # Twice the Hamming distance (see aar_scorer.packing), in one comprehension:
        # this loop runs over every earlier submission of the run, for every submission.
        doubled = [(candidate ^ earlier).bit_count() for earlier in self.packed]
        best_distance = min(doubled)
        best_index = doubled.index(best_distance)
        best_distance //= 2
        walk = self.walks[best_index] + 1 if best_distance <= self.settings.walk_distance else 1
        reason = None
        if best_distance < self.settings.min_distance:
            reason = ProbeReason.NEAR_DUPLICATE
        elif walk >= self.settings.walk_length:
            reason = ProbeReason.WALK
        return Verdict(self.ids[best_index], best_distance, walk, reason)

    def add(self, submission: int, packed: int, walk_length: int) -> None:
        self.ids.append(submission)
        self.packed.append(packed)
        self.walks.append(walk_length)
