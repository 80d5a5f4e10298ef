"""The operator with the real gateway and scorer as local processes: it checks the run's model
and task with them before it makes anything, registers the run's budget and task, copies spend
and the best score into status, and at the run's budget marks BudgetExhausted and deletes the
Pods (workspaces kept). Upstream is the local Messages-API
stand-in; agents' requests go through the gateway with credentials the operator's key signs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from operator_process import OperatorProcess, eventually, names, refused

from aar_common.credentials import CredentialIssuer, generate_signing_key, public_key_pem
from aar_common.ports import free_port
from aar_devcluster.controlplane import ControlPlane
from aar_devcluster.tools import Tool

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


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class Services:
    """The stand-in upstream, the gateway and the scorer, each its own process."""

    def __init__(self, directory: Path) -> None:
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
        }
        (directory / "tasks.yaml").write_text(yaml.safe_dump({"tasks": [task]}))
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

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(30)

    def agent(self, namespace: str, run: str, agent: str) -> str:
        return self.issuer.mint_agent(namespace, run, agent)

    def admin(self) -> str:
        return self.issuer.mint_admin("test")


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Services]:
    running = Services(tmp_path)
    running.start()
    yield running
    running.stop()


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for item in (obj.get("status") or {}).get("conditions", []):
        if item["type"] == kind:
            return dict(item)
    return {}


def test_spend_and_best_reach_status_and_a_spent_budget_stops_the_run(
    control_plane: ControlPlane,
    kubectl: Tool,
    namespace: str,
    operator_namespace: str,
    crds: None,
    services: Services,
    tmp_path: Path,
) -> None:
    operator = OperatorProcess(
        control_plane.kubeconfig_path,
        operator_namespace,
        tmp_path / "operator.log",
        environment={
            "AAR_CREDENTIAL_SIGNING_KEY_FILE": str(services.signing_key),
            "AAR_OPERATOR_SERVICES": "true",
            "AAR_GATEWAY_URL": services.gateway,
            "AAR_SCORER_URL": services.scorer,
            "AAR_OPERATOR_POLL_SECONDS": "1",
        },
    )
    operator.start()
    try:
        run = {
            "apiVersion": "aar.dev/v1alpha1",
            "kind": "ResearchRun",
            "metadata": {"name": "spend"},
            "spec": {
                "agents": 2,
                "task": {"name": "w2s-chat"},
                "sandbox": {"image": "agent:test"},
                # Room for a few requests per agent: each holds its worst case (about $0.0072
                # here: every byte of the body a token at the dearest input rate, plus
                # max_tokens) against its agent's half of the cap.
                "budget": {"usd": 0.04},
                "review": {"required": False},
            },
        }
        kubectl.apply(run)
        eventually(lambda: names(kubectl, "pods", "aar.dev/run=spend") == ["spend-0", "spend-1"])
        reachable = eventually(
            lambda: (
                condition(kubectl.json("get", "rr", "spend"), "ServicesReachable").get("status")
                == "True"
            ),
            what="run registered with the gateway and the scorer",
        )
        assert reachable
        spend_url = f"{services.gateway}/api/v1/spend/{namespace}/spend"
        status, registered = call(spend_url, services.admin())
        assert status == 200, registered

        # The agents talk through the gateway until it refuses each of them for the budget.
        refused: dict[str, Any] = {}
        out: set[str] = set()
        for attempt in range(200):
            agent = f"spend-{attempt % 2}"
            if agent in out:
                continue
            status, answer = call(
                f"{services.gateway}/v1/messages",
                services.agent(namespace, "spend", agent),
                {"model": "claude-opus-4-6", "max_tokens": 64,
                 "messages": [{"role": "user", "content": "Propose an experiment. " * 20}]},
                method="POST",
            )  # fmt: skip
            if status == 402:
                refused = answer
                out.add(agent)
                run_spent = f"run budget of {namespace}/spend" in answer["error"]["message"]
                if run_spent or out == {"spend-0", "spend-1"}:
                    break
            else:
                assert status == 200, answer
        assert refused["error"]["type"] == "billing_error"
        _, spent = call(spend_url, services.admin())
        # Spent, but never past the cap: each request held its worst case before it went.
        assert Decimal(0) < Decimal(spent["run"]["usd"]) <= Decimal("0.04")
        assert all(spent["agents"][agent]["exhausted"] for agent in out)

        # A counted submission becomes the run's best.
        status, submitted = call(
            f"{services.scorer}/api/v1/submissions",
            services.agent(namespace, "spend", "spend-1"),
            {
                "task": "w2s-chat",
                "predictions": LABELS,
                "method": "the true labels",
                "artifact": None,
            },
            method="POST",
        )
        assert status == 200, submitted

        def exhausted() -> dict[str, Any] | None:
            current = kubectl.json("get", "rr", "spend")
            done = condition(current, "BudgetExhausted").get("status") == "True"
            return current if done and (current["status"].get("best") or {}).get("agent") else None

        try:
            stopped = eventually(exhausted, what="BudgetExhausted and the best score in status")
        except AssertionError:
            print(json.dumps(kubectl.json("get", "rr", "spend").get("status"), indent=1))
            raise
        assert condition(stopped, "Ready")["reason"] == "BudgetExhausted"
        assert "budget" in condition(stopped, "BudgetExhausted")["message"]
        assert Decimal(stopped["status"]["spend"]["usd"]) == Decimal(spent["run"]["usd"]).quantize(
            MICRO
        )
        assert stopped["status"]["spend"]["outputTokens"] == spent["run"]["output_tokens"]
        assert stopped["status"]["best"]["agent"] == "spend-1"
        assert stopped["status"]["best"]["submission"] == str(submitted["id"])

        eventually(lambda: names(kubectl, "pods", "aar.dev/run=spend") == [], what="Pods deleted")
        assert names(kubectl, "persistentvolumeclaims", "aar.dev/run=spend") == [
            "spend-0-workspace",
            "spend-1-workspace",
        ]
        sandbox = eventually(
            lambda: (
                (s := kubectl.json("get", "asb", "spend-0"))
                and condition(s, "BudgetExhausted").get("status") == "True"
                and s
            ),
            what="the sandbox says its budget is spent",
        )
        assert sandbox["status"]["spend"]["usd"] == str(
            Decimal(spent["agents"]["spend-0"]["usd"]).quantize(MICRO)
        )
    finally:
        operator.stop()
        print(f"--- operator log (tail) ---\n{operator.log()}")


def test_an_unknown_task_or_model_is_refused_before_any_pod(
    control_plane: ControlPlane,
    kubectl: Tool,
    operator_namespace: str,
    crds: None,
    services: Services,
    tmp_path: Path,
) -> None:
    operator = OperatorProcess(
        control_plane.kubeconfig_path,
        operator_namespace,
        tmp_path / "operator.log",
        environment={
            "AAR_CREDENTIAL_SIGNING_KEY_FILE": str(services.signing_key),
            "AAR_OPERATOR_SERVICES": "true",
            "AAR_GATEWAY_URL": services.gateway,
            "AAR_SCORER_URL": services.scorer,
            "AAR_OPERATOR_POLL_SECONDS": "1",
        },
    )

    def run(name: str, task: str, model: str = "claude-opus-4-6") -> dict[str, Any]:
        return {
            "apiVersion": "aar.dev/v1alpha1",
            "kind": "ResearchRun",
            "metadata": {"name": name},
            "spec": {
                "agents": 2,
                "model": model,
                "task": {"name": task},
                "sandbox": {"image": "agent:test"},
                "budget": {"usd": 1},
            },
        }

    operator.start()
    try:
        kubectl.apply(run("typo", "w2s-chta"))
        message = refused(kubectl, "ResearchRun", "typo", "UnknownTask")
        # The scorer's own words, not an HTTP dump.
        assert message == (
            "the scorer refuses task 'w2s-chta': unknown task 'w2s-chta'; the scorer knows: "
            "w2s-chat"
        )
        kubectl.apply(run("dear", "w2s-chat", model="claude-opus-9"))
        message = refused(kubectl, "ResearchRun", "dear", "UnknownModel")
        assert message.startswith("the gateway refuses model 'claude-opus-9': model ")
        assert "The gateway prices: " in message
        assert "claude-opus-4-6" in message
        # Fixed, the run starts.
        kubectl.apply(run("typo", "w2s-chat"))
        eventually(
            lambda: names(kubectl, "pods", "aar.dev/run=typo") == ["typo-0", "typo-1"],
            what="the Pods of the corrected run",
        )
        assert names(kubectl, "pods", "aar.dev/run=dear") == []
    finally:
        operator.stop()
        print(f"--- operator log (tail) ---\n{operator.log()}")


def test_a_gateway_that_cannot_be_reached_is_reported_and_the_run_goes_on(
    control_plane: ControlPlane,
    kubectl: Tool,
    operator_namespace: str,
    crds: None,
    tmp_path: Path,
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    operator = OperatorProcess(
        control_plane.kubeconfig_path,
        operator_namespace,
        tmp_path / "operator.log",
        environment={
            "AAR_OPERATOR_SERVICES": "true",
            "AAR_GATEWAY_URL": nowhere,
            "AAR_SCORER_URL": nowhere,
        },
    )
    operator.start()
    try:
        kubectl.apply(
            {
                "apiVersion": "aar.dev/v1alpha1",
                "kind": "ResearchRun",
                "metadata": {"name": "offline"},
                "spec": {
                    "agents": 1,
                    "task": {"name": "w2s-chat"},
                    "sandbox": {"image": "a:1"},
                    "budget": {"usd": 1},
                },
            }
        )
        reported = eventually(
            lambda: (
                (c := condition(kubectl.json("get", "rr", "offline"), "ServicesReachable"))
                and c.get("status") == "False"
                and c
            ),
            what="ServicesReachable=False",
        )
        assert reported["reason"] == "ServiceError"
        assert nowhere in reported["message"]
        # The gateway is fail-closed for runs it does not know, so the agents may start.
        eventually(lambda: names(kubectl, "pods", "aar.dev/run=offline") == ["offline-0"])
    finally:
        operator.stop()
        print(f"--- operator log (tail) ---\n{operator.log()}")
