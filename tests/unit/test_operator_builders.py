"""Builders are pure: spec in, manifest out."""

from __future__ import annotations

from typing import Any

import pytest

from aar_operator import builders
from aar_operator.budget import agent_budget
from aar_operator.builders import Owner, Sandbox
from aar_operator.config import OperatorConfig
from aar_operator.models import API_VERSION, AgentSandboxSpec, ResearchRunSpec
from aar_operator.naming import agent_index

CONFIG = OperatorConfig()
RUN = Owner(API_VERSION, "ResearchRun", "w2s", "run-uid")


def run_spec(**overrides: Any) -> ResearchRunSpec:
    spec: dict[str, Any] = {
        "agents": 5,
        "directions": ["a", "b"],
        "task": {"name": "w2s-chat"},
        "sandbox": {
            "image": "agent:1",
            "resources": {"gpu": 2, "cpu": "8", "memory": "64Gi"},
            "storage": "50Gi",
        },
        "budget": {"usd": 1000, "agentHours": 100},
    }
    spec.update(overrides)
    return ResearchRunSpec.model_validate(spec)


def sandbox(run_owner: Owner | None = RUN, **sandbox: Any) -> Sandbox:
    template = {"image": "agent:1", "resources": {"gpu": 1, "cpu": 4, "memory": "8Gi"}, **sandbox}
    spec = AgentSandboxSpec.model_validate(
        {"run": "w2s", "direction": "a", "task": {"name": "w2s-chat"}, "sandbox": template}
    )
    return Sandbox("research", "w2s-3", "sandbox-uid", spec, run_owner)


def test_directions_are_assigned_round_robin_and_the_budget_split_evenly() -> None:
    spec = run_spec()
    made = [builders.research_sandbox("ns", RUN, spec, i, None) for i in range(5)]
    assert [m["metadata"]["name"] for m in made] == [f"w2s-{i}" for i in range(5)]
    assert [m["spec"]["direction"] for m in made] == ["a", "b", "a", "b", "a"]
    assert {(m["spec"]["budget"]["usd"], m["spec"]["budget"]["agentHours"]) for m in made} == {
        (200.0, 20.0)
    }
    assert made[0]["metadata"]["ownerReferences"] == [RUN.reference()]
    assert made[0]["metadata"]["labels"]["aar.dev/agent"] == "w2s-0"
    assert made[0]["spec"]["suspend"] is False


def test_small_budgets_are_shared_without_rounding_to_nothing() -> None:
    share = agent_budget(run_spec(agents=3, budget={"usd": 0.004}))
    assert share.usd == 0.001333
    assert share.usd * 3 <= 0.004


def test_a_stopped_run_suspends_its_sandboxes_and_says_why() -> None:
    made = builders.research_sandbox("ns", RUN, run_spec(), 0, "DeadlineExceeded")
    assert made["spec"]["suspend"] is True
    assert made["metadata"]["annotations"][builders.STOP_REASON] == "DeadlineExceeded"


@pytest.mark.parametrize(
    ("name", "index"),
    [("w2s-0", 0), ("w2s-12", 12), ("w2s-x", None), ("other-1", None), ("w2s-1-2", None)],
)
def test_agent_index(name: str, index: int | None) -> None:
    assert agent_index("w2s", name) == index


def test_pod_is_locked_down() -> None:
    pod = builders.pod(sandbox(runtimeClassName="gvisor"), CONFIG)
    spec = pod["spec"]
    assert spec["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }  # fmt: skip
    [container] = spec["containers"]
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "1"}
    assert "nvidia.com/gpu" not in container["resources"]["requests"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False
    assert spec["runtimeClassName"] == "gvisor"
    mounts = {m["mountPath"]: m.get("readOnly", False) for m in container["volumeMounts"]}
    assert mounts == {"/workspace": False, "/task": True, "/tmp": False}
    claims = {v["name"]: v.get("persistentVolumeClaim") for v in spec["volumes"]}
    assert claims["workspace"] == {"claimName": "w2s-3-workspace"}
    assert claims["task"] == {"claimName": "aar-task-w2s-chat", "readOnly": True}


def test_pod_without_gpus_has_no_gpu_limit_or_toleration() -> None:
    spec = builders.pod(sandbox(resources={"gpu": 0}), CONFIG)["spec"]
    assert "nvidia.com/gpu" not in spec["containers"][0]["resources"]["limits"]
    assert "tolerations" not in spec
    assert "runtimeClassName" not in spec


def test_env_is_exactly_the_documented_table() -> None:
    env = {
        e["name"]: e.get("value", e.get("valueFrom"))
        for e in builders.sandbox_env(sandbox(), CONFIG)
    }
    credential = {"secretKeyRef": {"name": "w2s-3-credential", "key": "credential"}}
    assert env == {
        "AAR_NAMESPACE": "research",
        "AAR_RUN": "w2s",
        "AAR_AGENT": "w2s-3",
        "AAR_DIRECTION": "a",
        "AAR_MODEL": "claude-opus-4-6",
        "AAR_TASK": "w2s-chat",
        "AAR_TASK_DIR": "/task",
        "AAR_WORKSPACE": "/workspace",
        "AAR_CREDENTIAL": credential,
        "ANTHROPIC_API_KEY": credential,
        "ANTHROPIC_BASE_URL": "http://aar-gateway.aar-system:8080",
        "AAR_GATEWAY_URL": "http://aar-gateway.aar-system:8080",
        "AAR_FORUM_URL": "http://aar-forum.aar-system:8080",
        "AAR_SCORER_URL": "http://aar-scorer.aar-scorer:8080",
    }


def test_a_changed_spec_changes_the_pod_digest_and_only_then() -> None:
    first = builders.pod(sandbox(), CONFIG)["metadata"]["annotations"][builders.SPEC_HASH]
    again = builders.pod(sandbox(), CONFIG)["metadata"]["annotations"][builders.SPEC_HASH]
    other = builders.pod(sandbox(image="agent:2"), CONFIG)["metadata"]["annotations"][
        builders.SPEC_HASH
    ]
    assert first == again != other


def test_workspace_is_co_owned_by_the_run_so_it_outlives_a_scale_down() -> None:
    owners = builders.workspace_pvc(sandbox())["metadata"]["ownerReferences"]
    assert [(o["kind"], o["controller"]) for o in owners] == [
        ("AgentSandbox", True),
        ("ResearchRun", False),
    ]
    alone = builders.workspace_pvc(sandbox(run_owner=None))["metadata"]["ownerReferences"]
    assert [o["kind"] for o in alone] == ["AgentSandbox"]
    assert builders.workspace_pvc(sandbox())["spec"]["resources"] == {
        "requests": {"storage": "50Gi"}
    }


def test_credential_secret_is_immutable_and_owned() -> None:
    secret = builders.credential_secret(sandbox(), "aar1.x.y")
    assert secret["immutable"] is True
    assert secret["stringData"] == {"credential": "aar1.x.y"}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "sandbox-uid"


def test_service_account_has_no_token() -> None:
    assert builders.service_account(sandbox())["automountServiceAccountToken"] is False


def test_network_policy_denies_ingress_and_allows_only_dns_and_the_services() -> None:
    policy = builders.network_policy(sandbox(), CONFIG)["spec"]
    assert policy["podSelector"] == {"matchLabels": {"aar.dev/agent": "w2s-3"}}
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"] == []
    peers = [
        (
            peer["namespaceSelector"].get("matchLabels", {}).get("kubernetes.io/metadata.name"),
            next(iter(peer["podSelector"]["matchLabels"].values())),
        )
        for rule in policy["egress"]
        for peer in rule["to"]
    ]
    assert peers == [
        (None, "kube-dns"),
        ("aar-system", "forum"),
        ("aar-system", "gateway"),
        ("aar-scorer", "scorer"),
    ]
    assert all("ipBlock" not in peer for rule in policy["egress"] for peer in rule["to"])


def test_every_child_carries_the_labels() -> None:
    box = sandbox()
    for child in (
        builders.service_account(box),
        builders.credential_secret(box, "c"),
        builders.workspace_pvc(box),
        builders.pod(box, CONFIG),
        builders.network_policy(box, CONFIG),
    ):
        labels = child["metadata"]["labels"]
        assert labels["aar.dev/run"] == "w2s"
        assert labels["aar.dev/agent"] == "w2s-3"
        assert {k for k in labels if k.startswith("app.kubernetes.io/")} == {
            f"app.kubernetes.io/{k}"
            for k in ("name", "instance", "component", "managed-by", "part-of")
        }


def test_a_child_as_the_apiserver_returns_it_needs_no_update() -> None:
    from aar_operator.children import _differs

    wanted = builders.network_policy(sandbox(), CONFIG)
    # The apiserver drops the empty ingress list and adds fields of its own.
    stored = {**wanted, "spec": {k: v for k, v in wanted["spec"].items() if k != "ingress"}}
    stored["metadata"] = {**wanted["metadata"], "uid": "x", "resourceVersion": "7"}
    assert not _differs(
        stored, {"spec": wanted["spec"], "metadata": {"labels": wanted["metadata"]["labels"]}}
    )
    changed = {**wanted["spec"], "podSelector": {"matchLabels": {"aar.dev/agent": "other"}}}
    assert _differs(stored, {"spec": changed})
