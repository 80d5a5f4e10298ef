"""Helpers for the operator's cluster tests: waiting for a condition, listing names."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from aar_devcluster.tools import Tool
from aar_operator.local import OperatorProcess

__all__ = ["OperatorProcess", "eventually", "names"]

T = TypeVar("T")


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
