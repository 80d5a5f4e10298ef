"""What the local cluster needs besides its node before aar runs on it: cluster DNS as a Pod
behind the `kube-dns` Service (`aar_devcluster.clusterdns`), from the operator's image, which
carries the whole distribution."""

from __future__ import annotations

import time
from typing import Any

from aar_devcluster.node import CLUSTER_DNS_IP
from aar_devcluster.tools import Tool

DNS_NAMESPACE = "kube-system"
DNS_PORT = 5353  # unprivileged: the server runs as a non-root user with no capabilities
DNS_IMAGE_TARGET = "operator"


# What every container the development cluster adds runs with: no root, no capabilities, no writes
# to its image.
RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}


def one_pod_deployment(
    meta: dict[str, Any],
    labels: dict[str, str],
    container: dict[str, Any],
    service_account: str | None = None,
) -> dict[str, Any]:
    """A Deployment of one Pod running `container` (made restricted), RuntimeDefault seccomp."""
    pod: dict[str, Any] = {
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{**container, "securityContext": RESTRICTED}],
    }
    if service_account:
        pod["serviceAccountName"] = service_account
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod},
        },
    }


def cluster_dns(image: str) -> list[dict[str, Any]]:
    """The DNS server's ServiceAccount (it may list and watch Services), Deployment and the
    `kube-dns` Service at the address every Pod's resolv.conf names."""
    labels = {"k8s-app": "kube-dns", "app.kubernetes.io/name": "aar-cluster-dns"}
    meta = {"name": "kube-dns", "namespace": DNS_NAMESPACE, "labels": labels}
    container = {
        "name": "dns",
        "image": image,
        "imagePullPolicy": "Never",
        "command": ["python", "-m", "aar_devcluster.clusterdns", f"--port={DNS_PORT}"],
        "ports": [
            {"name": "dns", "containerPort": DNS_PORT, "protocol": "UDP"},
            {"name": "dns-tcp", "containerPort": DNS_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {"tcpSocket": {"port": DNS_PORT}, "periodSeconds": 2},
        "resources": {
            "requests": {"cpu": "10m", "memory": "32Mi"},
            "limits": {"cpu": "200m", "memory": "96Mi"},
        },
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": "aar:cluster-dns", "labels": labels},
            "rules": [{"apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "aar:cluster-dns", "labels": labels},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "aar:cluster-dns",
            },
            "subjects": [
                {"kind": "ServiceAccount", "name": "kube-dns", "namespace": DNS_NAMESPACE}
            ],
        },
        one_pod_deployment(meta, labels, container, "kube-dns"),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {
                "clusterIP": CLUSTER_DNS_IP,
                "selector": {"k8s-app": "kube-dns"},
                "ports": [
                    {"name": "dns", "port": 53, "targetPort": DNS_PORT, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "targetPort": DNS_PORT, "protocol": "TCP"},
                ],
            },
        },
    ]


def install_cluster_dns(kubectl: Tool, image: str, timeout: float = 120.0) -> None:
    """Apply the DNS add-on and wait until its Pod is Ready."""
    kubectl.apply(*cluster_dns(image))
    deadline = time.monotonic() + timeout
    kubectl.run(
        "-n",
        DNS_NAMESPACE,
        "rollout",
        "status",
        "deployment/kube-dns",
        f"--timeout={max(1, int(deadline - time.monotonic()))}s",
        timeout=timeout + 10,
    )
