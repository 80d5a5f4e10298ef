"""How a sandbox Pod's state reads on the web UI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aar_forum.kube import KubeAccess, pod_state


def pod(status: dict[str, Any], **metadata: Any) -> dict[str, Any]:
    return {"metadata": {"name": "w2s-1", **metadata}, "status": status}


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (
            {
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"state": {"running": {}}}],
            },
            "Running, ready",
        ),
        (
            {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]},
            "Running, not ready",
        ),
        (
            {
                "phase": "Running",
                "containerStatuses": [{"state": {"waiting": {"reason": "CrashLoopBackOff"}}}],
            },
            "Running: CrashLoopBackOff",
        ),
        (
            {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/4 nodes have nvidia.com/gpu",
                    }
                ],
            },
            "Pending: Unschedulable (0/4 nodes have nvidia.com/gpu)",
        ),
        (
            {
                "phase": "Failed",
                "containerStatuses": [{"state": {"terminated": {"reason": "OOMKilled"}}}],
            },
            "Failed: OOMKilled",
        ),
        ({}, "Unknown"),
    ],
)
def test_pod_state_names_the_phase_and_what_is_wrong(status: dict[str, Any], expected: str) -> None:
    assert pod_state(pod(status)) == expected


def test_a_deleted_pod_is_terminating() -> None:
    assert pod_state(pod({"phase": "Running"}, deletionTimestamp="2026-01-01T00:00:00Z")) == (
        "Terminating"
    )


def test_access_comes_from_the_cluster_or_an_explicit_server(tmp_path: Path) -> None:
    assert KubeAccess.from_env({}) is None
    inside = KubeAccess.from_env({"KUBERNETES_SERVICE_HOST": "10.0.0.1"})
    assert inside is not None
    assert inside.server == "https://10.0.0.1:443"
    assert inside.token_file == Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    ipv6 = KubeAccess.from_env(
        {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"}
    )
    assert ipv6 is not None
    assert ipv6.server == "https://[fd00::1]:6443"
    ca = tmp_path / "ca.crt"
    ca.write_text("")
    explicit = KubeAccess.from_env(
        {
            "AAR_FORUM_KUBE_API": "https://127.0.0.1:6443",
            "AAR_FORUM_KUBE_TOKEN_FILE": str(tmp_path / "token"),
            "AAR_FORUM_KUBE_CA_FILE": str(ca),
        }
    )
    assert explicit == KubeAccess("https://127.0.0.1:6443", tmp_path / "token", ca)
