"""Label exfiltration, attempted through the real HTTP API within the configured quota.

Two attacks, each run against the scorer and against a naive endpoint that returns the exact
accuracy (the control, built here):
- flip one: submit a base, then the base with answer i flipped, for every i; the score moving
  up or down gives label i;
- subset decoding (adaptive): submit the current base with a random half of its answers
  flipped, so that no two submissions are near each other and probe detection sees nothing;
  every score is a linear equation in the hidden labels, solved by least squares at the end;
  the base moves to each submission whose score was a new best, so the attack climbs the Ladder
  as fast as it lets anyone climb.

The scorer's task flags probes instead of refusing them, so the Ladder alone stands between the
attacker and the labels. Its stated bound (aar_scorer.ladder.recovery_bound): with probability
at least 1 - 1e-6 over uniformly drawn labels, an attacker with k submissions gets at most
n/2 + sqrt(n * (log2 C(k + L, L) * ln 2 + ln 1e6) / 2) of n binary labels right, L = 1/step.
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
async def naive(unused_tcp_port_factory: Callable[[], int]) -> AsyncIterator[Oracle]:
    """The control: the exact accuracy on every hidden label, for every submission."""

    async def score(request: web.Request) -> web.Response:
        predictions = (await request.json())["predictions"]
        correct = sum(p == t for p, t in zip(predictions, TRUTH, strict=True))
        return json_response({"accuracy": correct / SIZE})

    app = make_app(CredentialVerifier(public_key_pem(KEY)), CollectorRegistry())
    app.router.add_post("/score", score)
    runner = web.AppRunner(app)
    await runner.setup()
    port = unused_tcp_port_factory()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    async with aiohttp.ClientSession() as http:

        async def oracle(predictions: list[int]) -> float | None:
            async with http.post(
                f"http://127.0.0.1:{port}/score", json={"predictions": predictions}
            ) as response:
                accuracy: float = (await response.json())["accuracy"]
                return accuracy

        yield oracle
    await runner.cleanup()


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
        "feedback": {"step": STEP},
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
