"""The chart's operator RBAC: enough to run a ResearchRun, and never a read of the scorer's
Secrets. The operator runs here with the chart's ServiceAccount token, not as cluster admin."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from helm_chart import Chart
from operator_process import OperatorProcess, eventually, names

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
    crds: None,
    tmp_path: Path,
) -> None:
    chart.install(release="aar")
    scorer_namespace = chart.scorer_namespace
    account = "aar-operator"
    deployment = kubectl.json("get", "deployment", account)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    # Ready once Kopf serves its health endpoint, which it does after the startup handler ran.
    readiness = container["readinessProbe"]["httpGet"]
    assert (readiness["path"], readiness["port"]) == ("/healthz", "health")
    assert container["livenessProbe"]["httpGet"] == container["readinessProbe"]["httpGet"]

    who = f"system:serviceaccount:{namespace}:{account}"
    for verb in ("get", "list", "watch", "update", "patch", "delete"):
        assert not can(kubectl, who, verb, "secrets", scorer_namespace), verb
        assert not can(kubectl, who, verb, "secrets", "default"), verb
    assert can(kubectl, who, "create", "secrets", scorer_namespace)
    assert can(kubectl, who, "get", "secrets/aar-credential-signing-key", namespace)
    assert not can(kubectl, who, "get", "secrets/other", namespace)

    # The operator, with exactly the chart's rights, makes a run's sandboxes and publishes
    # the public key in its namespace and the scorer's.
    config = service_account_kubeconfig(control_plane, kubectl, account, tmp_path / "sa.kubeconfig")
    process = OperatorProcess(
        config,
        namespace,
        tmp_path / "operator.log",
        environment={"AAR_SCORER_NAMESPACE": scorer_namespace},
    )
    process.start()
    try:
        # Runs go in a namespace of their own: never the operator's (the release namespace).
        runs = Tool("kubectl", control_plane.kubeconfig_path, more_namespaces("runs"))
        runs_make_sandboxes(runs)
        scorer = Tool("kubectl", control_plane.kubeconfig_path, scorer_namespace)
        ours = kubectl.json("get", "configmap", "aar-credential-public-key")["data"]
        assert scorer.json("get", "configmap", "aar-credential-public-key")["data"] == ours
    finally:
        process.stop()
        print(f"--- operator log (tail) ---\n{process.log()}")


def runs_make_sandboxes(kubectl: Tool) -> None:
    """A two-agent run in kubectl's namespace gets both agents' children and their status."""
    run: dict[str, Any] = {
        "apiVersion": "aar.dev/v1alpha1",
        "kind": "ResearchRun",
        "metadata": {"name": "rbac"},
        "spec": {"agents": 2, "task": {"name": "t"}, "sandbox": {"image": "agent:test"}},
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
