"""Where runs may be: never in the scorer's namespace (a Pod there could mount the hidden labels'
Secret) nor the operator's own, and only on the operator's allow-list when it has one. A refused
run or sandbox gets Ready=False, reason InvalidSpec, a message with the fix, a Warning event, and
no children at all."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from operator_process import RUN_KINDS, OperatorProcess, eventually, names, ready, refused, running

from aar_devcluster.controlplane import ControlPlane
from aar_devcluster.tools import Tool

SANDBOX = {"task": {"name": "t"}, "sandbox": {"image": "agent:test"}}


def research_run(name: str, agents: int = 2) -> dict[str, Any]:
    return {
        "apiVersion": "aar.dev/v1alpha1",
        "kind": "ResearchRun",
        "metadata": {"name": name},
        "spec": {"agents": agents, **SANDBOX, "budget": {"usd": 10}},
    }


def agent_sandbox(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "aar.dev/v1alpha1",
        "kind": "AgentSandbox",
        "metadata": {"name": name},
        "spec": SANDBOX,
    }


@pytest.fixture
def operator(
    control_plane: ControlPlane, operator_namespace: str, crds: None, tmp_path: Path
) -> Callable[..., AbstractContextManager[OperatorProcess]]:
    """Runs the operator, configured by these environment variables, for a `with` block."""

    def run(**environment: str) -> AbstractContextManager[OperatorProcess]:
        log = tmp_path / "operator.log"
        return running(control_plane.kubeconfig_path, operator_namespace, log, environment)

    return run


def made(kubectl: Tool, run: str) -> None:
    """Applies a two-agent run in kubectl's namespace and waits for its two Pods."""
    kubectl.apply(research_run(run))
    eventually(
        lambda: names(kubectl, "pods", f"aar.dev/run={run}") == [f"{run}-0", f"{run}-1"],
        what=f"the Pods of run {run} in namespace {kubectl.namespace}",
    )


def in_namespace(plane: ControlPlane, namespace: str) -> Tool:
    return Tool("kubectl", plane.kubeconfig_path, namespace)


def test_runs_and_sandboxes_in_the_scorers_or_the_operators_namespace_are_refused(
    control_plane: ControlPlane,
    kubectl: Tool,
    operator_namespace: str,
    more_namespaces: Callable[[str], str],
    operator: Callable[..., AbstractContextManager[OperatorProcess]],
) -> None:
    scorer_namespace = more_namespaces("scorer")
    scorer = in_namespace(control_plane, scorer_namespace)
    home = in_namespace(control_plane, operator_namespace)
    with operator(AAR_SCORER_NAMESPACE=scorer_namespace):
        scorer.apply(research_run("sneak"))
        scorer.apply(agent_sandbox("by-hand"))
        home.apply(research_run("home"))
        made(kubectl, "sneak")  # the same run anywhere else is made as always

        anywhere_else = f"any namespace but {scorer_namespace}, {operator_namespace}, aar-verify"
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
    more_namespaces: Callable[[str], str],
    operator: Callable[..., AbstractContextManager[OperatorProcess]],
) -> None:
    outside = in_namespace(control_plane, more_namespaces("outside"))
    with operator(AAR_RUN_NAMESPACES=namespace):
        outside.apply(research_run("w2s"))
        outside.apply(agent_sandbox("by-hand"))
        made(kubectl, "w2s")  # in the allowed namespace
        for kind in RUN_KINDS:
            assert names(kubectl, kind, "aar.dev/run=w2s"), kind
        assert ready(kubectl, "researchrun", "w2s").get("reason") != "InvalidSpec"

        message = refused(outside, "ResearchRun", "w2s")
        assert "not on the operator's allow-list" in message
        assert f"one of the allowed namespaces ({namespace})" in message
        assert "operator.runNamespaces" in message
        assert "--run-namespaces" in message
        assert "not on the operator's allow-list" in refused(outside, "AgentSandbox", "by-hand")


def test_a_narrowed_allow_list_stops_the_pods_it_now_refuses(
    kubectl: Tool,
    more_namespaces: Callable[[str], str],
    operator: Callable[..., AbstractContextManager[OperatorProcess]],
) -> None:
    with operator():
        made(kubectl, "before")
    with operator(AAR_RUN_NAMESPACES=more_namespaces("elsewhere")):
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
