"""Reproduction (docs/scorer.md, Reproduction): which of a run's submissions the operator runs
again from their code, what those runs scored on the task's fresh split and transfer tasks, and
whether a submission's claim held.

A run that reproduces counts a submission only when its fresh-split reproduction succeeded and
its PGR there is at least the claimed PGR (the private score) less the run's tolerance. The
scores of a reproduction are private: only admins and the verifier ever see them, and nothing
of them goes through the Ladder.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
from dataclasses import dataclass, field
from typing import Any

from aar_common.api import (
    ReproductionOutcome,
    ReproductionReport,
    ReproductionTarget,
    WantedReproduction,
)
from aar_common.web import fail
from aar_scorer.packing import Packer
from aar_scorer.tasks import Task

FRESH = "fresh"
TRANSFER = "transfer"


@dataclass(frozen=True)
class CountRule:
    """How a run's submissions come to count (docs/scorer.md, Review and Reproduction)."""

    review_required: bool
    reproduce: bool = False
    tolerance: float = 0.1
    transfer: tuple[str, ...] = ()
    top: int = 3


@dataclass
class Reproduced:
    """A run's reproductions, by submission and target task."""

    rows: dict[int, dict[str, sqlite3.Row]] = field(default_factory=dict)
    requested: set[int] = field(default_factory=set)

    def of(self, submission: int) -> dict[str, sqlite3.Row]:
        return self.rows.get(submission, {})


def targets(task: Task, rule: CountRule) -> list[ReproductionTarget]:
    """Where a run's submissions are reproduced: the fresh split, then its transfer tasks."""
    reproduction = task.spec.reproduction
    if reproduction is None:
        return []
    return [ReproductionTarget(task=reproduction.fresh, kind=FRESH)] + [
        ReproductionTarget(task=name, kind=TRANSFER) for name in rule.transfer
    ]


def check_registration(task: Task, reproduce: bool, transfer: list[str] | None) -> tuple[str, ...]:
    """The transfer tasks a run reproduces on; a 400 that says how to fix a run asking for
    reproduction of a task that has no targets, or for a transfer task not configured."""
    reproduction = task.spec.reproduction
    if reproduction is None:
        if reproduce or transfer:
            fail(
                400,
                f"task {task.name} has no reproduction targets in the scorer's configuration: "
                "add a reproduction section (fresh, transfer) to it, or set "
                "spec.review.reproduce: false",
            )
        return ()
    if transfer is None:
        return tuple(reproduction.transfer)
    unknown = [name for name in transfer if name not in reproduction.transfer]
    if unknown:
        fail(
            400,
            f"transfer task(s) {', '.join(unknown)} are not configured for task {task.name}; "
            f"it can transfer to: {', '.join(reproduction.transfer) or 'nothing'}",
        )
    return tuple(transfer)


class ReproductionBook:
    """Reproductions read from the store, and the rule they feed."""

    def __init__(self, reader: sqlite3.Connection, tasks: dict[str, Task]) -> None:
        self.reader = reader
        self.tasks = tasks

    def of_run(self, run: str) -> Reproduced:
        reproduced = Reproduced()
        for row in self.reader.execute(
            "SELECT p.* FROM reproductions p JOIN submissions s ON s.id = p.submission "
            "WHERE s.run = ? ORDER BY p.id",
            (run,),
        ):
            reproduced.rows.setdefault(row["submission"], {})[row["target"]] = row
        reproduced.requested = {
            row[0]
            for row in self.reader.execute(
                "SELECT q.submission FROM reproduction_requests q "
                "JOIN submissions s ON s.id = q.submission WHERE s.run = ?",
                (run,),
            )
        }
        return reproduced

    def pgr(self, row: sqlite3.Row) -> float | None:
        """A reproduction's PGR on its target, with the target's own baselines: the mean over
        the seeds it ran with."""
        target = self.tasks.get(row["target"])
        if row["accuracy"] is None or target is None:
            return None
        return round(target.pgr(row["accuracy"]), 6)

    def pgr_by_seed(self, row: sqlite3.Row) -> list[float]:
        target = self.tasks.get(row["target"])
        if row["accuracies"] is None or target is None:
            return []
        return [round(target.pgr(accuracy), 6) for accuracy in json.loads(row["accuracies"])]

    def holds(self, submission: sqlite3.Row, task: Task, rule: CountRule, done: Reproduced) -> bool:
        """Whether the submission's claim survived its fresh-split reproduction (always, in a
        run that does not reproduce)."""
        if not rule.reproduce:
            return True
        return self._verdict(submission, task, rule, done)[0]

    def _verdict(
        self, submission: sqlite3.Row, task: Task, rule: CountRule, done: Reproduced
    ) -> tuple[bool, str]:
        if not (submission["artifact"] and submission["command"]):
            return False, "not reproducible: submitted without an artifact and a command"
        reproduction = task.spec.reproduction
        if reproduction is None:
            return False, f"task {task.name} has no fresh split to reproduce on"
        fresh = done.of(submission["id"]).get(reproduction.fresh)
        if fresh is None:
            return False, "waiting for its reproduction"
        if fresh["outcome"] != ReproductionOutcome.SUCCEEDED:
            return False, f"reproduction {fresh['outcome']}: {fresh['reason']}"
        claimed = round(task.pgr(submission["private_accuracy"]), 6)
        reproduced = self.pgr(fresh)
        assert reproduced is not None  # a successful reproduction is scored
        # Rounded as the figures are, so that a reproduction exactly at the line counts.
        if reproduced < round(claimed - rule.tolerance, 6):
            return False, (
                f"did not reproduce: PGR {reproduced} on the fresh split {reproduction.fresh}, "
                f"claimed {claimed} (tolerance {rule.tolerance})"
            )
        return True, (
            f"reproduced: PGR {reproduced} on the fresh split, claimed {claimed} "
            f"(tolerance {rule.tolerance})"
        )

    def summary(
        self, submission: sqlite3.Row, task: Task, rule: CountRule | None, done: Reproduced
    ) -> dict[str, Any]:
        """A submission's reproductions as reviewers see them: claimed, reproduced and
        transfer PGR, each run's outcome, exit status and log, and the verdict."""
        results = []
        for row in done.of(submission["id"]).values():
            results.append(
                {
                    "target": row["target"],
                    "kind": row["kind"],
                    "outcome": row["outcome"],
                    "pgr": self.pgr(row),
                    # Each seed's PGR, and their spread (population standard deviation).
                    "seeds": (by_seed := self.pgr_by_seed(row)),
                    "spread": round(statistics.pstdev(by_seed), 6) if by_seed else None,
                    "exit_code": row["exit_code"],
                    "reason": row["reason"],
                    "log": row["log"],
                    "gpu_hours": row["gpu_hours"],
                    "job": row["job"],
                    "created_at": row["created_at"],
                }
            )
        fresh = next((r for r in results if r["kind"] == FRESH), None)
        summary: dict[str, Any] = {
            "claimed": None
            if submission["private_accuracy"] is None
            else round(task.pgr(submission["private_accuracy"]), 6),
            "reproduced": fresh["pgr"] if fresh else None,
            "transfer": {r["target"]: r["pgr"] for r in results if r["kind"] == TRANSFER},
            "results": results,
            "reported": sorted(r["target"] for r in results),
            "requested": submission["id"] in done.requested,
            "command": submission["command"],
        }
        if rule is not None:
            holds, verdict = self._verdict(submission, task, rule, done)
            summary["required"] = rule.reproduce
            summary["holds"] = holds
            summary["verdict"] = verdict
        return summary

    def wanted(
        self, run: str, task: Task, rule: CountRule, done: Reproduced
    ) -> list[WantedReproduction]:
        """The run's leading submissions by public score (its top `rule.top`, when it
        reproduces) and those a reviewer asked for, with the targets they have no result for."""
        aims = targets(task, rule)
        if not aims:
            return []
        rows = self.reader.execute(
            "SELECT id, agent, artifact, command FROM submissions "
            "WHERE run = ? AND task = ? AND status != 'refused' AND artifact IS NOT NULL "
            "AND command IS NOT NULL ORDER BY public_accuracy DESC, id ASC",
            (run, task.name),
        ).fetchall()
        leaders = rule.top if rule.reproduce else 0
        chosen = rows[:leaders] + [row for row in rows[leaders:] if row["id"] in done.requested]
        wanted = []
        for row in chosen:
            missing = [aim for aim in aims if aim.task not in done.of(row["id"])]
            if missing:
                wanted.append(
                    WantedReproduction(
                        submission=row["id"],
                        agent=row["agent"],
                        artifact=row["artifact"],
                        command=row["command"],
                        targets=missing,
                    )
                )
        return wanted

    def score(self, report: ReproductionReport) -> Scored:
        """The outcome, each seed's accuracy and the reason to store for a report: predictions
        that do not fit the target make it invalid, saying which seed's and why."""
        target = self.tasks[report.target]
        if report.outcome is not ReproductionOutcome.SUCCEEDED:
            return Scored(report.outcome.value, [], report.reason or report.outcome.value)
        if report.predictions is None:
            return Scored(ReproductionOutcome.FAILED.value, [], "the command wrote no predictions")
        accuracies = []
        for seed, predictions in enumerate(report.predictions):
            if len(predictions) != target.size:
                return Scored(
                    ReproductionOutcome.INVALID.value,
                    [],
                    f"seed {seed}: {len(predictions)} predictions for task {target.name}, which "
                    f"needs {target.size}",
                )
            try:
                packed = Packer(target.spec.labels).pack(predictions)
            except ValueError as error:
                return Scored(ReproductionOutcome.INVALID.value, [], f"seed {seed}: {error}")
            accuracies.append(target.accuracy(packed))
        return Scored(ReproductionOutcome.SUCCEEDED.value, accuracies, report.reason)


@dataclass(frozen=True)
class Scored:
    """A reproduction as it is stored: its outcome, each seed's accuracy on the target (none
    unless it succeeded) and why."""

    outcome: str
    accuracies: list[float]
    reason: str

    @property
    def accuracy(self) -> float | None:
        return statistics.fmean(self.accuracies) if self.accuracies else None

    @property
    def accuracies_json(self) -> str | None:
        return json.dumps(self.accuracies) if self.accuracies else None


def transfer_json(transfer: tuple[str, ...]) -> str:
    return json.dumps(list(transfer))
