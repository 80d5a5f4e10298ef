"""The Ladder releases a public score only on a full step up, the number of different feedback
sequences it can give is what the stated leakage bound counts, and a task's leakage budget
closes its feedback on counts alone before the bound passes the budget."""

from __future__ import annotations

import itertools
import math

import pytest

from aar_scorer.ladder import (
    Budget,
    Ladder,
    level,
    open_submissions,
    recovery_bound,
    transcript_bits,
)


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


@pytest.mark.parametrize(("answers", "step", "budget"), [(400, 0.1, 112.0), (1284, 0.05, 160.5)])
def test_open_submissions_is_the_most_the_budget_admits(
    answers: int, step: float, budget: float
) -> None:
    limit = open_submissions(answers, step, budget)
    assert limit > 0
    assert recovery_bound(answers, limit, step) <= budget
    assert recovery_bound(answers, limit + 1, step) > budget


def test_a_budget_below_a_blind_guesss_spread_never_opens() -> None:
    # Even with nothing released, a blind guess's spread is sqrt(n ln(1/delta) / 2).
    floor = recovery_bound(100, 0, 0.05)
    assert floor == pytest.approx(math.sqrt(100 * math.log(1e6) / 2))
    assert open_submissions(100, 0.05, floor - 1) == 0
    assert not Budget(100, 0.05, 0).take()


def test_the_budget_closes_on_counts_and_the_bound_freezes() -> None:
    budget = Budget(400, 0.1, limit=3)
    assert [budget.take() for _ in range(5)] == [True, True, True, False, False]
    assert not budget.open
    assert budget.answered == 3
    assert budget.bits == transcript_bits(3, 0.1)
    assert budget.labels == recovery_bound(400, 3, 0.1)
    # Without a budget it never closes, and the bound grows with every scored submission.
    unlimited = Budget(400, 0.1, limit=None)
    for _ in range(1000):
        assert unlimited.take()
    assert unlimited.labels == recovery_bound(400, 1000, 0.1)
