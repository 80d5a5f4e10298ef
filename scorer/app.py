"""The scorer's HTTP API (docs/interfaces.md, Scorer): `build_app` and its route table, and the
handlers, thin HTTP around the `Scorer` (scorer.py): submissions, tasks, the leaderboard, run
registration and best score, and the review queue."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field

from aar_common.api import (
    HISTORY_POINTS,
    MAX_HISTORY_POINTS,
    BestScore,
    ReproductionReport,
    RunRegistration,
    Status,
    WantedReproductions,
)
from aar_common.credentials import CredentialVerifier, Principal, Role
from aar_common.web import authenticate, fail, json_response, make_app, read_model, whole_number
from aar_scorer.intake import SUBMISSIONS_PATH, Intake, TaskFacts, receive
from aar_scorer.metrics import Metrics
from aar_scorer.scorer import Scorer
from aar_scorer.store import Store
from aar_scorer.tasks import Task

SCORER_KEY = web.AppKey("scorer", Scorer)


async def _submit(request: web.Request) -> web.Response:
    """Submissions this process receives itself: all of them without intake workers."""
    scorer = request.app[SCORER_KEY]
    answer = await scorer.answer(await receive(request, scorer.intake.parser))
    return answer.response()


async def _task(request: web.Request) -> web.Response:
    authenticate(request)
    scorer = request.app[SCORER_KEY]
    task = scorer.known_task(request.match_info["task"])
    if task.spec.verification_only:
        fail(
            404,
            f"task {task.name} is for verification only: reproductions are scored on it, and "
            "no run works on it",
        )
    return json_response(
        {
            "name": task.name,
            "metric": task.spec.metric.value,
            "size": task.size,
            "labels": task.spec.labels,
            # The bound stated for everything released for the task so far (counts only).
            "feedback": scorer.feedback_facts(task),
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
        board = scorer.reviews.public_board(run, state.task)
    else:
        board = scorer.reviews.admin_board(run, state.task, state.rule)
    facts = scorer.feedback_facts(state.task)
    board["feedback"] = {
        "closed": facts["closed"],
        "task_best_public_score": facts["best_public_score"],
        "message": (
            f"feedback for task {state.task.name} is closed: its leakage budget is spent; "
            "submissions are still scored and kept for reviewers"
            if facts["closed"]
            else f"feedback for task {state.task.name} is open"
        ),
    }
    return json_response(board)


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
    best = scorer.reviews.best(run, state.task, state.rule)
    if best is None:
        fail(404, f"run {run} has no counted submission yet")
    return json_response(BestScore.model_validate(best))


async def _history(request: web.Request) -> web.Response:
    """A run's submissions and best scores over time, for the console's charts (admins)."""
    authenticate(request, admin=True)
    scorer = request.app[SCORER_KEY]
    run = f"{request.match_info['namespace']}/{request.match_info['run']}"
    points = whole_number(
        request.query.get("points", str(HISTORY_POINTS)), "points", 1, MAX_HISTORY_POINTS
    )
    state = scorer.run_state(run)
    history = scorer.reviews.history(run, state.task, state.rule, scorer.clock(), points)
    if history is None:
        fail(404, f"run {run} has no scored submission yet")
    return json_response(history)


async def _review_queue(request: web.Request) -> web.Response:
    authenticate(request, admin=True)
    scorer = request.app[SCORER_KEY]
    run = request.query.get("run")
    runs = [run] if run else sorted(scorer.runs)
    pending: list[dict[str, Any]] = []
    for name in runs:
        state = scorer.run_state(name)
        pending += scorer.reviews.pending(name, state.task, state.rule)
    return json_response({"pending": pending})


async def _submission(request: web.Request) -> web.Response:
    authenticate(request, admin=True)
    return json_response(_detail(request.app[SCORER_KEY], _submission_id(request)))


def _detail(scorer: Scorer, submission: int) -> dict[str, Any]:
    """A submission as reviewers see it, with whether it counts under its run's rule."""
    run = scorer.reviews.detail(submission)["run"]
    state = scorer.runs.get(run)
    return scorer.reviews.detail(submission, None if state is None else state.rule)


async def _wanted_reproductions(request: web.Request) -> web.Response:
    """What the operator should reproduce for a run (the verifier, or an admin)."""
    authenticate(request, admin=True, verifier=True)
    scorer = request.app[SCORER_KEY]
    run = f"{request.match_info['namespace']}/{request.match_info['run']}"
    state = scorer.run_state(run)
    done = scorer.reviews.reproductions.of_run(run)
    wanted = scorer.reviews.reproductions.wanted(run, state.task, state.rule, done)
    return json_response(WantedReproductions(run=run, wanted=wanted))


async def _report_reproduction(request: web.Request) -> web.Response:
    """A reproduction Job's result, from the operator's verifier credential only: an admin
    is a person, and a result must come from the Job that ran the code."""
    verifier = authenticate(request, verifier=True)
    if verifier.role is not Role.VERIFIER:
        fail(403, "reproduction results come from the operator's verifier credential")
    body = await read_model(request, ReproductionReport)
    scorer = request.app[SCORER_KEY]
    detail = await scorer.record_reproduction(_submission_id(request), body, verifier.name)
    return json_response(detail)


async def _request_reproduction(request: web.Request) -> web.Response:
    admin = authenticate(request, admin=True)
    scorer = request.app[SCORER_KEY]
    return json_response(await scorer.request_reproduction(_submission_id(request), admin.name))


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
    return json_response(_detail(scorer, submission))


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
    app.router.add_get("/api/v1/runs/{namespace}/{run}/history", _history)
    app.router.add_get("/api/v1/runs/{namespace}/{run}/reproductions", _wanted_reproductions)
    app.router.add_post("/api/v1/submissions/{id}/reproductions", _report_reproduction)
    app.router.add_post("/api/v1/submissions/{id}/reproduce", _request_reproduction)
    app.router.add_get("/api/v1/review", _review_queue)
    app.router.add_post("/api/v1/review/{id}", _decide)
    return app
