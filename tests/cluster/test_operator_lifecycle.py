"""Scaling, suspend and resume, invalid specs, a deadline, and a crash mid-reconcile."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from operator_process import CHILD_KINDS, OperatorProcess, eventually, names

from aar_devcluster.controlplane import ControlPlane
from aar_devcluster.tools import Tool, ToolError


def run(name: str, agents: int, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "aar.dev/v1alpha1",
        "kind": "ResearchRun",
        "metadata": {"name": name},
        "spec": {
            "agents": agents,
            "task": {"name": "w2s-chat"},
            "sandbox": {
                "image": "agent:test",
                "resources": {"gpu": 1, "cpu": "1", "memory": "1Gi"},
            },
            "budget": {"usd": 100},
            **spec,
        },
    }


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for item in (obj.get("status") or {}).get("conditions", []):
        if item["type"] == kind:
            return dict(item)
    return {}


def of_run(kubectl: Tool, kind: str, name: str) -> list[str]:
    return names(kubectl, kind, f"aar.dev/run={name}")


def agents(name: str, count: int, suffix: str = "") -> list[str]:
    return sorted(f"{name}-{i}{suffix}" for i in range(count))


def test_scale_three_to_five_to_two_keeps_removed_workspaces(
    kubectl: Tool, aar_operator: OperatorProcess
) -> None:
    kubectl.apply(run("scale", 3))
    eventually(lambda: of_run(kubectl, "pods", "scale") == agents("scale", 3), what="3 Pods")

    kubectl.apply(run("scale", 5))
    eventually(lambda: of_run(kubectl, "pods", "scale") == agents("scale", 5), what="5 Pods")
    assert of_run(kubectl, "agentsandboxes", "scale") == agents("scale", 5)

    kubectl.apply(run("scale", 2))
    eventually(
        lambda: of_run(kubectl, "agentsandboxes", "scale") == agents("scale", 2), what="2 sandboxes"
    )
    for kind in ("pods", "serviceaccounts", "networkpolicies"):
        eventually(
            lambda k=kind: of_run(kubectl, k, "scale") == agents("scale", 2), what=f"2 {kind}"
        )
    # The highest indexes went; their workspaces stay with the run.
    assert of_run(kubectl, "persistentvolumeclaims", "scale") == agents("scale", 5, "-workspace")
    kept = kubectl.json("get", "pvc", "scale-4-workspace")
    eventually(
        lambda: (
            [
                o["kind"]
                for o in kubectl.json("get", "pvc", "scale-4-workspace")["metadata"][
                    "ownerReferences"
                ]
            ]
            == ["ResearchRun"]
        ),
        what="the removed agent's workspace owned by the run alone",
    )
    assert kept["metadata"]["labels"]["aar.dev/agent"] == "scale-4"

    status = eventually(
        lambda: (
            (s := kubectl.json("get", "researchrun", "scale").get("status", {}))
            and s["agents"]["desired"] == 2
            and s
        ),
        what="run status counts 2 agents",
    )
    assert status["ready"] == "0/2"

    # Scaling up again takes the old workspace back.
    kubectl.apply(run("scale", 5))
    eventually(lambda: of_run(kubectl, "pods", "scale") == agents("scale", 5), what="5 Pods again")
    owners = kubectl.json("get", "pvc", "scale-4-workspace")["metadata"]["ownerReferences"]
    sandbox_uid = kubectl.json("get", "agentsandbox", "scale-4")["metadata"]["uid"]
    assert [(o["kind"], o["uid"]) for o in owners if o.get("controller")] == [
        ("AgentSandbox", sandbox_uid)
    ]

    kubectl.run("delete", "researchrun", "scale", "--wait=false")
    for kind in ["agentsandboxes", *CHILD_KINDS]:
        eventually(
            lambda k=kind: of_run(kubectl, k, "scale") == [], timeout=120, what=f"no {kind} left"
        )


def test_suspend_deletes_pods_keeps_workspaces_and_resume_recreates(
    kubectl: Tool, aar_operator: OperatorProcess
) -> None:
    kubectl.apply(run("pause", 2))
    eventually(lambda: of_run(kubectl, "pods", "pause") == agents("pause", 2), what="2 Pods")
    before = {
        p["metadata"]["name"]: p["metadata"]["uid"] for p in kubectl.json("get", "pods")["items"]
    }

    kubectl.apply(run("pause", 2, suspend=True))
    eventually(lambda: of_run(kubectl, "pods", "pause") == [], what="Pods deleted")
    assert of_run(kubectl, "persistentvolumeclaims", "pause") == agents("pause", 2, "-workspace")
    ready = eventually(
        lambda: (
            (c := condition(kubectl.json("get", "researchrun", "pause"), "Ready")).get("reason")
            == "Suspended"
            and c
        ),
        what="run Ready=False Suspended",
    )
    assert ready["status"] == "False"
    sandbox = kubectl.json("get", "agentsandbox", "pause-0")
    assert sandbox["spec"]["suspend"] is True
    eventually(
        lambda: (
            condition(kubectl.json("get", "agentsandbox", "pause-0"), "Ready").get("reason")
            == "Suspended"
        ),
        what="sandbox Ready=False Suspended",
    )

    kubectl.apply(run("pause", 2))
    eventually(
        lambda: of_run(kubectl, "pods", "pause") == agents("pause", 2), what="Pods recreated"
    )
    after = {
        p["metadata"]["name"]: p["metadata"]["uid"] for p in kubectl.json("get", "pods")["items"]
    }
    assert set(after.values()).isdisjoint(before.values())


def test_a_changed_sandbox_spec_replaces_the_pod(
    kubectl: Tool, aar_operator: OperatorProcess
) -> None:
    kubectl.apply(run("image", 1))
    pod = eventually(
        lambda: kubectl.json("get", "pods", "-l", "aar.dev/run=image")["items"], what="a Pod"
    )[0]
    changed = run("image", 1)
    changed["spec"]["sandbox"]["image"] = "agent:new"
    kubectl.apply(changed)

    def replaced() -> dict[str, Any] | None:
        items = kubectl.json("get", "pods", "-l", "aar.dev/run=image")["items"]
        new = [p for p in items if p["metadata"]["uid"] != pod["metadata"]["uid"]]
        return new[0] if new else None

    new = eventually(replaced, what="a new Pod")
    assert new["spec"]["containers"][0]["image"] == "agent:new"


def test_schema_invalid_runs_are_refused_by_the_apiserver(kubectl: Tool, crds: None) -> None:
    def with_sandbox(**fields: Any) -> dict[str, Any]:
        bad = run("bad", 2)
        bad["spec"]["sandbox"]["resources"].update(fields)
        return bad

    def server_side(manifest: dict[str, Any]) -> None:
        # --validate=false: no client-side check, so the apiserver is the one that refuses.
        kubectl.run("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(manifest))

    cases = [
        (run("bad", 0), "spec.agents in body should be greater than or equal to 1"),
        (run("bad", 1001), "spec.agents in body should be less than or equal to 1000"),
        (run("bad", 2, task={"name": "Not_A_Task"}), "spec.task.name in body should match"),
        (with_sandbox(memory="lots"), "spec.sandbox.resources.memory in body should match"),
        (with_sandbox(gpu=17), "spec.sandbox.resources.gpu in body should be less than"),
    ]
    for manifest, message in cases:
        with pytest.raises(ToolError) as error:
            server_side(manifest)
        assert message in error.value.stderr
    missing = run("bad", 2)
    del missing["spec"]["sandbox"]
    with pytest.raises(ToolError, match=r"spec\.sandbox: Required value"):
        server_side(missing)
    assert names(kubectl, "researchruns") == []


def test_invalid_spec_gets_a_condition_and_a_warning_and_no_children(
    kubectl: Tool, aar_operator: OperatorProcess
) -> None:
    kubectl.apply(run("odd", 2, directions=["a", "b", "c"]))
    ready = eventually(
        lambda: (
            (c := condition(kubectl.json("get", "researchrun", "odd"), "Ready")).get("reason")
            == "InvalidSpec"
            and c
        ),
        what="Ready=False InvalidSpec",
    )
    assert ready["status"] == "False"
    assert "3 entries but spec.agents is 2" in ready["message"]
    events = kubectl.json("get", "events", "--field-selector", "involvedObject.name=odd")["items"]
    assert any(e["type"] == "Warning" and e["reason"] == "InvalidSpec" for e in events)
    assert of_run(kubectl, "agentsandboxes", "odd") == []

    # Fixing the spec starts the run.
    kubectl.apply(run("odd", 3, directions=["a", "b", "c"]))
    eventually(
        lambda: of_run(kubectl, "pods", "odd") == agents("odd", 3), what="3 Pods after the fix"
    )


def test_a_passed_deadline_stops_the_run_and_keeps_workspaces(
    kubectl: Tool, aar_operator: OperatorProcess
) -> None:
    kubectl.apply(run("late", 2, budget={"deadline": "20s", "usd": 100}))
    eventually(lambda: of_run(kubectl, "pods", "late") == agents("late", 2), what="2 Pods")
    ready = eventually(
        lambda: (
            (c := condition(kubectl.json("get", "researchrun", "late"), "Ready")).get("reason")
            == "DeadlineExceeded"
            and c
        ),
        timeout=120,
        what="Ready=False DeadlineExceeded",
    )
    assert "deadline" in ready["message"]
    eventually(lambda: of_run(kubectl, "pods", "late") == [], what="Pods deleted at the deadline")
    assert of_run(kubectl, "persistentvolumeclaims", "late") == agents("late", 2, "-workspace")
    eventually(
        lambda: (
            condition(kubectl.json("get", "agentsandbox", "late-1"), "Ready").get("reason")
            == "DeadlineExceeded"
        ),
        what="the sandbox says why it stopped",
    )


def test_operator_killed_mid_reconcile_converges_after_restart(
    kubectl: Tool, aar_operator: OperatorProcess
) -> None:
    # Enough agents that a fast machine cannot make every Pod between two polls of kubectl.
    count = 120
    kubectl.apply(run("crash", count))
    # Kill it while it is half-way: some sandboxes made, not all of their Pods.
    eventually(
        lambda: len(of_run(kubectl, "agentsandboxes", "crash")) > 0,
        timeout=60,
        what="some sandboxes",
    )
    aar_operator.kill()
    partial = {
        kind: len(of_run(kubectl, kind, "crash")) for kind in ["agentsandboxes", *CHILD_KINDS]
    }
    aar_operator.start()

    for kind, suffix in [
        ("agentsandboxes", ""), ("serviceaccounts", ""), ("secrets", "-credential"),
        ("persistentvolumeclaims", "-workspace"), ("pods", ""), ("networkpolicies", ""),
    ]:  # fmt: skip
        eventually(
            lambda k=kind, s=suffix: of_run(kubectl, k, "crash") == agents("crash", count, s),
            timeout=180,
            what=f"exactly {count} {kind} (had {partial})",
        )
    # Every child is controlled by a live sandbox of its own name: no orphans.
    sandboxes = {
        s["metadata"]["name"]: s["metadata"]["uid"]
        for s in kubectl.json("get", "agentsandboxes")["items"]
    }
    for kind in ["serviceaccounts", "pods", "networkpolicies", "persistentvolumeclaims"]:
        for item in kubectl.json("get", kind, "-l", "aar.dev/run=crash")["items"]:
            controller = [o for o in item["metadata"]["ownerReferences"] if o.get("controller")]
            agent = item["metadata"]["labels"]["aar.dev/agent"]
            assert [(o["kind"], o["uid"]) for o in controller] == [
                ("AgentSandbox", sandboxes[agent])
            ]
    # It was killed mid-way: some Pods were still to be made when it died.
    assert partial["pods"] < count, partial


def test_agent_hours_are_banked_and_capped(kubectl: Tool, aar_operator: OperatorProcess) -> None:
    # 0.002 agent-hours (7.2 s) for the run, 3.6 s each: reached within seconds of running.
    kubectl.apply(run("hours", 2, budget={"agentHours": 0.002, "usd": 100}))
    eventually(lambda: of_run(kubectl, "pods", "hours") == agents("hours", 2), what="2 Pods")

    def start_running(pod: str) -> None:
        """No kubelet here: say, as a kubelet would, that the agent's container started."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        status = {
            "phase": "Running",
            "startTime": now,
            "containerStatuses": [
                {
                    "name": "agent", "ready": True, "restartCount": 0, "image": "agent:test",
                    "imageID": "", "state": {"running": {"startedAt": now}},
                }
            ],
        }  # fmt: skip
        patch = json.dumps({"status": status})
        kubectl.run("patch", "pod", pod, "--subresource=status", "--type=merge", "-p", patch)

    start_running("hours-0")
    sandbox = eventually(
        lambda: (
            (s := kubectl.json("get", "asb", "hours-0"))
            and condition(s, "BudgetExhausted").get("status") == "True"
            and s
        ),
        what="agent 0 over its 0.001 agent-hour share",
    )
    spend = sandbox["status"]["spend"]
    assert spend["agentHours"] >= 0.001
    assert spend["gpuHours"] == spend["agentHours"]  # one GPU each
    assert "agent-hours" in condition(sandbox, "BudgetExhausted")["message"]
    eventually(lambda: of_run(kubectl, "pods", "hours") == ["hours-1"], what="only agent 0 stopped")
    run_now = eventually(
        lambda: (
            (r := kubectl.json("get", "rr", "hours"))
            and r["status"]["spend"]["agentHours"] >= 0.001
            and r
        ),
        what="the run sums its agents' hours",
    )
    assert condition(run_now, "BudgetExhausted")["status"] == "False"

    start_running("hours-1")
    stopped = eventually(
        lambda: (
            (r := kubectl.json("get", "rr", "hours"))
            and condition(r, "BudgetExhausted").get("status") == "True"
            and r
        ),
        what="the run over its 0.002 agent-hours",
    )
    assert condition(stopped, "Ready")["reason"] == "BudgetExhausted"
    eventually(lambda: of_run(kubectl, "pods", "hours") == [], what="every Pod deleted")
    assert of_run(kubectl, "persistentvolumeclaims", "hours") == agents("hours", 2, "-workspace")


def test_a_child_name_taken_by_someone_else_is_left_alone_and_reported(
    kubectl: Tool, aar_operator: OperatorProcess
) -> None:
    kubectl.run("create", "serviceaccount", "taken-0")
    kubectl.apply(run("taken", 2))
    eventually(
        lambda: names(kubectl, "pods", "aar.dev/agent=taken-1") == ["taken-1"], what="agent 1"
    )
    ready = eventually(
        lambda: (
            (c := condition(kubectl.json("get", "asb", "taken-0"), "Ready")).get("reason")
            == "ChildConflict"
            and c
        ),
        what="Ready=False ChildConflict",
    )
    assert (
        "ServiceAccount taken-0 exists and is not owned by AgentSandbox taken-0" in ready["message"]
    )
    untouched = kubectl.json("get", "serviceaccount", "taken-0")["metadata"]
    assert "ownerReferences" not in untouched
    assert "aar.dev/run" not in untouched.get("labels", {})
    assert names(kubectl, "pods", "aar.dev/agent=taken-0") == []


def test_a_pod_the_apiserver_refuses_is_reported_on_the_sandbox(
    kubectl: Tool, aar_operator: OperatorProcess
) -> None:
    sandbox = {"image": "agent:test", "resources": {"gpu": 1}, "runtimeClassName": "absent"}
    kubectl.apply(run("refused", 1, sandbox=sandbox))

    def rejected() -> dict[str, Any]:
        for sandbox in kubectl.json("get", "agentsandboxes")["items"]:
            if (ready := condition(sandbox, "Ready")).get("reason") == "PodRejected":
                return ready
        return {}

    ready = eventually(rejected, what="Ready=False PodRejected on the sandbox")
    assert 'RuntimeClass "absent" not found' in ready["message"]
    assert of_run(kubectl, "pods", "refused") == []
    events = kubectl.json("get", "events", "--field-selector", "involvedObject.name=refused-0")
    assert any(e["type"] == "Warning" and e["reason"] == "PodRejected" for e in events["items"])

    # Once the cluster has what the Pod asks for, the next reconcile creates it.
    kubectl.apply(
        {
            "apiVersion": "node.k8s.io/v1",
            "kind": "RuntimeClass",
            "metadata": {"name": "absent"},
            "handler": "runsc",
        }
    )
    eventually(lambda: of_run(kubectl, "pods", "refused") == ["refused-0"], what="the Pod")
    kubectl.run("delete", "runtimeclass", "absent")


def test_a_sandbox_follows_its_pod_between_resyncs(
    control_plane: ControlPlane, kubectl: Tool, operator_namespace: str, crds: None, tmp_path: Path
) -> None:
    # Resyncs far apart: only the watch on the agents' Pods can bring the scheduler's verdict
    # to the sandbox in time.
    operator = OperatorProcess(
        control_plane.kubeconfig_path, operator_namespace, tmp_path / "operator.log", resync=600
    )
    operator.start()
    try:
        kubectl.apply(run("watched", 1))
        started = time.monotonic()
        scheduled_at = sandbox_at = None
        verdict: tuple[str, str] | None = None
        while time.monotonic() - started < 60 and sandbox_at is None:
            if verdict is None:
                pod = kubectl.json("get", "pods", "-l", "aar.dev/run=watched")["items"]
                if pod and (scheduled := condition(pod[0], "PodScheduled")):
                    scheduled_at = time.monotonic()
                    verdict = (scheduled["status"], scheduled["reason"])
            else:
                shown = condition(kubectl.json("get", "asb", "watched-0"), "PodScheduled")
                if (shown.get("status"), shown.get("reason")) == verdict:
                    sandbox_at = time.monotonic()
            time.sleep(0.1)
        assert verdict == ("False", "Unschedulable"), "no node here: the scheduler says so"
        assert scheduled_at is not None
        assert sandbox_at is not None, "the sandbox never showed the scheduler's verdict"
        # The real figure is bench/operator_scale.py's; this only says the watch works at all.
        print(f"the sandbox showed the scheduler's verdict {sandbox_at - scheduled_at:.2f} s later")
        assert sandbox_at - scheduled_at < 30
    finally:
        operator.stop()
        print(f"--- operator log (tail) ---\n{operator.log()}")
