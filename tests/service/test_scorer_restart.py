"""A restarted scorer, even one killed without warning, keeps every submission, the review
state, the task's Ladder, its leakage account, the probe history and the quota already used."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_env import call_json

from aar_common.credentials import CredentialIssuer, generate_signing_key, public_key_pem
from aar_scorer.tasks import write_task_files

KEY = generate_signing_key()
ISSUER = CredentialIssuer(KEY)
SIZE = 500
TRUTH = random.Random(11).choices(["yes", "no"], k=SIZE)
ADMIN = {"Authorization": f"Bearer {ISSUER.mint_admin('reviewer')}"}
AGENT = {"Authorization": f"Bearer {ISSUER.mint_agent('lab', 'run-r', 'run-r-1')}"}


class Process:
    """`aar-scorer` as the container runs it, on a port of its own."""

    def __init__(self, tmp_path: Path, port: int) -> None:
        task = {
            "name": "restart",
            "labels": ["yes", "no"],
            "baselines": {"weak": 0.55, "ceiling": 0.95},
            "quota": {"per_agent": 10, "per_run": 10},
            # Admits four scored submissions' answers (the bound for five is over 0.235 * 250).
            "feedback": {"step": 0.02, "leakage_budget": 0.235},
        }
        key = tmp_path / "public-key.pem"
        key.write_bytes(public_key_pem(KEY))
        tasks = write_task_files(tmp_path / "tasks", [(task, TRUTH, "restart-test-seed")])
        self.command = [
            str(Path(sys.executable).parent / "aar-scorer"),
            *("--tasks", str(tasks), "--data-dir", str(tmp_path / "data")),
            *("--public-key", str(key)),
            *("--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"),
        ]
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.startswith("Serving restart on "), line

    def stop(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)
        self.process.wait(timeout=30)

    def call(self, method: str, path: str, headers: dict[str, str], body: Any = None) -> Any:
        return call_json(method, self.url + path, headers, body)


@pytest.fixture
def scorer(tmp_path: Path, unused_tcp_port: int) -> Iterator[Process]:
    process = Process(tmp_path, unused_tcp_port)
    process.start()
    yield process
    if process.process is not None and process.process.poll() is None:
        process.stop(signal.SIGTERM)


def answers(correct: int, seed: int) -> list[str]:
    right = set(random.Random(seed).sample(range(SIZE), correct))
    return [t if i in right else ("no" if t == "yes" else "yes") for i, t in enumerate(TRUTH)]


def submit(scorer: Process, predictions: list[str]) -> dict[str, Any]:
    body = {"task": "restart", "predictions": predictions, "method": "m", "artifact": None}
    answer: dict[str, Any] = scorer.call("POST", "/api/v1/submissions", AGENT, body)
    return answer


def test_a_killed_scorer_loses_nothing(scorer: Process) -> None:
    scorer.call("PUT", "/api/v1/runs/lab/run-r", ADMIN, {"task": "restart"})
    good, better, other = answers(400, 1), answers(450, 2), answers(300, 3)
    first = submit(scorer, good)
    second = submit(scorer, better)
    third = submit(scorer, other)
    assert second["feedback"]["released"]
    scorer.call(
        "POST", f"/api/v1/review/{second['id']}", ADMIN, {"decision": "approve", "comment": "ok"}
    )
    scorer.call(
        "POST", f"/api/v1/review/{first['id']}", ADMIN, {"decision": "reject", "comment": "no"}
    )
    before = {
        "board": scorer.call("GET", "/api/v1/leaderboard?run=lab/run-r", ADMIN),
        "public": scorer.call("GET", "/api/v1/leaderboard", AGENT),
        "best": scorer.call("GET", "/api/v1/runs/lab/run-r/best", ADMIN),
        "detail": scorer.call("GET", f"/api/v1/submissions/{first['id']}", ADMIN),
        "task": scorer.call("GET", "/api/v1/tasks/restart", AGENT),
    }
    assert before["task"]["feedback"]["counted_submissions"] == 3

    scorer.stop(signal.SIGKILL)  # no chance to flush anything
    time.sleep(0.1)
    scorer.start()

    assert scorer.call("GET", "/api/v1/leaderboard?run=lab/run-r", ADMIN) == before["board"]
    assert scorer.call("GET", "/api/v1/leaderboard", AGENT) == before["public"]
    assert scorer.call("GET", "/api/v1/runs/lab/run-r/best", ADMIN) == before["best"]
    assert scorer.call("GET", f"/api/v1/submissions/{first['id']}", ADMIN) == before["detail"]
    assert scorer.call("GET", "/api/v1/tasks/restart", AGENT) == before["task"]
    assert before["best"]["submission"] == second["id"]
    assert [entry["id"] for entry in before["board"]["submissions"]] == [
        second["id"],
        first["id"],
        third["id"],
    ]
    # The probe history survived: one flipped answer of a pre-restart submission is refused.
    flipped = ["no" if better[0] == "yes" else "yes", *better[1:]]
    probe = submit(scorer, flipped)
    assert probe["status"] == "refused"
    assert probe["id"] == third["id"] + 1
    # The Ladder's best survived: an answer no better than the best releases nothing.
    assert submit(scorer, answers(420, 4))["feedback"]["released"] is False
    # The leakage account survived: that was the fourth and last answer the budget admits.
    last = submit(scorer, answers(480, 5))
    assert last["feedback"]["released"] is False
    assert last["feedback"]["message"].startswith("feedback for task restart is closed")
    # The quota used before the restart still counts: 6 of 10 used now.
    assert last["quota"]["remaining"] == 4
