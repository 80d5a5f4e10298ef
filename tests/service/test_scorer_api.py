"""The scorer's HTTP API over real HTTP and a real SQLite file: validation, quotas, probing,
the Ladder's feedback, leaderboards, review and the reviewer's CLI."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from scorer_harness import ServedScorer, StartScorer

from aar_common.cli import main as aar
from aar_common.credentials import CredentialIssuer, generate_signing_key
from aar_scorer.ladder import recovery_bound

KEY = generate_signing_key()
ISSUER = CredentialIssuer(KEY)
SIZE = 200
TRUTH = random.Random(7).choices([0, 1], k=SIZE)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Scorer:
    url: str
    http: aiohttp.ClientSession
    clock: Clock
    admin: dict[str, str]
    metrics_url: str

    async def call(
        self, method: str, path: str, headers: dict[str, str], body: Any = None
    ) -> tuple[int, Any, CIMultiDict[str]]:
        async with self.http.request(
            method, self.url + path, json=body, headers=headers
        ) as response:
            return response.status, await response.json(), response.headers.copy()

    async def submit(
        self, agent: dict[str, str], predictions: list[Any], task: str = "toy"
    ) -> tuple[int, Any]:
        body = {"task": task, "predictions": predictions, "method": "a test", "artifact": None}
        status, answer, _ = await self.call("POST", "/api/v1/submissions", agent, body)
        return status, answer


def agent(name: str, run: str = "run-a", namespace: str = "lab") -> dict[str, str]:
    return {"Authorization": f"Bearer {ISSUER.mint_agent(namespace, run, name)}"}


def guess(correct: int, seed: int) -> list[int]:
    """Predictions with `correct` right answers at random positions."""
    right = set(random.Random(seed).sample(range(SIZE), correct))
    return [t if i in right else 1 - t for i, t in enumerate(TRUTH)]


TASK: dict[str, Any] = {
    "name": "toy",
    "labels": [0, 1],
    "baselines": {"weak": 0.5, "ceiling": 1.0},
    "quota": {"per_agent": 4, "per_run": 6, "window_seconds": 3600},
    # No leakage budget here: these tests are about the Ladder, quotas and review; the budget's
    # own tests (test_scorer_budget.py) set one.
    "feedback": {"step": 0.05, "leakage_budget": None},
    "probing": {"min_distance": 5, "walk_distance": 5, "walk_length": 10},
}


async def start(start_scorer: StartScorer, task: dict[str, Any], clock: Clock) -> ServedScorer:
    return await start_scorer((task, TRUTH, "seed-for-the-test"), key=KEY, clock=clock)


@pytest.fixture
async def scorer(start_scorer: StartScorer) -> AsyncIterator[Scorer]:
    clock = Clock()
    served = await start(start_scorer, TASK, clock)
    admin = {"Authorization": f"Bearer {ISSUER.mint_admin('reviewer')}"}
    async with aiohttp.ClientSession() as http:
        service = Scorer(served.url, http, clock, admin, served.metrics_url)
        status, _, _ = await service.call(
            "PUT", "/api/v1/runs/lab/run-a", admin, {"task": "toy", "review_required": True}
        )
        assert status == 200
        yield service


async def test_task_facts_are_public_and_labels_are_not(scorer: Scorer) -> None:
    status, facts, _ = await scorer.call("GET", "/api/v1/tasks/toy", agent("a1"))
    assert status == 200
    feedback = facts.pop("feedback")
    assert facts == {"name": "toy", "metric": "accuracy", "size": SIZE, "labels": [0, 1]}
    # The bound stated for the task so far: nothing scored, nothing carried but chance.
    assert feedback == {
        "step": 0.05,
        "public_labels": SIZE // 2,
        "leakage_budget": None,
        "budget_labels": None,
        "open_submissions": None,
        "counted_submissions": 0,
        "closed": False,
        "best_public_score": None,
        "bound": {
            "bits": 0.0,
            "labels": round(recovery_bound(SIZE // 2, 0, 0.05), 3),
            "delta": 1e-6,
        },
    }


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"task": "nope", "predictions": [0] * SIZE, "method": "m"}, 404, "unknown task 'nope'"),
        ({"task": "toy", "predictions": [0] * 5, "method": "m"}, 400, "needs exactly 200"),
        (
            {"task": "toy", "predictions": [0] * 199 + [3], "method": "m"},
            400,
            "answer 199 is 3, which is not one of the allowed answers (0, 1)",
        ),
        ({"task": "toy", "predictions": [0] * SIZE}, 400, "method: Field required"),
        (
            {"task": "toy", "predictions": [True] * SIZE, "method": "m"},
            400,
            "predictions.0.int: Input should be a valid integer",
        ),
        (
            {"task": "toy", "predictions": [0] * SIZE, "method": "m", "artifact": "x"},
            400,
            "artifact: String should match pattern",
        ),
    ],
)
async def test_bad_submissions_are_refused_and_nothing_is_stored(
    scorer: Scorer, body: dict[str, Any], status: int, message: str
) -> None:
    got, answer, _ = await scorer.call("POST", "/api/v1/submissions", agent("a1"), body)
    assert got == status
    assert message in answer["error"]["message"]
    _, board, _ = await scorer.call("GET", "/api/v1/leaderboard?run=lab/run-a", scorer.admin)
    assert board["submissions"] == []


async def test_credentials_and_runs_are_checked(scorer: Scorer) -> None:
    body = {"task": "toy", "predictions": [0] * SIZE, "method": "m"}
    status, answer, _ = await scorer.call("POST", "/api/v1/submissions", {}, body)
    assert status == 401
    # A credential for a registered run, signed by someone else's key.
    forger = CredentialIssuer(generate_signing_key())
    forged = {"Authorization": f"Bearer {forger.mint_agent('lab', 'run-a', 'a1')}"}
    status, answer, _ = await scorer.call("POST", "/api/v1/submissions", forged, body)
    assert status == 401
    assert "signature does not verify" in answer["error"]["message"]
    status, answer, _ = await scorer.call("POST", "/api/v1/submissions", scorer.admin, body)
    assert status == 403
    status, answer = await scorer.submit(agent("x1", run="unregistered"), [0] * SIZE)
    assert status == 404
    assert "run lab/unregistered is not registered" in answer["error"]["message"]
    status, answer, _ = await scorer.call(
        "PUT", "/api/v1/runs/lab/run-b", agent("a1"), {"task": "toy"}
    )
    assert status == 403


async def test_feedback_is_the_ladder_and_never_the_private_score(scorer: Scorer) -> None:
    status, first = await scorer.submit(agent("a1"), guess(140, 1))
    assert status == 200
    assert first["status"] == "accepted"
    assert first["feedback"]["released"] is True
    released = first["feedback"]["score"]
    # PGR with weak 0.5, ceiling 1.0 of the public accuracy rounded down to a 0.05 step.
    assert released in [round((k * 0.05 - 0.5) / 0.5, 6) for k in range(21)]

    status, worse = await scorer.submit(agent("a2"), guess(100, 2))
    assert status == 200
    assert worse["feedback"] == {
        "score": None,
        "released": False,
        "message": worse["feedback"]["message"],
    }
    assert f"best public score (PGR {released})" in worse["feedback"]["message"]

    status, better = await scorer.submit(agent("a1"), guess(190, 3))
    assert better["feedback"]["released"] is True
    assert better["feedback"]["score"] > released

    # Agents see the released scores and nothing else.
    status, board, _ = await scorer.call("GET", "/api/v1/leaderboard", agent("a3"))
    assert status == 200
    assert [entry["submission"] for entry in board["released"]] == [first["id"], better["id"]]
    assert board["best_public_score"] == better["feedback"]["score"]
    text = str(board) + str(first) + str(worse) + str(better)
    assert "private" not in text
    # Humans see private scores.
    _, admin_board, _ = await scorer.call("GET", "/api/v1/leaderboard?run=lab/run-a", scorer.admin)
    private = {entry["id"]: entry["private_score"] for entry in admin_board["submissions"]}
    assert set(private) == {first["id"], worse["id"], better["id"]}
    assert private[better["id"]] > private[first["id"]]


async def test_quotas_answer_429_with_retry_after_and_reset(scorer: Scorer) -> None:
    for seed in range(4):
        status, answer = await scorer.submit(agent("a1"), guess(100, seed))
        assert status == 200
    assert answer["quota"]["remaining"] == 0
    status, answer, headers = await scorer.call(
        "POST",
        "/api/v1/submissions",
        agent("a1"),
        {"task": "toy", "predictions": guess(100, 9), "method": "m"},
    )
    assert status == 429
    assert "agent a1's quota of 4 submissions per 3600 s is spent" in answer["error"]["message"]
    assert 0 < int(headers["retry-after"]) <= 3600
    # The run's quota (6) binds across agents.
    for seed in range(2):
        status, _ = await scorer.submit(agent("a2"), guess(100, 10 + seed))
        assert status == 200
    status, answer = await scorer.submit(agent("a3"), guess(100, 20))
    assert status == 429
    assert "run lab/run-a's quota of 6" in answer["error"]["message"]
    # A new window, a new quota.
    scorer.clock.now += 3600
    status, answer = await scorer.submit(agent("a1"), guess(100, 21))
    assert status == 200
    assert answer["quota"]["remaining"] == 3


async def test_a_flipped_answer_is_refused_without_feedback(scorer: Scorer) -> None:
    base = guess(120, 1)
    _, first = await scorer.submit(agent("a1"), base)
    status, probe = await scorer.submit(agent("a2"), [1 - base[0], *base[1:]])
    assert status == 200
    assert probe["status"] == "refused"
    assert probe["feedback"]["score"] is None
    assert (
        f"differs from submission {first['id']} of this task in 1 answers"
        in (probe["feedback"]["message"])
    )
    _, detail, _ = await scorer.call("GET", f"/api/v1/submissions/{probe['id']}", scorer.admin)
    assert detail["probe"] == {
        "reason": "near_duplicate",
        "nearest": first["id"],
        "distance": 1,
        "walk_length": 2,
    }
    assert detail["private_score"] is None  # refused: never scored


async def test_metrics_count_results_probes_and_latency(scorer: Scorer) -> None:
    base = guess(120, 1)
    await scorer.submit(agent("a1"), base)
    await scorer.submit(agent("a1"), [1 - base[0], *base[1:]])
    await scorer.submit(agent("a1"), [0] * 3)
    async with scorer.http.get(scorer.metrics_url + "/metrics") as response:
        text = await response.text()
    assert 'aar_scorer_submissions_total{result="accepted"} 1.0' in text
    assert 'aar_scorer_submissions_total{result="refused"} 1.0' in text
    assert 'aar_scorer_submissions_total{result="invalid"} 1.0' in text
    assert 'aar_scorer_probes_total{action="refuse",reason="near_duplicate"} 1.0' in text
    assert "aar_scorer_feedback_released_total 1.0" in text
    assert "aar_scorer_scoring_seconds_count 2.0" in text


async def test_review_decides_what_counts_as_the_best(scorer: Scorer) -> None:
    _, low = await scorer.submit(agent("a1"), guess(130, 1))
    _, high = await scorer.submit(agent("a2"), guess(180, 2))
    status, answer, _ = await scorer.call("GET", "/api/v1/runs/lab/run-a/best", scorer.admin)
    assert status == 404  # review is required and nobody has reviewed yet
    assert "no counted submission" in answer["error"]["message"]
    _, queue, _ = await scorer.call("GET", "/api/v1/review?run=lab/run-a", scorer.admin)
    assert [entry["id"] for entry in queue["pending"]] == [high["id"], low["id"]]

    status, _, _ = await scorer.call(
        "POST", f"/api/v1/review/{high['id']}", scorer.admin, {"decision": "reject"}
    )
    assert status == 400  # a decision needs a comment
    status, decided, _ = await scorer.call(
        "POST",
        f"/api/v1/review/{high['id']}",
        scorer.admin,
        {"decision": "reject", "comment": "trained on the public split"},
    )
    assert status == 200
    assert decided["review"] == {
        "decision": "reject",
        "comment": "trained on the public split",
        "by": "admin:reviewer",
    }
    await scorer.call(
        "POST",
        f"/api/v1/review/{low['id']}",
        scorer.admin,
        {"decision": "approve", "comment": "ok"},
    )
    _, best, _ = await scorer.call("GET", "/api/v1/runs/lab/run-a/best", scorer.admin)
    assert best["submission"] == low["id"]
    assert best["agent"] == "a1"
    _, queue, _ = await scorer.call("GET", "/api/v1/review?run=lab/run-a", scorer.admin)
    assert queue["pending"] == []
    # Agents cannot review.
    status, _, _ = await scorer.call(
        "POST", f"/api/v1/review/{low['id']}", agent("a1"), {"decision": "approve", "comment": "!"}
    )
    assert status == 403


async def test_without_required_review_accepted_submissions_count(scorer: Scorer) -> None:
    await scorer.call(
        "PUT", "/api/v1/runs/lab/run-a", scorer.admin, {"task": "toy", "review_required": False}
    )
    _, first = await scorer.submit(agent("a1"), guess(150, 1))
    _, best, _ = await scorer.call("GET", "/api/v1/runs/lab/run-a/best", scorer.admin)
    assert best["submission"] == first["id"]


async def test_stored_rows_cannot_be_changed_or_deleted(scorer: Scorer, tmp_path: Path) -> None:
    await scorer.submit(agent("a1"), guess(150, 1))
    database = sqlite3.connect(tmp_path / "data" / "scorer.db")
    for statement in (
        "UPDATE submissions SET private_accuracy = 1",
        "DELETE FROM submissions",
        "DELETE FROM runs",
    ):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            database.execute(statement)
    database.close()


async def test_the_review_cli_lists_shows_and_decides(
    scorer: Scorer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, submitted = await scorer.submit(agent("a1"), guess(170, 1))
    monkeypatch.setenv("AAR_SCORER_URL", scorer.url)
    monkeypatch.setenv("AAR_CREDENTIAL", scorer.admin["Authorization"][7:])

    def cli(*args: str) -> str:
        assert aar(list(args)) == 0
        return capsys.readouterr().out

    # The CLI runs its own event loop: call it from a thread, as a terminal would be.
    listing = await asyncio.to_thread(cli, "review", "list")
    assert f"{submitted['id']:>6}  lab/run-a" in listing
    shown = await asyncio.to_thread(cli, "review", "show", str(submitted["id"]), "--json")
    assert '"method": "a test"' in shown
    shown = await asyncio.to_thread(cli, "review", "show", str(submitted["id"]))
    assert shown.startswith(f"Submission {submitted['id']} of lab/run-a by a1: accepted")
    assert "Method:\n  a test" in shown
    decided = await asyncio.to_thread(
        cli, "review", "approve", str(submitted["id"]), "--comment", "reproduced it"
    )
    assert decided.strip() == f"Approved submission {submitted['id']} of lab/run-a by a1"
    assert "No submissions wait for review" in await asyncio.to_thread(cli, "review", "list")

    def refused() -> str:
        with pytest.raises(SystemExit) as failed:
            aar(["review", "show", "99999"])
        return str(failed.value)

    assert "the scorer answered 404: no submission 99999" in await asyncio.to_thread(refused)


async def test_flagged_probes_get_feedback_but_count_only_when_approved(
    start_scorer: StartScorer,
) -> None:
    clock = Clock()
    flagging = TASK | {"probing": {"min_distance": 50, "walk_distance": 50, "action": "flag"}}
    served = await start(start_scorer, flagging, clock)
    admin = {"Authorization": f"Bearer {ISSUER.mint_admin('reviewer')}"}
    try:
        async with aiohttp.ClientSession() as http:
            scorer = Scorer(served.url, http, clock, admin, served.metrics_url)
            await scorer.call(
                "PUT", "/api/v1/runs/lab/run-a", admin, {"task": "toy", "review_required": False}
            )
            base = guess(100, 1)
            _, first = await scorer.submit(agent("a1"), base)
            # 40 wrong answers made right: better, and too close to the first to be anything
            # but a probe.
            improved = list(base)
            for position in [i for i, t in enumerate(TRUTH) if base[i] != t][:40]:
                improved[position] = TRUTH[position]
            _, probe = await scorer.submit(agent("a1"), improved)
            assert probe["status"] == "flagged"
            assert "flagged for review: differs from submission" in probe["feedback"]["message"]
            # Accepted submissions count without review; the flagged one, better, does not.
            _, best, _ = await scorer.call("GET", "/api/v1/runs/lab/run-a/best", admin)
            assert best["submission"] == first["id"]
            _, queue, _ = await scorer.call("GET", "/api/v1/review", admin)
            assert [(e["id"], e["probe"]["reason"]) for e in queue["pending"]] == [
                (probe["id"], "near_duplicate")
            ]
            await scorer.call(
                "POST",
                f"/api/v1/review/{probe['id']}",
                admin,
                {"decision": "approve", "comment": "fine"},
            )
            _, best, _ = await scorer.call("GET", "/api/v1/runs/lab/run-a/best", admin)
            assert best["submission"] == probe["id"]
    finally:
        await served.stop()


async def test_history_follows_submissions_feedback_and_decisions_over_time(
    scorer: Scorer,
) -> None:
    start = scorer.clock.now
    _, low = await scorer.submit(agent("a1"), guess(130, 1))
    scorer.clock.now = start + 100
    _, high = await scorer.submit(agent("a2"), guess(180, 2))
    _, board, _ = await scorer.call("GET", "/api/v1/leaderboard?run=lab/run-a", scorer.admin)
    private = {entry["id"]: entry["private_score"] for entry in board["submissions"]}
    released = [a["feedback"]["score"] for a in (low, high) if a["feedback"]["released"]]
    assert released  # the Ladder released at least the first
    scorer.clock.now = start + 200
    await scorer.call(
        "POST", f"/api/v1/review/{high['id']}", scorer.admin,
        {"decision": "approve", "comment": "reproduced"},
    )  # fmt: skip
    scorer.clock.now = start + 300
    for submission, decision in ((high, "reject"), (low, "approve")):
        await scorer.call(
            "POST", f"/api/v1/review/{submission['id']}", scorer.admin,
            {"decision": decision, "comment": "second look"},
        )  # fmt: skip
    scorer.clock.now = start + 400

    status, history, _ = await scorer.call(
        "GET", "/api/v1/runs/lab/run-a/history?points=4", scorer.admin
    )
    assert status == 200, history
    assert history["start"] == start
    assert history["end"] == start + 400
    assert history["times"] == [start + 100, start + 200, start + 300, start + 400]
    series = history["series"]
    assert series["submissions"] == [2, 2, 2, 2]
    assert series["best_public"] == [max(released)] * 4
    # Approved at +200, then rejected at +300 in favour of the other: the latest decision holds.
    assert series["best_counted"] == [
        None, private[high["id"]], private[low["id"]], private[low["id"]]
    ]  # fmt: skip

    status, answer, _ = await scorer.call(
        "GET", "/api/v1/runs/lab/run-a/history?points=0", scorer.admin
    )
    assert status == 400
    assert "points must be between 1 and 500" in answer["error"]["message"]
    status, _, _ = await scorer.call("GET", "/api/v1/runs/lab/run-a/history", agent("a1"))
    assert status == 403  # the private scores are in it
    await scorer.call("PUT", "/api/v1/runs/lab/quiet", scorer.admin, {"task": "toy"})
    status, answer, _ = await scorer.call("GET", "/api/v1/runs/lab/quiet/history", scorer.admin)
    assert status == 404
    assert "no scored submission yet" in answer["error"]["message"]
