"""What a cluster expects of the chart's Deployments, rendered with `helm template`: every
Deployment says when its Pod is ready to serve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helm_template import render

from aar_operator.config import OperatorConfig

COMPONENTS = ["operator", "forum", "scorer", "gateway"]


def deployments(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["labels"]["app.kubernetes.io/component"]: o
        for o in objects
        if o["kind"] == "Deployment"
    }


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    pod = deployment["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


@pytest.fixture(scope="module")
def default(repo_root: Path) -> dict[str, dict[str, Any]]:
    rendered = deployments(render(repo_root))
    assert set(rendered) == set(COMPONENTS)
    return rendered


@pytest.mark.parametrize("component", COMPONENTS)
def test_every_deployment_is_ready_only_when_its_health_endpoint_answers(
    default: dict[str, dict[str, Any]], component: str
) -> None:
    (container,) = default[component]["spec"]["template"]["spec"]["containers"]
    probe = container["readinessProbe"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # An HTTP GET of the component's own /healthz, on a port the container declares: Ready
    # means the process serves, not only that it was started.
    assert probe["httpGet"]["path"] == "/healthz"
    assert probe["httpGet"]["port"] in ports
    assert probe["periodSeconds"] <= 10
    assert container["livenessProbe"]["httpGet"] == probe["httpGet"]
    if component == "operator":
        # Kopf's health endpoint, where `aar-operator run` serves it.
        assert ports[probe["httpGet"]["port"]] == OperatorConfig().liveness_port
    else:
        assert probe["httpGet"]["port"] == "http"
