"""Submissions received in intake worker processes (aar_scorer.intake), over real HTTP: the same
answers as receiving them in the deciding process, every other request passed through unchanged,
and a worker that dies or stops costs at most a retry, never a submission."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import random
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from agent_env import scrape
from aiohttp import web
from scorer_harness import ServedScorer, StartScorer

from aar_common.api import RunRegistration
from aar_common.credentials import (
    CredentialIssuer,
    generate_signing_key,
    public_key_pem,
)
from aar_common.ports import free_port
from aar_common.web import listen
from aar_scorer.app import SCORER_KEY
from aar_scorer.intake import IntakeError
from aar_scorer.main import main as scorer_main
from aar_scorer.tasks import write_task_files

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
    def __init__(
        self, url: str, http: aiohttp.ClientSession, app: web.Application, metrics_url: str
    ) -> None:
        self.url, self.http, self.app, self.metrics_url = url, http, app, metrics_url

    async def post(self, headers: dict[str, str], body: Any) -> tuple[int, Any, dict[str, str]]:
        async with self.http.post(
            self.url + "/api/v1/submissions", json=body, headers=headers
        ) as response:
            return response.status, await response.json(), dict(response.headers)

    async def metrics(self) -> str:
        async with self.http.get(self.metrics_url + "/metrics") as response:
            return await response.text()


async def serve(
    start_scorer: StartScorer, workers: int, directory: Path | None = None
) -> ServedScorer:
    return await start_scorer(
        (TASK, TRUTH, "intake-test-seed"),
        key=KEY,
        directory=directory,
        clock=lambda: 1_800_000_000.0,
        workers=workers,
    )


@pytest.fixture
async def servers(tmp_path: Path, start_scorer: StartScorer) -> AsyncIterator[dict[int, Server]]:
    """The same scorer twice, on stores of their own: receiving submissions in the deciding
    process (0 workers) and in one worker process (1)."""
    async with aiohttp.ClientSession() as http:
        servers = {}
        for workers in (0, 1):
            served = await serve(start_scorer, workers, tmp_path / f"workers-{workers}")
            servers[workers] = Server(served.url, http, served.runner.app, served.metrics_url)
            async with http.put(
                f"{served.url}/api/v1/runs/lab/run-i",
                json={"task": "intake", "review_required": False},
                headers=ADMIN,
            ) as response:
                assert response.status == 200
        yield servers


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


async def test_workers_answer_exactly_as_the_deciding_process_does(
    servers: dict[int, Server],
) -> None:
    for headers in ({}, ADMIN, {"Authorization": "Bearer nonsense"}):
        inline = await servers[0].post(headers, BODIES[0])
        worker = await servers[1].post(headers, BODIES[0])
        assert worker[:2] == inline[:2], headers
    for body in BODIES:
        inline = await servers[0].post(agent("i1"), body)
        worker = await servers[1].post(agent("i1"), body)
        assert worker[:2] == inline[:2], body
        assert worker[2]["Content-Type"] == inline[2]["Content-Type"]
    # Both rounds stored the same: two accepted, one refused.
    for server in servers.values():
        text = await server.metrics()
        assert 'aar_scorer_submissions_total{result="accepted"} 2.0' in text
        assert 'aar_scorer_submissions_total{result="refused"} 1.0' in text
        assert 'aar_scorer_submissions_total{result="invalid"} 11.0' in text
        assert "aar_scorer_scoring_seconds_count 3.0" in text


async def test_a_body_too_large_is_refused_alike(servers: dict[int, Server]) -> None:
    body = {"task": "intake", "predictions": answers(9), "method": "m" * 2_000_000}
    inline = await servers[0].post(agent("i1"), body)
    worker = await servers[1].post(agent("i1"), body)
    assert worker[:2] == inline[:2]
    assert worker[0] == 413
    assert "send a smaller body" in worker[1]["error"]["message"]


async def test_every_other_request_is_passed_through_unchanged(
    servers: dict[int, Server],
) -> None:
    await servers[0].post(agent("i1"), BODIES[0])
    await servers[1].post(agent("i1"), BODIES[0])
    requests: list[tuple[str, str, dict[str, str], Any]] = [
        ("GET", "/api/v1/tasks/intake", agent("i1"), None),
        ("GET", "/api/v1/tasks/nope", agent("i1"), None),
        ("GET", "/api/v1/leaderboard", agent("i1"), None),
        ("GET", "/api/v1/leaderboard?run=lab/run-i", ADMIN, None),
        ("GET", "/api/v1/review?run=lab/run-i", ADMIN, None),
        ("GET", "/api/v1/review", agent("i1"), None),
        ("GET", "/api/v1/submissions/1", ADMIN, None),
        ("POST", "/api/v1/review/1", ADMIN, {"decision": "maybe", "comment": "x"}),
        ("POST", "/api/v1/review/1", ADMIN, {"decision": "approve", "comment": "checked"}),
        ("PUT", "/api/v1/runs/lab/run-j", ADMIN, {"task": "intake"}),
        ("GET", "/api/v1/nowhere", ADMIN, None),
        ("DELETE", "/api/v1/submissions", ADMIN, None),
        ("GET", "/healthz", {}, None),
    ]
    for method, path, headers, body in requests:
        answers_ = []
        for server in servers.values():
            async with server.http.request(
                method, server.url + path, headers=headers, json=body
            ) as response:
                text = await response.text()
                answers_.append((response.status, response.content_type, text))
        inline, worker = answers_
        assert worker[:2] == inline[:2], path
        if inline[1] == "application/json":
            # Review records carry the time they were made; everything else is the same.
            bodies = [json.loads(inline[2]), json.loads(worker[2])]
            for body_ in bodies:
                for review in body_.get("reviews", []):
                    review.pop("created_at")
            assert bodies[1] == bodies[0], path
        else:
            assert worker[2] == inline[2], path
    metrics = await servers[1].metrics()
    assert 'aar_scorer_submissions_total{result="accepted"} 1.0' in metrics


async def test_many_submissions_at_once_through_one_worker(servers: dict[int, Server]) -> None:
    # Frames arrive several to a read and split across reads, both ways.
    bodies = [
        {"task": "intake", "predictions": answers(100 + n), "method": f"m{n}"} for n in range(60)
    ]
    results = await asyncio.gather(
        *(servers[1].post(agent(f"a{n}"), b) for n, b in enumerate(bodies))
    )
    assert [status for status, _, _ in results] == [200] * 60
    assert sorted(answer["id"] for _, answer, _ in results) == list(range(1, 61))
    scorer = servers[1].app[SCORER_KEY]
    for n, (_, answer, _) in enumerate(results):
        row = scorer.store.reader.execute(
            "SELECT method, agent FROM submissions WHERE id = ?", (answer["id"],)
        ).fetchone()
        # Each answer is the one to its own request.
        assert (row["method"], row["agent"]) == (f"m{n}", f"a{n}")


async def raw_post(port: int, body: Any, connection: Any = None) -> tuple[Any, Any]:
    """Send a submission on a connection of its own (or the one given), written by hand so the
    test knows which connection holds it; returns the connection and a future of the answer's
    status and body."""
    reader, writer = connection or await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    writer.write(
        (
            f"POST /api/v1/submissions HTTP/1.1\r\nHost: scorer\r\n"
            f"Authorization: Bearer {ISSUER.mint_agent('lab', 'run-i', 'i1')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode()
        + payload
    )
    await writer.drain()

    async def status_and_body() -> tuple[int, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        return int(head[9:12]), await reader.readexactly(length)

    return (reader, writer), asyncio.ensure_future(status_and_body())


def stored(server: Server) -> int:
    return stored_in(server.app[SCORER_KEY])


async def test_a_worker_that_dies_costs_a_retry_not_a_submission(
    servers: dict[int, Server],
) -> None:
    server = servers[1]
    port = int(server.url.rsplit(":", 1)[1])
    [pid] = intake_workers()
    # A connection the worker has accepted and served once.
    connection, answer = await raw_post(port, BODIES[0])
    assert (await answer)[0] == 200
    os.kill(pid, signal.SIGSTOP)
    # Frozen, the worker holds the next submission on that connection, and a new connection
    # waits, not yet accepted, on the listening socket the worker shares with the scorer.
    _, held = await raw_post(port, {**BODIES[0], "predictions": answers(50)}, connection)
    _, queued = await raw_post(port, {**BODIES[0], "predictions": answers(51)})
    await asyncio.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    # The held one's connection is gone with the worker, and nothing of it was stored.
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await held
    # The queued one is accepted and scored by the worker that took over.
    status, _ = await queued
    assert status == 200
    assert stored(server) == 2
    [replacement] = intake_workers()
    assert replacement != pid
    # Sent again, the held one is scored.
    _, answer = await raw_post(port, {**BODIES[0], "predictions": answers(50)})
    assert (await answer)[0] == 200
    assert stored(server) == 3
    assert "aar_scorer_intake_restarts_total 1.0" in await server.metrics()


async def test_a_stuck_worker_is_replaced(servers: dict[int, Server]) -> None:
    server = servers[1]
    server.app[SCORER_KEY].intake.silence_timeout = 0.5
    [pid] = intake_workers()
    os.kill(pid, signal.SIGSTOP)  # alive, and never answering a ping
    for _ in range(100):
        if intake_workers() not in ([pid], []):
            break
        await asyncio.sleep(0.05)
    assert intake_workers() not in ([pid], [])
    status, answer, _ = await server.post(agent("i1"), BODIES[0])
    assert status == 200, answer


@pytest.mark.parametrize("end", ["worker", "scorer"])
async def test_a_malformed_frame_costs_the_worker_not_the_scorer(
    servers: dict[int, Server], end: str
) -> None:
    server = servers[1]
    scorer = server.app[SCORER_KEY]
    [pid] = intake_workers()
    [worker] = scorer.intake._running
    # A pickled submission: no frame of either end's, refused without being unpickled.
    pickled = pickle.dumps({"task": "intake"}, protocol=pickle.HIGHEST_PROTOCOL)
    if end == "worker":
        worker.write(pickled)  # the worker closes its socket and exits
    else:
        worker.data_received(pickled)  # the scorer kills the worker
    for _ in range(200):
        running = scorer.intake._running
        if intake_workers() not in ([pid], []) and running and running[0].ready.done():
            break
        await asyncio.sleep(0.05)
    assert intake_workers() not in ([pid], [])
    status, answer, _ = await server.post(agent("i1"), BODIES[0])
    assert status == 200, answer
    assert "aar_scorer_intake_restarts_total 1.0" in await server.metrics()


class HeldDecisions:
    """Holds each of the scorer's decisions until `release` is set, so that a test can act while
    a worker waits for one; `deciding` is set once one is held."""

    def __init__(self, scorer: Any) -> None:
        self.deciding, self.release = asyncio.Event(), asyncio.Event()
        self._scorer, self._submit = scorer, scorer.submit
        scorer.submit = self._held

    async def _held(self, *args: Any) -> Any:
        self.deciding.set()
        await self.release.wait()
        return await self._submit(*args)

    def restore(self) -> None:
        self._scorer.submit = self._submit


async def test_a_stopping_scorer_answers_what_its_workers_hold(start_scorer: StartScorer) -> None:
    served = await serve(start_scorer, workers=1)
    port = served.port
    scorer = served.runner.app[SCORER_KEY]
    await scorer.register("lab/run-i", RunRegistration(task="intake"), "reviewer")
    # The decision waits until the scorer has been told to stop.
    held = HeldDecisions(scorer)
    _, answer = await raw_post(port, BODIES[0])
    await asyncio.wait_for(held.deciding.wait(), 10)
    stopping = asyncio.ensure_future(served.stop())
    await asyncio.sleep(0.3)
    assert not stopping.done()  # waiting for the worker, which waits for its answer
    held.release.set()
    status, body = await answer
    assert status == 200, body
    await stopping
    assert intake_workers() == []


async def test_workers_stop_with_the_scorer(start_scorer: StartScorer) -> None:
    served = await serve(start_scorer, workers=2)
    pids = intake_workers()
    assert len(pids) == 2
    await served.stop()
    assert intake_workers() == []
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)  # noqa: ASYNC240


async def test_a_worker_that_cannot_start_stops_the_scorer_saying_so(
    start_scorer: StartScorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An interpreter that exits at once, as a broken installation would.
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(IntakeError, match=r"did not start .*pass --intake-workers 0"):
        await serve(start_scorer, workers=1)
    assert intake_workers() == []


def test_a_negative_worker_count_is_refused_with_how_to_fix_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        scorer_main(["--intake-workers", "-1"])
    assert "--intake-workers: -1 is not a worker count; pass 0 or more" in capsys.readouterr().err


def test_a_port_in_use_is_refused_with_how_to_fix_it(tmp_path: Path) -> None:
    key = tmp_path / "public-key.pem"
    key.write_bytes(public_key_pem(KEY))
    tasks = write_task_files(tmp_path / "tasks", [(TASK, TRUTH, "intake-test-seed")])
    with listen("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as refused:
            scorer_main(
                ["--tasks", str(tasks), "--data-dir", str(tmp_path / "data"),
                 "--public-key", str(key), "--host", "127.0.0.1", "--port", str(port)]
            )  # fmt: skip
    message = str(refused.value)
    assert f"cannot listen on 127.0.0.1:{port}" in message
    assert "pass another --port" in message


def children(pid: int) -> list[int]:
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


async def test_aar_scorer_serves_a_unix_socket_through_its_workers(tmp_path: Path) -> None:
    key = tmp_path / "public-key.pem"
    key.write_bytes(public_key_pem(KEY))
    tasks = write_task_files(tmp_path / "tasks", [(TASK, TRUTH, "intake-test-seed")])
    path = tmp_path / "scorer.sock"
    metrics_port = free_port()
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "aar-scorer"),
        "--tasks", str(tasks), "--data-dir", str(tmp_path / "data"), "--public-key", str(key),
        "--unix-socket", str(path), "--intake-workers", "2",
        "--host", "127.0.0.1", "--metrics-port", str(metrics_port),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 60)
        assert line.decode().strip() == f"Serving intake on http://unix:{path}:"
        workers = children(process.pid)
        assert len(workers) == 2
        connector = aiohttp.UnixConnector(path=str(path))
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.put(
                "http://scorer/api/v1/runs/lab/run-i", json={"task": "intake"}, headers=ADMIN
            ) as response:
                assert response.status == 200
            async with http.post(
                "http://scorer/api/v1/submissions", json=BODIES[0], headers=agent("i1")
            ) as response:
                assert response.status == 200
                assert (await response.json())["status"] == "accepted"
            # Passed on by a worker to the deciding process, which has no /metrics there ...
            async with http.get("http://scorer/metrics") as response:
                assert response.status == 404
        # ... but serves them itself on its metrics port, counting what the workers passed it.
        text = await scrape(f"http://127.0.0.1:{metrics_port}")
        assert 'aar_scorer_submissions_total{result="accepted"} 1.0' in text
        assert "aar_scorer_intake_restarts_total 0.0" in text
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
        # The workers went first, and the scorer waited for them.
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)  # noqa: ASYNC240
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_workers_die_with_a_killed_scorer_and_free_its_port(tmp_path: Path) -> None:
    key = tmp_path / "public-key.pem"
    key.write_bytes(public_key_pem(KEY))
    tasks = write_task_files(tmp_path / "tasks", [(TASK, TRUTH, "intake-test-seed")])
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "aar-scorer"),
        "--tasks", str(tasks), "--data-dir", str(tmp_path / "data"), "--public-key", str(key),
        "--host", "127.0.0.1", "--port", str(port), "--intake-workers", "2",
        "--metrics-port", "0",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    await asyncio.wait_for(process.stdout.readline(), 60)
    workers = children(process.pid)
    assert len(workers) == 2
    try:
        # One worker is stuck: it will never read the end of its socket to the scorer.
        os.kill(workers[0], signal.SIGSTOP)
        process.kill()
        for _ in range(100):
            if not any(Path(f"/proc/{pid}").exists() for pid in workers):  # noqa: ASYNC240
                break
            await asyncio.sleep(0.05)
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)  # noqa: ASYNC240
        # A scorer started again can listen on the port.
        listen("127.0.0.1", port).close()
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await asyncio.wait_for(process.wait(), 10)


async def test_a_submission_the_scorer_stopped_answering_is_said_to_be_maybe_stored(
    start_scorer: StartScorer,
) -> None:
    served = await serve(start_scorer, workers=1)
    port = served.port
    try:
        scorer = served.runner.app[SCORER_KEY]
        await scorer.register("lab/run-i", RunRegistration(task="intake"), "reviewer")
        held = HeldDecisions(scorer)
        _, answer = await raw_post(port, BODIES[0])
        await asyncio.wait_for(held.deciding.wait(), 10)
        # The worker's socket to the deciding process closes, as when that process dies.
        [worker] = scorer.intake._running
        worker.close()
        status, body = await answer
        assert status == 503
        assert "may have been stored" in json.loads(body)["error"]["message"]
        held.release.set()
        for _ in range(100):
            if stored_in(scorer) == 1:
                break
            await asyncio.sleep(0.02)
        # It was stored; sent again, it is a near duplicate, refused.
        held.restore()
        for _ in range(100):  # the worker that took over accepts connections
            if len(intake_workers()) == 1 and scorer.intake._running[0].ready.done():
                break
            await asyncio.sleep(0.05)
        _, answer = await raw_post(port, BODIES[0])
        status, body = await answer
        assert status == 200
        assert json.loads(body)["status"] == "refused"
        assert stored_in(scorer) == 2
    finally:
        await served.stop()


def stored_in(scorer: Any) -> int:
    return int(scorer.store.reader.execute("SELECT COUNT(*) FROM submissions").fetchone()[0])
