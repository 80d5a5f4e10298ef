"""The operator against a real apiserver: `kubectl apply -f examples/run.yaml` and what follows."""

from __future__ import annotations

import base64
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from operator_process import OperatorProcess, eventually, names

from aar_common.credentials import CredentialVerifier, Role
from aar_devcluster.tools import Tool

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "examples" / "run.yaml"
CHILD_KINDS = "serviceaccounts,secrets,persistentvolumeclaims,pods,networkpolicies"


def example(**overrides: Any) -> dict[str, Any]:
    run: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    run["spec"].update(overrides)
    return run


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for item in (obj.get("status") or {}).get("conditions", []):
        if item["type"] == kind:
            return dict(item)
    return {}


@pytest.fixture
def gvisor(kubectl: Tool) -> None:
    """The example names RuntimeClass gvisor; the apiserver refuses Pods naming a missing one."""
    kubectl.run(
        "apply",
        "-f",
        "-",
        input="apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata: {name: gvisor}\n"
        "handler: runsc\n",
    )


def managed(kubectl: Tool, kind: str, run: str) -> list[str]:
    return names(kubectl, kind, f"aar.dev/run={run}")


def test_example_run_yields_exactly_the_sandboxes_and_their_children(
    kubectl: Tool,
    aar_operator: OperatorProcess,
    gvisor: None,
    namespace: str,
    operator_namespace: str,
) -> None:
    kubectl.run("apply", "-f", str(EXAMPLE))
    agents = [f"w2s-chat-{i}" for i in range(9)]
    eventually(lambda: managed(kubectl, "pods", "w2s-chat") == agents, what="nine Pods")

    assert managed(kubectl, "agentsandboxes", "w2s-chat") == agents
    assert managed(kubectl, "serviceaccounts", "w2s-chat") == agents
    assert managed(kubectl, "secrets", "w2s-chat") == sorted(f"{a}-credential" for a in agents)
    assert managed(kubectl, "persistentvolumeclaims", "w2s-chat") == sorted(
        f"{a}-workspace" for a in agents
    )
    assert managed(kubectl, "networkpolicies", "w2s-chat") == agents

    sandboxes = kubectl.json("get", "agentsandboxes")["items"]
    directions = yaml.safe_load(EXAMPLE.read_text())["spec"]["directions"]
    for sandbox in sandboxes:
        index = int(sandbox["metadata"]["name"].rsplit("-", 1)[1])
        assert sandbox["spec"]["direction"] == directions[index % len(directions)]
        assert sandbox["spec"]["budget"] == {"usd": 2000.0, "agentHours": pytest.approx(800 / 9)}
        assert sandbox["metadata"]["ownerReferences"][0]["kind"] == "ResearchRun"

    pod = kubectl.json("get", "pod", "w2s-chat-3")
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == "w2s-chat-3"
    assert spec["runtimeClassName"] == "gvisor"
    [container] = spec["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["runAsNonRoot"] is True
    assert security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"]["limits"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/task"]["readOnly"] is True
    assert not mounts["/workspace"].get("readOnly")
    assert "/tmp" in mounts
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["workspace"]["persistentVolumeClaim"]["claimName"] == "w2s-chat-3-workspace"
    env = {e["name"]: e for e in container["env"]}
    assert set(env) == {
        "AAR_NAMESPACE", "AAR_RUN", "AAR_AGENT", "AAR_DIRECTION", "AAR_MODEL", "AAR_TASK",
        "AAR_TASK_DIR", "AAR_WORKSPACE", "AAR_CREDENTIAL", "ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL", "AAR_GATEWAY_URL", "AAR_FORUM_URL", "AAR_SCORER_URL",
    }  # fmt: skip
    assert env["AAR_AGENT"]["value"] == "w2s-chat-3"
    assert env["AAR_NAMESPACE"]["value"] == namespace
    assert env["ANTHROPIC_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "w2s-chat-3-credential",
        "key": "credential",
    }
    assert pod["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "aar-operator"
    assert pod["metadata"]["labels"]["aar.dev/agent"] == "w2s-chat-3"

    # The credential verifies with the published public key and names this agent only.
    secret = kubectl.json("get", "secret", "w2s-chat-3-credential")
    assert secret["immutable"] is True
    published = kubectl.json(
        "get", "configmap", "aar-credential-public-key", "-n", operator_namespace
    )
    public = published["data"]["public-key.pem"]
    token = base64.b64decode(secret["data"]["credential"]).decode()
    principal = CredentialVerifier(public.encode()).verify(token)
    assert (principal.role, principal.namespace, principal.run, principal.agent) == (
        Role.AGENT, namespace, "w2s-chat", "w2s-chat-3",
    )  # fmt: skip

    policy = kubectl.json("get", "networkpolicy", "w2s-chat-3")["spec"]
    assert policy["podSelector"] == {"matchLabels": {"aar.dev/agent": "w2s-chat-3"}}
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert not policy.get("ingress")
    egress_ports = sorted(p["port"] for rule in policy["egress"] for p in rule["ports"])
    assert egress_ports == [53, 53, 8080, 8080]

    # No kubelet, no nodes: the scheduler's verdict is copied onto the sandbox, which waits.
    def unschedulable() -> dict[str, Any]:
        sandbox = kubectl.json("get", "agentsandbox", "w2s-chat-3")
        scheduled = condition(sandbox, "PodScheduled")
        return scheduled if scheduled.get("reason") == "Unschedulable" else {}

    scheduled = eventually(unschedulable, what="PodScheduled=False, Unschedulable")
    assert "nodes" in scheduled["message"]
    run = eventually(
        lambda: (r := kubectl.json("get", "researchrun", "w2s-chat"))["status"].get("agents") and r,
        what="run status",
    )
    assert run["status"]["agents"]["desired"] == 9
    assert condition(run, "Ready")["status"] == "False"

    # Prometheus: sandboxes by state and reconcile timings, labelled by run.
    def scraped() -> str | None:
        url = f"http://127.0.0.1:{aar_operator.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text: str = response.read().decode()
        labels = f'namespace="{namespace}",run="w2s-chat",state="Unschedulable"'
        unschedulable = f"aar_operator_sandboxes{{{labels}}} 9.0"
        return text if unschedulable in text else None

    metrics = eventually(scraped, what="nine Unschedulable sandboxes in /metrics")
    assert (
        f'aar_operator_reconcile_duration_seconds_count{{kind="AgentSandbox",namespace="{namespace}",'
        'run="w2s-chat"}' in metrics
    )
    assert f'aar_run_agent_seconds{{namespace="{namespace}",run="w2s-chat"}} 0.0' in metrics
    with urllib.request.urlopen(f"http://127.0.0.1:{aar_operator.liveness_port}/healthz") as health:
        assert health.status == 200

    # Idempotent: resyncs (every 2 s here) change nothing that was not asked to change.
    time.sleep(5)
    events = kubectl.json("get", "events", "--field-selector", "involvedObject.name=w2s-chat-3")
    reasons = [
        e["reason"] for e in events["items"] if e["involvedObject"]["kind"] == "AgentSandbox"
    ]
    assert reasons == ["Created"], reasons
    events = kubectl.json("get", "events", "--field-selector", "involvedObject.name=w2s-chat")
    assert [e["reason"] for e in events["items"]] == ["Created"]

    # Deleting the run deletes everything it made.
    kubectl.run("delete", "researchrun", "w2s-chat", "--wait=false")
    eventually(
        lambda: (
            not kubectl.run(
                "get", f"agentsandboxes,{CHILD_KINDS}", "-l", "aar.dev/run=w2s-chat", "-o", "name"
            )
        ),
        timeout=120,
        what="every child of the run gone",
    )
