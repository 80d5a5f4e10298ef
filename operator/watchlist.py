"""Level-triggered reconciling: every ResearchRun and AgentSandbox the watch has shown is
reconciled when it is first seen, when its spec changes (a new generation) and every resync
interval, one reconcile per object at a time. Between resyncs, status follows what it reports on
within a second or two: a change to an agent's Pod reconciles its sandbox, and a change to a
sandbox's status its run (after a short pause that gathers the changes of many agents into one
reconcile of the run).

Kopf's watch streams feed it through `@kopf.on.event`, which needs no finalizers and no progress
annotations: deletion never waits for the operator, and a 900-agent run costs the apiserver no
bookkeeping writes beyond the objects themselves.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

import kopf

from aar_operator import metrics
from aar_operator.children import controller_uid
from aar_operator.context import Context
from aar_operator.models import API_VERSION

logger = logging.getLogger(__name__)

# Reconciles an object; returns the object as it stands after the status write, if written.
Reconcile = Callable[[Context, kopf.Body], Awaitable[dict[str, Any] | None]]

# Resyncs run this many reconciles at once: steady, and gentle on the apiserver.
RESYNC_CONCURRENCY = 16
# A run waits this long after one of its sandboxes changed before it is reconciled: a 900-agent
# run whose Pods start together is summed a few times, not 900 times.
RUN_GATHER_SECONDS = 1.0


def _reported(status: dict[str, Any]) -> tuple[Any, ...]:
    """What a sandbox's status takes from its Pod's: the phase, the conditions' verdicts, each
    container's state."""
    return (
        status.get("phase"),
        tuple(
            (c.get("type"), c.get("status"), c.get("reason"), c.get("message"))
            for c in status.get("conditions", [])
        ),
        tuple(
            (c.get("name"), tuple(sorted((c.get("state") or {}).keys())), c.get("restartCount"))
            for c in status.get("containerStatuses", [])
        ),
    )


_NOTHING_REPORTED = _reported({})


class Watchlist:
    def __init__(
        self,
        context: Context,
        reconcilers: dict[str, Reconcile],
        on_deleted: dict[str, Callable[[Context, dict[str, Any]], Awaitable[None]]] | None = None,
    ) -> None:
        self._context = context
        self._reconcilers = reconcilers
        # What to do once an object of a kind is deleted (what its ownerReferences cannot
        # reach, such as a run's Jobs in another namespace).
        self._on_deleted = on_deleted or {}
        self._objects: dict[str, dict[str, Any]] = {}  # uid -> latest body seen
        self._poked: set[str] = set()  # uids with a reconcile scheduled that has not begun
        self._pokes: set[asyncio.Task[None]] = set()
        self._pods: dict[str, tuple[Any, ...]] = {}  # agent Pod uid -> what its sandbox reports
        self._stopped = False
        # Pokes share the apiserver with the watch's own reconciles (which create children):
        # a 900-agent run's Pods all being scheduled at once must not crowd those out.
        self._poke_gate = asyncio.Semaphore(RESYNC_CONCURRENCY)

    async def observe(self, kind: str, event_type: str | None, body: kopf.Body) -> None:
        """One watch event. Our own status writes come back here and change nothing."""
        # Objects from a list (the watch's first page) may lack kind and apiVersion.
        raw: dict[str, Any] = {"kind": kind, "apiVersion": API_VERSION, **body}
        uid = raw["metadata"]["uid"]
        if event_type == "DELETED":
            self._forget(uid, raw)
            if (then := self._on_deleted.get(kind)) is not None:
                self._spawn(then(self._context, raw))
            return
        seen = self._objects.get(uid)
        self._objects[uid] = raw
        observed = (raw.get("status") or {}).get("observedGeneration")
        if kind == "AgentSandbox" and (seen or {}).get("status") != raw.get("status"):
            self._sandbox_changed(raw)
        if seen is None or observed != raw["metadata"].get("generation"):
            await self.reconcile(uid)

    async def observe_pod(self, event_type: str | None, body: kopf.Body) -> None:
        """A watch event of an agent's Pod: its sandbox's status follows it now, not at the next
        resync (the sandbox reads the Pod again; this says only when). Only a change to what the
        sandbox reports counts: not the Pod's creation by the sandbox's own reconcile, nor
        changes to its metadata."""
        raw = dict(body)
        uid = raw["metadata"]["uid"]
        if event_type == "DELETED":
            self._pods.pop(uid, None)
        else:
            reported = _reported(raw.get("status") or {})
            if self._pods.get(uid, _NOTHING_REPORTED) == reported:
                return
            self._pods[uid] = reported
        owner = controller_uid(raw)
        if owner is not None:
            self.poke(owner)

    def _sandbox_changed(self, sandbox: dict[str, Any]) -> None:
        """A sandbox's status changed (its own write, seen on the watch): its run sums again."""
        run = controller_uid(sandbox)
        if run is not None:
            self.poke(run, delay=RUN_GATHER_SECONDS)

    def poke(self, uid: str, delay: float = 0.0) -> None:
        """Reconcile a known object soon. Pokes that arrive before that reconcile begins are one
        with it; those that arrive while it runs make one more."""
        if self._stopped or uid not in self._objects or uid in self._poked:
            return
        self._poked.add(uid)

        async def reconcile_soon() -> None:
            await asyncio.sleep(delay)
            async with self._poke_gate:
                self._poked.discard(uid)
                await self.reconcile(uid)

        self._spawn(reconcile_soon())

    def _spawn(self, work: Awaitable[None]) -> None:
        """Run `work` in the background; `stop` cancels what is still running."""

        async def logged() -> None:
            try:
                await work
            except Exception:
                logger.exception("Background work of the watch failed")

        task = asyncio.create_task(logged())
        self._pokes.add(task)
        task.add_done_callback(self._pokes.discard)

    def uids(self, kind: str) -> set[str]:
        """The uids of the objects of `kind` the watch has shown and not seen deleted."""
        return {uid for uid, raw in self._objects.items() if raw["kind"] == kind}

    async def reconcile(self, uid: str) -> None:
        async with self._context.locks[uid]:
            raw = self._objects.get(uid)
            if raw is None:  # deleted while waiting for the lock
                return
            try:
                updated = await self._reconcilers[raw["kind"]](
                    self._context, kopf.Body(cast(kopf.RawBody, raw))
                )
            except Exception:
                name = f"{raw['kind']} {raw['metadata']['namespace']}/{raw['metadata']['name']}"
                logger.exception(f"Reconcile of {name} failed; retrying at the next resync")
                return
            if updated is not None and uid in self._objects:
                self._objects[uid] = updated

    async def stop(self) -> None:
        """No reconcile after this: the operator is closing its connections."""
        self._stopped = True
        for task in list(self._pokes):
            task.cancel()
        await asyncio.gather(*self._pokes, return_exceptions=True)

    async def resync_forever(self, interval: float) -> None:
        gate = asyncio.Semaphore(RESYNC_CONCURRENCY)

        async def one(uid: str) -> None:
            async with gate:
                await self.reconcile(uid)

        while True:
            await asyncio.sleep(interval)
            await asyncio.gather(*(one(uid) for uid in list(self._objects)))

    def _forget(self, uid: str, raw: dict[str, Any]) -> None:
        self._objects.pop(uid, None)
        self._context.locks.pop(uid, None)
        namespace, name = raw["metadata"]["namespace"], raw["metadata"]["name"]
        if raw["kind"] == "ResearchRun":
            self._context.runs.pop((namespace, name), None)
            metrics.run_gone(namespace, name)
        else:
            metrics.sandbox_gone(namespace, name)
