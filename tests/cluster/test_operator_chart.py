"""The chart's operator RBAC: enough to run a ResearchRun, and never a read of the scorer's
Secrets. The operator runs here with the chart's ServiceAccount token, not as cluster admin."""

from __future__ import annotations

import base64
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_chart import Chart
from helm_template import helm_template, render
from operator_process import OperatorProcess, eventually, names, running

from aar_devcluster.controlplane import ControlPlane, kubeconfig
from aar_devcluster.tools import Tool

CHILDREN = [
    ("pods", ""),
    ("secrets", "-credential"),
    ("networkpolicies", ""),
    ("persistentvolumeclaims", "-workspace"),
    ("serviceaccounts", ""),
]


def service_account_kubeconfig(
    plane: ControlPlane, kubectl: Tool, account: str, path: Path
) -> Path:
    """A kubeconfig that authenticates as `account` with its token Secret (1.20 makes one)."""

    def token() -> str | None:
        for secret in kubectl.json("get", "secrets")["items"]:
            annotations = secret["metadata"].get("annotations", {})
            if annotations.get("kubernetes.io/service-account.name") == account:
                return base64.b64decode(secret["data"]["token"]).decode()
        return None

    state = plane.read_state()
    assert state is not None
    ca = (plane.pki_dir / "ca.crt").read_bytes()
    path.write_text(
        yaml.safe_dump(kubeconfig(state.server, ca, eventually(token, what="SA token")))
    )
    return path


ACCOUNT = "aar-operator"  # the chart's ServiceAccount for the operator


@pytest.fixture
def who(namespace: str) -> str:
    """The chart's operator ServiceAccount (the chart installed in this test's namespace), as
    `kubectl auth can-i --as` names it."""
    return f"system:serviceaccount:{namespace}:{ACCOUNT}"


@pytest.fixture
def operator_as_the_chart(
    control_plane: ControlPlane, kubectl: Tool, namespace: str, crds: None, tmp_path: Path
) -> Callable[[dict[str, str]], AbstractContextManager[OperatorProcess]]:
    """Runs the operator, configured by these environment variables, for a `with` block with
    exactly the rights of the chart's ServiceAccount (not as cluster admin)."""

    def run(environment: dict[str, str]) -> AbstractContextManager[OperatorProcess]:
        config = service_account_kubeconfig(
            control_plane, kubectl, ACCOUNT, tmp_path / "sa.kubeconfig"
        )
        return running(config, namespace, tmp_path / "operator.log", environment)

    return run


def can(kubectl: Tool, who: str, verb: str, resource: str, namespace: str) -> bool:
    answer = kubectl.run(
        "auth", "can-i", verb, resource, "--as", who, "--namespace", namespace, check=False
    )
    return answer.strip() == "yes"


def test_chart_rbac_runs_the_operator_and_hides_the_scorers_secrets(
    control_plane: ControlPlane,
    kubectl: Tool,
    chart: Chart,
    namespace: str,
    more_namespaces: Callable[[str], str],
    who: str,
    operator_as_the_chart: Callable[[dict[str, str]], AbstractContextManager[OperatorProcess]],
) -> None:
    chart.install(release="aar")
    scorer_namespace = chart.scorer_namespace
    deployment = kubectl.json("get", "deployment", ACCOUNT)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    # Ready once Kopf serves its health endpoint, which it does after the startup handler ran.
    readiness = container["readinessProbe"]["httpGet"]
    assert (readiness["path"], readiness["port"]) == ("/healthz", "health")
    assert container["livenessProbe"]["httpGet"] == container["readinessProbe"]["httpGet"]

    for verb in ("get", "list", "watch", "update", "patch", "delete"):
        assert not can(kubectl, who, verb, "secrets", scorer_namespace), verb
        assert not can(kubectl, who, verb, "secrets", "default"), verb
    assert can(kubectl, who, "create", "secrets", scorer_namespace)
    assert can(kubectl, who, "get", "secrets/aar-credential-signing-key", namespace)
    assert not can(kubectl, who, "get", "secrets/other", namespace)

    # The operator, with exactly the chart's rights, makes a run's sandboxes and publishes
    # the public key in its namespace and the scorer's.
    with operator_as_the_chart({"AAR_SCORER_NAMESPACE": scorer_namespace}):
        # Runs go in a namespace of their own: never the operator's (the release namespace).
        runs = Tool("kubectl", control_plane.kubeconfig_path, more_namespaces("runs"))
        runs_make_sandboxes(runs)
        scorer = Tool("kubectl", control_plane.kubeconfig_path, scorer_namespace)
        ours = kubectl.json("get", "configmap", "aar-credential-public-key")["data"]
        assert scorer.json("get", "configmap", "aar-credential-public-key")["data"] == ours


def runs_make_sandboxes(kubectl: Tool) -> None:
    """A two-agent run in kubectl's namespace gets both agents' children and their status."""
    run: dict[str, Any] = {
        "apiVersion": "aar.dev/v1alpha1",
        "kind": "ResearchRun",
        "metadata": {"name": "rbac"},
        "spec": {
            "agents": 2,
            "task": {"name": "t"},
            "sandbox": {"image": "agent:test"},
            "budget": {"usd": 10},
        },
    }
    kubectl.apply(run)
    for kind, suffix in CHILDREN:
        eventually(
            lambda k=kind, s=suffix: (
                names(kubectl, k, "aar.dev/run=rbac") == [f"rbac-0{s}", f"rbac-1{s}"]
            ),
            what=f"two {kind} made with the chart's RBAC",
        )
    status = eventually(
        lambda: (kubectl.json("get", "agentsandbox", "rbac-0").get("status") or {}).get(
            "conditions"
        ),
        what="sandbox status written",
    )
    assert {c["type"] for c in status} >= {"Ready", "PodScheduled"}


# Kinds that exist outside any namespace: all a ClusterRole of a namespaced operator may name.
CLUSTER_SCOPED = {"customresourcedefinitions", "namespaces"}


def test_chart_with_run_namespaces_grants_roles_there_and_nothing_namespaced_cluster_wide(
    repo_root: Path,
) -> None:
    objects = render(
        repo_root,
        "--namespace",
        "aar-system",
        "--set",
        "operator.runNamespaces={research,team-b}",
    )
    rbac = [o for o in objects if o["kind"] in ("Role", "RoleBinding", "ClusterRole")]
    operator = [o for o in rbac if o["metadata"]["name"].startswith("aar-operator")]
    runs = {
        kind: sorted(
            o["metadata"]["namespace"]
            for o in operator
            if o["kind"] == kind and o["metadata"]["name"] == "aar-operator-runs"
        )
        for kind in ("Role", "RoleBinding")
    }
    assert runs == {"Role": ["research", "team-b"], "RoleBinding": ["research", "team-b"]}
    # Elsewhere only the key Roles of old: the public key (and the signing key at home).
    assert sorted(
        o["metadata"]["namespace"]
        for o in operator
        if o["metadata"]["name"] == "aar-operator" and o["kind"] == "Role"
    ) == ["aar-scorer", "aar-system"]
    [cluster_role] = [o for o in operator if o["kind"] == "ClusterRole"]
    named = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert named <= CLUSTER_SCOPED, named - CLUSTER_SCOPED
    role = next(o for o in operator if o["metadata"]["name"] == "aar-operator-runs")
    granted = {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert {("pods", "create"), ("researchruns/status", "patch"), ("secrets", "create")} <= granted
    assert not {("secrets", v) for v in ("get", "list", "watch")} & granted

    [deployment] = [
        o for o in objects if o["kind"] == "Deployment" and "operator" in o["metadata"]["name"]
    ]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert (env["AAR_RUN_NAMESPACES"], env["AAR_OPERATOR_NAMESPACED"]) == (
        "research,team-b",
        "true",
    )

    # Without a list: one ClusterRole for the children, and no allow-list for the operator.
    objects = render(repo_root, "--namespace", "aar-system")
    [cluster_role] = [
        o for o in objects if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "aar-operator"
    ]
    assert "pods" in {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert not [o for o in objects if o["metadata"]["name"] == "aar-operator-runs"]


def test_chart_refuses_run_namespaces_that_are_the_scorers_or_its_own(repo_root: Path) -> None:
    for forbidden in ("aar-scorer", "aar-system"):
        result = helm_template(
            repo_root,
            "--namespace",
            "aar-system",
            "--set",
            f"operator.runNamespaces={{{forbidden}}}",
        )
        assert result.returncode != 0
        assert f"operator.runNamespaces must not list {forbidden}" in result.stderr


def test_chart_with_run_namespaces_runs_the_operator_with_roles_only_there(
    control_plane: ControlPlane,
    kubectl: Tool,
    chart: Chart,
    more_namespaces: Callable[[str], str],
    who: str,
    operator_as_the_chart: Callable[[dict[str, str]], AbstractContextManager[OperatorProcess]],
) -> None:
    listed, other = more_namespaces("runs"), more_namespaces("other")
    chart.install("--set", f"operator.runNamespaces={{{listed}}}", release="aar")
    for verb in ("create", "delete"):
        assert can(kubectl, who, verb, "pods", listed), verb
        assert not can(kubectl, who, verb, "pods", other), verb
        assert not can(kubectl, who, verb, "pods", chart.scorer_namespace), verb
    assert not can(kubectl, who, "list", "researchruns.aar.dev", other)
    # Not even `create` on Secrets outside the listed namespaces, the scorer's above all.
    assert can(kubectl, who, "create", "secrets", listed)
    assert not can(kubectl, who, "create", "secrets", chart.scorer_namespace)

    # The operator as the chart configures it (namespaced, its allow-list) with the chart's rights.
    [container] = kubectl.json("get", "deployment", ACCOUNT)["spec"]["template"]["spec"][
        "containers"
    ]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    with operator_as_the_chart(
        {
            name: env[name]
            for name in ("AAR_SCORER_NAMESPACE", "AAR_RUN_NAMESPACES", "AAR_OPERATOR_NAMESPACED")
        }
    ):
        elsewhere = Tool("kubectl", control_plane.kubeconfig_path, other)
        elsewhere.apply(
            {
                "apiVersion": "aar.dev/v1alpha1",
                "kind": "ResearchRun",
                "metadata": {"name": "unseen"},
                "spec": {
                    "agents": 1,
                    "task": {"name": "t"},
                    "sandbox": {"image": "agent:test"},
                    "budget": {"usd": 10},
                },
            }
        )
        runs_make_sandboxes(Tool("kubectl", control_plane.kubeconfig_path, listed))
        # Watching only the listed namespace, the operator never sees the other run.
        assert not elsewhere.json("get", "researchrun", "unseen").get("status")
        assert names(elsewhere, "agentsandboxes") == []
