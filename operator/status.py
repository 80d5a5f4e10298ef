"""Pure status computations: validation a schema cannot express, why a run stops, conditions,
agent-hours, and the run's aggregate over its sandboxes. Handlers call these once per cycle."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from aar_operator.models import (
    MAX_AGENT_NAME,
    AgentCounts,
    AgentSandboxSpec,
    Condition,
    ResearchRunSpec,
    Spend,
    format_time,
    parse_duration,
    parse_time,
)
from aar_operator.naming import agent_name

TRUE, FALSE = "True", "False"

# Why a run or sandbox has no Pods, in the order they are checked.
SUSPENDED = "Suspended"
DEADLINE_EXCEEDED = "DeadlineExceeded"
BUDGET_EXHAUSTED = "BudgetExhausted"
INVALID_SPEC = "InvalidSpec"
# A service answered that it cannot serve the run: no Pods until the spec or the service changes.
UNKNOWN_MODEL = "UnknownModel"
UNKNOWN_TASK = "UnknownTask"


@dataclass(frozen=True)
class Stop:
    reason: str
    message: str


def deadline(spec: ResearchRunSpec, created: datetime) -> datetime | None:
    """When the run must stop: creation + a duration, or an absolute RFC 3339 time."""
    text = spec.budget.deadline
    if not text:
        return None
    try:
        return created + parse_duration(text)
    except ValueError:
        return parse_time(text)


def with_default_cap(spec: ResearchRunSpec, default_usd: float | None) -> ResearchRunSpec:
    """The spec with the operator's default dollar cap where it gives none and does not ask to
    run uncapped."""
    budget = spec.budget
    if budget.usd is not None or budget.usd_unlimited or default_usd is None:
        return spec
    return spec.model_copy(update={"budget": budget.model_copy(update={"usd": default_usd})})


def validate_run(name: str, spec: ResearchRunSpec, created: datetime) -> list[str]:
    """What is wrong with a run that its schema let through; each message says how to fix it.
    `spec` is the one `with_default_cap` gives."""
    problems = []
    if spec.budget.usd is None and not spec.budget.usd_unlimited:
        problems.append(
            "spec.budget.usd is not set, so the agents' model spend would have no cap: give the "
            "run one (budget: {usd: 50}), or write budget: {usdUnlimited: true} to run uncapped "
            "on purpose (the operator has no default cap; the chart sets one with "
            "operator.defaultBudgetUsd)"
        )
    if spec.budget.usd is not None and spec.budget.usd_unlimited:
        problems.append(
            f"spec.budget gives both usd ({spec.budget.usd:g}) and usdUnlimited: true; keep the "
            "one you mean"
        )
    longest = agent_name(name, spec.agents - 1)
    if len(longest) > MAX_AGENT_NAME:
        problems.append(
            f"agent names like {longest!r} would exceed {MAX_AGENT_NAME} characters; "
            f"shorten the run's name to at most {MAX_AGENT_NAME - len(str(spec.agents - 1)) - 1}"
        )
    if len(spec.directions) > spec.agents:
        problems.append(
            f"spec.directions has {len(spec.directions)} entries but spec.agents is "
            f"{spec.agents}: every direction needs an agent; raise spec.agents or drop directions"
        )
    if spec.budget.deadline:
        try:
            moment = deadline(spec, created)
        except ValueError:
            problems.append(
                f"spec.budget.deadline {spec.budget.deadline!r} is neither a duration (120h, "
                "1h30m) nor an RFC 3339 time (2026-12-01T00:00:00Z)"
            )
        else:
            if moment is not None and moment <= created:
                problems.append(
                    f"spec.budget.deadline {spec.budget.deadline} is before the run was created "
                    f"({format_time(created)}); give a later time or a duration such as 120h"
                )
    return problems


def validate_sandbox(name: str, spec: AgentSandboxSpec) -> list[str]:
    if len(name) > MAX_AGENT_NAME:
        return [f"the sandbox name {name!r} is longer than {MAX_AGENT_NAME} characters"]
    return []


def run_stop(spec: ResearchRunSpec, created: datetime, now: datetime, spend: Spend) -> Stop | None:
    """Why the run's agents must not run now, or None."""
    if spec.suspend:
        return Stop(SUSPENDED, "spec.suspend is true; Pods deleted, workspaces kept")
    moment = deadline(spec, created)
    if moment is not None and now >= moment:
        return Stop(
            DEADLINE_EXCEEDED,
            f"the deadline {format_time(moment)} has passed; Pods deleted, workspaces kept",
        )
    return budget_stop(spec.budget.usd, spec.budget.agent_hours, spend, "run")


def budget_stop(
    usd_cap: float | None, hours_cap: float | None, spend: Spend, who: str
) -> Stop | None:
    if usd_cap is not None and spend.budget_exhausted:
        return Stop(
            BUDGET_EXHAUSTED,
            f"the {who} spent ${spend.usd} of its ${usd_cap:.2f} budget, and what is left is less "
            "than its next model request could cost, so the gateway refused it; Pods deleted, "
            "workspaces kept (raise spec.budget.usd to continue)",
        )
    if usd_cap is not None and spend.dollars() >= Decimal(str(usd_cap)):
        return Stop(
            BUDGET_EXHAUSTED,
            f"the {who} spent ${spend.usd} of its ${usd_cap:.2f} budget; Pods deleted, "
            "workspaces kept (raise spec.budget.usd to continue)",
        )
    if hours_cap is not None and spend.agent_hours >= hours_cap:
        return Stop(
            BUDGET_EXHAUSTED,
            f"the {who} used {spend.agent_hours:.2f} of its {hours_cap:g} agent-hours; Pods "
            "deleted, workspaces kept (raise spec.budget.agentHours to continue)",
        )
    return None


def set_condition(
    conditions: list[Condition],
    type: str,
    status: str,
    reason: str,
    message: str,
    now: datetime,
    generation: int,
) -> list[Condition]:
    """Replace or add one condition; its transition time moves only when its status does."""
    previous = next((c for c in conditions if c.type == type), None)
    transition = (
        previous.last_transition_time
        if previous is not None and previous.status == status
        else format_time(now)
    )
    updated = Condition(
        type=type,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=transition,
        observed_generation=generation,
    )
    return [c for c in conditions if c.type != type] + [updated]


def condition(conditions: list[Condition], type: str) -> Condition | None:
    return next((c for c in conditions if c.type == type), None)


def running_seconds(pod: dict[str, Any] | None, accounted_at: str, now: datetime) -> float:
    """Pod running time not yet banked: since the later of its start and the last accounting."""
    if pod is None or pod.get("status", {}).get("phase") != "Running":
        return 0.0
    started_at = pod["status"].get("startTime")
    for container in pod["status"].get("containerStatuses", []):
        running = container.get("state", {}).get("running")
        if running and running.get("startedAt"):
            started_at = running["startedAt"]
    if not started_at:
        return 0.0
    start = parse_time(started_at)
    if accounted_at:
        start = max(start, parse_time(accounted_at))
    return max(0.0, (now - start).total_seconds())


def pod_scheduled(pod: dict[str, Any] | None) -> tuple[str, str, str]:
    """(status, reason, message) of the pod's PodScheduled condition, as the scheduler said it."""
    if pod is None:
        return FALSE, "NoPod", "the sandbox has no Pod"
    for item in pod.get("status", {}).get("conditions", []):
        if item.get("type") == "PodScheduled":
            return (
                item.get("status", "Unknown"),
                item.get("reason") or ("Scheduled" if item.get("status") == TRUE else "Pending"),
                item.get("message", ""),
            )
    return "Unknown", "Pending", "the scheduler has not looked at the Pod yet"


def state_of(conditions: list[Condition]) -> str:
    """One word per sandbox for metrics and counts: the Ready condition's reason."""
    ready = condition(conditions, "Ready")
    return ready.reason if ready is not None else "Unknown"


def aggregate(desired: int, sandboxes: list[dict[str, Any]]) -> tuple[AgentCounts, Spend]:
    """A run's agent counts and agent-hours, summed over its current sandboxes."""
    ready = scheduled = suspended = 0
    hours = gpu_hours = 0.0
    for sandbox in sandboxes:
        status = sandbox.get("status") or {}
        kinds = {c.get("type"): c for c in status.get("conditions", [])}
        if kinds.get("Ready", {}).get("status") == TRUE:
            ready += 1
        if kinds.get("PodScheduled", {}).get("status") == TRUE:
            scheduled += 1
        if kinds.get("Ready", {}).get("reason") in {SUSPENDED, DEADLINE_EXCEEDED, BUDGET_EXHAUSTED}:
            suspended += 1
        spend = status.get("spend") or {}
        hours += float(spend.get("agentHours", 0.0))
        gpu_hours += float(spend.get("gpuHours", 0.0))
    counts = AgentCounts(desired=desired, ready=ready, scheduled=scheduled, suspended=suspended)
    return counts, Spend(agent_hours=round(hours, 4), gpu_hours=round(gpu_hours, 4))
