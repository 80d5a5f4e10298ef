"""Public feedback through the Ladder (Blum & Hardt, 2015), and the bound on what it leaks.

The Ladder keeps one best public accuracy per run, on a grid of step `step`. A submission's
public accuracy is released only when it reaches the next grid level above that best, and is
then released rounded down to the grid. Everything else an agent sees (quota, probe refusals)
depends on predictions and counts only, never on labels.

Bound. Whatever an attacker does, the labels reach it only through the sequence of released
levels: a non-decreasing sequence, one entry per scored submission, over the L + 1 grid values
0, step, ..., L*step (L = floor(1/step)). There are at most C(k + L, L) such sequences for k
submissions, so the feedback carries at most B = log2 C(k + L, L) bits. Any guess g of n hidden
labels that the attacker derives from it is one of at most 2^B guesses, so for labels drawn
uniformly from c classes, Hoeffding's inequality and a union bound give, with probability at
least 1 - delta over the labels,

    correct(g) <= n/c + sqrt(n * (B ln 2 + ln(1/delta)) / 2).

`recovery_bound` is that excess over chance: the most labels an attacker can recover. Against
an exact score, one flipped answer per submission recovers one label per submission.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Accuracies are ratios of counts; without the slack, 0.3 / 0.1 would fall to level 2.
_GRID_SLACK = 1e-9


def level(accuracy: float, step: float) -> int:
    """The grid level an accuracy rounds down to."""
    return math.floor(accuracy / step + _GRID_SLACK)


@dataclass(frozen=True)
class Release:
    """What the Ladder says about one submission."""

    released: bool  # this submission set the run's new best
    level: int | None  # the run's best level after it (None before any scored submission)


class Ladder:
    """One run's best released level; decisions are made one submission at a time."""

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


def recovery_bound(answers: int, submissions: int, step: float, delta: float = 1e-6) -> float:
    """The most hidden labels, beyond the n/c a blind guess gets, that any attacker making
    `submissions` submissions recovers among `answers` labels drawn uniformly from c classes,
    with probability at least 1 - delta (the excess does not depend on c)."""
    bits = transcript_bits(submissions, step)
    return math.sqrt(answers * (bits * math.log(2) + math.log(1 / delta)) / 2)
