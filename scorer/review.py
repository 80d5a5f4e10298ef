"""Leaderboards, the review queue and a run's best counted submission, read from the store.

A scored submission counts towards its run's best when a reviewer approved it, or, in a run
that does not require review, when it was accepted (not flagged) and nobody rejected it; in a run
that reproduces, only once its code reproduced its claim too (aar_scorer.reproduction). The
latest decision on a submission is the one that holds; earlier ones stay in its history.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from aar_common.api import History
from aar_common.web import fail
from aar_scorer.reproduction import CountRule, Reproduced, ReproductionBook
from aar_scorer.tasks import Task

# How many submissions above the best counted one wait in a run's queue at once.
QUEUE_LENGTH = 20

_LATEST = "(SELECT {column} FROM reviews r WHERE r.submission = s.id ORDER BY r.id DESC LIMIT 1)"

_WITH_DECISION = f"""
SELECT s.*,
       {_LATEST.format(column="decision")} AS decision,
       {_LATEST.format(column="comment")} AS comment,
       {_LATEST.format(column="reviewer")} AS reviewer
FROM submissions s
"""

_SCORED = (
    _WITH_DECISION
    + "WHERE s.run = ? AND s.task = ? AND s.status != 'refused' "
    + "ORDER BY s.private_accuracy DESC, s.id ASC"
)


def _reviewed(row: sqlite3.Row, review_required: bool) -> bool:
    """Whether the review rule lets the submission count."""
    if row["decision"] is not None:
        return bool(row["decision"] == "approve")
    return not review_required and row["status"] == "accepted"


class ReviewBook:
    def __init__(self, reader: sqlite3.Connection, tasks: dict[str, Task]) -> None:
        self.reader = reader
        self.tasks = tasks
        self.reproductions = ReproductionBook(reader, tasks)

    def _counts(self, row: sqlite3.Row, task: Task, rule: CountRule, done: Reproduced) -> bool:
        return _reviewed(row, rule.review_required) and self.reproductions.holds(
            row, task, rule, done
        )

    def _entry(
        self, row: sqlite3.Row, rule: CountRule | None, done: Reproduced | None = None
    ) -> dict[str, Any]:
        """A submission as humans see it: private and exact public scores included."""
        task = self.tasks.get(row["task"])

        def pgr(accuracy: float | None) -> float | None:
            if accuracy is None or task is None:
                return None
            return round(task.pgr(accuracy), 6)

        entry = {
            "id": row["id"],
            "run": row["run"],
            "agent": row["agent"],
            "task": row["task"],
            "created_at": row["created_at"],
            "digest": row["digest"],
            "method": row["method"],
            "artifact": row["artifact"],
            "status": row["status"],
            "probe": row["probe_reason"]
            and {
                "reason": row["probe_reason"],
                "nearest": row["probe_nearest"],
                "distance": row["probe_distance"],
                "walk_length": row["walk_length"],
            },
            "private_score": pgr(row["private_accuracy"]),
            "public_score": pgr(row["public_accuracy"]),
            "feedback": {
                "score": row["feedback_score"],
                "released": bool(row["released"]),
                "message": row["feedback_message"],
            },
            "review": row["decision"]
            and {"decision": row["decision"], "comment": row["comment"], "by": row["reviewer"]},
        }
        if task is not None and done is not None:
            entry["reproduction"] = self.reproductions.summary(row, task, rule, done)
        if rule is not None and task is not None and done is not None:
            entry["counted"] = self._counts(row, task, rule, done)
        return entry

    def _scored(self, run: str, task: Task) -> list[sqlite3.Row]:
        return self.reader.execute(_SCORED, (run, task.name)).fetchall()

    def best(self, run: str, task: Task, rule: CountRule) -> dict[str, Any] | None:
        """The run's best counted submission: `{score, agent, submission}` (private PGR), with
        its reproduced and transfer PGR."""
        done = self.reproductions.of_run(run)
        for row in self._scored(run, task):
            if self._counts(row, task, rule, done):
                summary = self.reproductions.summary(row, task, rule, done)
                return {
                    "score": round(task.pgr(row["private_accuracy"]), 6),
                    "agent": row["agent"],
                    "submission": row["id"],
                    "reproduced": summary["reproduced"],
                    "transfer": summary["transfer"],
                }
        return None

    def pending(self, run: str, task: Task, rule: CountRule) -> list[dict[str, Any]]:
        """Undecided submissions that would beat the run's best counted one if approved."""
        done = self.reproductions.of_run(run)
        waiting = []
        for row in self._scored(run, task):
            if self._counts(row, task, rule, done):
                break  # everything below the best counted one cannot become the best
            if row["decision"] is None:
                waiting.append(self._entry(row, rule, done))
            if len(waiting) == QUEUE_LENGTH:
                break
        return waiting

    def admin_board(self, run: str, task: Task, rule: CountRule, limit: int = 50) -> dict[str, Any]:
        done = self.reproductions.of_run(run)
        rows = self._scored(run, task)[:limit]
        return {
            "run": run,
            "task": task.name,
            "review_required": rule.review_required,
            "reproduce": rule.reproduce,
            "best": self.best(run, task, rule),
            "submissions": [self._entry(row, rule, done) for row in rows],
        }

    def public_board(self, run: str, task: Task) -> dict[str, Any]:
        """What agents see: only the scores the Ladder released, in the order released."""
        rows = self.reader.execute(
            "SELECT id, agent, created_at, feedback_score FROM submissions "
            "WHERE run = ? AND task = ? AND released = 1 ORDER BY id",
            (run, task.name),
        ).fetchall()
        released = [
            {
                "submission": row["id"],
                "agent": row["agent"],
                "created_at": row["created_at"],
                "score": row["feedback_score"],
            }
            for row in rows
        ]
        return {
            "run": run,
            "task": task.name,
            "best_public_score": released[-1]["score"] if released else None,
            "released": released,
        }

    def history(
        self, run: str, task: Task, rule: CountRule, end: float, points: int
    ) -> History | None:
        """Submissions (cumulative), the best released feedback and the best counted private
        score over time (admins: the private score is in it), or None before any submission."""
        submissions = self.reader.execute(
            "SELECT id, created_at, status, released, feedback_score, private_accuracy, "
            "artifact, command FROM submissions "
            "WHERE run = ? AND task = ? AND status != 'refused' ORDER BY id",
            (run, task.name),
        ).fetchall()
        if not submissions:
            return None
        decisions = self.reader.execute(
            "SELECT r.submission, r.decision, r.created_at FROM reviews r "
            "JOIN submissions s ON s.id = r.submission WHERE s.run = ? AND s.task = ? "
            "ORDER BY r.id",
            (run, task.name),
        ).fetchall()
        # Every change in time order: a submission arrives, a reviewer decides, or (in a run
        # that reproduces) a claim is reproduced.
        changes = [(row["created_at"], 0, row) for row in submissions]
        changes += [(row["created_at"], 1, row) for row in decisions]
        reproduced: set[int] = set()
        if rule.reproduce:
            done = self.reproductions.of_run(run)
            by_id = {row["id"]: row for row in submissions}
            for submission, rows in done.rows.items():
                if submission in by_id and self.reproductions.holds(
                    by_id[submission], task, rule, done
                ):
                    moment = max(row["created_at"] for row in rows.values())
                    changes.append((moment, 2, by_id[submission]))
        changes.sort(key=lambda change: (change[0], change[1]))
        start = submissions[0]["created_at"]
        end = max(end, changes[-1][0])
        times = History.steps(start, end, points)
        private = {row["id"]: round(task.pgr(row["private_accuracy"]), 6) for row in submissions}
        counted: set[int] = set()  # by the review rule
        count, best_public, best_counted = 0, None, None
        series: dict[str, list[float | None]] = {
            "submissions": [],
            "best_public": [],
            "best_counted": [],
        }
        position = 0
        for moment in times:
            while position < len(changes) and changes[position][0] <= moment:
                _, kind, row = changes[position]
                position += 1
                if kind == 0:
                    count += 1
                    if row["released"] and row["feedback_score"] is not None:
                        score = row["feedback_score"]
                        best_public = score if best_public is None else max(best_public, score)
                    if not rule.review_required and row["status"] == "accepted":
                        counted.add(row["id"])
                elif kind == 2:
                    reproduced.add(row["id"])
                elif row["decision"] == "approve":
                    counted.add(row["submission"])
                else:
                    counted.discard(row["submission"])
                holding = counted & reproduced if rule.reproduce else counted
                best_counted = max((private[id] for id in holding), default=None)
            series["submissions"].append(count)
            series["best_public"].append(best_public)
            series["best_counted"].append(best_counted)
        return History(start=start, end=end, times=times, series=series)

    def detail(self, submission: int, rule: CountRule | None = None) -> dict[str, Any]:
        """One submission with its feedback, reproductions and whole review history (admins);
        with its run's rule, whether it counts and why."""
        row = self.reader.execute(_WITH_DECISION + "WHERE s.id = ?", (submission,)).fetchone()
        if row is None:
            fail(404, f"no submission {submission}")
        done = self.reproductions.of_run(row["run"])
        history = [
            dict(review)
            for review in self.reader.execute(
                "SELECT decision, comment, reviewer, created_at FROM reviews "
                "WHERE submission = ? ORDER BY id",
                (submission,),
            )
        ]
        # The agent's notebook as it stood when it submitted: on the submission's page, not in
        # every row of a leaderboard.
        return {**self._entry(row, rule, done), "notebook": row["notebook"], "reviews": history}
