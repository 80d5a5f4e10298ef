"""Reconcile one ResearchRun: one AgentSandbox per agent, scale up and down, stop on suspend,
deadline or budget; register the run with the gateway and scorer, read back spend and the best
score; then compute the status once and write it once."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import kopf
from pydantic import ValidationError

from aar_operator import builders, metrics
from aar_operator.builders import Owner
from aar_operator.children import Changes, controller_uid, ensure
from aar_operator.context import Context, RunKnowledge
from aar_operator.handlers.sandbox import write_status
from aar_operator.kube import Ref
from aar_operator.models import (
    API_VERSION,
    Best,
    ResearchRunSpec,
    RunStatus,
    dump,
    now_utc,
    parse_time,
)
from aar_operator.services import (
    RunRegistration,
    ServiceError,
    budget_request,
)
from aar_operator.status import (
    BUDGET_EXHAUSTED,
    FALSE,
    INVALID_SPEC,
    TRUE,
    Stop,
    aggregate,
    condition,
    run_stop,
    set_condition,
    validate_run,
)

# Sandboxes are created and patched this many at a time: enough to keep the apiserver busy,
# few enough that one run does not starve the others.
CONCURRENCY = 32

logger = logging.getLogger(__name__)


async def reconcile_run(context: Context, body: kopf.Body) -> dict[str, Any] | None:
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    generation = int(body["metadata"].get("generation", 1))
    previous = RunStatus.model_validate(body.get("status") or {})
    created = parse_time(body["metadata"]["creationTimestamp"])
    now = now_utc()
    with metrics.reconciling("ResearchRun", namespace, name):
        try:
            spec = ResearchRunSpec.model_validate(body["spec"])
            problems = validate_run(name, spec, created)
        except ValidationError as error:
            spec, problems = None, [str(error)]
        if spec is None or problems:
            # No children for a spec we cannot honour: fix the spec and the run starts.
            message = "; ".join(problems)
            conditions = set_condition(
                previous.conditions, "Ready", FALSE, INVALID_SPEC, message, now, generation
            )
            if condition(previous.conditions, "Ready") != condition(conditions, "Ready"):
                await context.kube.event(body, "Warning", INVALID_SPEC, message)
            status = previous.model_copy(
                update={"conditions": conditions, "observed_generation": generation}
            )
            return await write_status(context, body, "ResearchRun", dump(status))

        owner = Owner(API_VERSION, "ResearchRun", name, body["metadata"]["uid"])
        knowledge = context.runs[(namespace, name)]
        service_problems = await _talk_to_services(context, namespace, name, spec, knowledge)
        gateway_spend = knowledge.spend.run.spend() if knowledge.spend else previous.spend

        existing = await context.kube.list(
            Ref(API_VERSION, "AgentSandbox", namespace), {"aar.dev/run": name}
        )
        ours = {
            item["metadata"]["name"]: item for item in existing if controller_uid(item) == owner.uid
        }
        counts, hours = aggregate(
            spec.agents, [s for s in ours.values() if _index(name, s) < spec.agents]
        )
        retired = previous.retired_agent_hours + sum(
            float((s.get("status") or {}).get("spend", {}).get("agentHours", 0.0))
            for s in ours.values()
            if _index(name, s) >= spec.agents
        )
        spend = gateway_spend.model_copy(
            update={
                "agent_hours": round(hours.agent_hours + retired, 4),
                "gpu_hours": hours.gpu_hours,
            }
        )
        stop = run_stop(spec, created, now, spend)

        conflicts = await _reconcile_sandboxes(
            context, body, namespace, owner, spec, ours, existing, stop
        )

        conditions = previous.conditions
        exhausted = stop is not None and stop.reason == BUDGET_EXHAUSTED
        conditions = set_condition(
            conditions,
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
        conditions = set_condition(
            conditions, "Ready", *_ready(stop, conflicts, counts), now, generation
        )
        if stop is not None and condition(previous.conditions, "Ready") != condition(
            conditions, "Ready"
        ):
            await context.kube.event(
                body, "Normal", stop.reason, f"Stopped the run: {stop.message}"
            )
        metrics.run_figures(namespace, name, spend)
        status = RunStatus(
            observed_generation=generation,
            conditions=conditions,
            agents=counts,
            spend=spend,
            best=_best(knowledge, previous.best),
            ready=f"{counts.ready}/{counts.desired}",
            retired_agent_hours=round(retired, 6),
        )
        return await write_status(context, body, "ResearchRun", dump(status))


def _index(run: str, sandbox: dict[str, Any]) -> int:
    index = builders.agent_index(run, sandbox["metadata"]["name"])
    return -1 if index is None else index


def _ready(stop: Stop | None, conflicts: list[str], counts: Any) -> tuple[str, str, str]:
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


async def _talk_to_services(
    context: Context,
    namespace: str,
    name: str,
    spec: ResearchRunSpec,
    knowledge: RunKnowledge,
) -> list[str]:
    """Register budget and task when they changed; poll spend and best at most every
    poll_seconds. A service that is down is reported, and the run goes on (the gateway is
    fail-closed: a run it does not know is refused)."""
    services = context.services
    if services is None:
        return []
    problems = []
    agents = [builders.agent_name(name, i) for i in range(spec.agents)]
    budget = budget_request(spec, agents, builders.agent_budget(spec))
    registration = RunRegistration(task=spec.task.name, review_required=spec.review.required)
    digest = builders.spec_hash([budget.model_dump(mode="json"), registration.model_dump()])
    if knowledge.registered != digest:
        try:
            await services.put_budget(namespace, name, budget)
            await services.register_run(namespace, name, registration)
            knowledge.registered = digest
            logger.info(f"Registered run {namespace}/{name} with the gateway and the scorer")
        except ServiceError as error:
            problems.append(str(error))
    if time.monotonic() - knowledge.polled_at >= context.config.poll_seconds:
        try:
            knowledge.spend = await services.spend(namespace, name)
            knowledge.best = await services.best(namespace, name)
            knowledge.polled_at = time.monotonic()
        except ServiceError as error:
            problems.append(str(error))
    return problems
