"""The cluster tier: one real control plane per test session, one namespace per test.

The control plane's processes die with the test session, also when it is interrupted or
killed, so a run never leaves etcd or an apiserver behind.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helm_chart import Chart
from operator_process import OperatorProcess
from service_processes import Services

from aar_devcluster.controlplane import ControlPlane
from aar_devcluster.paths import BinariesMissingError
from aar_devcluster.tools import Tool


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.cluster)


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
def more_namespaces(control_plane: ControlPlane, namespace: str) -> Iterator[Callable[[str], str]]:
    """Makes `<namespace>-<suffix>` for this test (another namespace than the one its runs go
    in: the operator's own, one outside an allow-list), deleted afterwards."""
    admin = Tool("kubectl", control_plane.kubeconfig_path)
    made: list[str] = []

    def make(suffix: str) -> str:
        name = f"{namespace}-{suffix}"
        admin.run("create", "namespace", name)
        made.append(name)
        return name

    yield make
    for name in made:
        admin.run("delete", "namespace", name, "--wait=false")


@pytest.fixture
def operator_namespace(more_namespaces: Callable[[str], str]) -> str:
    """Where the operator of a test lives (its signing key, its public key), apart from the
    test's namespace: runs are never allowed in the operator's own namespace."""
    return more_namespaces("operator")


@pytest.fixture
def kubectl(control_plane: ControlPlane, namespace: str) -> Tool:
    """kubectl 1.33 as the cluster admin, in this test's namespace."""
    return Tool("kubectl", control_plane.kubeconfig_path, namespace)


@pytest.fixture
def helm(control_plane: ControlPlane, namespace: str) -> Tool:
    """helm 4 as the cluster admin, in this test's namespace."""
    return Tool("helm", control_plane.kubeconfig_path, namespace)


@pytest.fixture
def chart(helm: Tool, namespace: str, repo_root: Path) -> Iterator[Chart]:
    """Installs charts/aar for this test and removes what it installed afterwards."""
    installed = Chart(helm, repo_root / "charts" / "aar", namespace)
    yield installed
    installed.uninstall_all()


@pytest.fixture
def crds(control_plane: ControlPlane) -> None:
    """The aar CRDs, applied from crds/ (idempotent: every test may ask for them)."""
    admin = Tool("kubectl", control_plane.kubeconfig_path)
    crd_dir = Path(__file__).resolve().parents[2] / "crds"
    admin.run("apply", "-f", str(crd_dir))
    for name in ("researchruns.aar.dev", "agentsandboxes.aar.dev"):
        admin.run("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")


@pytest.fixture
def aar_operator(
    control_plane: ControlPlane, operator_namespace: str, crds: None, tmp_path: Path
) -> Iterator[OperatorProcess]:
    """`aar-operator run` as a subprocess, for runs in this test's namespace; its signing key
    lives in `operator_namespace`, which doubles as the scorer's."""
    process = OperatorProcess(
        control_plane.kubeconfig_path, operator_namespace, tmp_path / "operator.log"
    )
    process.start()
    yield process
    process.stop()
    # Shown by pytest when the test failed: what the operator saw and did.
    print(f"--- operator log (tail) ---\n{process.log()}")


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    """The stand-in upstream, the gateway and the scorer as local processes (see Services)."""
    running = Services(tmp_path)
    running.start()
    yield running
    running.stop()
