"""Run the project's own kubectl and helm against a cluster: never the ones on PATH."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from aar_devcluster.paths import binary


class ToolError(RuntimeError):
    """kubectl or helm exited non-zero; the message carries the command and its stderr."""

    def __init__(self, command: list[str], result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(
            f"{' '.join(command)} exited with {result.returncode}:\n{result.stderr.strip()}"
        )
        self.stderr = result.stderr
        self.returncode = result.returncode


class Tool:
    """`kubectl` or `helm` from the project's cache, bound to a kubeconfig and, optionally,
    a namespace."""

    def __init__(self, name: str, kubeconfig: Path, namespace: str | None = None) -> None:
        self.path = binary(name)
        self.kubeconfig = kubeconfig
        self.namespace = namespace

    def run(
        self, *args: str, input: str | None = None, timeout: float = 60, check: bool = True
    ) -> str:
        """Run and return stdout; raise ToolError with stderr on a non-zero exit when `check`."""
        command = [str(self.path), "--kubeconfig", str(self.kubeconfig)]
        if self.namespace:
            command += ["--namespace", self.namespace]
        command += list(args)
        result = subprocess.run(
            command, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise ToolError(command, result)
        return result.stdout

    def json(self, *args: str) -> Any:
        """Run with `-o json` and parse the output."""
        return json.loads(self.run(*args, "-o", "json"))

    def apply(self, *manifests: dict[str, Any]) -> str:
        """`kubectl apply` the manifests, given as dicts."""
        return self.run("apply", "-f", "-", input=yaml.safe_dump_all(manifests))
