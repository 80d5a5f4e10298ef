"""The e2e tier: kind with a NetworkPolicy-enforcing CNI, images built and loaded, the chart
installed. The kind tests need a running Docker engine; without one they are skipped with the
reason. The image builds need no Docker (buildah, as root)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

# The modules that drive kind, and so need a Docker engine.
DOCKER_MODULES = {"test_kind.py"}


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
    needs_docker = [item for item in ours if Path(str(item.fspath)).name in DOCKER_MODULES]
    reason = docker_unavailable_reason() if needs_docker else None
    for item in ours:
        item.add_marker(pytest.mark.e2e)
    for item in needs_docker:
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
