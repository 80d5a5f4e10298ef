"""The operator with the real gateway and scorer as local processes: it checks the run's model
and task with them before it makes anything, registers the run's budget and task, copies spend
and the best score into status, and at the run's budget marks BudgetExhausted and deletes the
Pods (workspaces kept). Upstream is the local Messages-API
stand-in; agents' requests go through the gateway with credentials the operator's key signs."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

from operator_process import OperatorProcess, eventually, names, refused
from service_processes import LABELS, MICRO, Services, call

from aar_common.ports import free_port
from aar_devcluster.controlplane import ControlPlane
from aar_devcluster.tools import Tool


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for item in (obj.get("status") or {}).get("conditions", []):
        if item["type"] == kind:
            return dict(item)
    return {}


def test_spend_and_best_reach_status_and_a_spent_budget_stops_the_run(
    control_plane: ControlPlane,
    kubectl: Tool,
    namespace: str,
    operator_namespace: str,
    crds: None,
    services: Services,
    tmp_path: Path,
) -> None:
    operator = services.operator(
        control_plane.kubeconfig_path, operator_namespace, tmp_path / "operator.log"
    )
    operator.start()
    try:
        run = {
            "apiVersion": "aar.dev/v1alpha1",
            "kind": "ResearchRun",
            "metadata": {"name": "spend"},
            "spec": {
                "agents": 2,
                "task": {"name": "w2s-chat"},
                "sandbox": {"image": "agent:test"},
                # Room for a few requests per agent: each holds its worst case (about $0.0072
                # here: every byte of the body a token at the dearest input rate, plus
                # max_tokens) against its agent's half of the cap.
                "budget": {"usd": 0.04},
                "review": {"required": False},
            },
        }
        kubectl.apply(run)
        eventually(lambda: names(kubectl, "pods", "aar.dev/run=spend") == ["spend-0", "spend-1"])
        reachable = eventually(
            lambda: (
                condition(kubectl.json("get", "rr", "spend"), "ServicesReachable").get("status")
                == "True"
            ),
            what="run registered with the gateway and the scorer",
        )
        assert reachable
        spend_url = f"{services.gateway}/api/v1/spend/{namespace}/spend"
        status, registered = call(spend_url, services.admin())
        assert status == 200, registered

        # The agents talk through the gateway until it refuses each of them for the budget.
        refused: dict[str, Any] = {}
        out: set[str] = set()
        for attempt in range(200):
            agent = f"spend-{attempt % 2}"
            if agent in out:
                continue
            status, answer = call(
                f"{services.gateway}/v1/messages",
                services.agent(namespace, "spend", agent),
                {"model": "claude-opus-4-6", "max_tokens": 64,
                 "messages": [{"role": "user", "content": "Propose an experiment. " * 20}]},
                method="POST",
            )  # fmt: skip
            if status == 402:
                refused = answer
                out.add(agent)
                run_spent = f"run budget of {namespace}/spend" in answer["error"]["message"]
                if run_spent or out == {"spend-0", "spend-1"}:
                    break
            else:
                assert status == 200, answer
        assert refused["error"]["type"] == "billing_error"
        _, spent = call(spend_url, services.admin())
        # Spent, but never past the cap: each request held its worst case before it went.
        assert Decimal(0) < Decimal(spent["run"]["usd"]) <= Decimal("0.04")
        assert all(spent["agents"][agent]["exhausted"] for agent in out)

        # A counted submission becomes the run's best.
        status, submitted = call(
            f"{services.scorer}/api/v1/submissions",
            services.agent(namespace, "spend", "spend-1"),
            {
                "task": "w2s-chat",
                "predictions": LABELS,
                "method": "the true labels",
                "artifact": None,
            },
            method="POST",
        )
        assert status == 200, submitted

        def exhausted() -> dict[str, Any] | None:
            current = kubectl.json("get", "rr", "spend")
            done = condition(current, "BudgetExhausted").get("status") == "True"
            return current if done and (current["status"].get("best") or {}).get("agent") else None

        try:
            stopped = eventually(exhausted, what="BudgetExhausted and the best score in status")
        except AssertionError:
            print(json.dumps(kubectl.json("get", "rr", "spend").get("status"), indent=1))
            raise
        assert condition(stopped, "Ready")["reason"] == "BudgetExhausted"
        assert "budget" in condition(stopped, "BudgetExhausted")["message"]
        assert Decimal(stopped["status"]["spend"]["usd"]) == Decimal(spent["run"]["usd"]).quantize(
            MICRO
        )
        assert stopped["status"]["spend"]["outputTokens"] == spent["run"]["output_tokens"]
        assert stopped["status"]["best"]["agent"] == "spend-1"
        assert stopped["status"]["best"]["submission"] == str(submitted["id"])

        eventually(lambda: names(kubectl, "pods", "aar.dev/run=spend") == [], what="Pods deleted")
        assert names(kubectl, "persistentvolumeclaims", "aar.dev/run=spend") == [
            "spend-0-workspace",
            "spend-1-workspace",
        ]
        sandbox = eventually(
            lambda: (
                (s := kubectl.json("get", "asb", "spend-0"))
                and condition(s, "BudgetExhausted").get("status") == "True"
                and s
            ),
            what="the sandbox says its budget is spent",
        )
        assert sandbox["status"]["spend"]["usd"] == str(
            Decimal(spent["agents"]["spend-0"]["usd"]).quantize(MICRO)
        )
    finally:
        operator.stop()
        print(f"--- operator log (tail) ---\n{operator.log()}")


def test_an_unknown_task_or_model_is_refused_before_any_pod(
    control_plane: ControlPlane,
    kubectl: Tool,
    operator_namespace: str,
    crds: None,
    services: Services,
    tmp_path: Path,
) -> None:
    operator = services.operator(
        control_plane.kubeconfig_path, operator_namespace, tmp_path / "operator.log"
    )

    def run(name: str, task: str, model: str = "claude-opus-4-6") -> dict[str, Any]:
        return {
            "apiVersion": "aar.dev/v1alpha1",
            "kind": "ResearchRun",
            "metadata": {"name": name},
            "spec": {
                "agents": 2,
                "model": model,
                "task": {"name": task},
                "sandbox": {"image": "agent:test"},
                "budget": {"usd": 1},
            },
        }

    operator.start()
    try:
        kubectl.apply(run("typo", "w2s-chta"))
        message = refused(kubectl, "ResearchRun", "typo", "UnknownTask")
        # The scorer's own words, not an HTTP dump.
        assert message == (
            "the scorer refuses task 'w2s-chta': unknown task 'w2s-chta'; the scorer knows: "
            "w2s-chat"
        )
        kubectl.apply(run("dear", "w2s-chat", model="claude-opus-9"))
        message = refused(kubectl, "ResearchRun", "dear", "UnknownModel")
        assert message.startswith("the gateway refuses model 'claude-opus-9': model ")
        assert "The gateway prices: " in message
        assert "claude-opus-4-6" in message
        # Fixed, the run starts.
        kubectl.apply(run("typo", "w2s-chat"))
        eventually(
            lambda: names(kubectl, "pods", "aar.dev/run=typo") == ["typo-0", "typo-1"],
            what="the Pods of the corrected run",
        )
        assert names(kubectl, "pods", "aar.dev/run=dear") == []
    finally:
        operator.stop()
        print(f"--- operator log (tail) ---\n{operator.log()}")


def test_a_gateway_that_cannot_be_reached_is_reported_and_the_run_goes_on(
    control_plane: ControlPlane,
    kubectl: Tool,
    operator_namespace: str,
    crds: None,
    tmp_path: Path,
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    operator = OperatorProcess(
        control_plane.kubeconfig_path,
        operator_namespace,
        tmp_path / "operator.log",
        environment={
            "AAR_OPERATOR_SERVICES": "true",
            "AAR_GATEWAY_URL": nowhere,
            "AAR_SCORER_URL": nowhere,
        },
    )
    operator.start()
    try:
        kubectl.apply(
            {
                "apiVersion": "aar.dev/v1alpha1",
                "kind": "ResearchRun",
                "metadata": {"name": "offline"},
                "spec": {
                    "agents": 1,
                    "task": {"name": "w2s-chat"},
                    "sandbox": {"image": "a:1"},
                    "budget": {"usd": 1},
                },
            }
        )
        reported = eventually(
            lambda: (
                (c := condition(kubectl.json("get", "rr", "offline"), "ServicesReachable"))
                and c.get("status") == "False"
                and c
            ),
            what="ServicesReachable=False",
        )
        assert reported["reason"] == "ServiceError"
        assert nowhere in reported["message"]
        # The gateway is fail-closed for runs it does not know, so the agents may start.
        eventually(lambda: names(kubectl, "pods", "aar.dev/run=offline") == ["offline-0"])
    finally:
        operator.stop()
        print(f"--- operator log (tail) ---\n{operator.log()}")
