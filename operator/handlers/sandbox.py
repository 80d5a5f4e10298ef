"""Reconcile one AgentSandbox as an ordered list of steps: identity (ServiceAccount, credential
Secret), workspace (PVC), network (NetworkPolicy), pod; then compute the conditions once and
write the status once."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
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
    Condition,
    SandboxStatus,
    Spend,
    dump,
    format_time,
    money,
    now_utc,
)
from aar_operator.namespaces import refusal
from aar_operator.naming import pod_name
from aar_operator.status import (
    BUDGET_EXHAUSTED,
    FALSE,
    INVALID_SPEC,
    TRUE,
    Stop,
    budget_stop,
    pod_scheduled,
    running_seconds,
    set_condition,
    state_of,
    validate_sandbox,
)
from aar_operator.statuswriter import write_invalid_spec, write_status

POD_REJECTED = "PodRejected"
# Answers that mean the API server will not take this Pod as it is (not a passing failure).
REFUSED = frozenset({400, 403, 422})


@dataclass(frozen=True)
class Cycle:
    """What every step of one reconcile reads: the sandbox as found, and the cycle's clock."""

    context: Context
    body: kopf.Body
    sandbox: Sandbox
    previous: SandboxStatus
    now: datetime
    changes: Changes

    @property
    def generation(self) -> int:
        return int(self.body["metadata"].get("generation", 1))

    @property
    def known(self) -> bool:
        """Reconciled before, so its children most likely exist: each step reads first."""
        return self.previous.observed_generation > 0


@dataclass(frozen=True)
class PodState:
    """Where the pod step left the agent's Pod; `rejected` says why the API server refused it."""

    pod: dict[str, Any] | None
    conflict: str = ""
    rejected: str = ""


async def reconcile_sandbox(context: Context, body: kopf.Body) -> dict[str, Any] | None:
    """Bring one sandbox's children in line with its spec, then write its status once."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    previous = SandboxStatus.model_validate(body.get("status") or {})
    now = now_utc()
    run = body["spec"].get("run") or name
    with metrics.reconciling("AgentSandbox", namespace, run):
        refused = refusal("AgentSandbox", namespace, context.config)
        if refused:
            # A Pod made before its namespace was refused (a narrowed allow-list) stops.
            await _delete_pod(context, body)
        spec, problems = (None, [refused]) if refused else _validate(name, body)
        if spec is None or problems:
            metrics.sandbox_state(namespace, name, run, INVALID_SPEC)
            return await write_invalid_spec(
                context.kube, body, "AgentSandbox", previous, problems, now
            )
        sandbox = Sandbox(namespace, name, body["metadata"]["uid"], spec, _run_owner(body))
        cycle = Cycle(context, body, sandbox, previous, now, Changes())

        conflicts = [
            await _ensure_identity(cycle),
            await _ensure_workspace(cycle),
            await _ensure_network(cycle),
        ]
        current = await _current_pod(cycle)
        conflicts.append(current.conflict)
        added_hours = running_seconds(current.pod, previous.accounted_at, now) / 3600
        spend = _agent_spend(cycle, added_hours)
        stop_reason, own_budget = _stop_reason(cycle, spend)
        pod = current
        # No Pod while a child it needs belongs to someone else (its identity, its policy).
        if not any(conflicts):
            pod = await _ensure_pod(cycle, current.pod, stop_reason)
            conflicts.append(pod.conflict)
        await cycle.changes.post(context.kube, body)

        conflict = "; ".join(c for c in conflicts if c)
        conditions = _conditions(cycle, pod, stop_reason, own_budget, conflict)
        status = _status(cycle, pod.pod, conditions, spend, added_hours)
        metrics.sandbox_state(namespace, name, run, state_of(conditions))
        return await write_status(context.kube, body, "AgentSandbox", dump(status))


def _validate(name: str, body: kopf.Body) -> tuple[AgentSandboxSpec | None, list[str]]:
    """The spec, and what is wrong with it that the schema let through."""
    try:
        spec = AgentSandboxSpec.model_validate(body["spec"])
    except ValidationError as error:
        return None, [str(error)]
    return spec, validate_sandbox(name, spec)


async def _delete_pod(context: Context, body: kopf.Body) -> None:
    """Delete the sandbox's Pod, if it has one; every other child is left as it is."""
    metadata = body["metadata"]
    ref = Ref("v1", "Pod", metadata["namespace"], pod_name(metadata["name"]))
    try:
        pod = await context.kube.get(ref)
    except ApiError as error:
        # An operator with no rights there made no Pod there either: the refusal still stands.
        if error.status != 403:
            raise
        return
    if (
        pod is None
        or controller_uid(pod) != metadata["uid"]
        or pod["metadata"].get("deletionTimestamp")
    ):
        return
    changes = Changes()
    if await context.kube.delete(ref, uid=pod["metadata"]["uid"]):
        changes.add("Deleted", ref)
    await changes.post(context.kube, body)


def _run_owner(body: kopf.Body) -> Owner | None:
    for reference in body["metadata"].get("ownerReferences", []):
        if reference.get("kind") == "ResearchRun" and reference.get("controller"):
            return Owner(
                reference["apiVersion"], "ResearchRun", reference["name"], reference["uid"]
            )
    return None


async def _ensure_identity(cycle: Cycle) -> str:
    """The ServiceAccount (no token: the agent has no business with the Kubernetes API) and
    the Secret holding the agent's signed credential; returns a conflict, if any."""
    kube, sandbox = cycle.context.kube, cycle.sandbox
    outcome = await ensure(
        kube,
        cycle.body,
        cycle.changes,
        builders.service_account(sandbox),
        update={"automountServiceAccountToken": False},
        known=cycle.known,
    )
    credential = cycle.context.issuer.mint_agent(sandbox.namespace, sandbox.run, sandbox.name)
    await ensure_secret(kube, cycle.changes, builders.credential_secret(sandbox, credential))
    return outcome.conflict


async def _ensure_workspace(cycle: Cycle) -> str:
    """The workspace PVC, which outlives the Pod (and, co-owned by the run, the sandbox)."""
    outcome = await ensure(
        cycle.context.kube,
        cycle.body,
        cycle.changes,
        builders.workspace_pvc(cycle.sandbox),
        known=cycle.known,
    )
    return outcome.conflict


async def _ensure_network(cycle: Cycle) -> str:
    """The NetworkPolicy, before the Pod, so the agent never runs unconfined."""
    policy = builders.network_policy(cycle.sandbox, cycle.context.config)
    outcome = await ensure(
        cycle.context.kube,
        cycle.body,
        cycle.changes,
        policy,
        update={"spec": policy["spec"]},
        known=cycle.known,
    )
    return outcome.conflict


async def _current_pod(cycle: Cycle) -> PodState:
    """The agent's Pod as it is now, read before anything can delete it (its running time is
    banked from it); a Pod of that name that another owner controls is a conflict."""
    sandbox = cycle.sandbox
    ref = Ref("v1", "Pod", sandbox.namespace, pod_name(sandbox.name))
    pod = await cycle.context.kube.get(ref) if cycle.known else None
    if pod is not None and controller_uid(pod) != sandbox.uid:
        return PodState(
            None, conflict=f"Pod {ref.name} exists and is not owned by AgentSandbox {sandbox.name}"
        )
    return PodState(pod)


def _agent_spend(cycle: Cycle, added_hours: float) -> Spend:
    """Spend is the gateway's figure for this agent (read by the run's reconcile); agent-hours
    and GPU-hours are banked here, before a Pod that ran can be deleted."""
    sandbox, previous = cycle.sandbox, cycle.previous.spend
    gpus = sandbox.spec.sandbox.resources.gpu
    knowledge = cycle.context.runs.get((sandbox.namespace, sandbox.run))
    hours = round(previous.agent_hours + added_hours, 6)
    gpu_hours = round(previous.gpu_hours + added_hours * gpus, 6)
    totals = None
    if knowledge is not None and knowledge.spend is not None:
        totals = knowledge.spend.agents.get(sandbox.name)
    if totals is None:
        return previous.model_copy(update={"agent_hours": hours, "gpu_hours": gpu_hours})
    return totals.spend(agent_hours=hours, gpu_hours=gpu_hours)


def _stop_reason(cycle: Cycle, spend: Spend) -> tuple[str, Stop | None]:
    """Why the agent must not run ("" when it may), and its own budget's verdict: the run's
    reason (annotation) first, then spec.suspend, then the agent's own share of the budget."""
    spec = cycle.sandbox.spec
    stop_reason = cycle.body["metadata"].get("annotations", {}).get(builders.STOP_REASON) or (
        "Suspended" if spec.suspend else ""
    )
    own_budget = budget_stop(spec.budget.usd, spec.budget.agent_hours, spend, "agent")
    if own_budget is not None and not stop_reason:
        stop_reason = BUDGET_EXHAUSTED
    return stop_reason, own_budget


async def _ensure_pod(cycle: Cycle, pod: dict[str, Any] | None, stop_reason: str) -> PodState:
    """Delete the Pod when the agent must stop or its spec changed, create it when missing."""
    kube, body = cycle.context.kube, cycle.body
    desired = builders.pod(cycle.sandbox, cycle.context.config)
    ref = Ref.of(desired)
    if pod is not None and (stop_reason or _replaced(pod, desired)):
        await kube.delete(ref, uid=pod["metadata"]["uid"])
        cycle.changes.add("Deleted" if stop_reason else "Replaced", ref)
        pod = None
    if pod is not None or stop_reason:
        return PodState(pod)
    try:
        outcome = await ensure(kube, body, cycle.changes, desired, known=False)
    except ApiError as error:
        # Admission said no (a missing RuntimeClass, a quota, a policy): retrying cannot help
        # until someone acts, so say so where they look.
        if error.status not in REFUSED:
            raise
        rejected = f"the API server refused Pod {ref.name}: {error.message}"
        await kube.event(body, "Warning", POD_REJECTED, rejected)
        return PodState(None, rejected=rejected)
    return PodState(None if outcome.conflict else outcome.object, conflict=outcome.conflict)


def _replaced(pod: dict[str, Any], desired: dict[str, Any]) -> bool:
    """A Pod's spec is immutable: a new digest means delete and create again."""
    if pod["metadata"].get("deletionTimestamp"):
        return False
    annotations = pod["metadata"].get("annotations", {})
    return bool(
        annotations.get(builders.SPEC_HASH)
        != desired["metadata"]["annotations"][builders.SPEC_HASH]
    )


def _conditions(
    cycle: Cycle, state: PodState, stop_reason: str, own_budget: Stop | None, conflict: str
) -> list[Condition]:
    """PodScheduled (the scheduler's words), BudgetExhausted, Succeeded or Failed once the Pod
    ended, and Ready, computed once from what the steps found."""
    now, generation, pod = cycle.now, cycle.generation, state.pod
    scheduled = pod_scheduled(pod)
    if stop_reason:
        scheduled = (FALSE, stop_reason, "the Pod is stopped")
    conditions = set_condition(
        cycle.previous.conditions, "PodScheduled", *scheduled, now, generation
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
    ready = _ready(cycle, state, stop_reason, conflict, phase, scheduled)
    return set_condition(conditions, "Ready", *ready, now, generation)


def _ready(
    cycle: Cycle,
    state: PodState,
    stop_reason: str,
    conflict: str,
    phase: str,
    scheduled: tuple[str, str, str],
) -> tuple[str, str, str]:
    """(status, reason, message) of Ready: the first of conflict, refusal, stop, no Pod, the
    Pod's phase, and the scheduler's verdict that applies."""
    if conflict:
        return FALSE, "ChildConflict", conflict
    if state.rejected:
        return FALSE, POD_REJECTED, state.rejected
    if stop_reason:
        suspended = cycle.sandbox.spec.suspend and stop_reason == "Suspended"
        why = "spec.suspend is true" if suspended else stop_reason
        return FALSE, stop_reason, f"stopped ({why}); the workspace is kept"
    if state.pod is None:
        return FALSE, "PodMissing", "the Pod is being created"
    if phase == "Running":
        return TRUE, "Running", "the agent is running"
    if phase in ("Succeeded", "Failed"):
        return FALSE, f"Pod{phase}", f"the agent's Pod {phase.lower()}"
    status, reason, message = scheduled
    if status == FALSE:
        return FALSE, reason or "Unschedulable", message or "waiting for a node"
    return FALSE, "PodPending", "the Pod is starting"


def _status(
    cycle: Cycle,
    pod: dict[str, Any] | None,
    conditions: list[Condition],
    spend: Spend,
    added_hours: float,
) -> SandboxStatus:
    """The whole status of this cycle; accountedAt moves only when hours were banked."""
    previous = cycle.previous
    return SandboxStatus(
        observed_generation=cycle.generation,
        conditions=conditions,
        pod=pod["metadata"]["name"] if pod else "",
        spend=spend,
        spent=money(spend.dollars()),
        accounted_at=format_time(cycle.now)
        if added_hours or not previous.accounted_at
        else previous.accounted_at,
    )
