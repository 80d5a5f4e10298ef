"""Reproduction at the scorer, over real HTTP and SQLite: which submissions the operator is
asked to run again, results scored privately on the fresh split and transfer task, and a
submission counting only when its claim held, within the run's tolerance."""

from __future__ import annotations

import asyncio
import random
import statistics
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from scorer_harness import StartScorer

from aar_common.cli import main as aar
from aar_common.credentials import CredentialIssuer, generate_signing_key

KEY = generate_signing_key()
ISSUER = CredentialIssuer(KEY)
SIZE = 200
TRUTH = random.Random(1).choices([0, 1], k=SIZE)
FRESH_TRUTH = random.Random(2).choices([0, 1], k=SIZE)
TRANSFER_TRUTH = random.Random(3).choices([0, 1], k=100)
ARTIFACT = "sha256:" + "ab" * 32
COMMAND = "aar-train w2s --task $AAR_TASK_DIR --out $AAR_OUTPUT_DIR"
BASELINES = {"weak": 0.5, "ceiling": 1.0}
TASKS: list[tuple[dict[str, Any], list[Any], str]] = [
    (
        {
            "name": "toy",
            "labels": [0, 1],
            "baselines": BASELINES,
            "feedback": {"step": 0.05, "leakage_budget": None},
            "quota": {"per_agent": 10, "per_run": 20},
            "probing": {"min_distance": 5, "walk_distance": 5, "walk_length": 10},
            "reproduction": {"fresh": "toy-fresh", "transfer": ["toy-transfer"]},
        },
        TRUTH,
        "seed-of-the-toy-task",
    ),
    (
        {"name": "toy-fresh", "labels": [0, 1], "baselines": BASELINES, "verification_only": True},
        FRESH_TRUTH,
        "seed-of-the-fresh-split",
    ),
    (
        {
            "name": "toy-transfer",
            "labels": [0, 1],
            "baselines": {"weak": 0.6, "ceiling": 0.9},
            "verification_only": True,
        },
        TRANSFER_TRUTH,
        "seed-of-the-transfer-task",
    ),
]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def admin() -> dict[str, str]:
    # Minted when used: a module-level credential would expire in a long test session.
    return bearer(ISSUER.mint_admin("reviewer"))


def verifier() -> dict[str, str]:
    return bearer(ISSUER.mint_verifier("aar-operator", 300))


def agent(name: str) -> dict[str, str]:
    return bearer(ISSUER.mint_agent("lab", "run-a", name))


def with_accuracy(truth: list[int], accuracy: float, seed: int) -> list[int]:
    """Predictions right on exactly `accuracy` of the items."""
    right = set(random.Random(seed).sample(range(len(truth)), round(accuracy * len(truth))))
    return [t if i in right else 1 - t for i, t in enumerate(truth)]


@dataclass
class Scorer:
    url: str
    http: aiohttp.ClientSession
    metrics_url: str

    async def call(
        self, method: str, path: str, headers: dict[str, str], body: Any = None
    ) -> tuple[int, Any]:
        async with self.http.request(
            method, self.url + path, json=body, headers=headers
        ) as response:
            return response.status, await response.json()

    async def submit(self, who: str, predictions: list[int], *, code: bool = True) -> int:
        body = {"task": "toy", "predictions": predictions, "method": f"{who}'s method"}
        if code:
            body |= {"artifact": ARTIFACT, "command": COMMAND}
        status, answer = await self.call("POST", "/api/v1/submissions", agent(who), body)
        assert status == 200, answer
        return int(answer["id"])

    async def report(
        self,
        submission: int,
        target: str,
        predictions: list[int] | None,
        *,
        seeds: list[list[int]] | None = None,
        **fields: Any,
    ) -> tuple[int, Any]:
        """A report of one seed's `predictions`, or of several `seeds`'."""
        body = {
            "target": target,
            "outcome": "succeeded",
            "predictions": seeds or (None if predictions is None else [predictions]),
            "exit_code": 0,
            "log": "trained 3 seeds",
            "gpu_hours": 0.25,
            "job": f"aar-verify/repro-{submission}",
        } | fields
        return await self.call(
            "POST", f"/api/v1/submissions/{submission}/reproductions", verifier(), body
        )

    async def claimed(self, submission: int) -> float:
        status, detail = await self.call("GET", f"/api/v1/submissions/{submission}", admin())
        assert status == 200
        return float(detail["reproduction"]["claimed"])

    async def fresh_at(self, submission: int, pgr: float, seed: int) -> list[int]:
        """Predictions for the fresh split at exactly `pgr` (its baselines are 0.5 and 1.0)."""
        return with_accuracy(FRESH_TRUTH, 0.5 + pgr / 2, seed)

    async def best(self) -> tuple[int, Any]:
        return await self.call("GET", "/api/v1/runs/lab/run-a/best", admin())

    async def wanted(self, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        return await self.call("GET", "/api/v1/runs/lab/run-a/reproductions", headers or verifier())


async def register(scorer: Scorer, **fields: Any) -> tuple[int, Any]:
    body = {"task": "toy", "review_required": False, "reproduce": True, "tolerance": 0.1} | fields
    return await scorer.call("PUT", "/api/v1/runs/lab/run-a", admin(), body)


@pytest.fixture
async def scorer(start_scorer: StartScorer) -> AsyncIterator[Scorer]:
    served = await start_scorer(TASKS, key=KEY)
    async with aiohttp.ClientSession() as http:
        service = Scorer(served.url, http, served.metrics_url)
        status, answer = await register(service, reproduce_top=2)
        assert status == 200, answer
        yield service


async def test_a_claim_counts_only_once_reproduced_within_tolerance(scorer: Scorer) -> None:
    honest = await scorer.submit("a1", with_accuracy(TRUTH, 0.9, 1))
    claimed = await scorer.claimed(honest)  # about 0.8: the private half's PGR
    status, _ = await scorer.best()
    assert status == 404  # nothing counts before its reproduction

    # The fresh split gives 0.08 less: within 0.1 of the claim. The transfer task is reported too.
    reproduced = round(claimed - 0.08, 6)
    status, detail = await scorer.report(
        honest, "toy-fresh", await scorer.fresh_at(honest, reproduced, 2)
    )
    assert status == 200, detail
    status, detail = await scorer.report(
        honest, "toy-transfer", with_accuracy(TRANSFER_TRUTH, 0.75, 3)
    )
    assert status == 200, detail
    reproduction = detail["reproduction"]
    assert reproduction["claimed"] == claimed
    assert reproduction["reproduced"] == reproduced
    assert reproduction["transfer"] == {"toy-transfer": 0.5}  # 0.75 between 0.6 and 0.9
    assert reproduction["holds"] is True
    assert detail["counted"] is True

    status, best = await scorer.best()
    assert status == 200
    assert best == {
        "score": claimed,
        "agent": "a1",
        "submission": honest,
        "reproduced": reproduced,
        "transfer": {"toy-transfer": 0.5},
    }


async def test_leaked_labels_reproduce_near_chance_and_never_count(scorer: Scorer) -> None:
    # Predictions copied from the hidden labels: a perfect claim that its code cannot repeat
    # on items it never saw.
    leaked = await scorer.submit("a2", list(TRUTH))
    status, detail = await scorer.report(leaked, "toy-fresh", list(TRUTH))  # the same list again
    assert status == 200
    reproduction = detail["reproduction"]
    assert reproduction["claimed"] == 1.0
    assert abs(reproduction["reproduced"]) < 0.3  # chance is PGR 0 on a balanced task
    assert reproduction["holds"] is False
    assert "did not reproduce" in reproduction["verdict"]
    assert detail["counted"] is False
    status, _ = await scorer.best()
    assert status == 404


async def test_the_figures_are_the_mean_over_seeds_with_their_spread(scorer: Scorer) -> None:
    submission = await scorer.submit("a1", with_accuracy(TRUTH, 0.9, 30))
    claimed = await scorer.claimed(submission)
    seeds = [
        await scorer.fresh_at(submission, pgr, 31 + n)
        for n, pgr in enumerate((claimed - 0.2, claimed, claimed + 0.02))
    ]
    status, detail = await scorer.report(submission, "toy-fresh", None, seeds=seeds)
    assert status == 200, detail
    [result] = detail["reproduction"]["results"]
    by_seed = [round(claimed - 0.2, 6), claimed, round(claimed + 0.02, 6)]
    assert result["seeds"] == by_seed
    assert result["pgr"] == pytest.approx(sum(by_seed) / 3, abs=1e-6)
    assert result["spread"] == pytest.approx(statistics.pstdev(by_seed), abs=1e-6)
    # The claim is judged on the mean: 0.06 below it, within the tolerance.
    assert detail["reproduction"]["reproduced"] == result["pgr"]
    assert detail["counted"] is True
    # One seed whose predictions do not fit makes the whole reproduction invalid.
    other = await scorer.submit("a2", with_accuracy(TRUTH, 0.9, 34))
    _, detail = await scorer.report(other, "toy-fresh", None, seeds=[seeds[0], [1, 0]])
    assert detail["reproduction"]["verdict"].startswith("reproduction invalid: seed 1: 2 ")


async def test_the_tolerance_is_the_line(scorer: Scorer) -> None:
    # Exactly the tolerance below the claim counts; one fresh item fewer right does not.
    at_line = await scorer.submit("a1", with_accuracy(TRUTH, 0.9, 4))
    below = await scorer.submit("a2", with_accuracy(TRUTH, 0.9, 5))
    line = round(await scorer.claimed(at_line) - 0.1, 6)
    under_line = round(await scorer.claimed(below) - 0.1 - 0.01, 6)
    _, at = await scorer.report(at_line, "toy-fresh", await scorer.fresh_at(at_line, line, 6))
    _, under = await scorer.report(below, "toy-fresh", await scorer.fresh_at(below, under_line, 7))
    assert at["reproduction"]["reproduced"] == line
    assert at["counted"] is True
    assert under["reproduction"]["reproduced"] == under_line
    assert under["counted"] is False


async def test_a_failed_or_timed_out_reproduction_flags_with_its_reason(scorer: Scorer) -> None:
    crashed = await scorer.submit("a1", with_accuracy(TRUTH, 0.9, 8))
    slow = await scorer.submit("a2", with_accuracy(TRUTH, 0.9, 9))
    _, detail = await scorer.report(
        crashed,
        "toy-fresh",
        None,
        outcome="failed",
        exit_code=1,
        reason="the command exited with status 1",
        log="FileNotFoundError: /workspace/labels.json",
    )
    assert detail["reproduction"]["verdict"] == (
        "reproduction failed: the command exited with status 1"
    )
    assert detail["reproduction"]["results"][0]["log"].startswith("FileNotFoundError")
    assert detail["counted"] is False
    _, detail = await scorer.report(
        slow, "toy-fresh", None, outcome="timed_out", reason="deadline of 2h passed"
    )
    assert detail["reproduction"]["verdict"] == "reproduction timed_out: deadline of 2h passed"
    # Prometheus has them by outcome, and their GPU time.
    async with scorer.http.get(f"{scorer.metrics_url}/metrics") as response:
        metrics = await response.text()
    assert 'aar_scorer_reproductions_total{outcome="failed",task="toy-fresh"} 1.0' in metrics
    assert 'aar_scorer_reproductions_total{outcome="timed_out",task="toy-fresh"} 1.0' in metrics
    assert 'aar_scorer_reproduction_gpu_seconds_total{task="toy-fresh"} 1800.0' in metrics
    # Predictions that do not fit the target are invalid, whatever the Job said.
    short = await scorer.submit("a3", with_accuracy(TRUTH, 0.9, 10))
    _, detail = await scorer.report(short, "toy-fresh", [0] * 7)
    assert detail["reproduction"]["results"][0]["outcome"] == "invalid"
    assert (
        "seed 0: 7 predictions for task toy-fresh, which needs 200"
        in (detail["reproduction"]["verdict"])
    )


async def test_the_leaders_with_code_are_wanted_once(scorer: Scorer) -> None:
    first = await scorer.submit("a1", with_accuracy(TRUTH, 0.95, 11))
    second = await scorer.submit("a2", with_accuracy(TRUTH, 0.9, 12))
    third = await scorer.submit("a3", with_accuracy(TRUTH, 0.85, 13))
    await scorer.submit("a4", with_accuracy(TRUTH, 0.99, 14), code=False)  # nothing to run
    status, wanted = await scorer.wanted()
    assert status == 200
    assert [w["submission"] for w in wanted["wanted"]] == [first, second]  # top 2 with code
    assert wanted["wanted"][0]["command"] == COMMAND
    assert wanted["wanted"][0]["artifact"] == ARTIFACT
    assert wanted["wanted"][0]["targets"] == [
        {"task": "toy-fresh", "kind": "fresh"},
        {"task": "toy-transfer", "kind": "transfer"},
    ]
    # Reported targets are not asked for again; a report twice keeps the first.
    await scorer.report(first, "toy-fresh", list(FRESH_TRUTH))
    status, again = await scorer.report(first, "toy-fresh", None, outcome="failed")
    assert status == 200
    assert again["reproduction"]["results"][0]["outcome"] == "succeeded"
    _, wanted = await scorer.wanted()
    assert wanted["wanted"][0]["targets"] == [{"task": "toy-transfer", "kind": "transfer"}]

    # A reviewer asks for the third one: it is wanted too.
    status, detail = await scorer.call("POST", f"/api/v1/submissions/{third}/reproduce", admin())
    assert status == 200, detail
    assert detail["reproduction"]["requested"] is True
    _, wanted = await scorer.wanted()
    assert [w["submission"] for w in wanted["wanted"]] == [first, second, third]


async def test_only_the_verifier_reports_and_it_can_do_nothing_else(scorer: Scorer) -> None:
    submission = await scorer.submit("a1", with_accuracy(TRUTH, 0.9, 15))
    body = {"target": "toy-fresh", "outcome": "succeeded", "predictions": [FRESH_TRUTH], "job": "j"}
    path = f"/api/v1/submissions/{submission}/reproductions"
    for who in (agent("a1"), admin()):
        status, answer = await scorer.call("POST", path, who, body)
        assert status == 403, answer
    status, _ = await scorer.wanted(agent("a1"))
    assert status == 403
    # The verifier's credential opens nothing written for agents and admins.
    for method, other in [
        ("GET", "/api/v1/leaderboard?run=lab/run-a"),
        (
            "GET",
            f"/api/v1/submissions/{submission}",
        ),
        ("GET", "/api/v1/review"),
        ("GET", "/api/v1/runs/lab/run-a/best"),
        ("GET", "/api/v1/tasks/toy"),
    ]:
        status, answer = await scorer.call(method, other, verifier())
        assert status == 403, (other, answer)
        assert "verifier credential" in answer["error"]["message"]
    status, answer = await scorer.call(
        "POST",
        "/api/v1/submissions",
        verifier(),
        {"task": "toy", "predictions": TRUTH, "method": "m"},
    )
    assert status == 403


async def test_verification_tasks_are_never_worked_on_or_described(scorer: Scorer) -> None:
    status, answer = await scorer.call("GET", "/api/v1/tasks/toy-fresh", agent("a1"))
    assert status == 404
    assert "verification only" in answer["error"]["message"]
    status, answer = await scorer.call(
        "PUT", "/api/v1/runs/lab/run-b", admin(), {"task": "toy-fresh"}
    )
    assert status == 400
    assert "verification only" in answer["error"]["message"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"transfer": ["toy-nowhere"]}, "transfer task(s) toy-nowhere are not configured"),
        ({"tolerance": 2}, "tolerance"),
    ],
)
async def test_a_registration_the_task_cannot_honour_is_refused(
    scorer: Scorer, fields: dict[str, Any], message: str
) -> None:
    status, answer = await register(scorer, **fields)
    assert status == 400
    assert message in answer["error"]["message"]


async def test_a_run_that_does_not_reproduce_counts_as_before(scorer: Scorer) -> None:
    status, _ = await register(scorer, reproduce=False)
    assert status == 200
    submission = await scorer.submit("a1", with_accuracy(TRUTH, 0.9, 16))
    status, best = await scorer.best()
    assert status == 200
    assert best["submission"] == submission
    assert best["reproduced"] is None
    _, wanted = await scorer.wanted()
    assert wanted["wanted"] == []  # only what a reviewer asks for


async def test_a_reviewer_sees_the_three_figures_the_log_and_exit_status_and_asks_for_more(
    scorer: Scorer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Below the top two the operator reproduces by itself: only a reviewer's request brings it.
    for n, accuracy in enumerate((0.97, 0.96)):
        await scorer.submit(f"lead{n}", with_accuracy(TRUTH, accuracy, 20 + n))
    trailing = await scorer.submit("a1", with_accuracy(TRUTH, 0.9, 22))
    monkeypatch.setenv("AAR_SCORER_URL", scorer.url)
    monkeypatch.setenv("AAR_CREDENTIAL", admin()["Authorization"][7:])

    def cli(*args: str) -> str:
        assert aar(list(args)) == 0
        return capsys.readouterr().out

    _, wanted = await scorer.wanted()
    assert trailing not in [w["submission"] for w in wanted["wanted"]]
    asked = await asyncio.to_thread(cli, "review", "reproduce", str(trailing))
    assert f"Asked for submission {trailing} of lab/run-a to be reproduced" in asked
    _, wanted = await scorer.wanted()
    assert trailing in [w["submission"] for w in wanted["wanted"]]

    claimed = await scorer.claimed(trailing)
    seeds = [
        await scorer.fresh_at(trailing, round(claimed - 0.05 + offset, 6), 23)
        for offset in (-0.01, 0.01)
    ]
    await scorer.report(trailing, "toy-fresh", None, seeds=seeds)
    await scorer.report(
        trailing,
        "toy-transfer",
        None,
        outcome="failed",
        exit_code=2,
        reason="the command exited with status 2",
        log="epoch 1\nTraceback (most recent call last):\nOSError: /workspace: not found",
    )
    shown = await asyncio.to_thread(cli, "review", "show", str(trailing))
    assert f"claimed {claimed:.3f}, reproduced {claimed - 0.05:.3f}, transfer toy-transfer -" in (
        shown
    )
    assert f"command: {COMMAND}" in shown
    assert "toy-transfer (transfer): failed, PGR -, exit status 2" in shown
    assert "    | OSError: /workspace: not found" in shown
    assert "toy-fresh (fresh): succeeded" in shown
    assert " ± 0.010 over 2 seeds" in shown
