"""The chart's monitoring objects, rendered with `helm template` (the monitoring.coreos.com CRDs
are not in the local API server): off by default, a ServiceMonitor per component with /metrics,
and alert rules and dashboard queries that parse as PromQL and name only metrics and labels the
components export, read from the components' own metric definitions so that a rename fails here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from helm_template import helm, render
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from aar_forum.metrics import Metrics as ForumMetrics
from aar_gateway.metrics import Metrics as GatewayMetrics
from aar_operator import metrics as operator_metrics
from aar_operator.status import pod_scheduled
from aar_scorer.metrics import Metrics as ScorerMetrics
from aar_scorer.probing import ProbeReason
from aar_scorer.tasks import ProbeAction

ALL_ON = [
    "--set",
    "monitoring.serviceMonitor.enabled=true",
    "--set",
    "monitoring.prometheusRule.enabled=true",
    "--set",
    "monitoring.grafanaDashboard.enabled=true",
]
# Labels Prometheus adds to every series it scrapes through a ServiceMonitor.
TARGET_LABELS = {"job", "instance", "namespace", "service", "pod", "container", "endpoint"}
# Prometheus' own series.
PROMETHEUS_SERIES = {"up": set[str]()}
# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_INTERVALS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
# No `_created` series: aar_common turns them off (tests/service/test_metrics_port.py).
SUFFIXES = {
    "counter": ["_total"],
    "gauge": [""],
    "histogram": ["_bucket", "_count", "_sum"],
    "summary": ["", "_count", "_sum"],
}


def exported_series() -> dict[str, set[str]]:
    """Every series name the operator, forum, scorer and gateway expose, with its label names."""
    wrappers: list[MetricWrapperBase] = []
    for holder in (
        ForumMetrics(CollectorRegistry()),
        ScorerMetrics(CollectorRegistry()),
        GatewayMetrics(CollectorRegistry()),
        operator_metrics,
    ):
        wrappers += [v for v in vars(holder).values() if isinstance(v, MetricWrapperBase)]
    series: dict[str, set[str]] = {}
    for wrapper in wrappers:
        (family,) = wrapper.describe()
        # A labelled metric shows no samples before its first use; its label names are these.
        labels = set(wrapper._labelnames)
        for suffix in SUFFIXES[family.type]:
            series[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    # The operator counts sandboxes at scrape time; one sandbox makes the family show its labels.
    operator_metrics.sandbox_state("ns", "probe-0", "probe", "Running")
    try:
        (family,) = [f for f in REGISTRY.collect() if f.name == "aar_operator_sandboxes"]
        series[family.name] = set(family.samples[0].labels)
    finally:
        operator_metrics.sandbox_gone("ns", "probe-0")
    return series


@dataclass
class Query:
    """What one PromQL expression reads: series with their matchers, and grouping labels."""

    selectors: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)
    made: set[str] = field(default_factory=set)  # labels label_join/label_replace write


def read_query(expr: str) -> Query:
    for variable, value in GRAFANA_INTERVALS.items():
        expr = expr.replace(variable, value)
    query = Query()
    _walk(promql_parser.parse(expr), query)
    return query


def _walk(node: Any, query: Query) -> None:
    kind = type(node).__name__
    if kind == "VectorSelector":
        matchers = {m.name: m.value for m in node.matchers.matchers}
        query.selectors.append((node.name or matchers.pop("__name__", ""), matchers))
        return
    if kind == "Call" and node.func.name in ("label_join", "label_replace"):
        query.made.add(node.args[1].val)
    modifier = getattr(node, "modifier", None)
    if kind == "AggregateExpr" and modifier is not None:
        query.grouping |= set(modifier.labels)
    if kind == "BinaryExpr" and modifier is not None:
        if modifier.matching is not None:
            query.grouping |= set(modifier.matching.labels)
        query.grouping |= set(modifier.group_labels or [])
    for name in ("lhs", "rhs", "expr", "vector_selector", "param"):
        child = getattr(node, name, None)
        if child is not None and not isinstance(child, int | float | str):
            _walk(child, query)
    for child in getattr(node, "args", None) or []:
        _walk(child, query)


@pytest.fixture(scope="module")
def rendered(repo_root: Path) -> list[dict[str, Any]]:
    return render(repo_root, *ALL_ON)


@pytest.fixture(scope="module")
def series() -> dict[str, set[str]]:
    return exported_series()


def rule_expressions(objects: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
    (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
    for group in rule["spec"]["groups"]:
        for item in group["rules"]:
            yield item.get("alert") or item["record"], item["expr"]


def dashboard_of(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (config_map,) = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["labels"].get("grafana_dashboard") == "1"
    ]
    (text,) = config_map["data"].values()
    dashboard: dict[str, Any] = json.loads(text)
    return dashboard


def dashboard_expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((.+), *(\w+)\)", variable["query"]["query"])
            assert inner, f"variable {variable['name']}: expected label_values(selector, label)"
            yield f"variable {variable['name']}", inner.group(1)


def check_query(where: str, expr: str, series: dict[str, set[str]]) -> Query:
    """Assert the expression reads only exported series, by labels those series carry."""
    query = read_query(expr)
    assert query.selectors, f"{where}: reads no series"
    known = {**series, **PROMETHEUS_SERIES}
    available = set(TARGET_LABELS) | query.made
    for name, matchers in query.selectors:
        assert name in known, f"{where}: {name} is not a metric any component exports"
        labels = known[name] | TARGET_LABELS
        unknown = set(matchers) - labels
        assert not unknown, f"{where}: {name} has no label {sorted(unknown)}"
        available |= known[name]
    missing = query.grouping - available
    assert not missing, f"{where}: groups by {sorted(missing)}, which no series it reads carries"
    return query


def test_helm_lint_strict_passes_with_monitoring_on(repo_root: Path) -> None:
    result = subprocess.run(
        [str(helm()), "lint", "--strict", str(repo_root / "charts" / "aar"), *ALL_ON],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_monitoring_is_off_by_default(repo_root: Path) -> None:
    kinds = {(o["kind"], o["metadata"]["name"]) for o in render(repo_root)}
    assert not {k for k in kinds if k[0] in ("ServiceMonitor", "PrometheusRule")}
    assert ("Service", "aar-operator-metrics") not in kinds
    assert ("ConfigMap", "aar-dashboard") not in kinds


def test_each_component_with_metrics_gets_a_service_monitor_on_a_named_port(
    rendered: list[dict[str, Any]],
) -> None:
    services = {o["metadata"]["name"]: o for o in rendered if o["kind"] == "Service"}
    deployments = {
        o["metadata"]["labels"]["app.kubernetes.io/component"]: o
        for o in rendered
        if o["kind"] == "Deployment"
    }
    monitors = [o for o in rendered if o["kind"] == "ServiceMonitor"]
    components = {m["metadata"]["labels"]["app.kubernetes.io/component"] for m in monitors}
    assert components == {"operator", "forum", "scorer", "gateway"}
    for monitor in monitors:
        spec = monitor["spec"]
        selector = spec["selector"]["matchLabels"]
        (endpoint,) = spec["endpoints"]
        assert endpoint["path"] == "/metrics"
        # The ServiceMonitor finds exactly one Service, in the namespace it names ...
        (service,) = [
            s
            for s in services.values()
            if selector.items() <= s["metadata"]["labels"].items()
            # `helm template` installs into "default" and leaves that namespace unwritten.
            and s["metadata"].get("namespace", "default") in spec["namespaceSelector"]["matchNames"]
        ]
        # ... whose port of that name leads to a named container port of the component's Pod.
        (port,) = [p for p in service["spec"]["ports"] if p.get("name") == endpoint["port"]]
        component = selector["app.kubernetes.io/component"]
        pod = deployments[component]["spec"]["template"]
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        (container,) = pod["spec"]["containers"]
        assert port["targetPort"] in {p["name"] for p in container["ports"]}


def test_the_operator_service_monitor_keeps_the_runs_namespace_label(
    rendered: list[dict[str, Any]],
) -> None:
    # The operator labels its series with the run's namespace; Prometheus would otherwise
    # rename it to exported_namespace and the rules' `namespace` would be the operator's.
    monitors = {
        m["metadata"]["labels"]["app.kubernetes.io/component"]: m["spec"]["endpoints"][0]
        for m in rendered
        if m["kind"] == "ServiceMonitor"
    }
    assert monitors["operator"].get("honorLabels") is True
    assert not any(monitors[c].get("honorLabels") for c in ("forum", "scorer", "gateway"))


def test_the_scorers_monitor_looks_in_the_scorers_namespace(repo_root: Path) -> None:
    objects = render(repo_root, *ALL_ON, "--set", "scorer.namespace=hidden-labels")
    (monitor,) = [
        o
        for o in objects
        if o["kind"] == "ServiceMonitor"
        and o["metadata"]["labels"]["app.kubernetes.io/component"] == "scorer"
    ]
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == ["hidden-labels"]


def test_a_disabled_component_gets_no_monitor(repo_root: Path) -> None:
    objects = render(repo_root, *ALL_ON, "--set", "forum.enabled=false")
    components = {
        o["metadata"]["labels"]["app.kubernetes.io/component"]
        for o in objects
        if o["kind"] == "ServiceMonitor"
    }
    assert components == {"operator", "scorer", "gateway"}


def test_every_alert_reads_only_exported_metrics_and_labels(
    rendered: list[dict[str, Any]], series: dict[str, set[str]]
) -> None:
    alerts = dict(rule_expressions(rendered))
    for name, expr in alerts.items():
        check_query(f"alert {name}", expr, series)
    # The alerts the operations guide promises, each on the metric it is about.
    read = {name: {s for s, _ in read_query(expr).selectors} for name, expr in alerts.items()}
    assert "aar_budget_remaining_usd" in read["AarRunBudgetNearlySpent"]
    assert read["AarScorerProbesFlagged"] == {"aar_scorer_probes_total"}
    assert read["AarOperatorReconcileErrors"] == {"aar_operator_reconcile_errors_total"}
    assert read["AarSandboxesUnschedulable"] == {"aar_operator_sandboxes"}


def test_the_unschedulable_alert_matches_the_state_the_operator_reports(
    rendered: list[dict[str, Any]],
) -> None:
    # The state label is the Ready condition's reason; for a Pod the scheduler cannot place it
    # is the scheduler's own reason, as pod_scheduled reads it (tests/cluster/test_operator_run.py
    # sees the gauge exported with it).
    condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
    (_, reason, _) = pod_scheduled({"status": {"conditions": [condition]}})
    (expr,) = [e for n, e in rule_expressions(rendered) if n == "AarSandboxesUnschedulable"]
    ((_, matchers),) = read_query(expr).selectors
    assert matchers == {"state": reason}


def test_alert_thresholds_come_from_values(repo_root: Path) -> None:
    objects = render(
        repo_root,
        *ALL_ON,
        "--set-json",
        "monitoring.prometheusRule.budgetRemainingFraction=0.25",
        "--set",
        "monitoring.prometheusRule.labels.release=kps",
    )
    (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
    assert rule["metadata"]["labels"]["release"] == "kps"
    alerts = dict(rule_expressions(objects))
    assert alerts["AarRunBudgetNearlySpent"].strip().endswith("< 0.25")


def test_every_rule_has_a_severity_and_a_summary(rendered: list[dict[str, Any]]) -> None:
    (rule,) = [o for o in rendered if o["kind"] == "PrometheusRule"]
    for group in rule["spec"]["groups"]:
        for item in group["rules"]:
            assert item["labels"]["severity"] in {"info", "warning", "critical"}
            assert item["annotations"]["summary"]
            assert item["annotations"]["description"]


def test_the_dashboard_reads_only_exported_metrics_and_labels(
    rendered: list[dict[str, Any]], series: dict[str, set[str]]
) -> None:
    dashboard = dashboard_of(rendered)
    read: set[str] = set()
    for where, expr in dashboard_expressions(dashboard):
        read |= {name for name, _ in check_query(where, expr, series).selectors}
    # Spend per run and agent, tokens, sandboxes by state, submissions, reconcile latency.
    assert {
        "aar_llm_spend_usd_total",
        "aar_llm_tokens_total",
        "aar_operator_sandboxes",
        "aar_scorer_submissions_total",
        "aar_operator_reconcile_duration_seconds_bucket",
        "aar_run_best_score",
    } <= read


def test_dashboard_panels_use_the_datasource_variable_and_have_unique_ids(
    rendered: list[dict[str, Any]],
) -> None:
    dashboard = dashboard_of(rendered)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval", "__range"}
            assert used <= variables, f"{panel['title']}: undefined variables {used - variables}"


def test_the_query_reader_finds_selectors_grouping_and_made_labels() -> None:
    query = read_query(
        'sum by (run) (rate(a_total{x="1"}[$__rate_interval])) '
        '/ on (run) label_join(b, "run", "/", "namespace", "run")'
    )
    assert query.selectors == [("a_total", {"x": "1"}), ("b", {})]
    assert query.grouping == {"run"}
    assert query.made == {"run"}
    with pytest.raises(ValueError):  # noqa: PT011 - the parser's message varies by version
        read_query("sum by (run) (")


def test_a_renamed_metric_fails_the_check(series: dict[str, set[str]]) -> None:
    with pytest.raises(AssertionError, match="not a metric any component exports"):
        check_query("test", "rate(aar_llm_spend_dollars_total[5m])", series)
    with pytest.raises(AssertionError, match="has no label"):
        check_query("test", 'aar_budget_remaining_usd{model="x"}', series)
    with pytest.raises(AssertionError, match="groups by"):
        check_query("test", "sum by (model) (aar_budget_remaining_usd)", series)


def promtool(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is missing: `make tools` installs Debian's prometheus package")
    return subprocess.run(
        [found, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )


def series_line(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ",".join(f'{key}="{value}"' for key, value in labels.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def test_promtool_accepts_the_rules_and_their_templates(
    rendered: list[dict[str, Any]], tmp_path: Path
) -> None:
    (rule,) = [o for o in rendered if o["kind"] == "PrometheusRule"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = promtool(tmp_path, "check", "rules", "rules.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alerts_fire_on_the_series_the_components_export(
    rendered: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Prometheus' own rule engine (promtool) evaluates the rules over series labelled as the
    components label them: a bad join, filter or threshold shows as a missing or extra alert."""
    (rule,) = [o for o in rendered if o["kind"] == "PrometheusRule"]
    groups = rule["spec"]["groups"]
    for group in groups:
        for item in group["rules"]:
            # Annotation templates are promtool check's business; here, which alerts fire.
            item.pop("annotations")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
    (_, unschedulable, _) = pod_scheduled({"status": {"conditions": [condition]}})
    gateway, operator = "aar_budget_remaining_usd", "aar_run_spend_usd"
    inputs = [
        # lab/w2s has 5 of its 100 dollars left, lab/ok 80 of 100, lab/done none; an agent's
        # own spent cap (agent="w2s-0") is not its run's.
        series_line(gateway, {"run": "lab/w2s", "agent": ""}, "5x40"),
        series_line(gateway, {"run": "lab/w2s", "agent": "w2s-0"}, "0x40"),
        series_line(operator, {"namespace": "lab", "run": "w2s"}, "95x40"),
        series_line(gateway, {"run": "lab/ok", "agent": ""}, "80x40"),
        series_line(operator, {"namespace": "lab", "run": "ok"}, "20x40"),
        series_line(gateway, {"run": "lab/done", "agent": ""}, "0x40"),
        series_line(operator, {"namespace": "lab", "run": "done"}, "100x40"),
        # A third of lab/w2s's calls come back overloaded (529); lab/ok's all succeed.
        series_line("aar_llm_requests_total", {"run": "lab/w2s", "status": "200"}, "0+10x40"),
        series_line("aar_llm_requests_total", {"run": "lab/w2s", "status": "529"}, "0+5x40"),
        series_line("aar_llm_requests_total", {"run": "lab/ok", "status": "200"}, "0+10x40"),
        # One walk flagged 25 minutes in.
        series_line(
            "aar_scorer_probes_total",
            {"reason": ProbeReason.WALK.value, "action": ProbeAction.FLAG.value},
            "0x24 1x16",
        ),
        # AgentSandbox reconciles of lab/w2s raise every minute; ResearchRuns take 10-30 s.
        series_line(
            "aar_operator_reconcile_errors_total",
            {"kind": "AgentSandbox", "namespace": "lab", "run": "w2s"},
            "0+1x40",
        ),
        *(
            series_line(
                "aar_operator_reconcile_duration_seconds_bucket",
                {"kind": "ResearchRun", "namespace": "lab", "run": "w2s", "le": le},
                values,
            )
            for le, values in (("10", "0x40"), ("30", "0+1x40"), ("+Inf", "0+1x40"))
        ),
        series_line(
            "aar_operator_sandboxes",
            {"namespace": "lab", "run": "w2s", "state": unschedulable},
            "3x40",
        ),
        series_line(
            "aar_operator_sandboxes", {"namespace": "lab", "run": "ok", "state": "Running"}, "9x40"
        ),
        series_line("up", {"job": "aar-forum", "namespace": "aar-system"}, "0x40"),
        series_line("up", {"job": "aar-gateway", "namespace": "aar-system"}, "1x40"),
    ]
    expected = {
        "AarRunBudgetNearlySpent": [{"run": "lab/w2s"}, {"run": "lab/done"}],
        "AarRunBudgetExhausted": [{"run": "lab/done"}],
        "AarGatewayUpstreamErrors": [{"run": "lab/w2s"}],
        "AarScorerProbesFlagged": [{"reason": "walk", "action": "flag"}],
        "AarOperatorReconcileErrors": [{"kind": "AgentSandbox", "namespace": "lab", "run": "w2s"}],
        "AarOperatorReconcileSlow": [{"kind": "ResearchRun"}],
        "AarSandboxesUnschedulable": [{"namespace": "lab", "run": "w2s"}],
        "AarComponentDown": [{"job": "aar-forum", "namespace": "aar-system"}],
    }
    severities = {item["alert"]: item["labels"]["severity"] for g in groups for item in g["rules"]}
    assert set(expected) == set(severities)
    checks = [
        {
            "eval_time": "30m",
            "alertname": name,
            "exp_alerts": [
                {"exp_labels": {**labels, "severity": severities[name]}} for labels in alerts
            ],
        }
        for name, alerts in expected.items()
    ]
    # Before their `for` has passed, the slow-burning alerts stay silent.
    checks += [
        {"eval_time": "10m", "alertname": name, "exp_alerts": []}
        for name in ("AarOperatorReconcileErrors", "AarSandboxesUnschedulable")
    ]
    test = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": inputs, "alert_rule_test": checks}],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test))
    result = promtool(tmp_path, "test", "rules", "test.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
