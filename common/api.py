"""The bodies that one aar component sends and another reads (docs/interfaces.md), defined once:
the service that answers validates with these classes and its clients parse with the same ones.
A body only one component uses stays in that component."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

# Dollars a client sends: exact once parsed, a JSON number on the wire (as the operator sends it).
Dollars = Annotated[
    Decimal, Field(ge=0), PlainSerializer(float, return_type=float, when_used="json")
]
# Dollars the gateway reports: an exact decimal string, never in exponent form, never a float.
DollarText = Annotated[
    Decimal, PlainSerializer(lambda usd: format(usd, "f"), return_type=str, when_used="json")
]


# --- gateway ----------------------------------------------------------------------------------


class BudgetSpec(BaseModel):
    """`PUT /api/v1/budgets/{namespace}/{run}`: the whole budget, replacing the one before."""

    model_config = ConfigDict(extra="forbid")

    usd: Dollars | None = Field(description="the run's cap in dollars; null: uncapped")
    agents: dict[str, Dollars | None] = Field(
        default_factory=dict, description="per-agent caps in dollars; unlisted agents: none"
    )


class Totals(BaseModel):
    """What a run or an agent spent, as the gateway reports it."""

    usd: DollarText = Decimal(0)
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    requests: int = 0
    # A request was refused because it would not fit what is left of this budget (the gateway
    # holds each request's worst case, so spend stays below a cap rather than reaching it); the
    # agent ends its run on that answer. Cleared when the budget is set again.
    exhausted: bool = False


class ModelPrice(BaseModel):
    """`GET /api/v1/models/{model}`: the gateway prices this model, so runs may use it."""

    model: str
    priced_as: str  # the table's model it is priced as (itself, an alias's target, or "default")
    price_table: str  # the table's version


class RunSpend(BaseModel):
    """`GET /api/v1/spend/{namespace}/{run}`: the run's totals and each agent's."""

    run: Totals = Field(default_factory=Totals)
    agents: Mapping[str, Totals] = Field(default_factory=dict)


# --- scorer -----------------------------------------------------------------------------------


class RunRegistration(BaseModel):
    """`PUT /api/v1/runs/{namespace}/{run}`: the task a run is scored on."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1)
    review_required: bool = True


class BestScore(BaseModel):
    """`GET /api/v1/runs/{namespace}/{run}/best`: the run's best counted submission."""

    score: float  # the private PGR
    agent: str
    submission: int


class Status(StrEnum):
    ACCEPTED = "accepted"
    FLAGGED = "flagged"
    REFUSED = "refused"


class Feedback(BaseModel):
    score: float | None
    released: bool
    message: str


class Quota(BaseModel):
    remaining: int
    resets_at: str


class SubmissionResponse(BaseModel):
    """The answer to `POST /api/v1/submissions`; the private score is never in it."""

    id: int
    status: Status
    feedback: Feedback
    quota: Quota


# --- charts: the gateway's spend and the scorer's submissions over time ------------------------

HISTORY_POINTS = 60  # the default number of steps; at most MAX_HISTORY_POINTS
MAX_HISTORY_POINTS = 500


class History(BaseModel):
    """`GET .../history?points=N` of the gateway (a run's spend) and of the scorer (its
    submissions and best scores), for the console's charts: each series' value at the end of N
    equal steps from the run's first event to now. null: nothing yet at that time."""

    start: float  # unix seconds
    end: float
    times: list[float]  # the end of each step
    series: dict[str, list[float | None]]

    @staticmethod
    def steps(start: float, end: float, points: int) -> list[float]:
        """The end of each of `points` equal steps from start to end (the last one is end)."""
        span = max(end - start, 0.0)
        return [start + span * (index + 1) / points for index in range(points)]
