"""Create-or-update of one child, with the ownership rules every child follows.

An object of the desired name that another owner controls is never touched: it is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import kopf

from aar_operator.kube import ApiError, Kube, Ref


@dataclass(frozen=True)
class Outcome:
    """What ensuring one child did; `conflict` explains a name we may not take."""

    object: dict[str, Any] | None
    action: str = ""  # "Created", "Updated" or ""
    conflict: str = ""


def controller_uid(obj: dict[str, Any]) -> str | None:
    for reference in obj["metadata"].get("ownerReferences", []):
        if reference.get("controller"):
            return str(reference["uid"])
    return None


def _stale_controller(obj: dict[str, Any], desired: dict[str, Any]) -> bool:
    """Controlled by an earlier object of our own kind and name (e.g. a sandbox deleted on
    scale-down and created again): ours to take over."""
    ours = desired["metadata"]["ownerReferences"][0]
    return any(
        reference.get("controller")
        and reference["kind"] == ours["kind"]
        and reference["name"] == ours["name"]
        and reference["uid"] != ours["uid"]
        for reference in obj["metadata"].get("ownerReferences", [])
    )


def _merge_owners(
    current: list[dict[str, Any]], desired: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    uids = {reference["uid"] for reference in desired}
    names = {(reference["kind"], reference["name"]) for reference in desired}
    kept = [
        reference
        for reference in current
        if reference["uid"] not in uids and (reference["kind"], reference["name"]) not in names
    ]
    return desired + kept


def _differs(current: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """True when a field we set has another value (fields the server adds are ignored)."""
    for key, value in wanted.items():
        if isinstance(value, dict) and isinstance(current.get(key), dict):
            if _differs(current[key], value):
                return True
        elif current.get(key) != value:
            return True
    return False


async def ensure(
    kube: Kube,
    owner_body: kopf.Body,
    desired: dict[str, Any],
    *,
    update: dict[str, Any] | None = None,
    known: bool = False,
) -> Outcome:
    """Create `desired`, or bring an existing one we own in line with the fields in `update`
    (a merge patch; None means the object is immutable once made).

    `known`: the owner was reconciled before, so the child most likely exists and a read comes
    first; otherwise creating first saves a request for each new child.
    """
    ref = Ref.of(desired)
    current = await kube.get(ref) if known else None
    if current is None:
        try:
            created = await kube.create(desired)
        except ApiError as error:
            if error.status != 409:
                raise
            current = await kube.get(ref)
            if current is None:  # deleted between the two calls: the next cycle creates it
                return Outcome(None)
        else:
            kopf.event(
                owner_body,
                type="Normal",
                reason="Created",
                message=f"Created {ref.kind} {ref.name}",
            )
            return Outcome(created, "Created")
    owner_uid = desired["metadata"]["ownerReferences"][0]["uid"]
    if controller_uid(current) not in (owner_uid, None) and not _stale_controller(current, desired):
        message = (
            f"{ref.kind} {ref.name} exists and is not owned by "
            f"{owner_body['kind']} {owner_body['metadata']['name']}; delete or rename it"
        )
        return Outcome(current, conflict=message)
    if controller_uid(current) is None and current["metadata"].get("labels", {}).get(
        "aar.dev/agent"
    ) != desired["metadata"]["labels"].get("aar.dev/agent"):
        message = (
            f"{ref.kind} {ref.name} exists and was not made for this agent; delete or rename it"
        )
        return Outcome(current, conflict=message)
    wanted: dict[str, Any] = {"metadata": {"labels": desired["metadata"]["labels"]}}
    wanted.update(update or {})
    owners = _merge_owners(
        current["metadata"].get("ownerReferences", []), desired["metadata"]["ownerReferences"]
    )
    if _differs(current, wanted) or owners != current["metadata"].get("ownerReferences", []):
        patch = {**wanted, "metadata": {**wanted["metadata"], "ownerReferences": owners}}
        patched = await kube.patch(ref, patch)
        kopf.event(
            owner_body, type="Normal", reason="Updated", message=f"Updated {ref.kind} {ref.name}"
        )
        return Outcome(patched, "Updated")
    return Outcome(current)


async def ensure_secret(kube: Kube, owner_body: kopf.Body, desired: dict[str, Any]) -> None:
    """Credential Secrets are created once and never read back: the operator may create
    Secrets anywhere but read none outside its own namespace, so 409 means it exists."""
    try:
        await kube.create(desired)
    except ApiError as error:
        if error.status != 409:
            raise
    else:
        ref = Ref.of(desired)
        kopf.event(
            owner_body, type="Normal", reason="Created", message=f"Created {ref.kind} {ref.name}"
        )
