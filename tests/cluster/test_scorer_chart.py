"""The chart's scorer, against a real apiserver. Only the scorer's ServiceAccount can
read the hidden labels; an agent's and the operator's cannot get, list or watch its Secrets.
Every check is a request made as that ServiceAccount (impersonation), not a reading of YAML."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_chart import Chart

from aar_devcluster.controlplane import ControlPlane
from aar_devcluster.tools import Tool, ToolError
from aar_scorer.tasks import load_tasks

TASK = {
    "name": "w2s-toy",
    "labels": [0, 1],
    "baselines": {"weak": 0.6, "ceiling": 0.8},
    "quota": {"per_agent": 5, "per_run": 20},
    "feedback": {"step": 0.02},
}


@pytest.fixture
def installed(chart: Chart, control_plane: ControlPlane) -> dict[str, Any]:
    """The chart installed as shipped, in a scorer namespace of this test's own."""
    scorer_namespace = chart.scorer_namespace
    release = "aar-test"
    values = ["--set-json", f"scorer.tasks=[{json.dumps(TASK)}]"]
    manifests = list(yaml.safe_load_all(chart.template(*values, release=release)))
    chart.install(*values, release=release)
    # The labels Secret: created by whoever holds the labels, never by the chart.
    admin = Tool("kubectl", control_plane.kubeconfig_path, scorer_namespace)
    admin.run(
        "create", "secret", "generic", "aar-scorer-labels",
        "--from-literal=w2s-toy.json={}", "--from-literal=decoy=not-for-anyone",
    )  # fmt: skip
    return {
        "namespace": scorer_namespace,
        "manifests": [m for m in manifests if m],
        "release": release,
        "admin": admin,
    }


def operator_service_account(manifests: list[dict[str, Any]]) -> str:
    """The operator's ServiceAccount as the chart ships it (its RBAC comes with it)."""
    accounts = [
        f"system:serviceaccount:{m['metadata']['namespace']}:{m['metadata']['name']}"
        for m in manifests
        if m["kind"] == "ServiceAccount" and m["metadata"]["name"].endswith("-operator")
    ]
    assert len(accounts) == 1, accounts
    return accounts[0]


def assert_denied(admin: Tool, user: str, *args: str) -> None:
    with pytest.raises(ToolError) as refused:
        admin.run(*args, "--as", user)
    assert "forbidden" in refused.value.stderr, refused.value.stderr


def test_only_the_scorer_reads_the_hidden_labels(installed: dict[str, Any], kubectl: Tool) -> None:
    admin: Tool = installed["admin"]
    scorer_namespace = installed["namespace"]
    # An agent's ServiceAccount as the operator makes it: in a run's namespace, no RBAC at all.
    kubectl.run("create", "serviceaccount", "w2s-toy-1")
    agent = f"system:serviceaccount:{kubectl.namespace}:w2s-toy-1"
    operator = operator_service_account(installed["manifests"])
    assert operator == f"system:serviceaccount:{kubectl.namespace}:{installed['release']}-operator"
    scorer = f"system:serviceaccount:{scorer_namespace}:aar-scorer"

    # kubectl's --watch lists first; a raw watch request asks for the watch verb alone.
    secrets_path = f"/api/v1/namespaces/{scorer_namespace}/secrets"
    watch = ("get", "--raw", f"{secrets_path}?watch=1&timeoutSeconds=1")
    for user in (agent, operator):
        assert_denied(admin, user, "get", "secret", "aar-scorer-labels", "-o", "name")
        assert_denied(admin, user, "get", "secrets", "-o", "name")
        assert_denied(admin, user, *watch)

    assert admin.run("get", "secret", "aar-scorer-labels", "-o", "name", "--as", scorer) == (
        "secret/aar-scorer-labels\n"
    )
    # Its one Secret, by name: not the others in its namespace, no list, no watch.
    assert_denied(admin, scorer, "get", "secrets", "-o", "name")
    assert_denied(admin, scorer, *watch)
    admin.run("create", "secret", "generic", "another", "--from-literal=k=v")
    assert_denied(admin, scorer, "get", "secret", "another", "-o", "name")
    # And nowhere else.
    assert_denied(Tool("kubectl", admin.kubeconfig, kubectl.namespace), scorer, "get", "secrets")


def test_the_chart_deploys_the_scorer_as_the_interfaces_say(installed: dict[str, Any]) -> None:
    admin: Tool = installed["admin"]
    namespace = installed["namespace"]
    assert admin.json("get", "namespace", namespace)["metadata"]["name"] == namespace
    service = admin.json("get", "service", "aar-scorer")
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [
        ("http", 8080),
        ("metrics", 9090),
    ]
    deployment = admin.json("get", "deployment", "aar-scorer")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "aar-scorer"
    assert pod["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["labels"]["secret"]["secretName"] == "aar-scorer-labels"
    assert volumes["public-key"]["configMap"]["name"] == "aar-credential-public-key"
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "aar-scorer-data"
    container = pod["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert deployment["spec"]["strategy"]["type"] == "Recreate"


def test_the_rendered_tasks_file_is_what_the_scorer_loads(
    installed: dict[str, Any], tmp_path: Path
) -> None:
    config = installed["admin"].json("get", "configmap", "aar-scorer-tasks")
    rendered = yaml.safe_load(config["data"]["tasks.yaml"])
    labels_file = Path(rendered["tasks"][0]["labels_file"])
    assert labels_file == Path("/var/run/aar-scorer/labels/w2s-toy.json")
    # Load it as the scorer would, with the labels file where the Secret's volume puts it.
    rendered["tasks"][0]["labels_file"] = labels_file.name
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump(rendered))
    (tmp_path / labels_file.name).write_text(
        json.dumps({"labels": [0, 1] * 50, "split_seed": "a-seed-of-16-chars-or-more"})
    )
    task = load_tasks(tmp_path / "tasks.yaml")["w2s-toy"]
    assert task.spec.quota.per_agent == 5
    assert task.spec.feedback.step == 0.02
    assert task.size == 100


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--set", "scorer.labelSecret=typo", "additional properties 'labelSecret' not allowed"),
        (
            "--set-json",
            'scorer.tasks=[{"name": "t", "labels": [0, 1], "baselines": {"weak": 0.5}}]',
            "missing property 'ceiling'",
        ),
        (
            "--set-json",
            'scorer.tasks=[{"name": "t", "labels": [0, 1], '
            '"baselines": {"weak": 0.5, "ceiling": 0.9}, "probing": {"action": "ignore"}}]',
            "value must be one of 'refuse', 'flag'",
        ),
    ],
)
def test_the_chart_refuses_scorer_values_it_does_not_know(
    chart: Chart, flag: str, value: str, message: str
) -> None:
    with pytest.raises(ToolError) as refused:
        chart.template(flag, value)
    assert message in refused.value.stderr
