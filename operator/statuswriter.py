"""The one place a handler's status reaches the API server: once per cycle, skipped when
nothing changed."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import kopf

from aar_operator.kube import Kube, Ref
from aar_operator.models import RunStatus, SandboxStatus, dump
from aar_operator.status import FALSE, INVALID_SPEC, condition, set_condition


async def write_status(
    kube: Kube, body: kopf.Body, kind: str, status: dict[str, Any]
) -> dict[str, Any] | None:
    """The one status write of a cycle, skipped when nothing changed; returns the object."""
    if status == dict(body.get("status") or {}):
        return None
    ref = Ref(body["apiVersion"], kind, body["metadata"]["namespace"], body["metadata"]["name"])
    # A merge patch that sets every field we own: lists (conditions) are replaced whole.
    return await kube.patch(ref, {"status": status}, subresource="status")


async def write_invalid_spec(
    kube: Kube,
    body: kopf.Body,
    kind: str,
    previous: RunStatus | SandboxStatus,
    problems: list[str],
    now: datetime,
    reason: str = INVALID_SPEC,
) -> dict[str, Any] | None:
    """Ready=False with `reason` (InvalidSpec, or what a service refused), and a Warning event
    when that is news; the rest of the status is kept as it was."""
    generation = int(body["metadata"].get("generation", 1))
    message = "; ".join(problems)
    conditions = set_condition(
        previous.conditions, "Ready", FALSE, reason, message, now, generation
    )
    if condition(previous.conditions, "Ready") != condition(conditions, "Ready"):
        await kube.event(body, "Warning", reason, message)
    status = previous.model_copy(
        update={"conditions": conditions, "observed_generation": generation}
    )
    return await write_status(kube, body, kind, dump(status))
