"""What a cluster expects of the chart's Deployments, rendered with `helm template`: every container
asks for CPU and memory and is capped, every Deployment says when its Pod is ready to serve, and
both come from values that a release can override and the schema checks."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from helm_template import helm_template, render

from aar_operator.config import OperatorConfig

COMPONENTS = ["operator", "forum", "scorer", "gateway"]
UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity as a number: cores for CPU, bytes for memory."""
    text = str(value)
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text).groups()  # type: ignore[union-attr]
    return float(number) * UNITS[unit]


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
def test_every_container_requests_and_is_limited_in_cpu_and_memory(
    default: dict[str, dict[str, Any]], component: str
) -> None:
    for container in containers(default[component]):
        resources = container.get("resources") or {}
        for kind in ("requests", "limits"):
            assert set(resources.get(kind, {})) >= {"cpu", "memory"}, (
                f"{component}/{container['name']} has no CPU or memory {kind}: {resources}"
            )
        for resource in ("cpu", "memory"):
            request = quantity(resources["requests"][resource])
            limit = quantity(resources["limits"][resource])
            assert 0 < request <= limit, f"{component}/{container['name']} {resource}"


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


def test_resources_come_from_values_and_are_overridden_per_component(repo_root: Path) -> None:
    overrides = [
        "--set",
        "forum.resources.limits.memory=3Gi",
        "--set",
        "scorer.resources.requests.cpu=1500m",
        "--set",
        "gateway.resources.limits.cpu=4",
        "--set-json",
        'operator.resources={"requests": {"cpu": "50m", "memory": "64Mi"}, '
        '"limits": {"cpu": "500m", "memory": "256Mi"}}',
    ]
    changed = deployments(render(repo_root, *overrides))
    resources = {c: containers(d)[0]["resources"] for c, d in changed.items()}
    assert resources["forum"]["limits"]["memory"] == "3Gi"
    assert resources["scorer"]["requests"]["cpu"] == "1500m"
    assert str(resources["gateway"]["limits"]["cpu"]) == "4"
    assert resources["operator"] == {
        "requests": {"cpu": "50m", "memory": "64Mi"},
        "limits": {"cpu": "500m", "memory": "256Mi"},
    }
    # A key set alone leaves the other defaults of that component in place.
    assert resources["forum"]["requests"]["memory"] == "128Mi"
    assert "cpu" in resources["forum"]["limits"]


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("gateway.resources.limits.gpu=1", "additional properties 'gpu' not allowed"),
        ("scorer.resources.limit.memory=1Gi", "additional properties 'limit' not allowed"),
        ("forum.resources.requests.memory=lots", "at '/forum/resources/requests/memory'"),
        ("operator.resources.requests.cpu=fast", "at '/operator/resources/requests/cpu'"),
    ],
)
def test_the_schema_refuses_resources_a_pod_spec_would_not_take(
    repo_root: Path, setting: str, complaint: str
) -> None:
    result = helm_template(repo_root, "--set", setting)
    assert result.returncode != 0
    assert complaint in result.stderr, result.stderr


def test_the_operators_default_run_cap_comes_from_values_and_is_a_dollar_amount(
    repo_root: Path, default: dict[str, dict[str, Any]]
) -> None:
    def environment(deployment: dict[str, Any]) -> dict[str, str]:
        [operator] = deployment["spec"]["template"]["spec"]["containers"]
        return {item["name"]: item.get("value", "") for item in operator["env"]}

    # None by default: a run that gives no cap is refused rather than left uncapped.
    assert "AAR_OPERATOR_DEFAULT_BUDGET_USD" not in environment(default["operator"])
    for given in (
        ["--set", "operator.defaultBudgetUsd=250"],
        ["--set", "operator.defaultBudgetUsd=12.5"],
    ):
        capped = environment(deployments(render(repo_root, *given))["operator"])
        value = capped["AAR_OPERATOR_DEFAULT_BUDGET_USD"]
        assert value == given[1].rsplit("=", 1)[1]
        # What the operator reads from that variable.
        config = OperatorConfig.model_validate({"default_budget_usd": value})
        assert config.default_budget_usd == float(value)
    for bad in ("-1", "twelve"):
        result = helm_template(repo_root, "--set", f"operator.defaultBudgetUsd={bad}")
        assert result.returncode != 0
        assert "/operator/defaultBudgetUsd" in result.stderr
