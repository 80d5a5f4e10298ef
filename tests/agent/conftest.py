"""The agent tier: the real loop, in-process and as the `aar-agent` process, against the local
Messages-API stand-in on a real port, with a temporary workspace and task bundle."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from aar_agent.config import Settings, settings_from_env
from aar_common.anthropic_stub import AnthropicStub, start

API_KEY = "aar1.test-agent-credential"


@pytest.fixture
async def served_stub() -> AsyncIterator[tuple[AnthropicStub, str]]:
    server = AnthropicStub(api_key=API_KEY)
    runner, url = await start(server)
    yield server, url
    await runner.cleanup()


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
        "AAR_NAMESPACE": "research",
        "AAR_RUN": "w2s-chat",
        "AAR_AGENT": "w2s-chat-0",
        "AAR_DIRECTION": "data reweighting",
        "AAR_TASK": "w2s-chat",
        "AAR_TASK_DIR": str(task_dir),
        "AAR_WORKSPACE": str(workspace),
        "ANTHROPIC_API_KEY": API_KEY,
        "ANTHROPIC_BASE_URL": served_stub[1],
        "AAR_METRICS_PORT": "0",
    }


@pytest.fixture
def make_settings(sandbox_env: dict[str, str]) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return settings_from_env(sandbox_env).model_copy(update=overrides)

    return make
