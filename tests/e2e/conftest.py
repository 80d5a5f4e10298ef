"""The e2e tier: kind with a NetworkPolicy-enforcing CNI, images built and loaded, the chart
installed. It needs a running Docker engine; without one every test here is skipped with
the reason."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def docker_unavailable_reason() -> str | None:
    """Why e2e tests cannot run here, or None when a Docker engine answers."""
    if shutil.which("docker") is None:
        return "e2e tests need Docker and kind: no `docker` command on PATH"
    try:
        result = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "e2e tests need Docker and kind: `docker info` did not answer within 20 s"
    if result.returncode != 0:
        return (
            "e2e tests need a running Docker engine and kind: `docker info` failed "
            f"({result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no output'})"
        )
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    ours = [item for item in items if here in Path(str(item.fspath)).parents]
    if not ours:
        return
    reason = docker_unavailable_reason()
    for item in ours:
        item.add_marker(pytest.mark.e2e)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
