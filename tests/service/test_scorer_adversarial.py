"""Label exfiltration, attempted through the real HTTP API within the configured quota.

Three attacks, each run against the scorer and against a naive endpoint that returns the exact
accuracy (the control, built here):
- flip one: submit a base, then the base with answer i flipped, for every i; the score moving
  up or down gives label i;
- subset decoding (adaptive): submit the current base with a random half of its answers
  flipped, so that no two submissions are near each other and probe detection sees nothing;
  every score is a linear equation in the hidden labels, solved by least squares at the end;
  the base moves to each submission whose score was a new best, so the attack climbs the Ladder
  as fast as it lets anyone climb;
- edge flips, one submission per run over hundreds of runs: find a submission whose public
  accuracy sits exactly on a Ladder step (bisecting between a base and its complement), then
  flip one answer of it per run; against a Ladder of each run's own, every run's first
  submission is released, and dropping a step or not reads that label exactly.

The scorer's task flags probes instead of refusing them, so the Ladder alone stands between the
attacker and the labels. Its stated bound (aar_scorer.ladder.recovery_bound): with probability
at least 1 - 1e-6 over uniformly drawn labels, an attacker with k submissions of the task, in
any number of runs, gets at most n/2 + sqrt(n * (log2 C(k + L, L) * ln 2 + ln 1e6) / 2) of n
binary labels right, L = 1/step; k stops growing once the task's leakage budget closes its
feedback.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from scorer_harness import ServedScorer, StartScorer

from aar_common.credentials import (
    CredentialIssuer,
    CredentialVerifier,
    generate_signing_key,
    public_key_pem,
)
from aar_common.web import json_response, make_app
from aar_scorer.ladder import recovery_bound
from aar_scorer.tasks import split_positions

KEY = generate_signing_key()
ISSUER = CredentialIssuer(KEY)
SIZE = 300
TRUTH = random.Random(2015).choices([0, 1], k=SIZE)
STEP = 0.05
QUOTA = 330
FLIP_ONE_SUBMISSIONS = SIZE + 1
DECODING_SUBMISSIONS = 320

# Learns what it can from one submission: an accuracy, or None when the answer says nothing.
Oracle = Callable[[list[int]], Awaitable[float | None]]


@dataclass
class Outcome:
    guess: list[int]
    claimed: int  # labels the attacker believes it determined
    submissions: int

    @property
    def correct(self) -> int:
        return sum(g == t for g, t in zip(self.guess, TRUTH, strict=True))


async def flip_one(oracle: Oracle) -> Outcome:
    base = random.Random(1).choices([0, 1], k=SIZE)
    reference = await oracle(base)
    guess, claimed = list(base), 0
    for position in range(SIZE):
        flipped = list(base)
        flipped[position] = 1 - base[position]
        score = await oracle(flipped)
        if score is None or reference is None or score == reference:
            continue
        guess[position] = flipped[position] if score > reference else base[position]
        claimed += 1
    return Outcome(guess, claimed, SIZE + 1)


async def subset_decoding(oracle: Oracle) -> Outcome:
    rng = random.Random(2)
    base = [rng.randrange(2) for _ in range(SIZE)]
    best = -1.0
    rows: list[list[int]] = []
    values: list[float] = []
    for _ in range(DECODING_SUBMISSIONS):
        query = [1 - answer if rng.random() < 0.5 else answer for answer in base]
        score = await oracle(query)
        if score is None:
            continue
        # correct(q) = (n - |q|) + sum_i (2 q_i - 1) y_i: one linear equation in the labels y.
        rows.append([2 * answer - 1 for answer in query])
        values.append(score * SIZE - (SIZE - sum(query)))
        if score > best:
            best, base = score, query
    if rows:
        solution = np.linalg.lstsq(np.array(rows, float), np.array(values), rcond=None)[0]
        guess = [int(value > 0.5) for value in solution]
    else:
        guess = base
    return Outcome(guess, len(rows), DECODING_SUBMISSIONS)


@pytest.fixture
async def exact_score(
    unused_tcp_port_factory: Callable[[], int],
) -> AsyncIterator[Callable[[list[int]], Awaitable[Oracle]]]:
    """The control: an endpoint that answers the exact accuracy on every hidden label, for
    every submission; `await exact_score(truth)` serves one and gives its oracle."""
    runners: list[web.AppRunner] = []
    async with aiohttp.ClientSession() as http:

        async def serve(truth: list[int]) -> Oracle:
            async def score(request: web.Request) -> web.Response:
                predictions = (await request.json())["predictions"]
                correct = sum(p == t for p, t in zip(predictions, truth, strict=True))
                return json_response({"accuracy": correct / len(truth)})

            app = make_app(CredentialVerifier(public_key_pem(KEY)), CollectorRegistry())
            app.router.add_post("/score", score)
            runner = web.AppRunner(app)
            await runner.setup()
            runners.append(runner)
            port = unused_tcp_port_factory()
            await web.TCPSite(runner, "127.0.0.1", port).start()

            async def oracle(predictions: list[int]) -> float | None:
                async with http.post(
                    f"http://127.0.0.1:{port}/score", json={"predictions": predictions}
                ) as response:
                    accuracy: float = (await response.json())["accuracy"]
                    return accuracy

            return oracle

        yield serve
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def naive(exact_score: Callable[[list[int]], Awaitable[Oracle]]) -> Oracle:
    return await exact_score(TRUTH)


class ScorerUnderAttack:
    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.url, self.http = url, http
        self.statuses: list[str] = []

    async def register(self, run: str) -> None:
        admin = {"Authorization": f"Bearer {ISSUER.mint_admin('test')}"}
        async with self.http.put(
            f"{self.url}/api/v1/runs/lab/{run}", json={"task": "secret"}, headers=admin
        ) as response:
            assert response.status == 200

    def oracle(self, run: str) -> Oracle:
        headers = {"Authorization": f"Bearer {ISSUER.mint_agent('lab', run, f'{run}-1')}"}

        async def ask(predictions: list[int]) -> float | None:
            body = {"task": "secret", "predictions": predictions, "method": "probing"}
            async with self.http.post(
                f"{self.url}/api/v1/submissions", json=body, headers=headers
            ) as response:
                assert response.status == 200, await response.text()
                answer: dict[str, Any] = await response.json()
            self.statuses.append(answer["status"])
            pgr = answer["feedback"]["score"]
            # The attacker knows the baselines (weak 0.5, ceiling 1.0): PGR back to accuracy.
            return None if pgr is None else 0.5 + pgr * 0.5

        return ask


async def scorer_for(start_scorer: StartScorer, action: str) -> ServedScorer:
    task = {
        "name": "secret",
        "labels": [0, 1],
        "baselines": {"weak": 0.5, "ceiling": 1.0},
        "quota": {"per_agent": QUOTA, "per_run": QUOTA},
        # One run and no budget: the Ladder alone, for as many submissions as the quota allows.
        "feedback": {"step": STEP, "leakage_budget": None},
        "probing": {"action": action},
    }
    return await start_scorer((task, TRUTH, "never-shown-seed"), key=KEY)


@pytest.mark.parametrize(
    ("attack", "submissions"),
    [(flip_one, FLIP_ONE_SUBMISSIONS), (subset_decoding, DECODING_SUBMISSIONS)],
)
async def test_attacks_recover_no_more_than_the_bound_and_all_from_an_exact_score(
    attack: Callable[[Oracle], Awaitable[Outcome]],
    submissions: int,
    naive: Oracle,
    start_scorer: StartScorer,
) -> None:
    assert submissions <= QUOTA
    served = await scorer_for(start_scorer, "flag")
    try:
        async with aiohttp.ClientSession() as http:
            scorer = ScorerUnderAttack(served.url, http)
            await scorer.register("attack")
            against_scorer = await attack(scorer.oracle("attack"))
    finally:
        await served.stop()
    against_naive = await attack(naive)

    bound = recovery_bound(SIZE, submissions, STEP)
    recovered = against_scorer.correct - SIZE / 2
    print(
        f"\n{attack.__name__}: {submissions} submissions; exact score: "
        f"{against_naive.correct}/{SIZE} labels right; scorer: {against_scorer.correct}/{SIZE} "
        f"right ({recovered:+.0f} over chance, {against_scorer.claimed} claimed), "
        f"bound {bound:.1f} over chance"
    )
    # Every submission reached the scorer and was scored: the Ladder, not a refusal, held.
    assert len(scorer.statuses) == submissions
    assert "refused" not in scorer.statuses
    assert recovered <= bound
    # The control: the same attack reads essentially every label off an exact score.
    assert against_naive.correct >= 0.98 * SIZE
    assert against_naive.correct - SIZE / 2 > bound


async def test_refusing_probes_gives_flipped_answers_no_feedback(
    start_scorer: StartScorer,
) -> None:
    served = await scorer_for(start_scorer, "refuse")
    try:
        async with aiohttp.ClientSession() as http:
            scorer = ScorerUnderAttack(served.url, http)
            await scorer.register("refused")
            oracle = scorer.oracle("refused")
            base = [0] * SIZE
            await oracle(base)
            answers = [await oracle([1, *base[1:]]), await oracle([*base[:-1], 1])]
    finally:
        await served.stop()
    assert answers == [None, None]
    assert scorer.statuses == ["accepted", "refused", "refused"]


# Edge flips over many runs: 800 answers (400 public), a coarse step and a budget that keeps the
# task's feedback open for a few hundred submissions, so that runs with Ladders of their own
# would give away more than the bound admits.
MANY_SIZE = 800
MANY_TRUTH = random.Random(1812).choices([0, 1], k=MANY_SIZE)
MANY_STEP = 0.1
MANY_BUDGET = 0.28  # of the 400 public labels: 112; over n/4, so the config must allow it
MANY_SEED = "many-runs-split-seed"


async def edge_flips(oracle: Oracle, size: int) -> tuple[list[int], int]:
    """The guess, and the submissions it took. `oracle` may answer None (nothing released):
    the attacker then knows only that the score is not above the best released so far."""
    best = -1.0
    asked = 0

    async def ask(predictions: list[int]) -> float:
        nonlocal best, asked
        asked += 1
        score = await oracle(predictions)
        if score is None:
            return best
        best = max(best, score)
        return score

    rng = random.Random(4)
    while True:
        base = [rng.randrange(2) for _ in range(size)]

        def prefix_flipped(count: int, base: list[int] = base) -> list[int]:
            return [1 - a if i < count else a for i, a in enumerate(base)]

        low, high = 0, size
        scores = {low: await ask(base), high: await ask(prefix_flipped(size))}
        if scores[low] != scores[high]:
            break
    # Bisect to two neighbours that score differently: the higher one's public accuracy sits
    # exactly on a step, and one answer it has right, flipped, takes it a step down.
    while high - low > 1:
        middle = (low + high) // 2
        scores[middle] = await ask(prefix_flipped(middle))
        if scores[middle] != scores[low]:
            high = middle
        else:
            low = middle
    edge_at = low if scores[low] > scores[high] else high
    edge, on_step = prefix_flipped(edge_at), scores[edge_at]
    guess = list(edge)
    for position in range(size):
        flipped = list(edge)
        flipped[position] = 1 - edge[position]
        # Lower: the edge had it right. Not lower: it had it wrong (or the item is private).
        if await ask(flipped) >= on_step:
            guess[position] = flipped[position]
    return guess, asked


async def test_an_attack_over_hundreds_of_runs_recovers_no_more_than_the_tasks_bound(
    exact_score: Callable[[list[int]], Awaitable[Oracle]], start_scorer: StartScorer
) -> None:
    task = {
        "name": "secret",
        "labels": [0, 1],
        "baselines": {"weak": 0.5, "ceiling": 1.0},
        "feedback": {
            "step": MANY_STEP,
            "leakage_budget": MANY_BUDGET,
            "allow_vacuous_bound": True,
        },
        "probing": {"action": "flag"},
    }
    served = await start_scorer((task, MANY_TRUTH, MANY_SEED), key=KEY)
    runs = 0
    async with aiohttp.ClientSession() as http:
        scorer = ScorerUnderAttack(served.url, http)

        async def one_per_run(predictions: list[int]) -> float | None:
            nonlocal runs
            runs += 1
            await scorer.register(f"many-{runs}")
            return await scorer.oracle(f"many-{runs}")(predictions)

        guess, submissions = await edge_flips(one_per_run, MANY_SIZE)
        admin = {"Authorization": f"Bearer {ISSUER.mint_admin('test')}"}
        async with http.get(f"{served.url}/api/v1/tasks/secret", headers=admin) as response:
            stated = (await response.json())["feedback"]
    control, _ = await edge_flips(await exact_score(MANY_TRUTH), MANY_SIZE)

    public = sorted(split_positions(MANY_SEED, "secret", MANY_SIZE, 0.5))
    half = len(public) / 2

    def recovered(guess: list[int]) -> float:
        return sum(guess[i] == MANY_TRUTH[i] for i in public) - half

    print(
        f"\nedge flips: {submissions} submissions in {runs} runs; exact score: "
        f"{recovered(control):+.0f} public labels over chance; scorer: {recovered(guess):+.0f} "
        f"(stated bound {stated['bound']['labels']:.1f}, budget {stated['budget_labels']:.1f}, "
        f"{stated['counted_submissions']} submissions counted)"
    )
    assert runs == submissions >= 200
    # Every submission was within quota and scored (none refused): the task-wide Ladder and its
    # budget held, not a refusal.
    assert "refused" not in scorer.statuses
    assert recovered(guess) <= stated["bound"]["labels"]
    # The budget closed the task's feedback, and the bound stated froze within it.
    assert stated["closed"] is True
    assert stated["bound"]["labels"] <= stated["budget_labels"]
    # The control: the same attack reads every label off an exact score.
    assert sum(g == t for g, t in zip(control, MANY_TRUTH, strict=True)) == MANY_SIZE
    assert recovered(control) > stated["bound"]["labels"]
