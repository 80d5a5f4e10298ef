"""The Scorer: what the scorer decides (quotas, probe verdicts, the Ladder's feedback, the
leakage budget) and keeps (registered runs, each task's Ladder, leakage account and probe
history, the store, the review book). The HTTP routes around it are in app.py.

Feedback and probe detection are per task, across every run, agent and quota window of it, for
the life of its labels (docs/scorer.md, Feedback): a new run's feedback starts from the task's
released state. Quotas are per run and agent: they are about cost.

Every decision about a submission is made on the event loop without an await in between, so
concurrent submissions of one run are decided one after another, and the answer goes out only
once the submission is on disk. Submissions arrive as `Submission`s, received by intake workers
or by this process's own handler (aar_scorer.intake).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from aiohttp import web

from aar_common.api import (
    Feedback,
    Quota,
    ReproductionReport,
    RunRegistration,
    Status,
    SubmissionResponse,
)
from aar_common.credentials import CredentialVerifier, Principal, Role
from aar_common.web import error_body, fail, verify_token
from aar_scorer.intake import Answer, BodyError, Intake, ParsedSubmission, Submission
from aar_scorer.ladder import DELTA, Budget, Ladder, level
from aar_scorer.metrics import Metrics
from aar_scorer.probing import ProbeIndex, ProbeReason, Verdict
from aar_scorer.reproduction import CountRule, check_registration, targets
from aar_scorer.review import ReviewBook
from aar_scorer.store import Store
from aar_scorer.tasks import ProbeAction, Task

log = logging.getLogger(__name__)


@dataclass
class TaskState:
    """What the scorer keeps in memory about one task, across all its runs (rebuilt from the
    store): the Ladder, the leakage account and the probe history."""

    task: Task
    ladder: Ladder
    budget: Budget
    probes: ProbeIndex


@dataclass
class RunState:
    """What the scorer keeps in memory about one registered run (rebuilt from the store)."""

    task: Task
    rule: CountRule
    # (window start, agent or "" for the whole run) -> submissions counted in that window
    counts: dict[tuple[int, str], int] = field(default_factory=dict)


class _QuotaUse(NamedTuple):
    """A submission counted against its quota: when, when the window resets, what is left."""

    now: float
    resets_at: float
    remaining: int


class _Feedback(NamedTuple):
    """What a decided submission is told, and the accuracies it is stored with."""

    public: float | None
    private: float | None
    score: float | None
    released: bool
    message: str
    open: bool  # answered while the task's feedback was open: counted against its budget


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


class Scorer:
    """The service's state over its store; handlers below are thin HTTP around it."""

    def __init__(
        self,
        tasks: dict[str, Task],
        store: Store,
        metrics: Metrics,
        intake: Intake,
        verifier: CredentialVerifier,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.tasks = tasks
        self.store = store
        self.metrics = metrics
        self.intake = intake
        self.verifier = verifier
        self.clock = clock
        self.reviews = ReviewBook(store.reader, tasks)
        self.runs: dict[str, RunState] = {}
        self._next_submission = store.next_id("submissions")
        self.task_states = {name: self._load_task(task) for name, task in tasks.items()}
        for state in self.task_states.values():
            self._observe(state)
        for row in store.reader.execute(
            "SELECT * FROM runs WHERE id IN (SELECT MAX(id) FROM runs GROUP BY run)"
        ):
            if row["task"] in tasks:
                self.runs[row["run"]] = RunState(tasks[row["task"]], _rule(row))

    def _load_task(self, task: Task) -> TaskState:
        """Rebuild a task's Ladder, leakage account and probe history from the stored
        submissions of all its runs, registered now or not."""
        step = task.spec.feedback.step
        probes = ProbeIndex(task.spec.probing, task.size, len(task.spec.labels))
        best: int | None = None
        answered = 0
        for row in self.store.reader.execute(
            "SELECT id, packed, walk_length, public_accuracy, released, feedback_open "
            "FROM submissions WHERE task = ? AND status != 'refused' ORDER BY id",
            (task.name,),
        ):
            packed = int.from_bytes(row["packed"], "little")
            # The stars each submission joined, as they were when it came in.
            probes.add(row["id"], packed, row["walk_length"], probes.check(packed).neighbors)
            if row["released"]:
                best = max(level(row["public_accuracy"], step), best if best is not None else -1)
            answered += row["feedback_open"]
        budget = Budget(task.public_size, step, task.open_limit, answered)
        return TaskState(task, Ladder(step, best), budget, probes)

    def _observe(self, state: TaskState) -> None:
        """The task's leakage account, as metrics read when scraped (no cost per submission)."""
        name, budget = state.task.name, state.budget
        self.metrics.feedback_closed.labels(name).set_function(lambda: float(not budget.open))
        self.metrics.leakage_bits.labels(name).set_function(lambda: budget.bits)
        self.metrics.leakage_labels.labels(name).set_function(lambda: budget.labels)

    def feedback_facts(self, task: Task) -> dict[str, Any]:
        """What the task's feedback has leaked so far, as the bound states it (agents may see
        it: it depends on counts only)."""
        state = self.task_states[task.name]
        feedback = task.spec.feedback
        best = state.ladder.best
        return {
            "step": feedback.step,
            "public_labels": task.public_size,
            "leakage_budget": feedback.leakage_budget,
            "budget_labels": task.budget_labels,
            "open_submissions": task.open_limit,
            "counted_submissions": state.budget.answered,
            "closed": not state.budget.open,
            "best_public_score": None if best is None else round(task.pgr(best * feedback.step), 6),
            "bound": {
                "bits": round(state.budget.bits, 3),
                "labels": round(state.budget.labels, 3),
                "delta": DELTA,
            },
        }

    def _count(self, state: RunState, run: str, window: int, agent: str) -> int:
        key = (window, agent)
        if key not in state.counts:
            if any(counted != window for counted, _ in state.counts):
                # A new window: the old one's counts are done with.
                state.counts = {k: v for k, v in state.counts.items() if k[0] == window}
            start = float(window)
            sql = "SELECT COUNT(*) FROM submissions WHERE run = ? AND created_at >= ?"
            parameters: tuple[Any, ...] = (run, start)
            if agent:
                sql += " AND agent = ?"
                parameters = (run, start, agent)
            state.counts[key] = int(self.store.reader.execute(sql, parameters).fetchone()[0])
        return state.counts[key]

    async def register(self, run: str, body: RunRegistration, by: str) -> dict[str, Any]:
        task = self.known_task(body.task)
        if task.spec.verification_only:
            fail(
                400,
                f"task {task.name} is for verification only (reproductions are scored on it); "
                "runs work on a task whose reproduction section names it",
            )
        transfer = check_registration(task, body.reproduce, body.transfer)
        rule = CountRule(
            body.review_required, body.reproduce, body.tolerance, transfer, body.reproduce_top
        )
        await self.store.write(
            (
                "INSERT INTO runs (run, task, review_required, registered_by, created_at, "
                "reproduce, tolerance, transfer, reproduce_top) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run,
                    task.name,
                    int(rule.review_required),
                    by,
                    self.clock(),
                    int(rule.reproduce),
                    rule.tolerance,
                    json.dumps(list(rule.transfer)),
                    rule.top,
                ),
            )
        )
        current = self.runs.get(run)
        if current is not None and current.task is task:
            current.rule = rule
        else:
            self.runs[run] = RunState(task, rule)
        return {
            "run": run,
            "task": task.name,
            "review_required": rule.review_required,
            "reproduce": rule.reproduce,
            "tolerance": rule.tolerance,
            "transfer": list(rule.transfer),
            "reproduce_top": rule.top,
        }

    def known_task(self, name: str) -> Task:
        task = self.tasks.get(name)
        if task is None:
            known = sorted(t.name for t in self.tasks.values() if not t.spec.verification_only)
            fail(404, f"unknown task {name!r}; the scorer knows: {', '.join(known)}")
        return task

    async def record_reproduction(
        self, submission: int, report: ReproductionReport, by: str
    ) -> dict[str, Any]:
        """Store what a reproduction Job did, scored privately against its target's labels;
        a report for a target already reported is answered with what was stored (the operator
        may report twice across a restart)."""
        detail = self.reviews.detail(submission)
        state = self.run_state(detail["run"])
        aims = {aim.task: aim.kind for aim in targets(state.task, state.rule)}
        if report.target not in aims:
            fail(
                400,
                f"submission {submission} is not reproduced on {report.target!r}; its targets "
                f"are: {', '.join(aims) or 'none (its task has no reproduction section)'}",
            )
        if report.target not in detail["reproduction"]["reported"]:
            scored = self.reviews.reproductions.score(report)
            try:
                await self.store.write(
                    (
                        "INSERT INTO reproductions (submission, target, kind, outcome, accuracy, "
                        "accuracies, exit_code, reason, log, gpu_hours, job, reported_by, "
                        "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            submission,
                            report.target,
                            aims[report.target],
                            scored.outcome,
                            scored.accuracy,
                            scored.accuracies_json,
                            report.exit_code,
                            scored.reason,
                            report.log,
                            report.gpu_hours,
                            report.job,
                            by,
                            self.clock(),
                        ),
                    )
                )
            except sqlite3.IntegrityError:
                pass  # the same report, raced in: the first one stands
            else:
                self.metrics.reproductions.labels(report.target, scored.outcome).inc()
                self.metrics.reproduction_gpu_seconds.labels(report.target).inc(
                    report.gpu_hours * 3600
                )
        return self.reviews.detail(submission, state.rule)

    async def request_reproduction(self, submission: int, by: str) -> dict[str, Any]:
        """A reviewer asks for a submission to be reproduced, whatever its rank."""
        detail = self.reviews.detail(submission)
        state = self.run_state(detail["run"])
        if not (detail["artifact"] and detail["reproduction"]["command"]):
            fail(
                409,
                f"submission {submission} has no artifact and command to run again; only "
                "submissions made with both can be reproduced",
            )
        if not targets(state.task, state.rule):
            fail(
                409,
                f"task {state.task.name} has no reproduction targets in the scorer's "
                "configuration (a reproduction section naming its fresh split)",
            )
        if not detail["reproduction"]["requested"]:
            # Asked twice at once: once is enough.
            with contextlib.suppress(sqlite3.IntegrityError):
                await self.store.write(
                    (
                        "INSERT INTO reproduction_requests (submission, requested_by, "
                        "created_at) VALUES (?, ?, ?)",
                        (submission, by, self.clock()),
                    )
                )
        return self.reviews.detail(submission, state.rule)

    def run_state(self, run: str) -> RunState:
        state = self.runs.get(run)
        if state is None:
            fail(
                404,
                f"run {run} is not registered with the scorer; the operator registers each run "
                "when it starts (PUT /api/v1/runs/{namespace}/{run})",
            )
        return state

    async def answer(self, submission: Submission) -> Answer:
        """The HTTP answer to a submission, once it is decided and, if stored, on disk."""
        try:
            agent = verify_token(self.verifier, submission.token)
            if agent.role is not Role.AGENT:
                fail(403, "submissions come from agents; admins review them (/api/v1/review)")
            if isinstance(submission.parsed, BodyError):
                fail(submission.parsed.status, submission.parsed.message)
            decided = await self.submit(agent, submission.parsed)
        except web.HTTPException as error:
            if 400 <= error.status < 500 and error.status != 429:
                self.metrics.submissions.labels("invalid").inc()
            return Answer(error.status, (error.text or "").encode(), dict(error.headers))
        except Exception:
            # Said in the log, and to the client as any server error is; the worker that sent
            # it must get an answer either way.
            log.exception("Failed to decide a submission")
            return Answer(
                500,
                json.dumps(error_body(500, "the scorer failed on this submission")).encode(),
                {"Content-Type": "application/json"},
            )
        self.metrics.latency.observe(time.monotonic() - submission.arrived)
        return Answer(200, decided.model_dump_json().encode(), {"Content-Type": "application/json"})

    async def submit(self, agent: Principal, body: ParsedSubmission) -> SubmissionResponse:
        """Decide a submission and store it; every step up to the write runs without an await,
        so the submissions of one run are decided one after another."""
        run = agent.run_key
        state = self.run_state(run)
        packed = self._answers(state, run, body)
        quota = self._take_quota(state, run, agent.agent)
        task_state = self.task_states[state.task.name]
        verdict, status = self._probe_verdict(task_state, packed)
        submission = self._next_submission
        self._next_submission += 1
        feedback = self._feedback(task_state, packed, verdict, status)
        if status is not Status.REFUSED:
            task_state.probes.add(submission, packed, verdict.walk_length, verdict.neighbors)
        await self._store_row(submission, agent, body, packed, quota, verdict, status, feedback)
        self.metrics.submissions.labels(status.value).inc()
        return SubmissionResponse(
            id=submission,
            status=status,
            feedback=Feedback(
                score=feedback.score, released=feedback.released, message=feedback.message
            ),
            quota=Quota(remaining=quota.remaining, resets_at=_iso(quota.resets_at)),
        )

    def _answers(self, state: RunState, run: str, body: ParsedSubmission) -> int:
        """The packed answers, once they are for the run's task and fit it."""
        task = self.known_task(body.task)
        if task is not state.task:
            fail(400, f"run {run} is registered for task {state.task.name}, not {task.name}")
        if body.answer_error is not None:
            fail(400, body.answer_error)
        assert body.packed is not None  # intake packs the answers of every task it knows
        return body.packed

    def _take_quota(self, state: RunState, run: str, agent: str) -> _QuotaUse:
        """Count the submission against its agent's and its run's quota; 429 when either is
        spent (and then nothing is counted)."""
        now = self.clock()
        quota = state.task.spec.quota
        window = int(now // quota.window_seconds) * quota.window_seconds
        resets_at = window + quota.window_seconds
        used_agent = self._count(state, run, window, agent)
        used_run = self._count(state, run, window, "")
        if used_agent >= quota.per_agent or used_run >= quota.per_run:
            whose = (
                f"agent {agent}'s quota of {quota.per_agent}"
                if used_agent >= quota.per_agent
                else f"run {run}'s quota of {quota.per_run}"
            )
            self.metrics.submissions.labels("rate_limited").inc()
            fail(
                429,
                f"{whose} submissions per {quota.window_seconds} s is spent; "
                f"it resets at {_iso(resets_at)}",
                headers={"retry-after": str(max(1, math.ceil(resets_at - now)))},
            )
        state.counts[(window, agent)] = used_agent + 1
        state.counts[(window, "")] = used_run + 1
        remaining = min(quota.per_agent - used_agent, quota.per_run - used_run) - 1
        return _QuotaUse(now, resets_at, remaining)

    def _probe_verdict(self, state: TaskState, packed: int) -> tuple[Verdict, Status]:
        """Whether the answers look like label probing, and what the task says to do then."""
        verdict = state.probes.check(packed)
        if verdict.reason is None:
            return verdict, Status.ACCEPTED
        action = state.task.spec.probing.action
        self.metrics.probes.labels(verdict.reason.value, action.value).inc()
        return verdict, Status.REFUSED if action is ProbeAction.REFUSE else Status.FLAGGED

    def _feedback(
        self, state: TaskState, packed: int, verdict: Verdict, status: Status
    ) -> _Feedback:
        """The accuracies and what the task's Ladder releases of them: a score only for a new
        best of the task while its leakage budget lasts, and nothing at all for a refused
        submission."""
        task = state.task
        if status is Status.REFUSED:
            message = f"refused: {_describe(verdict, task)}; a refused submission gets no feedback"
            return _Feedback(None, None, None, False, message, False)
        public, private = task.accuracies(packed)
        if not state.budget.take():
            message = _closed(state)
            if status is Status.FLAGGED:
                message += f"; flagged for review: {_describe(verdict, task)}"
            return _Feedback(public, private, None, False, message, False)
        release = state.ladder.submit(public)
        assert release.level is not None
        best = round(task.pgr(release.level * task.spec.feedback.step), 6)
        if release.released:
            score: float | None = best
            message = f"new best public score of task {task.name}: PGR {best}"
            self.metrics.released.inc()
        else:
            score = None
            message = (
                f"no new feedback: this submission did not reach the next Ladder step above "
                f"the task's best public score (PGR {best}), over all its runs"
            )
        if not state.budget.open:
            message += "; " + _closed(state)
        if status is Status.FLAGGED:
            message += f"; flagged for review: {_describe(verdict, task)}"
        return _Feedback(public, private, score, release.released, message, True)

    async def _store_row(
        self,
        submission: int,
        agent: Principal,
        body: ParsedSubmission,
        packed: int,
        quota: _QuotaUse,
        verdict: Verdict,
        status: Status,
        feedback: _Feedback,
    ) -> None:
        """The submission's row, on disk before the answer goes out."""
        stored = packed.to_bytes((packed.bit_length() + 7) // 8, "little")
        row = {
            "id": submission,
            "run": agent.run_key,
            "agent": agent.agent,
            "task": body.task,
            "created_at": quota.now,
            # Of the packed answers: equal predictions, equal digests, at no cost per answer.
            "digest": f"sha256:{hashlib.sha256(stored).hexdigest()}",
            "packed": stored,
            "method": body.method,
            "artifact": body.artifact,
            "command": body.command,
            "notebook": body.notebook,
            "status": status.value,
            "probe_reason": verdict.reason.value if verdict.reason else None,
            "probe_nearest": verdict.nearest,
            "probe_distance": verdict.distance,
            "walk_length": verdict.walk_length,
            "public_accuracy": feedback.public,
            "private_accuracy": feedback.private,
            "released": int(feedback.released),
            "feedback_score": feedback.score,
            "feedback_message": feedback.message,
            "feedback_open": int(feedback.open),
        }
        await self.store.write(
            (
                f"INSERT INTO submissions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )
        )


def _rule(row: Any) -> CountRule:
    """A run's counting rule as its latest registration row holds it."""
    return CountRule(
        bool(row["review_required"]),
        bool(row["reproduce"]),
        float(row["tolerance"]),
        tuple(json.loads(row["transfer"])),
        int(row["reproduce_top"]),
    )


def _closed(state: TaskState) -> str:
    """Why nothing more is released for the task; it depends on counts only."""
    task = state.task
    best = state.ladder.best
    if best is None:
        said = "no public score was released before"
    else:
        score = round(task.pgr(best * task.spec.feedback.step), 6)
        said = f"the task's best public score stays PGR {score}"
    return (
        f"feedback for task {task.name} is closed: its leakage budget "
        f"({task.spec.feedback.leakage_budget} of its {task.public_size} public labels) is spent, "
        f"so no public score is released any more ({said}); submissions are still scored and "
        "kept for reviewers"
    )


def _describe(verdict: Verdict, task: Task) -> str:
    probing = task.spec.probing
    if verdict.reason is ProbeReason.NEAR_DUPLICATE:
        return (
            f"differs from submission {verdict.nearest} of this task in {verdict.distance} "
            f"answers (fewer than {probing.min_distance})"
        )
    if verdict.reason is ProbeReason.FAN:
        return (
            f"makes {verdict.fan} later submissions within {probing.fan_radius} answers of "
            f"submission {verdict.nearest} of this task (a fan: {probing.fan_size} or more)"
        )
    return (
        f"ends a walk of {verdict.walk_length} submissions, each within "
        f"{probing.walk_distance} answers of an earlier one"
    )
