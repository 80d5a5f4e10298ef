"""Probing detection: near duplicates and walks of small steps are caught; independent
submissions are not."""

from __future__ import annotations

import random

from aar_scorer.packing import Packer
from aar_scorer.probing import ProbeIndex, ProbeReason
from aar_scorer.tasks import Probing

PACKER = Packer([0, 1])
SIZE = 2567


def flipped(answers: list[int], positions: range | list[int]) -> list[int]:
    changed = list(answers)
    for position in positions:
        changed[position] = 1 - changed[position]
    return changed


def test_one_flipped_answer_is_a_near_duplicate() -> None:
    index = ProbeIndex(Probing(min_distance=10), SIZE, 2)
    base = random.Random(1).choices([0, 1], k=SIZE)
    assert index.check(PACKER.pack(base)).reason is None
    index.add(1, PACKER.pack(base), 1)

    verdict = index.check(PACKER.pack(flipped(base, [17])))

    assert verdict.reason is ProbeReason.NEAR_DUPLICATE
    assert (verdict.nearest, verdict.distance) == (1, 1)


def test_independent_submissions_are_not_probes() -> None:
    rng = random.Random(2)
    index = ProbeIndex(Probing(), SIZE, 2)
    for submission in range(300):
        packed = PACKER.pack([rng.randrange(2) for _ in range(SIZE)])
        verdict = index.check(packed)
        assert verdict.reason is None
        assert verdict.walk_length == 1
        index.add(submission, packed, verdict.walk_length)


def test_a_walk_of_small_steps_is_caught_at_its_configured_length() -> None:
    index = ProbeIndex(Probing(min_distance=10, walk_distance=40, walk_length=4), SIZE, 2)
    current = random.Random(3).choices([0, 1], k=SIZE)
    reasons = []
    for step in range(5):
        verdict = index.check(PACKER.pack(current))
        reasons.append(verdict.reason)
        index.add(step, PACKER.pack(current), verdict.walk_length)
        # Each step changes 20 answers: above min_distance, so no single step is a duplicate.
        current = flipped(current, range(step * 20, step * 20 + 20))
    assert reasons == [None, None, None, ProbeReason.WALK, ProbeReason.WALK]


def test_hundreds_of_earlier_submissions_find_the_nearest() -> None:
    rng = random.Random(4)
    index = ProbeIndex(Probing(), SIZE, 2)
    earlier = [[rng.randrange(2) for _ in range(SIZE)] for _ in range(400)]
    for submission, answers in enumerate(earlier):
        index.add(submission, PACKER.pack(answers), 1)

    verdict = index.check(PACKER.pack(flipped(earlier[271], [5, 6, 7])))

    assert (verdict.nearest, verdict.distance, verdict.reason) == (
        271,
        3,
        ProbeReason.NEAR_DUPLICATE,
    )
