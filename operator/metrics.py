"""The operator's Prometheus metrics: sandboxes by state, reconcile durations and errors, and
each run's spend, labelled by namespace and run."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

import aar_common  # noqa: F401  (importing it turns off the `_created` series)
from aar_operator.models import Best, Spend

RECONCILE_SECONDS = Histogram(
    "aar_operator_reconcile_duration_seconds",
    "Time one reconcile of a ResearchRun or AgentSandbox took",
    ["kind", "namespace", "run"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RECONCILE_ERRORS = Counter(
    "aar_operator_reconcile_errors_total",
    "Reconciles that raised (Kopf retries them)",
    ["kind", "namespace", "run"],
)
RUN_SPEND_USD = Gauge(
    "aar_run_spend_usd", "A run's LLM spend, as metered by the gateway", ["namespace", "run"]
)
RUN_AGENT_SECONDS = Gauge(
    "aar_run_agent_seconds",
    "A run's Pod running time summed over its agents, in seconds (promtool's base unit)",
    ["namespace", "run"],
)

RUN_BEST_SCORE = Gauge(
    "aar_run_best_score",
    "A run's best counted submission's private score (PGR), as the scorer last reported it",
    ["namespace", "run"],
)

# (namespace, sandbox) -> (run, state); counted at scrape time so deleted sandboxes vanish.
_STATES: dict[tuple[str, str], tuple[str, str]] = {}


class _SandboxStates(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "aar_operator_sandboxes",
            "AgentSandboxes by the reason of their Ready condition",
            labels=["namespace", "run", "state"],
        )
        counts: dict[tuple[str, str, str], int] = {}
        for (namespace, _), (run, state) in list(_STATES.items()):
            key = (namespace, run, state)
            counts[key] = counts.get(key, 0) + 1
        for labels, count in sorted(counts.items()):
            family.add_metric(list(labels), count)
        yield family


REGISTRY.register(_SandboxStates())


def sandbox_state(namespace: str, name: str, run: str, state: str) -> None:
    _STATES[(namespace, name)] = (run, state)


def sandbox_gone(namespace: str, name: str) -> None:
    _STATES.pop((namespace, name), None)


def run_gone(namespace: str, run: str) -> None:
    """A deleted run's series go with it: a fleet's runs come and go, and each would otherwise
    be exported for as long as the operator runs."""
    for gauge in (RUN_SPEND_USD, RUN_AGENT_SECONDS, RUN_BEST_SCORE):
        with suppress(KeyError):
            gauge.remove(namespace, run)
    for per_reconcile in (RECONCILE_SECONDS, RECONCILE_ERRORS):
        for kind in ("ResearchRun", "AgentSandbox"):
            with suppress(KeyError):
                per_reconcile.remove(kind, namespace, run)


def run_figures(namespace: str, run: str, spend: Spend, best: Best | None) -> None:
    RUN_SPEND_USD.labels(namespace, run).set(float(spend.dollars()))
    RUN_AGENT_SECONDS.labels(namespace, run).set(spend.agent_hours * 3600)
    if best is not None and best.score is not None:
        RUN_BEST_SCORE.labels(namespace, run).set(best.score)


@contextmanager
def reconciling(kind: str, namespace: str, run: str) -> Iterator[None]:
    """Time a reconcile and count it as an error if it raises."""
    started = time.perf_counter()
    try:
        yield
    except Exception:
        RECONCILE_ERRORS.labels(kind, namespace, run).inc()
        raise
    finally:
        RECONCILE_SECONDS.labels(kind, namespace, run).observe(time.perf_counter() - started)
