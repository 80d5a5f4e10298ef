"""Helpers for the operator's cluster tests: the operator as a subprocess, waiting for a
condition, listing names."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from aar_devcluster.tools import Tool
from aar_operator.local import OperatorProcess

__all__ = [
    "CHILD_KINDS",
    "RUN_KINDS",
    "OperatorProcess",
    "eventually",
    "names",
    "ready",
    "refused",
    "running",
]

T = TypeVar("T")

# Every kind the operator makes for a sandbox.
CHILD_KINDS = ["serviceaccounts", "secrets", "persistentvolumeclaims", "pods", "networkpolicies"]
# Everything the operator makes for a run, and every child of a sandbox.
RUN_KINDS = ["agentsandboxes", *CHILD_KINDS]


@contextmanager
def running(
    kubeconfig: Path, namespace: str, log: Path, environment: dict[str, str] | None = None
) -> Iterator[OperatorProcess]:
    """`aar-operator run` as a subprocess (its signing key in `namespace`), stopped on the way
    out, when it prints the log's tail: pytest shows what the operator saw and did when the
    test failed."""
    process = OperatorProcess(kubeconfig, namespace, log, environment=environment)
    process.start()
    try:
        yield process
    finally:
        process.stop()
        print(f"--- operator log (tail) ---\n{process.log()}")


def eventually(check: Callable[[], T | None], timeout: float = 90, what: str = "") -> T:
    """Poll `check` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}; last: {last!r}")


def names(kubectl: Tool, kind: str, selector: str = "") -> list[str]:
    args = ["get", kind] + (["-l", selector] if selector else [])
    items = kubectl.json(*args)["items"]
    return sorted(item["metadata"]["name"] for item in items)


def ready(kubectl: Tool, kind: str, name: str) -> dict[str, Any]:
    status = kubectl.json("get", kind, name).get("status") or {}
    return next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})


def refused(kubectl: Tool, kind: str, name: str, reason: str = "InvalidSpec") -> str:
    """Waits for Ready=False with `reason` on the object and its Warning event, checks that the
    operator made nothing for it, and returns the message."""
    condition = eventually(
        lambda: (c := ready(kubectl, kind, name)).get("reason") == reason and c,
        what=f"{kind} {name} refused ({reason})",
    )
    assert condition["status"] == "False"
    events = kubectl.json("get", "events", "--field-selector", f"involvedObject.name={name}")
    warnings = [
        (e["type"], e["reason"], e["message"])
        for e in events["items"]
        if e["involvedObject"]["kind"] == kind
    ]
    assert warnings == [("Warning", reason, condition["message"])], warnings
    # Everything the operator makes is labelled with its run (a sandbox's own name, by hand).
    for child in RUN_KINDS:
        assert names(kubectl, child, f"aar.dev/run={name}") == [], child
    return str(condition["message"])
