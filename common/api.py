"""The bodies that one aar component sends and another reads (docs/interfaces.md), defined once:
the service that answers validates with these classes and its clients parse with the same ones.
A body only one component uses stays in that component."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, StrictInt, StrictStr

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


# The most of an agent's notebook a submission carries for its reviewers (its newest entries).
NOTEBOOK_EXCERPT_CHARS = 4000


class RunRegistration(BaseModel):
    """`PUT /api/v1/runs/{namespace}/{run}`: the task a run is scored on."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1)
    review_required: bool = True
    # Count a submission only once its code reproduced its score on the task's fresh split
    # (docs/scorer.md, Reproduction), within `tolerance` PGR of its claim.
    reproduce: bool = False
    tolerance: float = Field(default=0.1, ge=0, le=1)
    # Transfer tasks to reproduce on (a subset of the task's configured ones); None: all of them.
    transfer: list[str] | None = None
    # How many of the run's leading submissions (by public score) are reproduced.
    reproduce_top: int = Field(default=3, ge=1, le=100)


class BestScore(BaseModel):
    """`GET /api/v1/runs/{namespace}/{run}/best`: the run's best counted submission."""

    score: float  # the private PGR: what the submission claims
    agent: str
    submission: int
    # Its PGR reproduced on the fresh split, and on each transfer task (None: not yet, or the
    # reproduction failed), when the run reproduces.
    reproduced: float | None = None
    transfer: dict[str, float | None] = Field(default_factory=dict)


# --- reproductions: the operator (a verifier credential) and the scorer -----------------------


class ReproductionOutcome(StrEnum):
    SUCCEEDED = "succeeded"  # the command exited 0 and wrote predictions
    FAILED = "failed"  # it exited non-zero, or wrote no predictions
    TIMED_OUT = "timed_out"  # the Job's deadline passed
    INVALID = "invalid"  # predictions the scorer could not take (the reason says why)


class ReproductionTarget(BaseModel):
    task: str
    kind: str  # "fresh" or "transfer"


class WantedReproduction(BaseModel):
    """A submission to run again, with the targets it has no result for yet."""

    submission: int
    agent: str
    artifact: str
    command: str
    targets: list[ReproductionTarget]


class WantedReproductions(BaseModel):
    """`GET /api/v1/runs/{namespace}/{run}/reproductions`: what the operator should run."""

    run: str
    wanted: list[WantedReproduction]


class ReproductionReport(BaseModel):
    """`POST /api/v1/submissions/{id}/reproductions`: what a reproduction Job did. Scored
    privately: nothing of it reaches any agent."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(min_length=1)
    outcome: ReproductionOutcome
    # One list of predictions per seed the command ran with (AAR_SEED 0, 1, ...), in that order.
    predictions: list[list[StrictInt | StrictStr]] | None = Field(
        default=None, min_length=1, max_length=10
    )
    exit_code: int | None = None
    reason: str = Field(default="", max_length=2000)
    log: str = Field(default="", max_length=65_536, description="the end of the Job's log")
    gpu_hours: float = Field(default=0.0, ge=0)
    job: str = Field(min_length=1, max_length=253, description="namespace/name of the Job")


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
