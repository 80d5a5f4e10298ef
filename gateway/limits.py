"""Whether a request may start: the run's and the agent's budget, and the agent's request rate.

Budgets are checked when a request would start, against spend already recorded; a request in
flight is not reserved against, so a budget overshoots by at most the cost of the requests in
flight when it is reached (the Messages API cannot say in advance what a request will cost).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from aar_gateway.pricing import nano_to_usd
from aar_gateway.store import RUN_ROW, Store


@dataclass(frozen=True)
class Refusal:
    status: int
    error_type: str
    message: str


def _usd(nano: int) -> str:
    return f"${nano_to_usd(nano):.2f}"


def budget_refusal(store: Store, run: str, agent: str) -> Refusal | None:
    """Why `agent` of `run` may not start a request now, or None when it may."""
    budget = store.budgets.get(run)
    if budget is None:
        return Refusal(
            403,
            "permission_error",
            f"run {run} has no budget registered at the gateway, so its spend cannot be capped: "
            "the aar operator registers it when the ResearchRun is reconciled; check that the "
            "run exists and the operator is running",
        )
    checks = [("run", run, budget.cap_nano, store.spent(run, RUN_ROW).cost_nano)]
    if agent in budget.agents:
        checks.append(("agent", agent, budget.agents[agent], store.spent(run, agent).cost_nano))
    for scope, name, cap, spent in checks:
        if cap is not None and spent >= cap:
            return Refusal(
                402,
                "billing_error",
                f"the {scope} budget of {name} is spent: cap {_usd(cap)}, spent {_usd(spent)}; "
                "no further model requests will be served until the budget is raised "
                "(spec.budget of the ResearchRun)",
            )
    return None


class RateLimiter:
    """Requests per minute per agent, as a token bucket holding at most a minute's worth."""

    def __init__(self, per_minute: float) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}  # agent -> (tokens, as of time)

    def wait(self, key: str, now: float) -> float:
        """0 if a request may go now (and count it), else the seconds until one may."""
        if self.per_minute <= 0:
            return 0.0
        rate = self.per_minute / 60.0
        tokens, then = self._buckets.get(key, (self.per_minute, now))
        tokens = min(self.per_minute, tokens + (now - then) * rate)
        if tokens >= 1:
            self._buckets[key] = (tokens - 1, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1 - tokens) / rate


def retry_after(seconds: float) -> str:
    """A `retry-after` value: whole seconds, never 0 (a client would spin)."""
    return str(max(1, math.ceil(seconds)))
