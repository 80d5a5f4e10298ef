"""The service tier's fixtures: each service once, started as a test needs it.

- the Messages-API stand-in on a loopback port: `start_stub` (and, for the agent's tests,
  `served_stub`/`stub` taking the agent's credential, `upstream_stub` taking only the real key);
- the forum, its aiohttp application on a loopback port over a fresh data directory:
  `start_forum`, `forum` (forum_harness.Forum);
- the scorer, its application on a loopback port over a real SQLite file, served through its
  intake as `aar-scorer` serves it: `start_scorer` (scorer_harness.ServedScorer);
- the gateway in this process: gateway_harness.Gateway, which its tests start, restart on the
  same directory and stop themselves;
- the agent's sandbox: a temporary workspace and task bundle and the environment the operator
  gives a sandbox (`sandbox_env`, `make_settings`);
- the real forum, scorer and gateway as their own processes (`aar-forum`, `aar-scorer`,
  `aar-gateway`), for the agent to talk to: `services`, `gateway`.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from agent_env import (
    AGENT,
    CREDENTIAL,
    NAMESPACE,
    REAL_API_KEY,
    RUN,
    TASK_LABELS,
    TASK_TRUTH,
    Service,
)
from agent_env import SIGNING_KEY as AGENT_SIGNING_KEY
from aiohttp import web
from forum_harness import SIGNING_KEY as FORUM_SIGNING_KEY
from forum_harness import Forum
from scorer_harness import ScorerTask, ServedScorer, StartScorer, serve_scorer

from aar_agent.config import Settings, settings_from_env
from aar_common.credentials import public_key_pem
from aar_common.web import REGISTRY_KEY, metrics_app
from aar_devcluster.anthropic_stub import AnthropicStub, serving
from aar_forum.app import build_app as build_forum
from aar_forum.settings import Settings as ForumSettings
from aar_scorer.tasks import write_task_files

# The Messages-API stand-in.


@pytest.fixture
async def start_stub() -> AsyncIterator[Callable[..., Any]]:
    """Start the stand-in (AnthropicStub's arguments: `api_key`, `researcher`, ...) on a
    loopback port; several may run, each stopped at the end of the test. Returns the stand-in
    and its URL."""
    async with contextlib.AsyncExitStack() as running:

        async def start(**options: Any) -> tuple[AnthropicStub, str]:
            server = AnthropicStub(**options)
            url = await running.enter_async_context(serving(server))
            return server, url

        yield start


@pytest.fixture
async def served_stub(start_stub: Callable[..., Any]) -> tuple[AnthropicStub, str]:
    """The stand-in as the agent's gateway: it takes the agent's own credential."""
    served: tuple[AnthropicStub, str] = await start_stub(api_key=CREDENTIAL)
    return served


@pytest.fixture
def stub(served_stub: tuple[AnthropicStub, str]) -> AnthropicStub:
    return served_stub[0]


@pytest.fixture
async def upstream_stub(start_stub: Callable[..., Any]) -> tuple[AnthropicStub, str]:
    """The stand-in as the gateway's upstream: it takes only the real key, never an agent's."""
    served: tuple[AnthropicStub, str] = await start_stub(api_key=REAL_API_KEY)
    return served


# The forum, in this process.


@pytest.fixture(scope="session")
def public_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The public key of forum_harness's credentials, as a file."""
    path = tmp_path_factory.mktemp("keys") / "public-key.pem"
    path.write_bytes(public_key_pem(FORUM_SIGNING_KEY))
    return path


@pytest.fixture
async def start_forum(
    tmp_path: Path, public_key_file: Path, unused_tcp_port_factory: Callable[[], int]
) -> AsyncIterator[Callable[..., Any]]:
    """Start a forum (several may run; each is stopped at the end of the test)."""
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(data_dir: Path | None = None, **overrides: Any) -> Forum:
        settings = ForumSettings(
            data_dir=data_dir or tmp_path / "data", public_key_file=public_key_file, **overrides
        )
        app = build_forum(settings)
        runner = web.AppRunner(app)
        await runner.setup()
        port = unused_tcp_port_factory()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        exporter = web.AppRunner(metrics_app(app[REGISTRY_KEY]))
        await exporter.setup()
        metrics_port = unused_tcp_port_factory()
        await web.TCPSite(exporter, "127.0.0.1", metrics_port).start()
        runners.append(exporter)
        http = aiohttp.ClientSession()
        sessions.append(http)
        return Forum(
            f"http://127.0.0.1:{port}",
            settings,
            http,
            app,
            runner,
            f"http://127.0.0.1:{metrics_port}",
        )

    yield start
    for session in sessions:
        await session.close()
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def forum(start_forum: Callable[..., Any]) -> Forum:
    result: Forum = await start_forum()
    return result


# The scorer, in this process.


@pytest.fixture
async def start_scorer(tmp_path: Path) -> AsyncIterator[StartScorer]:
    """Start a scorer (several may run; each is stopped at the end of the test) holding `task`,
    accepting credentials signed with `key`, its task files and database under `directory`
    (tasks/, data/scorer.db; default the test's tmp_path), on a free loopback port; `clock`
    and `workers` (intake worker processes) are build_app's."""
    started: list[ServedScorer] = []

    async def start(
        task: ScorerTask | list[ScorerTask],
        *,
        key: bytes,
        directory: Path | None = None,
        clock: Callable[[], float] = time.time,
        workers: int = 0,
    ) -> ServedScorer:
        served = await serve_scorer(directory or tmp_path, task, key, clock, workers)
        started.append(served)
        return served

    yield start
    for served in started:
        await served.stop()


# The agent's sandbox.


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    task = tmp_path / "task"
    task.mkdir()
    (task / "README.md").write_text("# w2s-chat\nPredict which of two replies people preferred.\n")
    return task


@pytest.fixture
def sandbox_env(
    served_stub: tuple[AnthropicStub, str], tmp_path: Path, task_dir: Path
) -> dict[str, str]:
    """The environment the operator gives a sandbox, pointing at this test's stand-ins."""
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    return {
        "AAR_NAMESPACE": NAMESPACE,
        "AAR_RUN": RUN,
        "AAR_AGENT": AGENT,
        "AAR_DIRECTION": "data reweighting",
        "AAR_TASK": "w2s-chat",
        "AAR_TASK_DIR": str(task_dir),
        "AAR_WORKSPACE": str(workspace),
        "AAR_CREDENTIAL": CREDENTIAL,
        "ANTHROPIC_API_KEY": CREDENTIAL,
        "ANTHROPIC_BASE_URL": served_stub[1],
        "AAR_METRICS_PORT": "0",
    }


@pytest.fixture
def make_settings(sandbox_env: dict[str, str]) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return settings_from_env(sandbox_env).model_copy(update=overrides)

    return make


# The services as their own processes, for the agent.


def _serve(command: list[str], ready: str, port: int, metrics_port: int) -> Service:
    """Start a service, its /metrics on `metrics_port`, and wait for the line (on stdout or
    stderr) saying it listens; the rest of its output is drained so a chatty log can never fill
    the pipe and stall it."""
    command = [*command, "--metrics-port", str(metrics_port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if ready in line:
            break
    else:
        raise AssertionError(f"{command[0]} exited before it served: {''.join(seen)}")
    threading.Thread(target=process.stdout.read, daemon=True).start()
    return Service(f"http://127.0.0.1:{port}", process, f"http://127.0.0.1:{metrics_port}")


@pytest.fixture
def scorer_task() -> ScorerTask:
    """The task the scorer holds for this run: its spec, hidden labels and split seed (a module
    overrides this fixture to score a real bundle's test split)."""
    task = {
        "name": "w2s-chat",
        "labels": TASK_LABELS,
        "baselines": {"weak": 0.6, "ceiling": 0.9},
        # A small task: the default leakage budget would close its feedback before the first
        # submission; these tests need released scores.
        "feedback": {"step": 0.01, "leakage_budget": None, "allow_vacuous_bound": True},
    }
    return task, TASK_TRUTH, "x" * 16


@pytest.fixture
def services(
    tmp_path: Path,
    unused_tcp_port_factory: Callable[[], int],
    scorer_task: ScorerTask,
) -> Iterator[tuple[Service, Service]]:
    """The real forum and scorer (`aar-forum`, `aar-scorer`), each its own process, with this
    run registered at the scorer for a task whose labels only the scorer holds."""
    key = tmp_path / "public-key.pem"
    key.write_bytes(public_key_pem(AGENT_SIGNING_KEY))
    bin_dir = Path(sys.executable).parent
    forum_port, scorer_port = unused_tcp_port_factory(), unused_tcp_port_factory()
    forum = _serve(
        [
            str(bin_dir / "aar-forum"),
            *("--host", "127.0.0.1", "--port", str(forum_port)),
            *("--data-dir", str(tmp_path / "forum"), "--public-key-file", str(key)),
        ],
        "aar-forum listening",
        forum_port,
        unused_tcp_port_factory(),
    )
    tasks_file = write_task_files(tmp_path / "scorer-tasks", [scorer_task])
    task = scorer_task[0]
    scorer = _serve(
        [
            str(bin_dir / "aar-scorer"),
            *("--host", "127.0.0.1", "--port", str(scorer_port)),
            *("--tasks", str(tasks_file), "--data-dir", str(tmp_path / "scorer")),
            *("--public-key", str(key)),
        ],
        f"Serving {task['name']}",
        scorer_port,
        unused_tcp_port_factory(),
    )
    scorer.call("PUT", f"/api/v1/runs/{NAMESPACE}/{RUN}", {"task": task["name"]})
    yield forum, scorer
    for service in (forum, scorer):
        stop(service)


def stop(service: Service) -> None:
    service.process.terminate()
    service.process.wait(timeout=30)


@pytest.fixture
def gateway(
    tmp_path: Path,
    upstream_stub: tuple[AnthropicStub, str],
    unused_tcp_port_factory: Callable[[], int],
) -> Iterator[Service]:
    """The real gateway (`aar-gateway`) in front of the stand-in, holding the real key."""
    key, api_key = tmp_path / "gateway-public-key.pem", tmp_path / "anthropic-api-key"
    key.write_bytes(public_key_pem(AGENT_SIGNING_KEY))
    api_key.write_text(REAL_API_KEY)
    port = unused_tcp_port_factory()
    service = _serve(
        [
            str(Path(sys.executable).parent / "aar-gateway"),
            *("--host", "127.0.0.1", "--port", str(port), "--upstream", upstream_stub[1]),
            *("--api-key-file", str(api_key), "--public-key-file", str(key)),
            *("--data-dir", str(tmp_path / "gateway")),
        ],
        "Serving the gateway on",
        port,
        unused_tcp_port_factory(),
    )
    yield service
    stop(service)
