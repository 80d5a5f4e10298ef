"""Create-or-update of one child, with the ownership rules every child follows.

An object of the desired name that another owner controls is never touched: it is reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import kopf

from aar_operator.kube import ApiError, Kube, Ref


class Changes:
    """What one reconcile did to its children, posted as one Event per reason ("Created
    ServiceAccount w2s-3, Pod w2s-3"): one request instead of one per child."""

    MAX_NAMED = 20

    def __init__(self) -> None:
        self._done: dict[str, list[str]] = {}

    def add(self, reason: str, ref: Ref) -> None:
        self._done.setdefault(reason, []).append(f"{ref.kind} {ref.name}")

    async def post(self, kube: Kube, body: kopf.Body) -> None:
        for reason, done in self._done.items():
            named = ", ".join(done[: self.MAX_NAMED])
            more = f" and {len(done) - self.MAX_NAMED} more" if len(done) > self.MAX_NAMED else ""
            await kube.event(body, "Normal", reason, f"{reason} {named}{more}")
        self._done.clear()


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


def _foreign(current: dict[str, Any], desired: dict[str, Any]) -> bool:
    """Someone else's: controlled by another owner, or uncontrolled and not labelled for ours
    (an uncontrolled object labelled for this agent is adopted, e.g. a workspace kept by its
    run after a scale-down)."""
    controller = controller_uid(current)
    if controller is None:
        agent = current["metadata"].get("labels", {}).get("aar.dev/agent")
        return bool(agent != desired["metadata"]["labels"].get("aar.dev/agent"))
    ours = desired["metadata"]["ownerReferences"][0]["uid"]
    return controller != ours and not _stale_controller(current, desired)


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
        elif current.get(key) != value and not (value in ([], {}) and key not in current):
            # The apiserver drops empty lists and maps (e.g. a NetworkPolicy's `ingress: []`).
            return True
    return False


async def ensure(
    kube: Kube,
    owner_body: kopf.Body,
    changes: Changes,
    desired: dict[str, Any],
    *,
    update: dict[str, Any] | None = None,
    known: bool = False,
    current: dict[str, Any] | None = None,
) -> Outcome:
    """Create `desired`, or bring an existing one we own in line with the fields in `update`
    (a merge patch; None means the object is immutable once made).

    `known`: the owner was reconciled before, so the child most likely exists and a read comes
    first; otherwise creating first saves a request for each new child. `current`: the object
    as already read (from a list), so no read is needed at all.
    """
    ref = Ref.of(desired)
    if current is None and known:
        current = await kube.get(ref)
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
            changes.add("Created", ref)
            return Outcome(created, "Created")
    if _foreign(current, desired):
        message = (
            f"{ref.kind} {ref.name} exists and is not owned by "
            f"{owner_body['kind']} {owner_body['metadata']['name']}; delete or rename it"
        )
        return Outcome(current, conflict=message)
    extra = dict(update or {})
    metadata = {"labels": desired["metadata"]["labels"], **extra.pop("metadata", {})}
    wanted: dict[str, Any] = {"metadata": metadata, **extra}
    owners = _merge_owners(
        current["metadata"].get("ownerReferences", []), desired["metadata"]["ownerReferences"]
    )
    if _differs(current, wanted) or owners != current["metadata"].get("ownerReferences", []):
        patch = {**wanted, "metadata": {**wanted["metadata"], "ownerReferences": owners}}
        patched = await kube.patch(ref, patch)
        changes.add("Updated", ref)
        return Outcome(patched, "Updated")
    return Outcome(current)


async def ensure_secret(kube: Kube, changes: Changes, desired: dict[str, Any]) -> None:
    """Credential Secrets are created once and never read back: the operator may create
    Secrets anywhere but read none outside its own namespace, so 409 means it exists."""
    try:
        await kube.create(desired)
    except ApiError as error:
        if error.status != 409:
            raise
    else:
        changes.add("Created", Ref.of(desired))
