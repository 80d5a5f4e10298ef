"""The scorer's HTTP API (docs/interfaces.md, Scorer): submissions, bounded feedback, the
leaderboard, run registration and the review queue.

Every decision about a submission (quota, probing, the Ladder) is made on the event loop without
an await in between, so concurrent submissions of one run are decided one after another, and
the answer goes out only once the submission is on disk. Submissions arrive as `Submission`s,
received by intake workers or by this process's own handler (aar_scorer.intake).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import BaseModel, ConfigDict, Field

from aar_common.api import BestScore, Feedback, Quota, RunRegistration, Status, SubmissionResponse
from aar_common.credentials import CredentialVerifier, Principal, Role
from aar_common.web import (
    authenticate,
    error_body,
    fail,
    json_response,
    make_app,
    read_model,
    verify_token,
)
from aar_scorer.intake import (
    SUBMISSIONS_PATH,
    Answer,
    BodyError,
    Intake,
    ParsedSubmission,
    Submission,
    TaskFacts,
    receive,
)
from aar_scorer.ladder import Ladder, level
from aar_scorer.probing import ProbeIndex, ProbeReason, Verdict
from aar_scorer.review import ReviewBook
from aar_scorer.store import Store
from aar_scorer.tasks import ProbeAction, Task

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.submissions = Counter(
            "aar_scorer_submissions",
            "Submissions by result: accepted, flagged, refused, rate_limited, invalid",
            ["result"],
            registry=registry,
        )
        self.released = Counter(
            "aar_scorer_feedback_released",
            "Submissions whose public score the Ladder released (a new best of their run)",
            registry=registry,
        )
        self.probes = Counter(
            "aar_scorer_probes",
            "Submissions that looked like label probing, by pattern and by what was done",
            ["reason", "action"],
            registry=registry,
        )
        self.intake_restarts = Counter(
            "aar_scorer_intake_restarts",
            "Intake workers started again after one exited (the connections it held were closed)",
            registry=registry,
        )
        self.latency = Histogram(
            "aar_scorer_scoring_seconds",
            "Time from a submission's arrival to its durable answer",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )


@dataclass
class RunState:
    """What the scorer keeps in memory about one registered run (rebuilt from the store)."""

    task: Task
    review_required: bool
    ladder: Ladder
    probes: ProbeIndex
    # (window start, agent or "" for the whole run) -> submissions counted in that window
    counts: dict[tuple[int, str], int] = field(default_factory=dict)


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
        for row in store.reader.execute(
            "SELECT run, task, review_required FROM runs WHERE id IN "
            "(SELECT MAX(id) FROM runs GROUP BY run)"
        ):
            if row["task"] in tasks:
                self.runs[row["run"]] = self._load_run(
                    row["run"], tasks[row["task"]], bool(row["review_required"])
                )

    def _load_run(self, run: str, task: Task, review_required: bool) -> RunState:
        """Rebuild a run's Ladder and probe index from its stored submissions."""
        step = task.spec.feedback.step
        probes = ProbeIndex(task.spec.probing, task.size, len(task.spec.labels))
        best: int | None = None
        for row in self.store.reader.execute(
            "SELECT id, packed, walk_length, public_accuracy, released FROM submissions "
            "WHERE run = ? AND task = ? AND status != 'refused' ORDER BY id",
            (run, task.name),
        ):
            probes.add(row["id"], int.from_bytes(row["packed"], "little"), row["walk_length"])
            if row["released"]:
                best = max(level(row["public_accuracy"], step), best if best is not None else -1)
        return RunState(task, review_required, Ladder(step, best), probes)

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
        await self.store.write(
            (
                "INSERT INTO runs (run, task, review_required, registered_by, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (run, task.name, int(body.review_required), by, self.clock()),
            )
        )
        current = self.runs.get(run)
        if current is not None and current.task is task:
            current.review_required = body.review_required
        else:
            self.runs[run] = self._load_run(run, task, body.review_required)
        return {"run": run, "task": task.name, "review_required": body.review_required}

    def known_task(self, name: str) -> Task:
        task = self.tasks.get(name)
        if task is None:
            fail(404, f"unknown task {name!r}; the scorer knows: {', '.join(sorted(self.tasks))}")
        return task

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
        run = agent.run_key
        state = self.run_state(run)
        task = self.known_task(body.task)
        if task is not state.task:
            fail(400, f"run {run} is registered for task {state.task.name}, not {task.name}")
        if body.answer_error is not None:
            fail(400, body.answer_error)
        packed = body.packed
        assert packed is not None  # intake packs the answers of every task it knows

        now = self.clock()
        quota = task.spec.quota
        window = int(now // quota.window_seconds) * quota.window_seconds
        resets_at = window + quota.window_seconds
        used_agent = self._count(state, run, window, agent.agent)
        used_run = self._count(state, run, window, "")
        if used_agent >= quota.per_agent or used_run >= quota.per_run:
            whose = (
                f"agent {agent.agent}'s quota of {quota.per_agent}"
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

        verdict = state.probes.check(packed)
        status = Status.ACCEPTED
        if verdict.reason is not None:
            action = task.spec.probing.action
            status = Status.REFUSED if action is ProbeAction.REFUSE else Status.FLAGGED
            self.metrics.probes.labels(verdict.reason.value, action.value).inc()

        submission = self._next_submission
        self._next_submission += 1
        public = private = None
        score: float | None = None
        released = False
        if status is Status.REFUSED:
            message = f"refused: {_describe(verdict, task)}; a refused submission gets no feedback"
        else:
            public, private = task.accuracies(packed)
            release = state.ladder.submit(public)
            assert release.level is not None
            best = round(task.pgr(release.level * task.spec.feedback.step), 6)
            released = release.released
            if released:
                score = best
                message = f"new best public score of run {run}: PGR {best}"
                self.metrics.released.inc()
            else:
                message = (
                    f"no new feedback: this submission did not reach the next Ladder step above "
                    f"the run's best public score (PGR {best})"
                )
            if status is Status.FLAGGED:
                message += f"; flagged for review: {_describe(verdict, task)}"
            state.probes.add(submission, packed, verdict.walk_length)
        state.counts[(window, agent.agent)] = used_agent + 1
        state.counts[(window, "")] = used_run + 1

        stored = packed.to_bytes((packed.bit_length() + 7) // 8, "little")
        row = {
            "id": submission,
            "run": run,
            "agent": agent.agent,
            "task": task.name,
            "created_at": now,
            # Of the packed answers: equal predictions, equal digests, at no cost per answer.
            "digest": f"sha256:{hashlib.sha256(stored).hexdigest()}",
            "packed": stored,
            "method": body.method,
            "artifact": body.artifact,
            "status": status.value,
            "probe_reason": verdict.reason.value if verdict.reason else None,
            "probe_nearest": verdict.nearest,
            "probe_distance": verdict.distance,
            "walk_length": verdict.walk_length,
            "public_accuracy": public,
            "private_accuracy": private,
            "released": int(released),
            "feedback_score": score,
            "feedback_message": message,
        }
        await self.store.write(
            (
                f"INSERT INTO submissions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )
        )
        self.metrics.submissions.labels(status.value).inc()
        remaining = min(quota.per_agent - used_agent, quota.per_run - used_run) - 1
        return SubmissionResponse(
            id=submission,
            status=status,
            feedback=Feedback(score=score, released=released, message=message),
            quota=Quota(remaining=remaining, resets_at=_iso(resets_at)),
        )


def _describe(verdict: Verdict, task: Task) -> str:
    probing = task.spec.probing
    if verdict.reason is ProbeReason.NEAR_DUPLICATE:
        return (
            f"differs from submission {verdict.nearest} of this run in {verdict.distance} "
            f"answers (fewer than {probing.min_distance})"
        )
    return (
        f"ends a walk of {verdict.walk_length} submissions, each within "
        f"{probing.walk_distance} answers of an earlier one"
    )


SCORER_KEY = web.AppKey("scorer", Scorer)


async def _submit(request: web.Request) -> web.Response:
    """Submissions this process receives itself: all of them without intake workers."""
    scorer = request.app[SCORER_KEY]
    answer = await scorer.answer(await receive(request, scorer.intake.parser))
    return answer.response()


async def _task(request: web.Request) -> web.Response:
    authenticate(request)
    task = request.app[SCORER_KEY].known_task(request.match_info["task"])
    return json_response(
        {
            "name": task.name,
            "metric": task.spec.metric.value,
            "size": task.size,
            "labels": task.spec.labels,
        }
    )


def _run_parameter(request: web.Request, principal: Principal) -> str:
    if principal.role is Role.AGENT:
        return principal.run_key
    run = request.query.get("run", "")
    if run.count("/") != 1:
        fail(400, "admins name the run: ?run=<namespace>/<run>")
    return run


async def _leaderboard(request: web.Request) -> web.Response:
    principal = authenticate(request)
    scorer = request.app[SCORER_KEY]
    run = _run_parameter(request, principal)
    state = scorer.run_state(run)
    if principal.role is Role.AGENT:
        return json_response(scorer.reviews.public_board(run, state.task))
    return json_response(scorer.reviews.admin_board(run, state.task, state.review_required))


async def _register(request: web.Request) -> web.Response:
    admin = authenticate(request, admin=True)
    body = await read_model(request, RunRegistration)
    run = f"{request.match_info['namespace']}/{request.match_info['run']}"
    return json_response(await request.app[SCORER_KEY].register(run, body, admin.name))


async def _best(request: web.Request) -> web.Response:
    authenticate(request, admin=True)
    scorer = request.app[SCORER_KEY]
    run = f"{request.match_info['namespace']}/{request.match_info['run']}"
    state = scorer.run_state(run)
    best = scorer.reviews.best(run, state.task, state.review_required)
    if best is None:
        fail(404, f"run {run} has no counted submission yet")
    return json_response(BestScore.model_validate(best))


async def _review_queue(request: web.Request) -> web.Response:
    authenticate(request, admin=True)
    scorer = request.app[SCORER_KEY]
    run = request.query.get("run")
    runs = [run] if run else sorted(scorer.runs)
    pending: list[dict[str, Any]] = []
    for name in runs:
        state = scorer.run_state(name)
        pending += scorer.reviews.pending(name, state.task, state.review_required)
    return json_response({"pending": pending})


async def _submission(request: web.Request) -> web.Response:
    authenticate(request, admin=True)
    return json_response(request.app[SCORER_KEY].reviews.detail(_submission_id(request)))


def _submission_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not raw.isdigit():
        fail(400, f"a submission id is a number (got {raw!r})")
    return int(raw)


class ReviewDecision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: str = Field(pattern="^(approve|reject)$")
    comment: str = Field(min_length=1, max_length=10_000, description="why, for the record")


async def _decide(request: web.Request) -> web.Response:
    admin = authenticate(request, admin=True)
    body = await read_model(request, ReviewDecision)
    scorer = request.app[SCORER_KEY]
    submission = _submission_id(request)
    detail = scorer.reviews.detail(submission)
    if detail["status"] == Status.REFUSED:
        fail(
            409, f"submission {submission} was refused and never scored; there is nothing to review"
        )
    await scorer.store.write(
        (
            "INSERT INTO reviews (submission, decision, comment, reviewer, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (submission, body.decision, body.comment, admin.name, scorer.clock()),
        )
    )
    return json_response(scorer.reviews.detail(submission))


def build_app(
    tasks: dict[str, Task],
    store: Store,
    verifier: CredentialVerifier,
    clock: Callable[[], float] = time.time,
    intake_workers: int = 0,
) -> web.Application:
    """The scorer as an aiohttp application; the caller owns the store and closes it.

    With `intake_workers`, submissions are received in that many worker processes
    (aar_scorer.intake), started and stopped with the application; the caller then serves the
    application on `app[SCORER_KEY].intake.listen(public_socket)`, which the workers accept on.
    """
    registry = CollectorRegistry()
    largest = max((task.size for task in tasks.values()), default=0)
    # Room for the longest task's answers as JSON strings, the method and the envelope.
    client_max_size = largest * 64 + 256 * 1024
    app = make_app(verifier, registry, client_max_size=client_max_size)
    metrics = Metrics(registry)
    intake = Intake(
        {name: TaskFacts(task.spec.labels, task.size) for name, task in tasks.items()},
        intake_workers,
        client_max_size,
        metrics.intake_restarts,
    )
    scorer = app[SCORER_KEY] = Scorer(tasks, store, metrics, intake, verifier, clock)

    async def start_intake(_: web.Application) -> None:
        await intake.start(scorer.answer)

    async def stop_intake(_: web.Application) -> None:
        await intake.stop()

    app.on_startup.append(start_intake)
    # Before in-flight requests are waited for: the workers finish theirs while this process
    # still decides.
    app.on_shutdown.append(stop_intake)
    app.router.add_get("/api/v1/tasks/{task}", _task)
    app.router.add_post(SUBMISSIONS_PATH, _submit)
    app.router.add_get("/api/v1/submissions/{id}", _submission)
    app.router.add_get("/api/v1/leaderboard", _leaderboard)
    app.router.add_put("/api/v1/runs/{namespace}/{run}", _register)
    app.router.add_get("/api/v1/runs/{namespace}/{run}/best", _best)
    app.router.add_get("/api/v1/review", _review_queue)
    app.router.add_post("/api/v1/review/{id}", _decide)
    return app
