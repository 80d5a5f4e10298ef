"""Reconcile one ResearchRun: one AgentSandbox per agent, scale up and down, stop on suspend,
deadline or budget; register the run with the gateway and scorer, read back spend and the best
score; then compute the status once and write it once."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import kopf
from pydantic import ValidationError

from aar_operator import builders, metrics
from aar_operator.budget import agent_budget
from aar_operator.builders import Owner
from aar_operator.children import Changes, controller_uid, ensure
from aar_operator.context import Context, RunKnowledge
from aar_operator.handlers.reproduction import reconcile_reproductions
from aar_operator.kube import Ref
from aar_operator.models import (
    API_VERSION,
    AgentCounts,
    Best,
    Condition,
    ResearchRunSpec,
    RunStatus,
    Spend,
    dump,
    format_time,
    money,
    now_utc,
    parse_time,
)
from aar_operator.namespaces import refusal
from aar_operator.naming import agent_index, agent_name
from aar_operator.reproductions import RunRef
from aar_operator.services import (
    RunRegistration,
    ServiceError,
    budget_request,
)
from aar_operator.status import (
    BUDGET_EXHAUSTED,
    FALSE,
    TRUE,
    UNKNOWN_MODEL,
    UNKNOWN_TASK,
    Stop,
    aggregate,
    condition,
    deadline,
    run_stop,
    set_condition,
    validate_run,
    with_default_cap,
)
from aar_operator.statuswriter import write_invalid_spec, write_status

# Sandboxes are created and patched this many at a time: enough to keep the apiserver busy,
# few enough that one run does not starve the others.
CONCURRENCY = 32

logger = logging.getLogger(__name__)


async def reconcile_run(context: Context, body: kopf.Body) -> dict[str, Any] | None:
    """Bring one run's sandboxes in line with its spec and tell the services about it, then
    write its status once."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    generation = int(body["metadata"].get("generation", 1))
    previous = RunStatus.model_validate(body.get("status") or {})
    created = parse_time(body["metadata"]["creationTimestamp"])
    now = now_utc()
    with metrics.reconciling("ResearchRun", namespace, name):
        refused = refusal("ResearchRun", namespace, context.config)
        spec, problems = (
            (None, [refused])
            if refused
            else _validate(name, body, created, context.config.default_budget_usd)
        )
        if spec is None or problems:
            # No children for a spec we cannot honour (fix it and the run starts), nor in a
            # namespace where runs may not be.
            return await write_invalid_spec(
                context.kube, body, "ResearchRun", previous, problems, now
            )
        knowledge = context.runs[(namespace, name)]
        declined = await _refusal_by_services(context, spec, knowledge)
        if declined is not None:
            # Pods asking a model nobody bills, or for a task nobody scores, would only burn
            # their GPUs: none until the spec or the service changes.
            return await write_invalid_spec(
                context.kube,
                body,
                "ResearchRun",
                previous,
                [declined.message],
                now,
                declined.reason,
            )
        owner = Owner(API_VERSION, "ResearchRun", name, body["metadata"]["uid"])
        polled = await _talk_to_services(context, namespace, name, spec, knowledge)
        service_problems = polled.problems
        if polled.fresh or knowledge.reproductions is None:
            knowledge.reproductions = await reconcile_reproductions(
                context,
                RunRef(namespace, name, owner.uid),
                spec,
                knowledge.reproductions or previous.reproductions,
            )
        existing, ours = await _list_sandboxes(context, namespace, owner)
        counts, spend, retired = _tally(name, spec, ours, previous, knowledge)
        stop = run_stop(spec, created, now, spend)
        conflicts = await _reconcile_sandboxes(
            context, body, namespace, owner, spec, ours, existing, stop
        )

        conditions = _conditions(
            previous, stop, service_problems, conflicts, counts, now, generation
        )
        await _announce_stop(context, body, stop, previous.conditions, conditions)
        best = _best(knowledge, previous.best)
        metrics.run_figures(namespace, name, spend, best)
        status = RunStatus(
            observed_generation=generation,
            conditions=conditions,
            agents=counts,
            spend=spend,
            best=best,
            reproductions=knowledge.reproductions,
            ready=f"{counts.ready}/{counts.desired}",
            spent=money(spend.dollars()),
            budget=money(spec.budget.usd),
            ends=format_time(ends) if (ends := deadline(spec, created)) else "",
            retired_agent_hours=round(retired, 6),
        )
        return await write_status(context.kube, body, "ResearchRun", dump(status))


def _validate(
    name: str, body: kopf.Body, created: datetime, default_usd: float | None
) -> tuple[ResearchRunSpec | None, list[str]]:
    """The spec (with the operator's default cap where it gives none), and what is wrong with it
    that the schema let through."""
    try:
        spec = with_default_cap(ResearchRunSpec.model_validate(body["spec"]), default_usd)
    except ValidationError as error:
        return None, [str(error)]
    return spec, validate_run(name, spec, created)


async def _list_sandboxes(
    context: Context, namespace: str, owner: Owner
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every AgentSandbox labelled for the run, and by name those the run controls (the others
    are names it may not take)."""
    existing = await context.kube.list(
        Ref(API_VERSION, "AgentSandbox", namespace), {"aar.dev/run": owner.name}
    )
    ours = {
        item["metadata"]["name"]: item for item in existing if controller_uid(item) == owner.uid
    }
    return existing, ours


def _tally(
    run: str,
    spec: ResearchRunSpec,
    ours: dict[str, dict[str, Any]],
    previous: RunStatus,
    knowledge: RunKnowledge,
) -> tuple[AgentCounts, Spend, float]:
    """The run's agent counts, its spend (the gateway's dollars and tokens, agent-hours summed
    over its sandboxes) and the agent-hours of removed agents, which stay counted."""
    gateway_spend = knowledge.spend.run.spend() if knowledge.spend else previous.spend
    current = [s for s in ours.values() if _index(run, s) < spec.agents]
    counts, hours = aggregate(spec.agents, current)
    # Each agent's even share of the dollar cap refused its next request: so is the run's cap.
    shares_spent = (
        bool(current)
        and knowledge.spend is not None
        and all(
            (totals := knowledge.spend.agents.get(s["metadata"]["name"])) is not None
            and totals.exhausted
            for s in current
        )
    )
    retired = previous.retired_agent_hours + sum(
        float((s.get("status") or {}).get("spend", {}).get("agentHours", 0.0))
        for s in ours.values()
        if _index(run, s) >= spec.agents
    )
    # Reproductions are the run's GPU time too.
    reproduced = (knowledge.reproductions or previous.reproductions).gpu_hours
    spend = gateway_spend.model_copy(
        update={
            "agent_hours": round(hours.agent_hours + retired, 4),
            "gpu_hours": round(hours.gpu_hours + reproduced, 6),
            "budget_exhausted": gateway_spend.budget_exhausted or shares_spent,
        }
    )
    return counts, spend, retired


def _conditions(
    previous: RunStatus,
    stop: Stop | None,
    service_problems: list[str],
    conflicts: list[str],
    counts: AgentCounts,
    now: datetime,
    generation: int,
) -> list[Condition]:
    """BudgetExhausted, ServicesReachable and Ready, computed once from what the cycle found."""
    exhausted = stop is not None and stop.reason == BUDGET_EXHAUSTED
    conditions = set_condition(
        previous.conditions,
        BUDGET_EXHAUSTED,
        TRUE if exhausted else FALSE,
        BUDGET_EXHAUSTED if exhausted else "WithinBudget",
        stop.message if stop is not None and exhausted else "",
        now,
        generation,
    )
    conditions = set_condition(
        conditions,
        "ServicesReachable",
        FALSE if service_problems else TRUE,
        "ServiceError" if service_problems else "Registered",
        "; ".join(service_problems),
        now,
        generation,
    )
    return set_condition(conditions, "Ready", *_ready(stop, conflicts, counts), now, generation)


async def _announce_stop(
    context: Context,
    body: kopf.Body,
    stop: Stop | None,
    before: list[Condition],
    after: list[Condition],
) -> None:
    """One Normal event when the run stops (or stops for another reason), not every cycle."""
    if stop is not None and condition(before, "Ready") != condition(after, "Ready"):
        await context.kube.event(body, "Normal", stop.reason, f"Stopped the run: {stop.message}")


def _index(run: str, sandbox: dict[str, Any]) -> int:
    index = agent_index(run, sandbox["metadata"]["name"])
    return -1 if index is None else index


def _ready(stop: Stop | None, conflicts: list[str], counts: AgentCounts) -> tuple[str, str, str]:
    if conflicts:
        return FALSE, "ChildConflict", "; ".join(conflicts)
    if stop is not None:
        return FALSE, stop.reason, stop.message
    if counts.ready >= counts.desired:
        return TRUE, "AgentsReady", f"all {counts.desired} agents are running"
    return (
        FALSE,
        "AgentsNotReady",
        f"{counts.ready} of {counts.desired} agents are running ({counts.scheduled} scheduled)",
    )


def _best(knowledge: RunKnowledge, previous: Best | None) -> Best | None:
    return knowledge.best or previous


async def _reconcile_sandboxes(
    context: Context,
    body: kopf.Body,
    namespace: str,
    owner: Owner,
    spec: ResearchRunSpec,
    ours: dict[str, dict[str, Any]],
    existing: list[dict[str, Any]],
    stop: Stop | None,
) -> list[str]:
    """Create, update and prune the run's AgentSandboxes; returns names we may not take."""
    kube = context.kube
    stop_reason = stop.reason if stop is not None else None
    by_name = {item["metadata"]["name"]: item for item in existing}
    conflicts: list[str] = []
    changes = Changes()
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(index: int) -> None:
        desired = builders.research_sandbox(namespace, owner, spec, index, stop_reason)
        update = {
            "metadata": {"annotations": desired["metadata"]["annotations"]},
            "spec": desired["spec"],
        }
        async with gate:
            outcome = await ensure(
                kube,
                body,
                changes,
                desired,
                update=update,
                current=by_name.get(desired["metadata"]["name"]),
            )
        if outcome.conflict:
            conflicts.append(outcome.conflict)

    async def prune(item: dict[str, Any]) -> None:
        async with gate:
            # The workspace is co-owned by the run and outlives its sandbox.
            ref = Ref(API_VERSION, "AgentSandbox", namespace, item["metadata"]["name"])
            if await kube.delete(ref, uid=item["metadata"]["uid"]):
                changes.add("Deleted", ref)

    surplus = [item for item in ours.values() if _index(owner.name, item) >= spec.agents]
    await asyncio.gather(*(one(i) for i in range(spec.agents)), *(prune(item) for item in surplus))
    await changes.post(kube, body)
    return sorted(conflicts)


async def _refusal_by_services(
    context: Context, spec: ResearchRunSpec, knowledge: RunKnowledge
) -> Stop | None:
    """What the gateway (the model) or the scorer (the task) answered that it cannot serve, in
    its own words. Asked again when the spec names another model or task, and every
    poll_seconds while refused (a service may learn it). A service that gives no answer refuses
    nothing: `_talk_to_services` reports it, and the gateway stays fail-closed."""
    services = context.services
    if services is None:
        return None
    asked = (spec.model, spec.task.name)
    fresh = time.monotonic() - knowledge.checked_at < context.config.poll_seconds
    if knowledge.checked == asked and (knowledge.refusal is None or fresh):
        return knowledge.refusal
    try:
        refusal = None
        if (message := await services.model_refusal(spec.model)) is not None:
            refusal = Stop(UNKNOWN_MODEL, f"the gateway refuses model {spec.model!r}: {message}")
        elif (message := await services.task_refusal(spec.task.name)) is not None:
            refusal = Stop(UNKNOWN_TASK, f"the scorer refuses task {spec.task.name!r}: {message}")
    except ServiceError:
        return None
    knowledge.checked, knowledge.checked_at, knowledge.refusal = asked, time.monotonic(), refusal
    return refusal


@dataclass(frozen=True)
class Polled:
    problems: list[str]
    fresh: bool  # spend and best were read again this cycle


async def _talk_to_services(
    context: Context,
    namespace: str,
    name: str,
    spec: ResearchRunSpec,
    knowledge: RunKnowledge,
) -> Polled:
    """Register budget and task when they changed; poll spend and best at most every
    poll_seconds. A service that is down is reported, and the run goes on (the gateway is
    fail-closed: a run it does not know is refused)."""
    services = context.services
    if services is None:
        return Polled([], False)
    problems = []
    agents = [agent_name(name, i) for i in range(spec.agents)]
    budget = budget_request(spec, agents, agent_budget(spec))
    review = spec.review
    registration = RunRegistration(
        task=spec.task.name,
        review_required=review.required,
        reproduce=review.reproduce,
        tolerance=review.tolerance,
        transfer=review.transfer,
        reproduce_top=review.top,
    )
    digest = builders.spec_hash([budget.model_dump(mode="json"), registration.model_dump()])
    if knowledge.registered != digest:
        try:
            await services.put_budget(namespace, name, budget)
            await services.register_run(namespace, name, registration)
            knowledge.registered = digest
            logger.info(f"Registered run {namespace}/{name} with the gateway and the scorer")
        except ServiceError as error:
            problems.append(str(error))
    fresh = False
    if time.monotonic() - knowledge.polled_at >= context.config.poll_seconds:
        try:
            knowledge.spend = await services.spend(namespace, name)
            knowledge.best = await services.best(namespace, name)
            knowledge.polled_at = time.monotonic()
            fresh = True
        except ServiceError as error:
            problems.append(str(error))
    return Polled(problems, fresh)
