"""The Ladder releases a public score only on a full step up, and the number of different
feedback sequences it can give is what the stated leakage bound counts."""

from __future__ import annotations

import itertools
import math

import pytest

from aar_scorer.ladder import Ladder, level, recovery_bound, transcript_bits


def test_first_submission_is_released_rounded_down() -> None:
    ladder = Ladder(step=0.1)
    release = ladder.submit(0.57)
    assert release.released
    assert release.level == 5


def test_only_a_full_step_up_is_released() -> None:
    ladder = Ladder(step=0.1)
    ladder.submit(0.57)
    assert not ladder.submit(0.59).released  # better, but still level 5
    assert not ladder.submit(0.30).released  # worse: the best stays
    assert ladder.submit(0.30).level == 5
    up = ladder.submit(0.61)
    assert up.released
    assert up.level == 6


def test_grid_levels_survive_float_division() -> None:
    assert level(0.3, 0.1) == 3
    assert level(0.7, 0.1) == 7
    assert level(1.0, 0.01) == 100


@pytest.mark.parametrize(("submissions", "step"), [(3, 0.25), (4, 0.5), (5, 1 / 3)])
def test_transcript_count_matches_every_possible_feedback_sequence(
    submissions: int, step: float
) -> None:
    # Feed the Ladder every sequence of accuracies on a grid finer than its step, and collect
    # the distinct sequences of what it says: the bound must count exactly these.
    accuracies = [i / 12 for i in range(13)]
    transcripts = set()
    for sequence in itertools.product(accuracies, repeat=submissions):
        ladder = Ladder(step)
        transcripts.add(tuple((r.released, r.level) for r in map(ladder.submit, sequence)))
    assert math.log2(len(transcripts)) == pytest.approx(transcript_bits(submissions, step))


def test_the_bound_grows_with_submissions_and_finer_steps() -> None:
    assert recovery_bound(300, 100, 0.05) < recovery_bound(300, 400, 0.05)
    assert recovery_bound(300, 100, 0.1) < recovery_bound(300, 100, 0.05)
    # Well under the n/2 labels an exact score gives away for n submissions.
    assert recovery_bound(300, 320, 0.05) < 0.8 * 150
