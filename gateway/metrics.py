"""The gateway's Prometheus metrics, in base units, labelled by run (`namespace/run`), agent and
model. By default the agent label is empty and only runs' budgets are exported: a 900-agent run
would otherwise cost thousands of series (`per_agent` turns the agents' series on). The upstream
latency histogram never has the agent: latency is the upstream's, not the agent's."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from aar_gateway.pricing import Usage, nano_to_usd

TOKEN_TYPES = {
    "input": "input_tokens",
    "output": "output_tokens",
    "cache_creation": "cache_creation_input_tokens",
    "cache_read": "cache_read_input_tokens",
}


class Metrics:
    def __init__(self, registry: CollectorRegistry, per_agent: bool = False) -> None:
        self.per_agent = per_agent
        self.requests = Counter(
            "aar_llm_requests",
            "Messages API requests by the HTTP status the agent was answered "
            "(402: budget spent, 429: rate-limited, 5xx from upstream passed through)",
            ["run", "agent", "model", "status"],
            registry=registry,
        )
        self.tokens = Counter(
            "aar_llm_tokens",
            "Tokens the upstream reported, by type (input, output, cache_creation, cache_read)",
            ["run", "agent", "model", "type"],
            registry=registry,
        )
        self.spend = Counter(
            "aar_llm_spend_usd",
            "Dollars spent, priced by the gateway's price table",
            ["run", "agent", "model"],
            registry=registry,
        )
        self.remaining = Gauge(
            "aar_budget_remaining_usd",
            "Dollars left under a budget cap; agent is empty for the run's own cap",
            ["run", "agent"],
            registry=registry,
        )
        self.reservations = Gauge(
            "aar_budget_reserved_usd",
            "Dollars held by requests in flight: each one's worst-case cost, until it is billed; "
            "agent is empty for the run as a whole",
            ["run", "agent"],
            registry=registry,
        )
        self.upstream_latency = Histogram(
            "aar_llm_upstream_latency_seconds",
            "Time from sending a request upstream to its response headers",
            ["run", "model"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 600),
            registry=registry,
        )

    def _who(self, agent: str) -> str:
        return agent if self.per_agent else ""

    def answered(self, run: str, agent: str, model: str, status: int | str) -> None:
        self.requests.labels(run, self._who(agent), model, str(status)).inc()

    def billed(self, run: str, agent: str, model: str, usage: Usage, cost_nano: int) -> None:
        for kind, field in TOKEN_TYPES.items():
            count = getattr(usage, field)
            if count:
                self.tokens.labels(run, self._who(agent), model, kind).inc(count)
        self.spend.labels(run, self._who(agent), model).inc(float(nano_to_usd(cost_nano)))

    def budget_left(self, run: str, agent: str, cap_nano: int | None, spent_nano: int) -> None:
        if agent and not self.per_agent:
            return
        if cap_nano is None:
            # An uncapped budget has no remainder to show (and may have had one before).
            with contextlib.suppress(KeyError):
                self.remaining.remove(run, agent)
            return
        self.remaining.labels(run, agent).set(float(nano_to_usd(max(0, cap_nano - spent_nano))))

    def reserved(self, run: str, agent: str, held_nano: int) -> None:
        if agent and not self.per_agent:
            return
        self.reservations.labels(run, agent).set(float(nano_to_usd(held_nano)))
