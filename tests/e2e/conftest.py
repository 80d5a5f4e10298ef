"""The e2e tier: the local cluster with its node (as root), images built here with buildah, the
chart installed and a research run. The kind path is optional, for machines with a Docker
engine: its tests are collected only with `AAR_E2E_KIND=1`, and skipped with the reason when no
Docker engine answers."""

from __future__ import annotations

import os
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


def pytest_ignore_collect(collection_path: Path) -> bool | None:
    """The kind tests only when asked for: they need a Docker engine this tier does not."""
    if collection_path.name in DOCKER_MODULES and os.environ.get("AAR_E2E_KIND") != "1":
        return True
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
