"""Probing detection: submissions built to read single labels off the feedback.

Two patterns, both about a run's earlier scored submissions (refused ones got no feedback, so
nothing can be read by comparing with them):
- near duplicate: fewer than `min_distance` answers differ from some earlier submission, as in
  "flip one answer and watch the score";
- walk: a chain of submissions, each within `walk_distance` answers of its nearest earlier one,
  reaching `walk_length` links: the same attack taking a few answers per step.

The comparison is an XOR and a popcount of packed answers (aar_scorer.packing). Only a close
earlier submission matters, so the check runs in two passes over the run's earlier submissions:
the first 256 bits of each, kept column by column so that one numpy operation covers every
earlier submission, give a lower bound on each distance; only the few whose bound is within
`walk_distance` are compared in full. Independent submissions differ in about half of those
bits, so the full comparison is almost never needed and a check costs about the same with a
thousand earlier submissions as with ten. Submissions built to share their first bits only cost
the full comparison, never a missed probe: the bound is a true lower bound.
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


# Bits of each submission compared in the first pass: 256 make a chance match with an
# independent submission vanishingly rare (about 128 of them differ, with a spread of 8).
_PREFIX_WORDS = 4


@dataclass(frozen=True)
class Verdict:
    """How a new submission relates to the run's earlier ones."""

    nearest: int | None  # id of the closest earlier submission within walk_distance, or None
    distance: int | None  # answers that differ from it
    walk_length: int  # links in the chain of close submissions ending here (1: no chain)
    reason: ProbeReason | None  # why this looks like a probe, or None


_UNRELATED = Verdict(nearest=None, distance=None, walk_length=1, reason=None)


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
        words = self._bytes // 8
        self._prefix_words = min(_PREFIX_WORDS, words)
        # A differing answer flips at most _bits_per_answer bits, so a submission within
        # walk_distance answers is within this many bits, in the prefix as in the whole.
        self._close_bits = settings.walk_distance * self._bits_per_answer
        self._rows = np.zeros((16, words), dtype=np.uint64)
        self._prefix = np.zeros((self._prefix_words, 16), dtype=np.uint64)  # column per row
        self.ids: list[int] = []
        self.walks: list[int] = []

    def _words(self, packed: int) -> npt.NDArray[np.uint64]:
        key = (packed >> self._shift).to_bytes(self._bytes, "little")
        return np.frombuffer(key, dtype="<u8").astype(np.uint64, copy=False)

    def check(self, candidate: int) -> Verdict:
        count = len(self.ids)
        if not count:
            return _UNRELATED
        words = self._words(candidate)
        # First pass: a lower bound on every distance, from the prefixes of all earlier
        # submissions at once.
        prefix = self._prefix[:, :count] ^ words[: self._prefix_words, np.newaxis]
        bound = np.bitwise_count(prefix).sum(axis=0, dtype=np.uint16)
        close = np.flatnonzero(bound <= self._close_bits)
        if not close.size:
            return _UNRELATED
        # Second pass, over the few that may be close: the whole distance.
        differing = np.bitwise_xor(self._rows[close], words)
        distances = np.bitwise_count(differing).sum(axis=1, dtype=np.int64)
        nearest = int(distances.argmin())  # the earliest of equally near ones
        distance = int(distances[nearest]) // self._bits_per_answer
        if distance > self.settings.walk_distance:
            return _UNRELATED
        row = int(close[nearest])
        walk = self.walks[row] + 1
        reason = None
        if distance < self.settings.min_distance:
            reason = ProbeReason.NEAR_DUPLICATE
        elif walk >= self.settings.walk_length:
            reason = ProbeReason.WALK
        return Verdict(self.ids[row], distance, walk, reason)

    def add(self, submission: int, packed: int, walk_length: int) -> None:
        count = len(self.ids)
        if count == len(self._rows):
            rows = np.zeros((2 * count, self._rows.shape[1]), dtype=np.uint64)
            rows[:count] = self._rows
            self._rows = rows
            prefix = np.zeros((self._prefix_words, 2 * count), dtype=np.uint64)
            prefix[:, :count] = self._prefix
            self._prefix = prefix
        words = self._words(packed)
        self._rows[count] = words
        self._prefix[:, count] = words[: self._prefix_words]
        self.ids.append(submission)
        self.walks.append(walk_length)
