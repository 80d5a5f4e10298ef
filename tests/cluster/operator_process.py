"""The operator as a real subprocess against the test session's control plane."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from aar_devcluster.tools import Tool

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class OperatorProcess:
    """`aar-operator run` with its own namespace, signing key and ports; log in `log_path`."""

    def __init__(self, kubeconfig: Path, namespace: str, log_path: Path, resync: float = 2) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.log_path = log_path
        self.resync = resync
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "AAR_OPERATOR_NAMESPACE": self.namespace,
            "AAR_SCORER_NAMESPACE": self.namespace,
            "AAR_OPERATOR_RESYNC_SECONDS": str(self.resync),
            "AAR_OPERATOR_METRICS_PORT": str(self.metrics_port),
            "AAR_OPERATOR_LIVENESS_PORT": str(self.liveness_port),
            "AAR_OPERATOR_SERVICES": "false",
        }
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "aar_operator.cli", "run", "--verbose"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )

    def kill(self) -> None:
        """SIGKILL: no cleanup, no finalizers removed, as a crash would leave it."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(line[:500] for line in lines if " DEBUG " not in line)[-8000:]


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
