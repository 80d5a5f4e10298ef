"""The operator as a local process against any kubeconfig: for development clusters, the
cluster tests (a real SIGKILL), and the scale benchmark."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from aar_common.ports import free_port


class OperatorProcess:
    """`aar-operator run` with its own namespace (and signing key there) and free ports;
    its output goes to `log_path`."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        log_path: Path,
        resync: float = 2,
        environment: dict[str, str] | None = None,
        verbose: bool = True,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.environment = environment or {}
        self.verbose = verbose
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
            **self.environment,
        }
        command = [sys.executable, "-m", "aar_operator.cli", "run"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command + (["--verbose"] if self.verbose else []),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
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

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def log(self) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(line[:500] for line in lines if " DEBUG " not in line)[-8000:]
