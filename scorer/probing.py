"""Probing detection: submissions built to read single labels off the feedback.

Two patterns, both about a run's earlier scored submissions (refused ones got no feedback, so
nothing can be read by comparing with them):
- near duplicate: fewer than `min_distance` answers differ from some earlier submission, as in
  "flip one answer and watch the score";
- walk: a chain of submissions, each within `walk_distance` answers of its nearest earlier one,
  reaching `walk_length` links: the same attack taking a few answers per step.

The comparison is an XOR and a popcount of packed answers (aar_scorer.packing) against all of
the run's earlier submissions at once, kept as rows of 64-bit words in one numpy array: hundreds
of earlier 2,567-answer submissions take tens of microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt

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
    """One run's scored submissions as rows of 64-bit words, with the walk length each ended."""

    def __init__(self, settings: Probing, size: int, classes: int) -> None:
        self.settings = settings
        # With two allowed answers, the second bit plane alone says which answer each item has:
        # half the bits to compare, and one differing bit per differing answer. Otherwise a
        # changed answer flips two bits of the one-hot planes.
        self._shift = size if classes == 2 else 0
        self._bits_per_answer = 1 if classes == 2 else 2
        bits = size if classes == 2 else size * classes
        self._bytes = 8 * ((bits + 63) // 64)
        self._rows = np.zeros((16, self._bytes // 8), dtype=np.uint64)
        self.ids: list[int] = []
        self.walks: list[int] = []

    def _words(self, packed: int) -> npt.NDArray[np.uint64]:
        key = (packed >> self._shift).to_bytes(self._bytes, "little")
        return np.frombuffer(key, dtype="<u8").astype(np.uint64, copy=False)

    def check(self, candidate: int) -> Verdict:
        count = len(self.ids)
        if not count:
            return Verdict(nearest=None, distance=None, walk_length=1, reason=None)
        # Every earlier submission of the run at once: XOR, popcount, sum per row.
        differing = np.bitwise_xor(self._rows[:count], self._words(candidate))
        distances = np.bitwise_count(differing).sum(axis=1, dtype=np.int64)
        best_index = int(distances.argmin())  # the earliest of equally near ones
        best_distance = int(distances[best_index]) // self._bits_per_answer
        walk = self.walks[best_index] + 1 if best_distance <= self.settings.walk_distance else 1
        reason = None
        if best_distance < self.settings.min_distance:
            reason = ProbeReason.NEAR_DUPLICATE
        elif walk >= self.settings.walk_length:
            reason = ProbeReason.WALK
        return Verdict(self.ids[best_index], best_distance, walk, reason)

    def add(self, submission: int, packed: int, walk_length: int) -> None:
        count = len(self.ids)
        if count == len(self._rows):
            grown = np.zeros((2 * count, self._rows.shape[1]), dtype=np.uint64)
            grown[:count] = self._rows
            self._rows = grown
        self._rows[count] = self._words(packed)
        self.ids.append(submission)
        self.walks.append(walk_length)
