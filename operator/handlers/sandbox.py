"""Reconcile one AgentSandbox: ServiceAccount, credential Secret, workspace PVC, NetworkPolicy,
Pod, in that order; then compute the status once and write it once."""

from __future__ import annotations

from typing import Any

import kopf
from pydantic import ValidationError

from aar_operator import builders, metrics
from aar_operator.builders import Owner, Sandbox
from aar_operator.children import Changes, controller_uid, ensure, ensure_secret
from aar_operator.context import Context
from aar_operator.kube import ApiError, Ref
from aar_operator.models import (
    AgentSandboxSpec,
    SandboxStatus,
    Spend,
    dump,
    format_time,
    now_utc,
)
from aar_operator.status import (
    BUDGET_EXHAUSTED,
    FALSE,
    INVALID_SPEC,
    TRUE,
    budget_stop,
    condition,
    pod_scheduled,
    running_seconds,
    set_condition,
    state_of,
    validate_sandbox,
)

POD_REJECTED = "PodRejected"
# Answers that mean the API server will not take this Pod as it is (not a passing failure).
REFUSED = frozenset({400, 403, 422})


def _run_owner(body: kopf.Body) -> Owner | None:
    for reference in body["metadata"].get("ownerReferences", []):
        if reference.get("kind") == "ResearchRun" and reference.get("controller"):
            return Owner(
                reference["apiVersion"], "ResearchRun", reference["name"], reference["uid"]
            )
    return None


async def write_status(
    context: Context, body: kopf.Body, kind: str, status: dict[str, Any]
) -> dict[str, Any] | None:
    """The one status write of a cycle, skipped when nothing changed; returns the object."""
    if status == dict(body.get("status") or {}):
        return None
    ref = Ref(body["apiVersion"], kind, body["metadata"]["namespace"], body["metadata"]["name"])
    # A merge patch that sets every field we own: lists (conditions) are replaced whole.
    return await context.kube.patch(ref, {"status": status}, subresource="status")


async def reconcile_sandbox(context: Context, body: kopf.Body) -> dict[str, Any] | None:
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    generation = int(body["metadata"].get("generation", 1))
    previous = SandboxStatus.model_validate(body.get("status") or {})
    now = now_utc()
    run = body["spec"].get("run") or name
    with metrics.reconciling("AgentSandbox", namespace, run):
        try:
            spec = AgentSandboxSpec.model_validate(body["spec"])
            problems = validate_sandbox(name, spec)
        except ValidationError as error:
            spec, problems = None, [str(error)]
        if spec is None or problems:
            conditions = set_condition(
                previous.conditions,
                "Ready",
                FALSE,
                INVALID_SPEC,
                "; ".join(problems),
                now,
                generation,
            )
            if condition(previous.conditions, "Ready") != condition(conditions, "Ready"):
                await context.kube.event(body, "Warning", INVALID_SPEC, "; ".join(problems))
            status = previous.model_copy(
                update={"conditions": conditions, "observed_generation": generation}
            )
            metrics.sandbox_state(namespace, name, run, INVALID_SPEC)
            return await write_status(context, body, "AgentSandbox", dump(status))

        sandbox = Sandbox(namespace, name, body["metadata"]["uid"], spec, _run_owner(body))
        known = previous.observed_generation > 0
        kube, config = context.kube, context.config
        conflicts: list[str] = []
        rejected = ""
        changes = Changes()

        outcome = await ensure(
            kube,
            body,
            changes,
            builders.service_account(sandbox),
            update={"automountServiceAccountToken": False},
            known=known,
        )
        conflicts.append(outcome.conflict)
        credential = context.issuer.mint_agent(namespace, sandbox.run, name)
        await ensure_secret(kube, changes, builders.credential_secret(sandbox, credential))
        outcome = await ensure(kube, body, changes, builders.workspace_pvc(sandbox), known=known)
        conflicts.append(outcome.conflict)
        policy = builders.network_policy(sandbox, config)
        outcome = await ensure(
            kube, body, changes, policy, update={"spec": policy["spec"]}, known=known
        )
        conflicts.append(outcome.conflict)

        # Spend is the gateway's figure for this agent (read by the run's reconcile);
        # agent-hours are banked here, before a Pod that ran can be deleted.
        pod_ref = Ref("v1", "Pod", namespace, builders.pod_name(sandbox))
        desired_pod = builders.pod(sandbox, config)
        pod = await kube.get(pod_ref) if known else None
        if pod is not None and controller_uid(pod) != sandbox.uid:
            conflicts.append(f"Pod {pod_ref.name} exists and is not owned by AgentSandbox {name}")
            pod = None
        gpus = spec.sandbox.resources.gpu
        added = running_seconds(pod, previous.accounted_at, now) / 3600
        spend = _agent_spend(context, namespace, sandbox.run, name, previous.spend, added, gpus)

        stop_reason = body["metadata"].get("annotations", {}).get(builders.STOP_REASON) or (
            "Suspended" if spec.suspend else ""
        )
        own_budget = budget_stop(spec.budget.usd, spec.budget.agent_hours, spend, "agent")
        if own_budget is not None and not stop_reason:
            stop_reason = BUDGET_EXHAUSTED

        if not any(conflicts):
            if pod is not None and (stop_reason or _replaced(pod, desired_pod)):
                await kube.delete(pod_ref, uid=pod["metadata"]["uid"])
                changes.add("Deleted" if stop_reason else "Replaced", pod_ref)
                pod = None
            if pod is None and not stop_reason:
                try:
                    outcome = await ensure(kube, body, changes, desired_pod, known=False)
                except ApiError as error:
                    # Admission said no (a missing RuntimeClass, a quota, a policy): retrying
                    # cannot help until someone acts, so say so where they look.
                    if error.status not in REFUSED:
                        raise
                    rejected = f"the API server refused Pod {pod_ref.name}: {error.message}"
                    await kube.event(body, "Warning", POD_REJECTED, rejected)
                else:
                    conflicts.append(outcome.conflict)
                    pod = None if outcome.conflict else outcome.object
        await changes.post(kube, body)
        conflict = "; ".join(c for c in conflicts if c)

        conditions = _conditions(
            previous,
            pod,
            stop_reason,
            own_budget,
            conflict,
            rejected,
            spec.suspend,
            now,
            generation,
        )
        status = SandboxStatus(
            observed_generation=generation,
            conditions=conditions,
            pod=pod["metadata"]["name"] if pod else "",
            spend=spend,
            accounted_at=format_time(now)
            if added or not previous.accounted_at
            else previous.accounted_at,
        )
        metrics.sandbox_state(namespace, name, run, state_of(conditions))
        return await write_status(context, body, "AgentSandbox", dump(status))


def _replaced(pod: dict[str, Any], desired: dict[str, Any]) -> bool:
    """A Pod's spec is immutable: a new digest means delete and create again."""
    if pod["metadata"].get("deletionTimestamp"):
        return False
    annotations = pod["metadata"].get("annotations", {})
    return bool(
        annotations.get(builders.SPEC_HASH)
        != desired["metadata"]["annotations"][builders.SPEC_HASH]
    )


def _agent_spend(
    context: Context,
    namespace: str,
    run: str,
    agent: str,
    previous: Spend,
    added_hours: float,
    gpus: int,
) -> Spend:
    knowledge = context.runs.get((namespace, run))
    hours = round(previous.agent_hours + added_hours, 6)
    gpu_hours = round(previous.gpu_hours + added_hours * gpus, 6)
    totals = None
    if knowledge is not None and knowledge.spend is not None:
        totals = knowledge.spend.agents.get(agent)
    if totals is None:
        return previous.model_copy(update={"agent_hours": hours, "gpu_hours": gpu_hours})
    return totals.spend(agent_hours=hours, gpu_hours=gpu_hours)


def _conditions(
    previous: SandboxStatus,
    pod: dict[str, Any] | None,
    stop_reason: str,
    own_budget: Any,
    conflict: str,
    rejected: str,
    suspended: bool,
    now: Any,
    generation: int,
) -> list[Any]:
    conditions = previous.conditions
    scheduled, scheduled_reason, scheduled_message = pod_scheduled(pod)
    if stop_reason:
        scheduled, scheduled_reason, scheduled_message = FALSE, stop_reason, "the Pod is stopped"
    conditions = set_condition(
        conditions, "PodScheduled", scheduled, scheduled_reason, scheduled_message, now, generation
    )
    exhausted = own_budget is not None or stop_reason == BUDGET_EXHAUSTED
    conditions = set_condition(
        conditions,
        "BudgetExhausted",
        TRUE if exhausted else FALSE,
        BUDGET_EXHAUSTED if exhausted else "WithinBudget",
        own_budget.message
        if own_budget is not None
        else ("the run's budget is spent" if exhausted else ""),
        now,
        generation,
    )
    phase = (pod or {}).get("status", {}).get("phase", "")
    if phase in ("Succeeded", "Failed"):
        other = "Failed" if phase == "Succeeded" else "Succeeded"
        conditions = [c for c in conditions if c.type != other]
        conditions = set_condition(
            conditions,
            phase,
            TRUE,
            f"Pod{phase}",
            f"the agent's Pod {phase.lower()}",
            now,
            generation,
        )
    if conflict:
        ready = (FALSE, "ChildConflict", conflict)
    elif rejected:
        ready = (FALSE, POD_REJECTED, rejected)
    elif stop_reason:
        why = "spec.suspend is true" if suspended and stop_reason == "Suspended" else stop_reason
        ready = (FALSE, stop_reason, f"stopped ({why}); the workspace is kept")
    elif pod is None:
        ready = (FALSE, "PodMissing", "the Pod is being created")
    elif phase == "Running":
        ready = (TRUE, "Running", "the agent is running")
    elif phase in ("Succeeded", "Failed"):
        ready = (FALSE, f"Pod{phase}", f"the agent's Pod {phase.lower()}")
    elif scheduled == FALSE:
        ready = (
            FALSE,
            scheduled_reason or "Unschedulable",
            scheduled_message or "waiting for a node",
        )
    else:
        ready = (FALSE, "PodPending", "the Pod is starting")
    return set_condition(conditions, "Ready", *ready, now, generation)
