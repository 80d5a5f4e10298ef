"""The watchlist reconciles an object when first seen and when its spec changes, not when only
its status does; it forgets deleted objects and survives a reconcile that raises."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import kopf
import pytest

from aar_operator.config import OperatorConfig
from aar_operator.context import Context
from aar_operator.watchlist import Watchlist


def body(generation: int, observed: int | None = None, uid: str = "u1") -> kopf.Body:
    raw: dict[str, Any] = {
        "apiVersion": "aar.dev/v1alpha1",
        "kind": "AgentSandbox",
        "metadata": {"name": "a-0", "namespace": "ns", "uid": uid, "generation": generation},
    }
    if observed is not None:
        raw["status"] = {"observedGeneration": observed}
    return kopf.Body(cast(kopf.RawBody, raw))


@pytest.fixture
def seen() -> list[dict[str, Any]]:
    return []


@pytest.fixture
def reconciled() -> asyncio.Event:
    return asyncio.Event()


@pytest.fixture
def watchlist(seen: list[dict[str, Any]], reconciled: asyncio.Event) -> Watchlist:
    context = Context(kube=None, config=OperatorConfig(), issuer=None, services=None)  # type: ignore[arg-type]
    exploded: set[str] = set()

    async def reconcile(_: Context, obj: kopf.Body) -> dict[str, Any] | None:
        # An object labelled explode=once fails its first reconcile only, as on a passing error.
        if (
            obj["metadata"].get("labels", {}).get("explode")
            and obj["metadata"]["uid"] not in exploded
        ):
            exploded.add(obj["metadata"]["uid"])
            raise RuntimeError("boom")
        seen.append(dict(obj))
        reconciled.set()
        return None

    return Watchlist(context, {"AgentSandbox": reconcile, "ResearchRun": reconcile})


async def test_first_sight_and_new_generations_reconcile_status_only_changes_do_not(
    watchlist: Watchlist, seen: list[dict[str, Any]]
) -> None:
    await watchlist.observe("AgentSandbox", None, body(1, 1))  # first sight, e.g. after a restart
    await watchlist.observe("AgentSandbox", "MODIFIED", body(1, 1))  # our own status write
    assert len(seen) == 1
    await watchlist.observe("AgentSandbox", "MODIFIED", body(2, 1))  # the spec changed
    assert len(seen) == 2
    await watchlist.reconcile("u1")  # what the resync loop does for every object
    assert len(seen) == 3


async def test_deleted_objects_are_forgotten(
    watchlist: Watchlist, seen: list[dict[str, Any]]
) -> None:
    await watchlist.observe("AgentSandbox", "ADDED", body(1))
    await watchlist.observe("AgentSandbox", "DELETED", body(1))
    await watchlist.reconcile("u1")
    assert len(seen) == 1


async def test_a_failing_reconcile_is_logged_and_retried_at_the_next_resync(
    watchlist: Watchlist,
    seen: list[dict[str, Any]],
    reconciled: asyncio.Event,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = body(1)
    broken["metadata"]["labels"] = {"explode": "once"}  # type: ignore[index]
    await watchlist.observe("AgentSandbox", "ADDED", broken)
    assert seen == []
    assert "Reconcile of AgentSandbox ns/a-0 failed; retrying at the next resync" in caplog.text
    resync = asyncio.create_task(watchlist.resync_forever(0.01))
    try:
        await asyncio.wait_for(reconciled.wait(), 5)
    finally:
        resync.cancel()
    assert seen[0]["metadata"]["name"] == "a-0"


def owned(raw: dict[str, Any], owner_uid: str) -> dict[str, Any]:
    raw["metadata"]["ownerReferences"] = [{"uid": owner_uid, "controller": True}]
    return raw


async def settled(watchlist: Watchlist, seconds: float = 2.0) -> None:
    """Until every scheduled reconcile has run."""
    while watchlist._pokes:
        _, waiting = await asyncio.wait(set(watchlist._pokes), timeout=seconds)
        assert not waiting, "a scheduled reconcile did not finish"


def pod_event(phase: str | None, owner: str = "u1", uid: str = "p1") -> kopf.Body:
    raw: dict[str, Any] = {"kind": "Pod", "metadata": {"name": "a-0", "uid": uid}}
    if phase is not None:
        raw["status"] = {"phase": phase, "conditions": [{"type": "PodScheduled", "status": "True"}]}
    return kopf.Body(cast(kopf.RawBody, owned(raw, owner)))


async def test_an_agents_pod_changing_reconciles_its_sandbox_once_for_a_burst(
    watchlist: Watchlist, seen: list[dict[str, Any]]
) -> None:
    await watchlist.observe("AgentSandbox", "ADDED", body(1, 1))
    assert len(seen) == 1
    # Created by the sandbox's own reconcile: nothing to report yet.
    await watchlist.observe_pod("ADDED", pod_event(None))
    await settled(watchlist)
    assert len(seen) == 1
    # Scheduled, then running, then a label changed: one reconcile reads the Pod as it is.
    for phase in ("Pending", "Running", "Running"):
        await watchlist.observe_pod("MODIFIED", pod_event(phase))
    await settled(watchlist)
    assert len(seen) == 2
    await watchlist.observe_pod("MODIFIED", pod_event("Running"))  # nothing the sandbox shows
    await settled(watchlist)
    assert len(seen) == 2
    await watchlist.observe_pod("DELETED", pod_event("Running"))  # the sandbox makes another
    await settled(watchlist)
    assert len(seen) == 3
    # A Pod of no sandbox the watch has shown changes nothing.
    await watchlist.observe_pod("MODIFIED", pod_event("Running", owner="nobody", uid="p2"))
    await settled(watchlist)
    assert len(seen) == 3


async def test_sandbox_status_changes_reconcile_their_run_once_they_are_gathered(
    watchlist: Watchlist, seen: list[dict[str, Any]]
) -> None:
    run = {
        "apiVersion": "aar.dev/v1alpha1",
        "kind": "ResearchRun",
        "metadata": {"name": "r", "namespace": "ns", "uid": "run", "generation": 1},
        "status": {"observedGeneration": 1},
    }
    await watchlist.observe("ResearchRun", "ADDED", kopf.Body(cast(kopf.RawBody, run)))
    agents = [f"u{index}" for index in range(20)]
    for uid in agents:
        await watchlist.observe("AgentSandbox", "ADDED", body(1, 1, uid=uid))
    before = len(seen)
    for uid in agents:  # each sandbox writes its status: Ready, as its Pod started
        changed = owned(dict(body(1, 1, uid=uid)), "run")
        changed["status"] = {"observedGeneration": 1, "conditions": [{"type": "Ready"}]}
        await watchlist.observe("AgentSandbox", "MODIFIED", kopf.Body(cast(kopf.RawBody, changed)))
    await settled(watchlist)
    runs = [obj for obj in seen[before:] if obj["kind"] == "ResearchRun"]
    assert len(runs) == 1
    assert len(seen) == before + 1  # no sandbox reconciled again for its own status write
