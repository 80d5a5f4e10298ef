"""The custom resources' specs and statuses (group `aar.dev`, version `v1alpha1`).

These models are the single source of truth: the CRDs in `crds/` are generated from them
(`aar-operator crds`), and the operator parses every object it reads with them, so what the
apiserver accepts and what the operator understands cannot drift apart.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

GROUP = "aar.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
MAX_AGENTS = 1000
DEFAULT_MODEL = "claude-opus-4-6"
# A child is named `<agent>-workspace`; the agent name is also a label value (63 characters).
MAX_AGENT_NAME = 63

# Kubernetes quantities ("8", "500m", "64Gi") as the apiserver's own types describe them.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?"
    r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(h|m|s))+$"
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(h|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}

Quantity = Annotated[
    int | str,
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "pattern": QUANTITY_PATTERN,
            "x-kubernetes-int-or-string": True,
        }
    ),
]


def parse_duration(text: str) -> timedelta:
    """`120h`, `90m`, `1h30m` (Go-style, as in kubectl) to a timedelta."""
    if not re.fullmatch(DURATION_PATTERN, text):
        raise ValueError(f"{text!r} is not a duration such as 120h, 90m or 1h30m")
    return timedelta(
        seconds=sum(
            float(value) * _DURATION_UNITS[unit] for value, unit in _DURATION_PART.findall(text)
        )
    )


class _Model(BaseModel):
    """camelCase on the wire (Kubernetes style), snake_case in Python; unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class TaskRef(_Model):
    """The task the agents work on and are scored on."""

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="A task the scorer knows; its bundle is mounted read-only at /task.",
    )


class Resources(_Model):
    """What each agent's Pod gets."""

    gpu: int = Field(default=1, ge=0, le=16, description="nvidia.com/gpu limit per agent.")
    cpu: Quantity = Field(default="4", description="CPU request and limit per agent.")
    memory: Quantity = Field(default="32Gi", description="Memory request and limit per agent.")


class SandboxTemplate(_Model):
    """Each agent's sandbox: its image, resources, runtime and workspace."""

    image: str = Field(min_length=1, max_length=512, description="The agent container image.")
    resources: Resources = Field(
        default_factory=Resources, description="What each agent's Pod gets."
    )
    runtime_class_name: str | None = Field(
        default=None,
        max_length=253,
        description="Optional RuntimeClass for stronger isolation (for example gvisor).",
    )
    storage: Quantity = Field(default="50Gi", description="Size of each agent's workspace PVC.")
    storage_class_name: str | None = Field(
        default=None, max_length=253, description="StorageClass of the workspace PVCs."
    )


class RunBudget(_Model):
    """Caps for the whole run: dollars of model spend, agent-hours of Pod time, a deadline. At a
    cap the run's Pods are deleted and their workspaces kept."""

    usd: float | None = Field(
        default=None,
        ge=0,
        le=10_000_000,
        description="Run-wide cap on LLM spend in dollars. Required, unless usdUnlimited is "
        "true or the operator has a default cap.",
    )
    usd_unlimited: bool = Field(
        default=False,
        description="Run with no dollar cap, on purpose (a run that gives no cap is refused).",
    )
    agent_hours: float | None = Field(
        default=None, ge=0, le=10_000_000, description="Run-wide cap on Pod running time."
    )
    deadline: str | None = Field(
        default=None,
        description="Stop the run this long after it was created (e.g. 120h), or at this "
        "RFC 3339 time.",
        max_length=64,
    )


class Review(_Model):
    """How submissions come to count as the run's best."""

    required: bool = Field(
        default=True, description="Top submissions need a human approval before they count."
    )
    reproduce: bool = Field(
        default=False,
        description="Run the leading submissions' code again in a Job with no network and no "
        "credential, on the task's fresh split and transfer tasks; a submission counts only "
        "when its fresh-split PGR lands within the tolerance of its claim.",
    )
    tolerance: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="How far below its claimed PGR a reproduction may land and still count.",
    )
    transfer: list[Annotated[str, Field(min_length=1, max_length=63)]] | None = Field(
        default=None,
        max_length=16,
        description="Transfer tasks to reproduce on, of those the scorer configures for the "
        "task (default: all of them).",
    )
    top: int = Field(
        default=3, ge=1, le=100, description="How many leading submissions are reproduced."
    )
    seeds: int = Field(
        default=3,
        ge=1,
        le=10,
        description="How many times each reproduction runs the command, with AAR_SEED 0, 1, ...: "
        "the figures are the mean over them, with their spread.",
    )
    timeout: str = Field(
        default="2h",
        pattern=DURATION_PATTERN,
        max_length=32,
        description="The deadline of each reproduction Job (e.g. 2h, 90m).",
    )


class ResearchRunSpec(_Model):
    """A fleet of research agents working on one task under one budget."""

    agents: int = Field(ge=1, le=MAX_AGENTS, description="Agents working in parallel.")
    model: str = Field(
        default=DEFAULT_MODEL,
        min_length=1,
        max_length=128,
        description="The Claude model the agents use; the gateway must have a price for it.",
    )
    directions: list[Annotated[str, Field(min_length=1, max_length=1024)]] = Field(
        default_factory=list,
        max_length=MAX_AGENTS,
        description="Starting research directions, assigned to agents round-robin.",
    )
    task: TaskRef
    sandbox: SandboxTemplate
    budget: RunBudget = Field(default_factory=RunBudget)
    review: Review = Field(default_factory=Review)
    suspend: bool = Field(
        default=False, description="Delete the Pods and keep the workspaces; false resumes."
    )


class AgentBudget(_Model):
    """This agent's own caps (a run gives each agent an even share of its own)."""

    usd: float | None = Field(default=None, ge=0, description="This agent's cap in dollars.")
    agent_hours: float | None = Field(
        default=None, ge=0, description="This agent's cap on Pod running time."
    )


class AgentSandboxSpec(_Model):
    """One research agent: its Pod, workspace, credential and network policy."""

    run: str | None = Field(
        default=None,
        max_length=63,
        description="The run this agent belongs to (default: the sandbox's own name).",
    )
    direction: str = Field(
        default="", max_length=1024, description="The research direction this agent starts from."
    )
    model: str = Field(
        default=DEFAULT_MODEL,
        min_length=1,
        max_length=128,
        description="The Claude model the agent uses; the gateway must have a price for it.",
    )
    task: TaskRef
    sandbox: SandboxTemplate
    budget: AgentBudget = Field(default_factory=AgentBudget)
    suspend: bool = Field(default=False, description="Delete the Pod and keep the workspace.")


# --- status -----------------------------------------------------------------------------------


class Condition(_Model):
    type: str
    status: str  # "True" | "False" | "Unknown", as Kubernetes spells them
    reason: str
    message: str = ""
    last_transition_time: str = ""
    observed_generation: int | None = None


class Spend(_Model):
    usd: str = "0.00"  # a string so that dollars are not rounded through a float in JSON
    input_tokens: int = 0
    output_tokens: int = 0
    agent_hours: float = 0.0
    gpu_hours: float = 0.0
    # The gateway refused a request that would not fit what is left of the dollar cap: spent, as
    # far as the agents can use it, although the gateway's holds keep spend below the cap itself.
    budget_exhausted: bool = False

    def dollars(self) -> Decimal:
        return Decimal(self.usd)


class AgentCounts(_Model):
    desired: int = 0
    ready: int = 0
    scheduled: int = 0
    suspended: int = 0


class TransferScore(_Model):
    task: str
    pgr: float | None = None  # None: not reproduced there yet, or the reproduction failed


class Best(_Model):
    score: float | None = None  # the claimed PGR: the submission's private score
    agent: str = ""
    submission: str = ""
    # Its PGR when its code ran again on the task's fresh split, and on each transfer task.
    reproduced: float | None = None
    transfer: list[TransferScore] = Field(default_factory=list)


class Reproductions(_Model):
    """The run's reproduction Jobs (docs/operator.md, Reproduction)."""

    running: int = 0
    reported: int = 0
    gpu_hours: float = 0.0
    # What stops reproductions, when something does (a missing namespace or task volume).
    message: str = ""


class SandboxStatus(_Model):
    observed_generation: int = 0
    conditions: list[Condition] = Field(default_factory=list)
    pod: str = ""
    spend: Spend = Field(default_factory=Spend)
    spent: str = "$0.00"  # spend.usd as people read dollars, for the printer column
    # Pod running time is banked here each reconcile, so a deleted Pod's hours are not lost.
    accounted_at: str = ""


class RunStatus(_Model):
    observed_generation: int = 0
    conditions: list[Condition] = Field(default_factory=list)
    agents: AgentCounts = Field(default_factory=AgentCounts)
    spend: Spend = Field(default_factory=Spend)
    best: Best | None = None
    reproductions: Reproductions = Field(default_factory=Reproductions)
    # For the printer columns: ready agents of desired, dollars spent and the cap as people read
    # them, and when the deadline stops the run (empty: no deadline).
    ready: str = "0/0"
    spent: str = "$0.00"
    budget: str = ""
    ends: str = ""
    # Agent-hours of sandboxes removed by a scale-down, so the run's total never shrinks.
    retired_agent_hours: float = 0.0


def money(usd: Decimal | float | None) -> str:
    """Dollars as the printer columns, the console and the CLI show them: `$1,234.56`; an amount
    under a cent but not nothing is `<$0.01`, and no cap at all is `unlimited`."""
    if usd is None:
        return "unlimited"
    amount = Decimal(str(usd))
    if 0 < amount < Decimal("0.01"):
        return "<$0.01"
    return f"${amount:,.2f}"


def now_utc() -> datetime:
    return datetime.now(UTC)


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def dump(model: BaseModel) -> dict[str, Any]:
    """A model as the apiserver stores it: camelCase, defaults included, no nulls and no empty
    strings (the 1.20 apiserver reads an empty string as null and refuses it for a string)."""
    result: dict[str, Any] = _drop_empty(model.model_dump(mode="json", by_alias=True))
    return result


def _drop_empty(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_empty(v) for k, v in value.items() if v is not None and v != ""}
    if isinstance(value, list):
        return [_drop_empty(item) for item in value]
    return value
