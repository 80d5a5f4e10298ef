"""The chart's monitoring flags against a real API server, which has no monitoring.coreos.com
CRDs: the dashboard is a plain ConfigMap and installs anywhere; the Prometheus Operator's kinds
make the install fail, saying which kind is missing (docs/operations.md)."""

from __future__ import annotations

import json

import pytest
from helm_chart import Chart

from aar_devcluster.tools import Tool, ToolError


def test_the_dashboard_configmap_is_stored_with_the_sidecars_label(
    chart: Chart, kubectl: Tool
) -> None:
    chart.install(
        "--set",
        "monitoring.grafanaDashboard.enabled=true",
        "--set",
        "monitoring.grafanaDashboard.annotations.grafana_folder=aar",
    )
    config_map = kubectl.json("get", "configmap", "aar-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"]["grafana_folder"] == "aar"
    dashboard = json.loads(config_map["data"]["aar.json"])
    assert dashboard["uid"] == "aar-overview"
    assert dashboard["panels"]


def test_service_monitors_without_the_prometheus_operator_fail_the_install_by_name(
    chart: Chart, helm: Tool, kubectl: Tool
) -> None:
    with pytest.raises(ToolError) as refused:
        chart.install("--set", "monitoring.serviceMonitor.enabled=true")
    assert 'no matches for kind "ServiceMonitor"' in str(refused.value)
    # Helm checks every kind before it creates anything: nothing of the release is left.
    assert helm.run("list", "--short", "--failed", "--pending").split() == []
    made = kubectl.json(
        "get",
        "deployments,services,configmaps,serviceaccounts",
        "-l",
        "app.kubernetes.io/part-of=aar",
    )
    assert made["items"] == []
