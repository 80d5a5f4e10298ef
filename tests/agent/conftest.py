"""The agent tier: the real loop, in-process and as the `aar-agent` process, against the local
Messages-API stand-in on a real port, with a temporary workspace and task bundle, and, where a
test needs them, the real forum and scorer as their own processes."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_env import (
    AGENT,
    CREDENTIAL,
    NAMESPACE,
    REAL_API_KEY,
    RUN,
    SIGNING_KEY,
    TASK_LABELS,
    TASK_TRUTH,
    Service,
)

from aar_agent.config import Settings, settings_from_env
from aar_common.credentials import public_key_pem
from aar_devcluster.anthropic_stub import AnthropicStub, serving
from aar_scorer.tasks import write_task_files


@pytest.fixture
async def served_stub() -> AsyncIterator[tuple[AnthropicStub, str]]:
    server = AnthropicStub(api_key=CREDENTIAL)
    async with serving(server) as url:
        yield server, url


@pytest.fixture
def stub(served_stub: tuple[AnthropicStub, str]) -> AnthropicStub:
    return served_stub[0]


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


def _serve(command: list[str], ready: str, port: int) -> Service:
    """Start a service and wait for the line (on stdout or stderr) saying it listens; the rest
    of its output is drained so a chatty log can never fill the pipe and stall it."""
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
    return Service(f"http://127.0.0.1:{port}", process)


@pytest.fixture
def scorer_task() -> tuple[dict[str, Any], list[Any], str]:
    """The task the scorer holds for this run: its spec, hidden labels and split seed (a module
    overrides this fixture to score a real bundle's test split)."""
    task = {
        "name": "w2s-chat",
        "labels": TASK_LABELS,
        "baselines": {"weak": 0.6, "ceiling": 0.9},
        "feedback": {"step": 0.01},
    }
    return task, TASK_TRUTH, "x" * 16


@pytest.fixture
def services(
    tmp_path: Path,
    unused_tcp_port_factory: Callable[[], int],
    scorer_task: tuple[dict[str, Any], list[Any], str],
) -> Iterator[tuple[Service, Service]]:
    """The real forum and scorer (`aar-forum`, `aar-scorer`), each its own process, with this
    run registered at the scorer for a task whose labels only the scorer holds."""
    key = tmp_path / "public-key.pem"
    key.write_bytes(public_key_pem(SIGNING_KEY))
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
    )
    scorer.call("PUT", f"/api/v1/runs/{NAMESPACE}/{RUN}", {"task": task["name"]})
    yield forum, scorer
    for service in (forum, scorer):
        stop(service)


def stop(service: Service) -> None:
    service.process.terminate()
    service.process.wait(timeout=30)


@pytest.fixture
async def upstream_stub() -> AsyncIterator[tuple[AnthropicStub, str]]:
    """The stand-in as the gateway's upstream: it takes only the real key, never an agent's."""
    server = AnthropicStub(api_key=REAL_API_KEY)
    async with serving(server) as url:
        yield server, url


@pytest.fixture
def gateway(
    tmp_path: Path,
    upstream_stub: tuple[AnthropicStub, str],
    unused_tcp_port_factory: Callable[[], int],
) -> Iterator[Service]:
    """The real gateway (`aar-gateway`) in front of the stand-in, holding the real key."""
    key, api_key = tmp_path / "gateway-public-key.pem", tmp_path / "anthropic-api-key"
    key.write_bytes(public_key_pem(SIGNING_KEY))
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
    )
    yield service
    stop(service)
