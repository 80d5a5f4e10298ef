"""The local control plane is a real Kubernetes API: CRDs with schemas, admission, garbage
collection, controllers, and kubectl and helm talking to it."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from helm_chart import Chart
from operator_process import eventually

from aar_devcluster.controlplane import ControlPlane
from aar_devcluster.tools import Tool, ToolError


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The status condition of type `kind`, or None."""
    found = [c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind]
    return found[0] if found else None


def gadget_crd(group: str) -> dict[str, Any]:
    """A namespaced CRD with a structural schema: spec.replicas in 1..10, spec.mode an enum."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"gadgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["replicas"],
                                    "properties": {
                                        "replicas": {
                                            "type": "integer",
                                            "minimum": 1,
                                            "maximum": 10,
                                        },
                                        "mode": {"type": "string", "enum": ["fast", "careful"]},
                                    },
                                }
                            },
                        }
                    },
                }
            ],
        },
    }


@pytest.fixture
def gadget_group(control_plane: ControlPlane, kubectl: Tool) -> Iterator[str]:
    """A CRD installed for this test alone (CRDs are cluster-scoped), Established."""
    group = f"g{secrets.token_hex(3)}.test.aar.dev"
    kubectl.apply(gadget_crd(group))
    kubectl.run("wait", "--for=condition=Established", f"crd/gadgets.{group}", "--timeout=60s")
    yield group
    kubectl.run("delete", "crd", f"gadgets.{group}", "--wait=false")


def gadget(group: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": f"{group}/v1", "kind": "Gadget", "metadata": {"name": name}, "spec": spec}


def test_custom_resource_is_stored_and_read_back(gadget_group: str, kubectl: Tool) -> None:
    kubectl.apply(gadget(gadget_group, "first", {"replicas": 3, "mode": "careful"}))

    stored = kubectl.json("get", f"gadgets.{gadget_group}", "first")

    assert stored["spec"] == {"replicas": 3, "mode": "careful"}
    assert stored["metadata"]["namespace"] == kubectl.namespace
    assert stored["metadata"]["uid"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"replicas": 0},
            "spec.replicas: Invalid value: 0: spec.replicas in body should be "
            "greater than or equal to 1",
        ),
        ({"replicas": 11}, "should be less than or equal to 10"),
        ({"replicas": 2, "mode": "reckless"}, 'spec.mode: Unsupported value: "reckless"'),
        ({"mode": "fast"}, "spec.replicas: Required value"),
    ],
)
def test_apiserver_refuses_object_that_violates_schema(
    gadget_group: str, kubectl: Tool, spec: dict[str, Any], message: str
) -> None:
    with pytest.raises(ToolError) as refused:
        kubectl.apply(gadget(gadget_group, "bad", spec))

    assert "is invalid" in refused.value.stderr
    assert message in refused.value.stderr
    assert kubectl.run("get", f"gadgets.{gadget_group}", "-o", "name") == ""


def test_garbage_collector_deletes_owned_child(kubectl: Tool) -> None:
    kubectl.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}})
    owner_uid = kubectl.json("get", "configmap", "owner")["metadata"]["uid"]
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "child",
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid}
                ],
            },
        },
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "bystander"}},
    )

    kubectl.run("delete", "configmap", "owner", "--cascade=background")

    def child_gone() -> bool:
        return "child" not in kubectl.run("get", "configmaps", "-o", "name")

    eventually(child_gone, what="the garbage collector to delete configmap/child")
    assert "configmap/bystander" in kubectl.run("get", "configmaps", "-o", "name")


def test_controllers_turn_deployment_into_pending_pod(kubectl: Tool) -> None:
    kubectl.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "web", "image": "example.invalid/web:1"}]},
                },
            },
        }
    )

    def two_pods() -> bool:
        return len(kubectl.json("get", "pods", "-l", "app=web")["items"]) == 2

    eventually(two_pods, what="the Deployment's two Pods")

    def scheduler_gave_verdicts() -> bool:
        pods = kubectl.json("get", "pods", "-l", "app=web")["items"]
        return all(condition(pod, "PodScheduled") for pod in pods)

    eventually(scheduler_gave_verdicts, what="the scheduler's PodScheduled conditions")
    for pod in kubectl.json("get", "pods", "-l", "app=web")["items"]:
        # No node: the Pods exist, stay Pending, and the scheduler says why.
        assert pod["status"]["phase"] == "Pending"
        assert pod["spec"]["serviceAccountName"] == "default"
        scheduled = condition(pod, "PodScheduled")
        assert scheduled is not None
        assert scheduled["status"] == "False"
        assert scheduled["reason"] == "Unschedulable"
        assert "no nodes available" in scheduled["message"]


def test_rbac_denies_a_service_account_without_a_role(kubectl: Tool) -> None:
    kubectl.run("create", "serviceaccount", "nobody")
    user = f"system:serviceaccount:{kubectl.namespace}:nobody"

    can_list = kubectl.run("auth", "can-i", "list", "secrets", "--as", user, check=False)
    assert can_list.strip() == "no"
    with pytest.raises(ToolError) as forbidden:
        kubectl.run("get", "secrets", "--as", user)
    assert "forbidden" in forbidden.value.stderr


def test_helm_installs_the_chart(helm: Tool, kubectl: Tool, chart: Chart) -> None:
    helm.run("lint", "--strict", chart.path)
    chart.install(release="aar-test")

    releases = helm.json("list")
    assert [(r["name"], r["status"]) for r in releases] == [("aar-test", "deployed")]
    assert kubectl.json("get", "secrets", "-l", "owner=helm,name=aar-test")["items"]
