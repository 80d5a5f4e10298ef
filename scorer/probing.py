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

from dataclasses import dataclass
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


class ProbeIndex:
    """One run's scored submissions, packed, with the walk length each one ended."""

    def __init__(self, settings: Probing, size: int, classes: int) -> None:
        self.settings = settings
        # With two allowed answers, the second bit plane alone says which answer each item has:
        # half the bits to compare, and one differing bit per differing answer. Otherwise a
        # changed answer flips two bits of the one-hot planes.
        self._shift = size if classes == 2 else 0
        self._bits_per_answer = 1 if classes == 2 else 2
        self.ids: list[int] = []
        self.keys: list[int] = []
        self.walks: list[int] = []

    def check(self, candidate: int) -> Verdict:
        if not self.keys:
            return Verdict(nearest=None, distance=None, walk_length=1, reason=None)
        key = candidate >> self._shift
        # One comprehension over every earlier submission of the run, for every submission.
        distances = [(key ^ earlier).bit_count() for earlier in self.keys]
        best_distance = min(distances)
        best_index = distances.index(best_distance)
        best_distance //= self._bits_per_answer
        walk = self.walks[best_index] + 1 if best_distance <= self.settings.walk_distance else 1
        reason = None
        if best_distance < self.settings.min_distance:
            reason = ProbeReason.NEAR_DUPLICATE
        elif walk >= self.settings.walk_length:
            reason = ProbeReason.WALK
        return Verdict(self.ids[best_index], best_distance, walk, reason)

    def add(self, submission: int, packed: int, walk_length: int) -> None:
        self.ids.append(submission)
        self.keys.append(packed >> self._shift)
        self.walks.append(walk_length)
