"""Submissions parsed in intake worker processes (aar_scorer.intake), over real HTTP: the same
answers as parsing on the event loop, and a worker that dies costs a retry, never a submission."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from aar_common.credentials import (
    CredentialIssuer,
    CredentialVerifier,
    generate_signing_key,
    public_key_pem,
)
from aar_common.ports import free_port
from aar_scorer.intake import IntakeError
from aar_scorer.main import main as scorer_main
from aar_scorer.service import SCORER_KEY, build_app
from aar_scorer.store import Store
from aar_scorer.tasks import load_tasks, write_task_files

KEY = generate_signing_key()
ISSUER = CredentialIssuer(KEY)
ADMIN = {"Authorization": f"Bearer {ISSUER.mint_admin('reviewer')}"}
SIZE = 300
TRUTH = random.Random(3).choices(["a", "b", "c"], k=SIZE)
TASK = {
    "name": "intake",
    "labels": ["a", "b", "c"],
    "baselines": {"weak": 0.4, "ceiling": 0.9},
    "quota": {"per_agent": 1000, "per_run": 1000},
    "probing": {"min_distance": 3, "walk_distance": 3, "walk_length": 50},
}


class Server:
    def __init__(self, url: str, http: aiohttp.ClientSession, app: web.Application) -> None:
        self.url, self.http, self.app = url, http, app

    async def post(self, headers: dict[str, str], body: Any) -> tuple[int, Any, dict[str, str]]:
        async with self.http.post(
            self.url + "/api/v1/submissions", json=body, headers=headers
        ) as response:
            return response.status, await response.json(), dict(response.headers)

    async def metrics(self) -> str:
        async with self.http.get(self.url + "/metrics") as response:
            return await response.text()


async def serve(tmp_path: Path, port: int, workers: int) -> tuple[web.AppRunner, Store]:
    tasks = load_tasks(write_task_files(tmp_path / "tasks", [(TASK, TRUTH, "intake-test-seed")]))
    store = Store(tmp_path / "data" / "scorer.db")
    app = build_app(
        tasks, store, CredentialVerifier(public_key_pem(KEY)), lambda: 1_800_000_000.0, workers
    )
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, store


@pytest.fixture
async def servers(tmp_path: Path) -> AsyncIterator[dict[int, Server]]:
    """The same scorer twice, on stores of their own: parsing on the event loop (0 workers) and
    in one worker process (1)."""
    started = []
    async with aiohttp.ClientSession() as http:
        servers = {}
        for workers in (0, 1):
            port = free_port()
            runner, store = await serve(tmp_path / f"workers-{workers}", port, workers)
            started.append((runner, store))
            servers[workers] = Server(f"http://127.0.0.1:{port}", http, runner.app)
            async with http.put(
                f"http://127.0.0.1:{port}/api/v1/runs/lab/run-i",
                json={"task": "intake", "review_required": False},
                headers=ADMIN,
            ) as response:
                assert response.status == 200
        yield servers
    for runner, store in started:
        await runner.cleanup()
        store.close()


def agent(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {ISSUER.mint_agent('lab', 'run-i', name)}"}


def answers(seed: int) -> list[str]:
    return random.Random(seed).choices(["a", "b", "c"], k=SIZE)


def changed(predictions: list[str], positions: range) -> list[str]:
    following = {"a": "b", "b": "c", "c": "a"}
    return [following[p] if i in positions else p for i, p in enumerate(predictions)]


def intake_workers() -> list[int]:
    """Process ids of this process's children that are intake workers."""
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"aar_scorer.intake" in cmdline:
                pids.append(int(child))
    return pids


BODIES: list[Any] = [
    {"task": "intake", "predictions": answers(1), "method": "m", "artifact": None},
    {"task": "intake", "predictions": answers(2), "method": "m", "artifact": "sha256:" + "0" * 64},
    {"task": "nope", "predictions": answers(3), "method": "m"},
    {"task": "intake", "predictions": answers(4)[:-1], "method": "m"},
    {"task": "intake", "predictions": [*answers(5)[:-1], "d"], "method": "m"},
    {"task": "intake", "predictions": [*answers(6)[:-1], 1], "method": "m"},
    {"task": "intake", "predictions": answers(7), "method": ""},
    {"task": "intake", "predictions": answers(8), "method": "m", "extra": 1},
    {"task": "intake", "predictions": [], "method": "m"},
    ["not", "an", "object"],
    # Two answers changed from the first: a near duplicate, refused.
    {"task": "intake", "predictions": changed(answers(1), range(2)), "method": "m"},
]


async def test_workers_answer_exactly_as_the_event_loop_does(servers: dict[int, Server]) -> None:
    for body in BODIES:
        inline = await servers[0].post(agent("i1"), body)
        worker = await servers[1].post(agent("i1"), body)
        assert worker[:2] == inline[:2], body
    # Both rounds stored the same: two accepted, one refused.
    for server in servers.values():
        text = await server.metrics()
        assert 'aar_scorer_submissions_total{result="accepted"} 2.0' in text
        assert 'aar_scorer_submissions_total{result="refused"} 1.0' in text
        assert 'aar_scorer_submissions_total{result="invalid"} 8.0' in text


async def test_many_submissions_at_once_through_one_worker(servers: dict[int, Server]) -> None:
    # Frames arrive in the worker several to a read and split across reads.
    bodies = [
        {"task": "intake", "predictions": answers(100 + n), "method": f"m{n}"} for n in range(60)
    ]
    results = await asyncio.gather(
        *(servers[1].post(agent(f"a{n}"), b) for n, b in enumerate(bodies))
    )
    assert [status for status, _, _ in results] == [200] * 60
    assert sorted(answer["id"] for _, answer, _ in results) == list(range(1, 61))
    scorer = servers[1].app[SCORER_KEY]
    for _, answer, _ in results:
        row = scorer.store.reader.execute(
            "SELECT method FROM submissions WHERE id = ?", (answer["id"],)
        ).fetchone()
        assert row["method"] in {b["method"] for b in bodies}


async def test_a_worker_that_dies_costs_a_retry_not_a_submission(
    servers: dict[int, Server],
) -> None:
    server = servers[1]
    [pid] = intake_workers()
    body = {"task": "intake", "predictions": answers(50), "method": "m"}
    # Frozen, the worker holds the submission; killed, it never answers it.
    os.kill(pid, signal.SIGSTOP)
    held = asyncio.ensure_future(server.post(agent("i1"), body))
    scorer = server.app[SCORER_KEY]
    for _ in range(200):
        if scorer.intake.pending():
            break
        await asyncio.sleep(0.01)
    assert scorer.intake.pending() == 1
    os.kill(pid, signal.SIGKILL)
    status, answer, headers = await held
    assert status == 503
    assert "send it again" in answer["error"]["message"]
    assert headers["Retry-After"] == "1"
    count = scorer.store.reader.execute("SELECT COUNT(*) FROM submissions").fetchone()[0]
    assert count == 0
    # A new worker takes over: the same submission, sent again, is scored.
    status, answer, _ = await server.post(agent("i1"), body)
    assert status == 200, answer
    assert answer["status"] == "accepted"
    [replacement] = intake_workers()
    assert replacement != pid
    assert "aar_scorer_intake_restarts_total 1.0" in await server.metrics()


async def test_a_stuck_worker_is_replaced(servers: dict[int, Server]) -> None:
    server = servers[1]
    scorer = server.app[SCORER_KEY]
    scorer.intake.answer_timeout = 0.5
    [pid] = intake_workers()
    os.kill(pid, signal.SIGSTOP)  # alive, and never answering
    body = {"task": "intake", "predictions": answers(60), "method": "m"}
    status, answer, _ = await server.post(agent("i1"), body)
    assert status == 503
    assert "did not answer within 0.5 s; nothing was stored" in answer["error"]["message"]
    status, answer, _ = await server.post(agent("i1"), body)
    assert status == 200, answer
    assert intake_workers() != [pid]


async def test_workers_stop_with_the_scorer(tmp_path: Path) -> None:
    runner, store = await serve(tmp_path, free_port(), workers=2)
    pids = intake_workers()
    assert len(pids) == 2
    await runner.cleanup()
    store.close()
    assert intake_workers() == []
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)  # noqa: ASYNC240


async def test_a_worker_that_cannot_start_stops_the_scorer_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An interpreter that exits at once, as a broken installation would.
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(IntakeError, match=r"did not start .*pass --intake-workers 0"):
        await serve(tmp_path, free_port(), workers=1)
    assert intake_workers() == []


def test_a_negative_worker_count_is_refused_with_how_to_fix_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        scorer_main(["--intake-workers", "-1"])
    assert "--intake-workers: -1 is not a worker count; pass 0 or more" in capsys.readouterr().err
