"""Where runs may be: never in the scorer's namespace (a Pod there could mount the hidden labels'
Secret) nor the operator's own, and only on the operator's allow-list when it has one. A refused
run or sandbox gets Ready=False, reason InvalidSpec, a message with the fix, a Warning event, and
no children at all."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from operator_process import OperatorProcess, eventually, names

from aar_devcluster.controlplane import ControlPlane
from aar_devcluster.tools import Tool

# Everything the operator makes for a run, and every child of a sandbox.
CHILD_KINDS = [
    "agentsandboxes",
    "serviceaccounts",
    "secrets",
    "persistentvolumeclaims",
    "pods",
    "networkpolicies",
]
SANDBOX = {"task": {"name": "t"}, "sandbox": {"image": "agent:test"}}


def research_run(name: str, agents: int = 2) -> dict[str, Any]:
    return {
        "apiVersion": "aar.dev/v1alpha1",
        "kind": "ResearchRun",
        "metadata": {"name": name},
        "spec": {"agents": agents, **SANDBOX},
    }


def agent_sandbox(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "aar.dev/v1alpha1",
        "kind": "AgentSandbox",
        "metadata": {"name": name},
        "spec": SANDBOX,
    }


@contextmanager
def operator(
    plane: ControlPlane, namespace: str, log: Path, **environment: str
) -> Iterator[OperatorProcess]:
    process = OperatorProcess(plane.kubeconfig_path, namespace, log, environment=environment)
    process.start()
    try:
        yield process
    finally:
        process.stop()
        print(f"--- operator log (tail) ---\n{process.log()}")


def in_namespace(plane: ControlPlane, namespace: str) -> Tool:
    return Tool("kubectl", plane.kubeconfig_path, namespace)


def ready(kubectl: Tool, kind: str, name: str) -> dict[str, Any]:
    status = kubectl.json("get", kind, name).get("status") or {}
    return next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})


def refused(kubectl: Tool, kind: str, name: str) -> str:
    """Waits for Ready=False, InvalidSpec on the object and its Warning event, checks that the
    operator made nothing for it, and returns the message."""
    condition = eventually(
        lambda: (c := ready(kubectl, kind, name)).get("reason") == "InvalidSpec" and c,
        what=f"{kind} {name} refused",
    )
    assert condition["status"] == "False"
    events = kubectl.json("get", "events", "--field-selector", f"involvedObject.name={name}")
    warnings = [
        (e["type"], e["reason"], e["message"])
        for e in events["items"]
        if e["involvedObject"]["kind"] == kind
    ]
    assert warnings == [("Warning", "InvalidSpec", condition["message"])]
    # Everything the operator makes is labelled with its run (a sandbox's own name, by hand).
    for child in CHILD_KINDS:
        assert names(kubectl, child, f"aar.dev/run={name}") == [], child
    return str(condition["message"])


def test_runs_and_sandboxes_in_the_scorers_or_the_operators_namespace_are_refused(
    control_plane: ControlPlane,
    kubectl: Tool,
    namespace: str,
    operator_namespace: str,
    more_namespaces: Callable[[str], str],
    crds: None,
    tmp_path: Path,
) -> None:
    scorer_namespace = more_namespaces("scorer")
    scorer = in_namespace(control_plane, scorer_namespace)
    home = in_namespace(control_plane, operator_namespace)
    with operator(
        control_plane,
        operator_namespace,
        tmp_path / "operator.log",
        AAR_SCORER_NAMESPACE=scorer_namespace,
    ):
        scorer.apply(research_run("sneak"))
        scorer.apply(agent_sandbox("by-hand"))
        home.apply(research_run("home"))
        # The same run anywhere else is made as always.
        kubectl.apply(research_run("sneak"))
        eventually(
            lambda: names(kubectl, "pods", "aar.dev/run=sneak") == ["sneak-0", "sneak-1"],
            what="the run's Pods in an ordinary namespace",
        )

        anywhere_else = f"any namespace but {scorer_namespace} and {operator_namespace}"
        message = refused(scorer, "ResearchRun", "sneak")
        assert message.startswith(
            f"no ResearchRun may run in namespace {scorer_namespace}: it is the scorer's namespace"
        )
        assert anywhere_else in message
        assert "operator.runNamespaces" in message

        message = refused(scorer, "AgentSandbox", "by-hand")
        assert message.startswith(f"no AgentSandbox may run in namespace {scorer_namespace}:")
        assert anywhere_else in message

        message = refused(home, "ResearchRun", "home")
        assert message.startswith(
            f"no ResearchRun may run in namespace {operator_namespace}: it is the operator's own"
        )
        assert anywhere_else in message


def test_a_namespace_off_the_allow_list_is_refused_and_one_on_it_works(
    control_plane: ControlPlane,
    kubectl: Tool,
    namespace: str,
    operator_namespace: str,
    more_namespaces: Callable[[str], str],
    crds: None,
    tmp_path: Path,
) -> None:
    outside = in_namespace(control_plane, more_namespaces("outside"))
    with operator(
        control_plane,
        operator_namespace,
        tmp_path / "operator.log",
        AAR_RUN_NAMESPACES=namespace,
    ):
        outside.apply(research_run("w2s"))
        outside.apply(agent_sandbox("by-hand"))
        kubectl.apply(research_run("w2s"))
        eventually(
            lambda: names(kubectl, "pods", "aar.dev/run=w2s") == ["w2s-0", "w2s-1"],
            what="the run's Pods in the allowed namespace",
        )
        for kind in CHILD_KINDS:
            assert names(kubectl, kind, "aar.dev/run=w2s"), kind
        assert ready(kubectl, "researchrun", "w2s").get("reason") != "InvalidSpec"

        message = refused(outside, "ResearchRun", "w2s")
        assert "not on the operator's allow-list" in message
        assert f"one of the allowed namespaces ({namespace})" in message
        assert "operator.runNamespaces" in message
        assert "--run-namespaces" in message
        assert "not on the operator's allow-list" in refused(outside, "AgentSandbox", "by-hand")


def test_a_narrowed_allow_list_stops_the_pods_it_now_refuses(
    control_plane: ControlPlane,
    kubectl: Tool,
    operator_namespace: str,
    more_namespaces: Callable[[str], str],
    crds: None,
    tmp_path: Path,
) -> None:
    with operator(control_plane, operator_namespace, tmp_path / "operator.log"):
        kubectl.apply(research_run("before"))
        eventually(
            lambda: names(kubectl, "pods", "aar.dev/run=before") == ["before-0", "before-1"],
            what="the run's Pods",
        )
    with operator(
        control_plane,
        operator_namespace,
        tmp_path / "operator.log",
        AAR_RUN_NAMESPACES=more_namespaces("elsewhere"),
    ):
        eventually(
            lambda: ready(kubectl, "agentsandbox", "before-1").get("reason") == "InvalidSpec",
            what="the sandbox refused",
        )
        eventually(
            lambda: names(kubectl, "pods", "aar.dev/run=before") == [], what="its Pods deleted"
        )
        assert ready(kubectl, "researchrun", "before")["reason"] == "InvalidSpec"
        # The workspaces stay: allow the namespace again and the agents go on where they were.
        assert names(kubectl, "persistentvolumeclaims", "aar.dev/run=before") == [
            "before-0-workspace",
            "before-1-workspace",
        ]
