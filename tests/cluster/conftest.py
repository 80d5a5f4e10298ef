"""The cluster tier: one real control plane per test session, one namespace per test.

The control plane's processes die with the test session, also when it is interrupted or
killed, so a run never leaves etcd or an apiserver behind.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from aar_devcluster.controlplane import ControlPlane
from aar_devcluster.paths import BinariesMissingError, binary


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.cluster)


class CommandError(AssertionError):
    """A kubectl or helm command failed; the message carries its stderr."""

    def __init__(self, command: list[str], result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(
            f"{' '.join(command)} exited with {result.returncode}:\n{result.stderr.strip()}"
        )
        self.stderr = result.stderr
        self.returncode = result.returncode


class Tool:
    """Runs the project's own kubectl or helm against the test control plane."""

    def __init__(self, name: str, kubeconfig: Path, namespace: str | None = None) -> None:
        self.path = binary(name)
        self.kubeconfig = kubeconfig
        self.namespace = namespace

    def run(
        self, *args: str, input: str | None = None, timeout: float = 60, check: bool = True
    ) -> str:
        """Run and return stdout; raise CommandError with stderr on a non-zero exit when
        `check` (the default)."""
        command = [str(self.path), "--kubeconfig", str(self.kubeconfig)]
        if self.namespace:
            command += ["--namespace", self.namespace]
        command += list(args)
        result = subprocess.run(
            command, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise CommandError(command, result)
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-o", "json"))

    def apply(self, *manifests: dict[str, Any]) -> str:
        return self.run("apply", "-f", "-", input=yaml.safe_dump_all(manifests))


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"), die_with_parent=True)
    try:
        plane.start()
    except BinariesMissingError as error:
        pytest.fail(str(error), pytrace=False)
    yield plane
    plane.destroy()


def _namespace_name(test_name: str) -> str:
    stem = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:40].strip("-")
    return f"t-{stem}-{secrets.token_hex(3)}"


@pytest.fixture
def namespace(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for this test, deleted afterwards (the namespace controller empties it)."""
    name = _namespace_name(request.node.name)
    admin = Tool("kubectl", control_plane.kubeconfig_path)
    admin.run("create", "namespace", name)
    yield name
    admin.run("delete", "namespace", name, "--wait=false")


@pytest.fixture
def kubectl(control_plane: ControlPlane, namespace: str) -> Tool:
    """kubectl 1.33 as the cluster admin, in this test's namespace."""
    return Tool("kubectl", control_plane.kubeconfig_path, namespace)


@pytest.fixture
def helm(control_plane: ControlPlane, namespace: str) -> Tool:
    """helm 4 as the cluster admin, in this test's namespace."""
    return Tool("helm", control_plane.kubeconfig_path, namespace)
