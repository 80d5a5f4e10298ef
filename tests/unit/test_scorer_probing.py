"""Probing detection: near duplicates and walks of small steps are caught; independent
submissions are not."""

from __future__ import annotations

import random
import threading
from typing import Any

import numpy as np
import pytest

from aar_scorer import probing
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


def test_submissions_sharing_their_first_answers_are_still_told_apart() -> None:
    # The first pass compares only the first answers; submissions built to agree there must
    # still be compared in full, and a near one among them found.
    rng = random.Random(5)
    shared = [rng.randrange(2) for _ in range(1000)]
    index = ProbeIndex(Probing(min_distance=10, walk_distance=40), SIZE, 2)
    earlier = [shared + [rng.randrange(2) for _ in range(SIZE - 1000)] for _ in range(50)]
    for submission, answers in enumerate(earlier):
        verdict = index.check(PACKER.pack(answers))
        assert (verdict.nearest, verdict.reason) == (None, None)
        index.add(submission, PACKER.pack(answers), verdict.walk_length)

    verdict = index.check(PACKER.pack(flipped(earlier[33], [1500, 2000, 2566])))

    assert (verdict.nearest, verdict.distance, verdict.reason) == (
        33,
        3,
        ProbeReason.NEAR_DUPLICATE,
    )


def test_a_change_inside_the_first_answers_counts_like_any_other() -> None:
    base = random.Random(6).choices([0, 1], k=SIZE)
    index = ProbeIndex(Probing(min_distance=10, walk_distance=40), SIZE, 2)
    index.add(7, PACKER.pack(base), 1)

    assert index.check(PACKER.pack(flipped(base, range(0, 30)))).distance == 30
    assert index.check(PACKER.pack(flipped(base, range(0, 41)))).nearest is None  # not close


def test_close_submissions_of_a_task_with_more_than_two_answers_are_found() -> None:
    packer = Packer(["a", "b", "c", "d"])
    rng = random.Random(7)
    index = ProbeIndex(Probing(min_distance=10, walk_distance=40), 500, 4)
    earlier = [[rng.choice("abcd") for _ in range(500)] for _ in range(100)]
    for submission, answers in enumerate(earlier):
        index.add(submission, packer.pack(answers), 1)
    changed = list(earlier[60])
    for position in (0, 100, 499):
        changed[position] = "a" if changed[position] != "a" else "b"

    verdict = index.check(packer.pack(changed))

    assert (verdict.nearest, verdict.distance) == (60, 3)


def test_a_fan_of_spaced_queries_around_one_base_is_caught() -> None:
    # Each query flips 20 answers of the base, a different 20 each time: 20 from the base (no
    # near duplicate), 40 from each other, so every query's nearest is the base and no chain
    # grows past two; only the star they make around the base gives them away.
    index = ProbeIndex(Probing(min_distance=10, walk_distance=40, fan_size=8), SIZE, 2)
    base = random.Random(8).choices([0, 1], k=SIZE)
    index.add(0, PACKER.pack(base), 1)
    verdicts = []
    for query in range(1, 10):
        packed = PACKER.pack(flipped(base, range(query * 20, query * 20 + 20)))
        verdict = index.check(packed)
        verdicts.append(verdict)
        index.add(query, packed, verdict.walk_length, verdict.neighbors)
    assert [v.walk_length for v in verdicts] == [2] * 9
    assert [v.reason for v in verdicts] == [None] * 7 + [ProbeReason.FAN] * 2
    assert (verdicts[7].nearest, verdicts[7].distance, verdicts[7].fan) == (0, 20, 8)


def test_a_fan_wider_than_the_walk_distance_needs_a_wider_fan_distance() -> None:
    base = random.Random(9).choices([0, 1], k=SIZE)
    queries = [flipped(base, range(q * 60, q * 60 + 60)) for q in range(1, 10)]

    def reasons(probing: Probing) -> list[ProbeReason | None]:
        index = ProbeIndex(probing, SIZE, 2)
        index.add(0, PACKER.pack(base), 1)
        found = []
        for number, answers in enumerate(queries, start=1):
            verdict = index.check(PACKER.pack(answers))
            found.append(verdict.reason)
            index.add(number, PACKER.pack(answers), verdict.walk_length, verdict.neighbors)
        return found

    assert reasons(Probing(walk_distance=40)) == [None] * 9  # 60 answers: out of every reach
    assert reasons(Probing(walk_distance=40, fan_distance=80)) == [None] * 7 + [ProbeReason.FAN] * 2


def test_a_long_history_finds_exactly_what_comparing_with_every_submission_finds() -> None:
    # Past the first few thousand submissions the block index answers instead of the prefix
    # pass; both must find every close submission, early or late.
    rng = random.Random(10)
    index = ProbeIndex(Probing(), SIZE, 2)
    history: list[list[int]] = np.random.default_rng(10).integers(0, 2, (5000, SIZE)).tolist()
    for submission, answers in enumerate(history):
        index.add(submission, PACKER.pack(answers), 1)
    for target, changed in [(3, 3), (17, 39), (2047, 12), (2048, 25), (4999, 9), (4200, 41)]:
        positions = rng.sample(range(SIZE), changed)
        verdict = index.check(PACKER.pack(flipped(history[target], positions)))
        if changed <= 40:
            assert (verdict.nearest, verdict.distance) == (target, changed)
        else:
            assert verdict.nearest is None
    unrelated = index.check(PACKER.pack([rng.randrange(2) for _ in range(SIZE)]))
    assert (unrelated.nearest, unrelated.fan) == (None, 0)


def test_every_merge_keeps_every_submission_findable() -> None:
    # Merges rebuild the index's directory when the keys pass a power of two and update it
    # otherwise. 6,300 submissions of 41 blocks: the merges at 2,048 and 4,096 rebuild it, the
    # one at 6,144 and the last (settle) update it; every submission is still found.
    index = ProbeIndex(Probing(), SIZE, 2)
    history: list[list[int]] = np.random.default_rng(12).integers(0, 2, (6300, SIZE)).tolist()
    for submission, answers in enumerate(history):
        index.add(submission, PACKER.pack(answers), 1)
    index.settle()
    for target in range(0, 6300, 97):
        verdict = index.check(PACKER.pack(flipped(history[target], [target % SIZE])))
        assert (verdict.nearest, verdict.distance) == (target, 1)


def test_submissions_being_merged_into_the_index_are_still_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A merge runs in a thread; until it is done, the rows it takes in are found where they
    # waited. Hold the merge until the checks are made.
    release = threading.Event()
    merged = probing._merged

    def held(*arguments: Any) -> Any:
        release.wait(timeout=30)
        return merged(*arguments)

    monkeypatch.setattr(probing, "_merged", held)
    index = ProbeIndex(Probing(), SIZE, 2)
    history: list[list[int]] = np.random.default_rng(11).integers(0, 2, (2100, SIZE)).tolist()
    try:
        for submission, answers in enumerate(history):
            index.add(submission, PACKER.pack(answers), 1)
        for target in (0, 1500, 2047, 2099):  # merging, merging, merging, newer
            verdict = index.check(PACKER.pack(flipped(history[target], [7, 700])))
            assert (verdict.nearest, verdict.distance) == (target, 2)
    finally:
        release.set()
    verdict = index.check(PACKER.pack(flipped(history[1500], [9])))
    assert (verdict.nearest, verdict.distance) == (1500, 1)
