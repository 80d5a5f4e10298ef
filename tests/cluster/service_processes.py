"""The services an operator talks to, each its own local process: the Messages-API stand-in
upstream, the gateway, the scorer (a 40-item task, w2s-chat) and, for the console, the forum."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml
from operator_process import OperatorProcess, eventually

from aar_common.credentials import CredentialIssuer, generate_signing_key, public_key_pem
from aar_common.ports import free_port

BIN = Path(sys.executable).parent
LABELS = [index % 2 for index in range(40)]
MICRO = Decimal("0.000001")


def call(
    url: str, credential: str, body: dict[str, Any] | None = None, method: str = "GET"
) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {credential}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def publish(forum: str, credential: str, filename: str, data: bytes) -> str:
    """An artifact uploaded to the forum as an agent does; its digest."""
    request = urllib.request.Request(f"{forum}/api/v1/artifacts", data=data, method="POST")
    request.add_header("Authorization", f"Bearer {credential}")
    request.add_header("X-Aar-Filename", filename)
    with urllib.request.urlopen(request, timeout=30) as response:
        return str(json.loads(response.read())["digest"])


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class Services:
    """The stand-in upstream, the gateway and the scorer, each its own process."""

    def __init__(
        self,
        directory: Path,
        task_settings: dict[str, Any] | None = None,
        more_tasks: Sequence[tuple[dict[str, Any], list[int]]] = (),
    ) -> None:
        """`task_settings`: the task's own (feedback, probing), where a test needs other than
        the defaults; `more_tasks`: other tasks (such as reproduction targets), each with its
        labels."""
        self.directory = directory
        self.signing_key = directory / "signing-key.pem"
        pem = generate_signing_key()
        self.signing_key.write_bytes(pem)
        (directory / "public-key.pem").write_bytes(public_key_pem(pem))
        (directory / "api-key").write_text("real-key")
        (directory / "labels.json").write_text(
            json.dumps({"labels": LABELS, "split_seed": "0123456789abcdef"})
        )
        task = {
            "name": "w2s-chat",
            "labels": [0, 1],
            "baselines": {"weak": 0.6, "ceiling": 0.9},
            "labels_file": "labels.json",
            **(task_settings or {}),
        }
        tasks = [task]
        for more, labels in more_tasks:
            labels_file = f"{more['name']}-labels.json"
            (directory / labels_file).write_text(
                json.dumps({"labels": labels, "split_seed": f"seed-of-{more['name']}"})
            )
            tasks.append({**more, "labels_file": labels_file})
        (directory / "tasks.yaml").write_text(yaml.safe_dump({"tasks": tasks}))
        self.issuer = CredentialIssuer(pem)
        self.processes: list[subprocess.Popen[bytes]] = []
        self.gateway = f"http://127.0.0.1:{free_port()}"
        self.scorer = f"http://127.0.0.1:{free_port()}"

    def _spawn(self, name: str, command: list[str], **options: Any) -> subprocess.Popen[bytes]:
        log = (self.directory / f"{name}.log").open("ab")
        process = subprocess.Popen(command, stderr=log, **options)
        self.processes.append(process)
        return process

    def start(self) -> None:
        stub = self._spawn(
            "upstream",
            [sys.executable, "-m", "aar_devcluster.anthropic_stub", "--api-key", "real-key"],
            stdout=subprocess.PIPE,
        )
        assert stub.stdout is not None
        upstream = stub.stdout.readline().decode().strip()
        public = str(self.directory / "public-key.pem")
        gateway_port = self.gateway.rsplit(":", 1)[1]
        self._spawn(
            "gateway",
            [str(BIN / "aar-gateway"), "--host", "127.0.0.1", "--port", gateway_port],
            env={
                **os.environ,
                "AAR_GATEWAY_UPSTREAM": upstream,
                "AAR_ANTHROPIC_API_KEY_FILE": str(self.directory / "api-key"),
                "AAR_CREDENTIAL_PUBLIC_KEY_FILE": public,
                "AAR_DATA_DIR": str(self.directory / "gateway"),
                # No metrics port: two services on one host would both ask for 9090.
                "AAR_METRICS_PORT": "0",
            },
        )
        scorer_port = self.scorer.rsplit(":", 1)[1]
        self._spawn(
            "scorer",
            [
                str(BIN / "aar-scorer"), "--tasks", str(self.directory / "tasks.yaml"),
                "--data-dir", str(self.directory / "scorer"), "--public-key", public,
                "--host", "127.0.0.1", "--port", scorer_port, "--metrics-port", "0",
            ],
        )  # fmt: skip
        eventually(lambda: healthy(self.gateway) and healthy(self.scorer), what="gateway, scorer")

    def start_forum(self, kube_api: str, kube_token: str, kube_ca: Path) -> str:
        """The forum, reading runs from the cluster with `kube_token`; its URL."""
        token_file = self.directory / "forum-kube-token"
        token_file.write_text(kube_token)
        self.forum = f"http://127.0.0.1:{free_port()}"
        self._spawn(
            "forum",
            [str(BIN / "aar-forum"), "--host", "127.0.0.1", "--port",
             self.forum.rsplit(":", 1)[1], "--metrics-port", "0"],
            env={
                **os.environ,
                "AAR_DATA_DIR": str(self.directory / "forum"),
                "AAR_CREDENTIAL_PUBLIC_KEY_FILE": str(self.directory / "public-key.pem"),
                "AAR_SCORER_URL": self.scorer,
                "AAR_GATEWAY_URL": self.gateway,
                "AAR_FORUM_KUBE_API": kube_api,
                "AAR_FORUM_KUBE_TOKEN_FILE": str(token_file),
                "AAR_FORUM_KUBE_CA_FILE": str(kube_ca),
            },
        )  # fmt: skip
        eventually(lambda: healthy(self.forum), what="forum")
        return self.forum

    def operator(
        self, kubeconfig: Path, namespace: str, log: Path, **environment: str
    ) -> OperatorProcess:
        """The operator, polling every second, with its key and these services to talk to."""
        forum = {"AAR_FORUM_URL": self.forum} if getattr(self, "forum", None) else {}
        return OperatorProcess(
            kubeconfig,
            namespace,
            log,
            environment={
                "AAR_CREDENTIAL_SIGNING_KEY_FILE": str(self.signing_key),
                "AAR_OPERATOR_SERVICES": "true",
                "AAR_GATEWAY_URL": self.gateway,
                "AAR_SCORER_URL": self.scorer,
                "AAR_OPERATOR_POLL_SECONDS": "1",
                **forum,
                **environment,
            },
        )

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(30)

    def agent(self, namespace: str, run: str, agent: str) -> str:
        return self.issuer.mint_agent(namespace, run, agent)

    def admin(self) -> str:
        return self.issuer.mint_admin("test")
