"""Public feedback through the Ladder (Blum & Hardt, 2015), and the bound on what it leaks.

One Ladder per task, shared by every run, agent and quota window of that task for the life of
its labels: a submission's public accuracy, on a grid of step `step`, is released only when it
reaches the next grid level above the task's best released level, and is then released rounded
down to the grid. Everything else an agent sees (quota, probe verdicts, whether feedback is
closed) depends on predictions and counts only, never on labels.

Bound. Whatever any number of attackers do, across however many runs, the labels reach them only
through the task's sequence of released levels: a non-decreasing sequence, one entry per scored
submission of the task, over the L + 1 grid values 0, step, ..., L*step (L = floor(1/step)).
There are at most C(k + L, L) such sequences for k submissions, so the feedback carries at most
B = log2 C(k + L, L) bits. Any guess g of the n public labels derived from it is one of at most
2^B guesses, so for labels drawn uniformly from c classes, Hoeffding's inequality and a union
bound give, with probability at least 1 - delta over the labels,

    correct(g) <= n/c + sqrt(n * (B ln 2 + ln(1/delta)) / 2).

`recovery_bound` is that excess over chance: the most labels an attacker can recover. A
non-release is information too, so B grows with every scored submission; once a task's feedback
is closed, answers no longer depend on the labels and B stops growing. `Budget` closes it before
the excess passes the task's leakage budget, deciding from counts only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Accuracies are ratios of counts; without the slack, 0.3 / 0.1 would fall to level 2.
_GRID_SLACK = 1e-9

# The bound holds with probability at least 1 - DELTA over the hidden labels.
DELTA = 1e-6


def level(accuracy: float, step: float) -> int:
    """The grid level an accuracy rounds down to."""
    return math.floor(accuracy / step + _GRID_SLACK)


@dataclass(frozen=True)
class Release:
    """What the Ladder says about one submission."""

    released: bool  # this submission set the task's new best
    level: int | None  # the task's best level after it (None before any scored submission)


class Ladder:
    """One task's best released level; decisions are made one submission at a time."""

    def __init__(self, step: float, best: int | None = None) -> None:
        self.step = step
        self.best = best

    def submit(self, accuracy: float) -> Release:
        candidate = level(accuracy, self.step)
        if self.best is None or candidate > self.best:
            self.best = candidate
            return Release(released=True, level=candidate)
        return Release(released=False, level=self.best)


def transcript_bits(submissions: int, step: float) -> float:
    """B: log2 of how many different release sequences `submissions` submissions can get."""
    levels = math.floor(1 / step + _GRID_SLACK)
    ln_count = (
        math.lgamma(submissions + levels + 1)
        - math.lgamma(levels + 1)
        - math.lgamma(submissions + 1)
    )
    return ln_count / math.log(2)


def recovery_bound(answers: int, submissions: int, step: float, delta: float = DELTA) -> float:
    """The most hidden labels, beyond the n/c a blind guess gets, that any attacker making
    `submissions` submissions recovers among `answers` labels drawn uniformly from c classes,
    with probability at least 1 - delta (the excess does not depend on c)."""
    bits = transcript_bits(submissions, step)
    return math.sqrt(answers * (bits * math.log(2) + math.log(1 / delta)) / 2)


def open_submissions(answers: int, step: float, budget: float, delta: float = DELTA) -> int:
    """The most scored submissions whose answers may depend on the labels while the bound stays
    within `budget` labels beyond chance (0 when even a blind guess's spread is over it)."""
    if recovery_bound(answers, 1, step, delta) > budget:
        return 0
    low, high = 1, 2
    while recovery_bound(answers, high, step, delta) <= budget:
        low, high = high, 2 * high
    while high - low > 1:  # recovery_bound(low) <= budget < recovery_bound(high)
        middle = (low + high) // 2
        if recovery_bound(answers, middle, step, delta) <= budget:
            low = middle
        else:
            high = middle
    return low


class Budget:
    """A task's leakage account: how many scored submissions were answered while its feedback
    was open, and how many may be (None: no budget). Closing depends on these counts only."""

    def __init__(self, answers: int, step: float, limit: int | None, answered: int = 0) -> None:
        self.answers = answers
        self.step = step
        self.limit = limit
        self.answered = answered

    @property
    def open(self) -> bool:
        return self.limit is None or self.answered < self.limit

    def take(self) -> bool:
        """Count one scored submission against the budget; False when feedback is closed."""
        if not self.open:
            return False
        self.answered += 1
        return True

    @property
    def bits(self) -> float:
        """B for everything released for the task so far."""
        return transcript_bits(self.answered, self.step)

    @property
    def labels(self) -> float:
        """The stated bound so far: labels beyond chance, with probability 1 - DELTA."""
        return recovery_bound(self.answers, self.answered, self.step)
