"""Feedback is accounted per task, across every run, for the life of its labels: one Ladder, one
probe history and one leakage budget per task, rebuilt from the store after a restart. Over real
HTTP and a real SQLite file."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import aiohttp
from scorer_harness import ServedScorer, StartScorer

from aar_common.credentials import CredentialIssuer, generate_signing_key
from aar_scorer.app import SCORER_KEY
from aar_scorer.ladder import recovery_bound

KEY = generate_signing_key()
ISSUER = CredentialIssuer(KEY)
ADMIN = {"Authorization": f"Bearer {ISSUER.mint_admin('reviewer')}"}
SIZE = 200
PUBLIC = SIZE // 2
STEP = 0.05
TRUTH = random.Random(18).choices([0, 1], k=SIZE)


def agent(name: str, run: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {ISSUER.mint_agent('lab', run, name)}"}


def guess(correct: int, seed: int) -> list[int]:
    """Predictions with `correct` right answers at random positions."""
    right = set(random.Random(seed).sample(range(SIZE), correct))
    return [t if i in right else 1 - t for i, t in enumerate(TRUTH)]


def task(budget: float | None) -> dict[str, Any]:
    return {
        "name": "toy",
        "labels": [0, 1],
        "baselines": {"weak": 0.5, "ceiling": 1.0},
        "quota": {"per_agent": 50, "per_run": 50},
        "feedback": {"step": STEP, "leakage_budget": budget},
        "probing": {"min_distance": 5, "walk_distance": 5, "walk_length": 10},
    }


def budget_for(submissions: int) -> float:
    """A leakage budget (fraction of the public labels) that admits exactly this many scored
    submissions' answers."""
    low = recovery_bound(PUBLIC, submissions, STEP)
    high = recovery_bound(PUBLIC, submissions + 1, STEP)
    return (low + high) / 2 / PUBLIC


class Client:
    def __init__(self, served: ServedScorer, http: aiohttp.ClientSession) -> None:
        self.served, self.http = served, http

    async def call(self, method: str, path: str, headers: dict[str, str], body: Any = None) -> Any:
        async with self.http.request(
            method, self.served.url + path, json=body, headers=headers
        ) as response:
            assert response.status == 200, await response.text()
            return await response.json()

    async def register(self, run: str) -> None:
        await self.call("PUT", f"/api/v1/runs/lab/{run}", ADMIN, {"task": "toy"})

    async def submit(self, run: str, predictions: list[int], name: str = "1") -> Any:
        body = {"task": "toy", "predictions": predictions, "method": "a test"}
        return await self.call("POST", "/api/v1/submissions", agent(f"{run}-{name}", run), body)

    async def facts(self) -> Any:
        return (await self.call("GET", "/api/v1/tasks/toy", agent("x-1", "x")))["feedback"]


async def started(
    start_scorer: StartScorer,
    http: aiohttp.ClientSession,
    budget: float | None,
    *runs: str,
    directory: Path | None = None,
) -> Client:
    """A scorer holding the toy task with this leakage budget, these runs registered."""
    task_spec = (task(budget), TRUTH, "budget-test-seed")
    scorer = Client(await start_scorer(task_spec, key=KEY, directory=directory), http)
    for run in runs:
        await scorer.register(run)
    return scorer


async def test_a_new_runs_first_submission_is_released_only_above_the_tasks_best(
    start_scorer: StartScorer,
) -> None:
    async with aiohttp.ClientSession() as http:
        scorer = await started(start_scorer, http, None, "run-a", "run-b")
        first = await scorer.submit("run-a", guess(170, 1))
        assert first["feedback"]["released"] is True
        # The second run's first submission, no better than the task's best: nothing released,
        # where a Ladder of the run's own would release it at full grid resolution.
        second = await scorer.submit("run-b", guess(150, 2))
        assert second["feedback"] == {
            "score": None,
            "released": False,
            "message": second["feedback"]["message"],
        }
        assert (
            f"the task's best public score (PGR {first['feedback']['score']})"
            in (second["feedback"]["message"])
        )
        # Beating the task's best is released, in any run.
        third = await scorer.submit("run-b", guess(199, 3))
        assert third["feedback"]["released"] is True
        assert third["feedback"]["score"] > first["feedback"]["score"]
        board = await scorer.call("GET", "/api/v1/leaderboard", agent("run-b-2", "run-b"))
        assert [entry["submission"] for entry in board["released"]] == [third["id"]]
        assert board["feedback"]["closed"] is False
        assert board["feedback"]["task_best_public_score"] == third["feedback"]["score"]
        facts = await scorer.facts()
        assert facts["counted_submissions"] == 3
        assert facts["bound"]["labels"] == round(recovery_bound(PUBLIC, 3, STEP), 3)


async def test_probes_are_compared_with_every_run_of_the_task(start_scorer: StartScorer) -> None:
    async with aiohttp.ClientSession() as http:
        scorer = await started(start_scorer, http, None, "run-a", "run-b")
        base = guess(120, 1)
        first = await scorer.submit("run-a", base)
        probe = await scorer.submit("run-b", [1 - base[0], *base[1:]])
        assert probe["status"] == "refused"
        assert (
            f"differs from submission {first['id']} of this task in 1 answers"
            in (probe["feedback"]["message"])
        )


async def test_a_spent_leakage_budget_closes_feedback_for_every_run_and_keeps_scoring(
    start_scorer: StartScorer,
) -> None:
    async with aiohttp.ClientSession() as http:
        scorer = await started(start_scorer, http, budget_for(2), "run-a", "run-b")
        first = await scorer.submit("run-a", guess(120, 1))
        second = await scorer.submit("run-a", guess(110, 2))
        assert first["feedback"]["released"] is True
        assert "feedback for task toy is closed" in second["feedback"]["message"]
        # A new best, in a new run, after the budget: scored and kept, nothing released.
        third = await scorer.submit("run-b", guess(199, 3))
        assert third["status"] == "accepted"
        assert third["feedback"]["released"] is False
        assert third["feedback"]["score"] is None
        assert third["feedback"]["message"].startswith("feedback for task toy is closed")
        facts = await scorer.facts()
        assert facts["closed"] is True
        assert facts["counted_submissions"] == 2
        # The bound froze where feedback closed, within the budget.
        assert facts["bound"]["labels"] == round(recovery_bound(PUBLIC, 2, STEP), 3)
        assert facts["bound"]["labels"] <= facts["budget_labels"]
        board = await scorer.call("GET", "/api/v1/leaderboard", agent("run-b-1", "run-b"))
        assert board["feedback"]["closed"] is True
        assert "closed" in board["feedback"]["message"]
        assert board["released"] == []
        # Reviewers still see everything, the closed submission's scores included.
        detail = await scorer.call("GET", f"/api/v1/submissions/{third['id']}", ADMIN)
        assert detail["private_score"] is not None
        assert detail["public_score"] is not None
        metrics = scorer.served.runner.app[SCORER_KEY].metrics.registry
        assert metrics.get_sample_value("aar_scorer_feedback_closed", {"task": "toy"}) == 1
        assert metrics.get_sample_value(
            "aar_scorer_leakage_bound_labels", {"task": "toy"}
        ) == recovery_bound(PUBLIC, 2, STEP)


async def test_the_task_wide_state_is_rebuilt_from_the_store(
    start_scorer: StartScorer, tmp_path: Path
) -> None:
    budget, directory = budget_for(3), tmp_path / "scorer"
    async with aiohttp.ClientSession() as http:
        scorer = await started(start_scorer, http, budget, "run-a", "run-b", directory=directory)
        base = guess(180, 1)
        best = await scorer.submit("run-a", base)
        await scorer.submit("run-b", guess(100, 2))
        before = await scorer.facts()
        await scorer.served.stop()

        scorer = await started(start_scorer, http, budget, directory=directory)
        assert await scorer.facts() == before
        assert before["counted_submissions"] == 2
        # The Ladder's best, from another run: a third run's first submission below it gets
        # nothing.
        await scorer.register("run-c")
        below = await scorer.submit("run-c", guess(170, 3))
        assert below["feedback"]["released"] is False
        assert f"(PGR {best['feedback']['score']})" in below["feedback"]["message"]
        # The probe history of every run: a flipped answer of run-a's submission is refused.
        probe = await scorer.submit("run-c", [1 - base[0], *base[1:]], name="2")
        assert probe["status"] == "refused"
        # The budget's count: that was the third and last open one; the next is closed.
        closed = await scorer.submit("run-c", guess(199, 4), name="3")
        assert closed["feedback"]["released"] is False
        assert "is closed" in closed["feedback"]["message"]
        assert (await scorer.facts())["counted_submissions"] == 3
