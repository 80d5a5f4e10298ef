"""Pure functions from specs to manifests: no I/O, so every child is checked by a unit test.

A sandbox's children are its ServiceAccount, credential Secret, workspace PVC, Pod and
NetworkPolicy; a run's children are its AgentSandboxes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from aar_operator.budget import agent_budget
from aar_operator.config import OperatorConfig
from aar_operator.models import (
    API_VERSION,
    AgentSandboxSpec,
    ResearchRunSpec,
    SandboxTemplate,
    dump,
)
from aar_operator.naming import (
    agent_name,
    credential_secret_name,
    network_policy_name,
    pod_name,
    service_account_name,
    task_claim_name,
    workspace_name,
)

MANAGER = "aar-operator"
SPEC_HASH = "aar.dev/spec-hash"
STOP_REASON = "aar.dev/stop-reason"
# On every child of a sandbox: which agent it belongs to.
AGENT_LABEL = "aar.dev/agent"
TASK_DIR = "/task"
WORKSPACE_DIR = "/workspace"
CREDENTIAL_KEY = "credential"
AGENT_UID = 1000  # the agent image's unprivileged user
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class Owner:
    """Enough of an object to point an ownerReference at it."""

    api_version: str
    kind: str
    name: str
    uid: str

    def reference(self, controller: bool = True) -> dict[str, Any]:
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": controller,
            "blockOwnerDeletion": True,
        }


@dataclass(frozen=True)
class Sandbox:
    """An AgentSandbox as its builders need it."""

    namespace: str
    name: str
    uid: str
    spec: AgentSandboxSpec
    # The ResearchRun that made it, if any: workspaces are co-owned by it so that they outlive
    # a scale-down and go only with the run.
    run_owner: Owner | None = None

    @property
    def run(self) -> str:
        return self.spec.run or self.name

    @property
    def owner(self) -> Owner:
        return Owner(API_VERSION, "AgentSandbox", self.name, self.uid)


def labels(run: str, agent: str | None, component: str) -> dict[str, str]:
    result = {
        "app.kubernetes.io/name": "aar-agent",
        "app.kubernetes.io/instance": run,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGER,
        "app.kubernetes.io/part-of": "aar",
        "aar.dev/run": run,
    }
    if agent is not None:
        result[AGENT_LABEL] = agent
    return result


def spec_hash(obj: Any) -> str:
    """A short stable digest of what we asked for; a changed digest means replace or update."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# --- ResearchRun -> AgentSandboxes ------------------------------------------------------------


def research_sandbox(
    namespace: str, run: Owner, spec: ResearchRunSpec, index: int, stop_reason: str | None
) -> dict[str, Any]:
    """Agent `index` of a run. `stop_reason` (Suspended, DeadlineExceeded, BudgetExhausted)
    suspends it and says why."""
    name = agent_name(run.name, index)
    directions = spec.directions
    sandbox_spec = AgentSandboxSpec(
        run=run.name,
        direction=directions[index % len(directions)] if directions else "",
        model=spec.model,
        task=spec.task,
        sandbox=spec.sandbox,
        budget=agent_budget(spec),
        suspend=stop_reason is not None,
    )
    return {
        "apiVersion": API_VERSION,
        "kind": "AgentSandbox",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels(run.name, name, "sandbox"),
            "annotations": {STOP_REASON: stop_reason or ""},
            "ownerReferences": [run.reference()],
        },
        "spec": dump(sandbox_spec),
    }


# --- AgentSandbox -> children -----------------------------------------------------------------


def _metadata(sandbox: Sandbox, name: str, component: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": sandbox.namespace,
        "labels": labels(sandbox.run, sandbox.name, component),
        "ownerReferences": [sandbox.owner.reference()],
    }


def service_account(sandbox: Sandbox) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(sandbox, service_account_name(sandbox.name), "agent"),
        # The agent has no business with the Kubernetes API.
        "automountServiceAccountToken": False,
    }


def credential_secret(sandbox: Sandbox, credential: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(sandbox, credential_secret_name(sandbox.name), "credential"),
        "type": "Opaque",
        # Immutable: nobody (the operator included) rewrites an agent's identity in place.
        "immutable": True,
        "stringData": {CREDENTIAL_KEY: credential},
    }


def workspace_pvc(sandbox: Sandbox) -> dict[str, Any]:
    metadata = _metadata(sandbox, workspace_name(sandbox.name), "workspace")
    if sandbox.run_owner is not None:
        # Garbage collection deletes an object when its last owner is gone: with the run as
        # a second owner the workspace survives a scale-down and goes with the run.
        metadata["ownerReferences"].append(sandbox.run_owner.reference(controller=False))
    template = sandbox.spec.sandbox
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": str(template.storage)}},
    }
    if template.storage_class_name:
        spec["storageClassName"] = template.storage_class_name
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": metadata, "spec": spec}


def sandbox_env(sandbox: Sandbox, config: OperatorConfig) -> list[dict[str, Any]]:
    """Exactly the environment docs/interfaces.md promises an agent."""
    spec = sandbox.spec
    credential = {
        "valueFrom": {
            "secretKeyRef": {"name": credential_secret_name(sandbox.name), "key": CREDENTIAL_KEY}
        }
    }
    plain = {
        "AAR_NAMESPACE": sandbox.namespace,
        "AAR_RUN": sandbox.run,
        "AAR_AGENT": sandbox.name,
        "AAR_DIRECTION": spec.direction,
        "AAR_MODEL": spec.model,
        "AAR_TASK": spec.task.name,
        "AAR_TASK_DIR": TASK_DIR,
        "AAR_WORKSPACE": WORKSPACE_DIR,
    }
    urls = {
        "ANTHROPIC_BASE_URL": config.gateway_url,
        "AAR_GATEWAY_URL": config.gateway_url,
        "AAR_FORUM_URL": config.forum_url,
        "AAR_SCORER_URL": config.scorer_url,
    }
    return (
        [{"name": key, "value": value} for key, value in plain.items()]
        + [{"name": "AAR_CREDENTIAL", **credential}, {"name": "ANTHROPIC_API_KEY", **credential}]
        + [{"name": key, "value": value} for key, value in urls.items()]
    )


def container_security_context() -> dict[str, Any]:
    """Every container the operator makes, agent or reproduction: nothing to escalate to,
    nothing to write outside its volumes."""
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> dict[str, Any]:
    """Every Pod the operator makes runs as the image's unprivileged user."""
    return {
        "runAsNonRoot": True,
        "runAsUser": AGENT_UID,
        "runAsGroup": AGENT_UID,
        "fsGroup": AGENT_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_resources(template: SandboxTemplate) -> dict[str, Any]:
    """CPU and memory requested and limited alike; GPUs as a limit (an extended resource)."""
    resources = template.resources
    amounts: dict[str, str] = {"cpu": str(resources.cpu), "memory": str(resources.memory)}
    limits = dict(amounts)
    if resources.gpu:
        limits[GPU_RESOURCE] = str(resources.gpu)
    return {"requests": amounts, "limits": limits}


def pod_placement(template: SandboxTemplate) -> dict[str, Any]:
    """What a Pod of this template adds to its spec for where it runs: a toleration of GPU
    nodes' taint when it asks for GPUs, and its RuntimeClass."""
    placement: dict[str, Any] = {}
    if template.resources.gpu:
        placement["tolerations"] = [
            {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
        ]
    if template.runtime_class_name:
        placement["runtimeClassName"] = template.runtime_class_name
    return placement


def _agent_container(sandbox: Sandbox, config: OperatorConfig) -> dict[str, Any]:
    """The one container: nothing to escalate to, nothing to write outside its volumes."""
    return {
        "name": "agent",
        "image": sandbox.spec.sandbox.image,
        "env": sandbox_env(sandbox, config),
        "resources": container_resources(sandbox.spec.sandbox),
        "securityContext": container_security_context(),
        "volumeMounts": [
            {"name": "workspace", "mountPath": WORKSPACE_DIR},
            {"name": "task", "mountPath": TASK_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def _volumes(sandbox: Sandbox) -> list[dict[str, Any]]:
    """The agent's workspace, its task's bundle (read-only) and a scratch /tmp."""
    return [
        {
            "name": "workspace",
            "persistentVolumeClaim": {"claimName": workspace_name(sandbox.name)},
        },
        {
            "name": "task",
            "persistentVolumeClaim": {
                "claimName": task_claim_name(sandbox.spec.task.name),
                "readOnly": True,
            },
        },
        {"name": "tmp", "emptyDir": {"sizeLimit": "10Gi"}},
    ]


def pod(sandbox: Sandbox, config: OperatorConfig) -> dict[str, Any]:
    """The agent's Pod: non-root, read-only root, no capabilities, RuntimeDefault seccomp."""
    template = sandbox.spec.sandbox
    spec: dict[str, Any] = {
        "serviceAccountName": service_account_name(sandbox.name),
        "automountServiceAccountToken": False,
        # Service links would put every Service of the namespace into the environment.
        "enableServiceLinks": False,
        # An agent that ends its loop is done; the sandbox reports Succeeded or Failed.
        "restartPolicy": "Never",
        "securityContext": pod_security_context(),
        "containers": [_agent_container(sandbox, config)],
        "volumes": _volumes(sandbox),
        **pod_placement(template),
    }
    metadata = _metadata(sandbox, pod_name(sandbox.name), "agent")
    metadata["annotations"] = {SPEC_HASH: spec_hash(spec)}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def _service_peer(namespace: str, component: str) -> dict[str, Any]:
    # `kubernetes.io/metadata.name` is set on every namespace by Kubernetes 1.21+; on older
    # clusters the chart labels its namespaces with it.
    return {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/component": component}},
    }


def network_policy(sandbox: Sandbox, config: OperatorConfig) -> dict[str, Any]:
    """Deny all ingress; egress only to DNS, the forum, the gateway and the scorer."""
    http = [{"protocol": "TCP", "port": 8080}]
    dns = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(sandbox, network_policy_name(sandbox.name), "network-policy"),
        "spec": {
            "podSelector": {"matchLabels": {AGENT_LABEL: sandbox.name}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": [
                {
                    "to": [
                        {
                            "namespaceSelector": {},
                            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
                        }
                    ],
                    "ports": dns,
                },
                {
                    "to": [
                        _service_peer(config.services_namespace, "forum"),
                        _service_peer(config.services_namespace, "gateway"),
                    ],
                    "ports": http,
                },
                {"to": [_service_peer(config.scorer_namespace, "scorer")], "ports": http},
            ],
        },
    }
