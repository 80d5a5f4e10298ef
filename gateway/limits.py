"""Whether a request may start: the run's and the agent's budget, and the agent's request rate.

A request may start only when its worst-case cost fits under each cap that applies, after what is
spent and what the requests in flight hold (reservations.py), so requests in flight together can
never spend past a cap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from aar_gateway.pricing import nano_to_usd
from aar_gateway.reservations import Reservations, WorstCase
from aar_gateway.store import RUN_ROW, Store

_RAISE = "(spec.budget of the ResearchRun raises the cap)"


@dataclass(frozen=True)
class Refusal:
    status: int
    error_type: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)
    # The ledger row (RUN_ROW or an agent) whose budget this refusal shows spent: nothing the
    # agent may send next would fit it (the agent ends its run on a 402).
    exhausts: str | None = None


def _usd(nano: int) -> str:
    """Dollars to the cent, or exact below a cent (where cents would read $0.00)."""
    return f"${nano_to_usd(nano):.2f}" if nano >= 10**7 else usd_exact(nano)


def usd_exact(nano: int) -> str:
    """Dollars as they are, to the nano-dollar and without trailing zeros: `$0.000185`."""
    return f"${format(nano_to_usd(nano).normalize(), 'f')}"


@dataclass(frozen=True)
class _Cap:
    scope: str  # "run" or "agent"
    name: str
    row: str
    cap: int
    spent: int
    held: int
    in_flight: int


def budget_refusal(
    store: Store,
    reservations: Reservations,
    run: str,
    agent: str,
    worst: WorstCase | None = None,
) -> Refusal | None:
    """Why `agent` of `run` may not start a request now, or None when it may. Without `worst`
    (a request that costs nothing, such as counting tokens) only a spent budget refuses."""
    budget = store.budgets.get(run)
    if budget is None:
        return Refusal(
            403,
            "permission_error",
            f"run {run} has no budget registered at the gateway, so its spend cannot be capped: "
            "the aar operator registers it when the ResearchRun is reconciled; check that the "
            "run exists and the operator is running",
        )
    caps = [
        _Cap(
            scope,
            name,
            row,
            cap,
            store.spent(run, row).cost_nano,
            *_holding(reservations, run, row),
        )
        for scope, name, row, cap in (
            ("run", run, RUN_ROW, budget.cap_nano),
            ("agent", agent, agent, budget.agents.get(agent)),
        )
        if cap is not None
    ]
    for c in caps:
        if c.spent >= c.cap:
            return Refusal(
                402,
                "billing_error",
                f"the {c.scope} budget of {c.name} is spent: cap {_usd(c.cap)}, spent "
                f"{_usd(c.spent)}; no further model requests will be served until the budget is "
                "raised (spec.budget of the ResearchRun)",
                exhausts=c.row,
            )
    if worst is None:
        return None
    # Never: not even with nothing else in flight. Not now: once requests in flight settle.
    for c in caps:
        if worst.nano > c.cap - c.spent:
            return Refusal(402, "billing_error", _never_fits(c, worst), exhausts=c.row)
    for c in caps:
        if c.spent + c.held + worst.nano > c.cap:
            return Refusal(
                429,
                "rate_limit_error",
                f"the {c.scope} budget of {c.name} has {usd_exact(c.cap - c.spent)} left of its "
                f"cap {usd_exact(c.cap)}, but {usd_exact(c.held)} of that is held by "
                f"{c.in_flight} request{'' if c.in_flight == 1 else 's'} in flight, and this "
                f"request could cost up to {usd_exact(worst.nano)}; retry when they end (each "
                "is then billed its real cost, and gives back the rest)",
                {"retry-after": "1"},
            )
    return None


def _holding(reservations: Reservations, run: str, row: str) -> tuple[int, int]:
    return reservations.held(run, row), reservations.in_flight(run, row)


def _never_fits(c: _Cap, worst: WorstCase) -> str:
    left = c.cap - c.spent
    cost = (
        f"this request could cost up to {usd_exact(worst.nano)} (at most "
        f"{worst.input_tokens:,} input tokens, {worst.input_basis}, and max_tokens "
        f"{worst.max_tokens:,}), more than the {c.scope} budget of {c.name} has left: "
        f"{usd_exact(left)} of its cap {usd_exact(c.cap)}"
    )
    rate = worst.output_nano_per_token
    input_cost = worst.nano - worst.max_tokens * rate
    largest = (left - input_cost) // rate if rate else 0
    if largest >= 1:
        return f"{cost}; with this input, max_tokens of at most {largest:,} would fit {_RAISE}"
    return (
        f"{cost}; its input alone could cost {usd_exact(input_cost)}: shorten the conversation "
        f"{_RAISE}"
    )


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
