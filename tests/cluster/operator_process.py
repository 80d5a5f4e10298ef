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

__all__ = ["CHILD_KINDS", "OperatorProcess", "eventually", "names", "running"]

T = TypeVar("T")

# Every kind the operator makes for a sandbox.
CHILD_KINDS = ["serviceaccounts", "secrets", "persistentvolumeclaims", "pods", "networkpolicies"]


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
