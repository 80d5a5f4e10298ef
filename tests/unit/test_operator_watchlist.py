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
