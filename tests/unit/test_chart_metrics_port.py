"""The chart's metrics port and NetworkPolicies, as `helm template` renders them: one value
(`metrics.port`) sets every component's metrics port wherever it is named, the API ports never
carry /metrics, the policies come behind `networkPolicy.enabled` (on by default), and the schema
refuses what could not work. Who reaches what is tests/cluster/test_network_policies_chart.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helm_template import helm_template, render

COMPONENTS = {"operator", "forum", "scorer", "gateway"}
SERVICE_MONITORS = ("--set", "monitoring.serviceMonitor.enabled=true")


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["labels"]["app.kubernetes.io/component"]: o
        for o in objects
        if o["kind"] == kind
    }


def test_one_value_sets_every_metrics_port(repo_root: Path) -> None:
    objects = render(repo_root, *SERVICE_MONITORS, "--set", "metrics.port=9100")
    deployments = by_kind(objects, "Deployment")
    assert set(deployments) == COMPONENTS
    for component, deployment in deployments.items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == 9100, component
        env = {e["name"]: e.get("value") for e in container["env"]}
        variable = "AAR_OPERATOR_METRICS_PORT" if component == "operator" else "AAR_METRICS_PORT"
        assert env[variable] == "9100", component
    services = [o for o in objects if o["kind"] == "Service"]
    metrics_ports = {
        s["metadata"]["name"]: [p for p in s["spec"]["ports"] if p["name"] == "metrics"]
        for s in services
    }
    assert {name: [(p["port"], p["targetPort"]) for p in ports] for name, ports in
            metrics_ports.items()} == {
        "aar-forum": [(9100, "metrics")],
        "aar-gateway": [(9100, "metrics")],
        "aar-scorer": [(9100, "metrics")],
        "aar-operator-metrics": [(9100, "metrics")],
    }  # fmt: skip
    for monitor in by_kind(objects, "ServiceMonitor").values():
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    for policy in by_kind(objects, "NetworkPolicy").values():
        (to_metrics,) = [
            rule for rule in policy["spec"]["ingress"] if {"protocol": "TCP", "port": 9100} in
            rule["ports"]
        ]  # fmt: skip
        assert to_metrics["ports"] == [{"protocol": "TCP", "port": 9100}]


def test_network_policies_are_on_by_default_and_behind_their_flag(repo_root: Path) -> None:
    assert set(by_kind(render(repo_root), "NetworkPolicy")) == COMPONENTS
    assert by_kind(render(repo_root, "--set", "networkPolicy.enabled=false"), "NetworkPolicy") == {}
    # A component that is not installed gets no policy.
    assert set(by_kind(render(repo_root, "--set", "forum.enabled=false"), "NetworkPolicy")) == {
        "operator",
        "scorer",
        "gateway",
    }


def test_prometheus_and_the_forums_extra_peers_come_from_values(repo_root: Path) -> None:
    objects = render(
        repo_root,
        "--set-json",
        'networkPolicy.prometheus={"namespace": "obs", "podSelector": {"matchExpressions":'
        ' [{"key": "app", "operator": "In", "values": ["prometheus"]}]}}',
        "--set-json",
        'networkPolicy.forumFrom=[{"namespaceSelector": {"matchLabels": {"ingress": "yes"}}}]',
    )
    policies = by_kind(objects, "NetworkPolicy")
    prometheus = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "obs"}},
        "podSelector": {
            "matchExpressions": [{"key": "app", "operator": "In", "values": ["prometheus"]}]
        },
    }
    for component, policy in policies.items():
        metrics_rule = policy["spec"]["ingress"][-1]
        assert metrics_rule["from"] == [prometheus], component
    api_peers = policies["forum"]["spec"]["ingress"][0]["from"]
    assert {"namespaceSelector": {"matchLabels": {"ingress": "yes"}}} in api_peers


def test_agents_are_sought_in_the_listed_run_namespaces_else_in_any(repo_root: Path) -> None:
    def agent_namespaces(*values: str) -> dict[str, Any]:
        policies = by_kind(render(repo_root, *values), "NetworkPolicy")
        return {
            component: policies[component]["spec"]["ingress"][0]["from"][0]["namespaceSelector"]
            for component in ("forum", "gateway", "scorer")
        }

    assert set(map(str, agent_namespaces().values())) == {"{}"}
    listed = agent_namespaces("--set", "operator.runNamespaces={research,team-b}")
    requirement = {"key": "kubernetes.io/metadata.name", "operator": "In"}
    for selector in listed.values():
        assert selector == {"matchExpressions": [{**requirement, "values": ["research", "team-b"]}]}


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        (["--set", "metrics.port=8080"], "/metrics/port"),
        (["--set", "metrics.port=0"], "/metrics/port"),
        (["--set", "networkPolicy.enabled=yes"], "/networkPolicy/enabled"),
        (["--set", "networkPolicy.ingress=true"], "ingress"),
        (["--set", "networkPolicy.prometheus.namespace=Monitoring"], "/networkPolicy/prometheus"),
        (
            ["--set-json", 'networkPolicy.prometheus.podSelector={"matchExpressions":'
             ' [{"key": "app", "operator": "Equals"}]}'],
            "operator",
        ),
        (["--set-json", "networkPolicy.forumFrom=[{}]"], "forumFrom"),
    ],
)  # fmt: skip
def test_the_schema_refuses_what_could_not_work(
    repo_root: Path, values: list[str], complaint: str
) -> None:
    result = helm_template(repo_root, *values)
    assert result.returncode != 0
    assert complaint in result.stderr
