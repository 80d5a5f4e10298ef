"""`make demo`: the whole system on one machine, on the local control plane.

The control plane runs with the CRDs installed; the operator, gateway, scorer and forum run as
local processes (as the chart would run them in a cluster), with a credential signing key of the
demo's own and a demo task whose labels only the scorer reads. Without `ANTHROPIC_API_KEY` the
gateway's upstream is the local Messages-API stand-in as the offline researcher
(`aar_common.offline_researcher`), so nothing leaves the machine. Then
`examples/run.yaml` is applied and the operator turns it into sandboxes; without a kubelet their
Pods stay Pending, and each sandbox says why.

State (keys, databases, logs, ports and pids) lives in `<cluster state dir>/demo/`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from aar_common.credentials import CredentialIssuer, generate_signing_key, public_key_pem
from aar_common.ports import free_port
from aar_devcluster.controlplane import ControlPlane, write_private
from aar_devcluster.paths import bin_dir
from aar_devcluster.tools import Tool

REPO = Path(__file__).resolve().parent.parent
RUN_NAMESPACE = "research"
OPERATOR_NAMESPACE = "aar-system"
SERVICE_ORDER = ("upstream", "gateway", "scorer", "forum", "operator")
# The demo task: as many items as the reference chat-preference test set, baselines from it.
DEMO_TASK_SIZE = 2567


class DemoError(RuntimeError):
    """A demo service did not start; the message names it and shows its log."""


@dataclass
class Service:
    name: str
    command: list[str]
    port: int
    environment: dict[str, str]
    health_path: str = "/healthz"


def command(program: str | Path, *arguments: str, **flags: object) -> list[str]:
    """`program arguments... --flag-name value...`"""
    options = [[f"--{name.replace('_', '-')}", str(value)] for name, value in flags.items()]
    return [str(program), *arguments, *(item for pair in options for item in pair)]


class Demo:
    def __init__(self, control_plane: ControlPlane, say: Callable[[str], None]) -> None:
        self.control_plane = control_plane
        self.say = say
        self.directory = control_plane.state_dir / "demo"
        self.state_path = self.directory / "state.json"

    # --- processes -----------------------------------------------------------------------------
    def _read_state(self) -> dict[str, dict[str, int]]:
        try:
            state: dict[str, dict[str, int]] = json.loads(self.state_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return state

    def _ours(self, pid: int) -> bool:
        """A recycled pid is never taken for ours: our processes run in the demo directory."""
        try:
            return Path(f"/proc/{pid}/cwd").resolve() == self.directory.resolve()
        except OSError:
            return False

    def running(self) -> dict[str, dict[str, int]]:
        return {n: s for n, s in self._read_state().items() if self._ours(s["pid"])}

    def stop(self) -> None:
        """Stop every demo process (operator first); data stays for the next start."""
        services = self._read_state()
        for signal_number in (signal.SIGTERM, signal.SIGKILL):
            for name in reversed(SERVICE_ORDER):
                if name in services and self._ours(services[name]["pid"]):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(services[name]["pid"], signal_number)
            end = time.monotonic() + 10
            while time.monotonic() < end and any(self._ours(s["pid"]) for s in services.values()):
                time.sleep(0.1)
        if self.state_path.exists():
            write_private(self.state_path, "{}")

    def _start(self, service: Service) -> None:
        log_path = self.directory / "logs" / f"{service.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                service.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env={**os.environ, **service.environment},
                start_new_session=True,
            )
        state = self._read_state()
        state[service.name] = {"pid": process.pid, "port": service.port}
        write_private(self.state_path, json.dumps(state, indent=2))
        deadline = time.monotonic() + 60
        url = f"http://127.0.0.1:{service.port}{service.health_path}"
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
                raise DemoError(
                    f"{service.name} exited with code {process.returncode}; {log_path}:\n{tail}"
                )
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status < 500:
                    return
            time.sleep(0.3)
        raise DemoError(f"{service.name} did not answer {url} within 60 s; see {log_path}")

    # --- set-up --------------------------------------------------------------------------------
    def _keys(self) -> tuple[Path, Path]:
        keys = self.directory / "keys"
        signing, public = keys / "signing-key.pem", keys / "public-key.pem"
        if not signing.exists():
            keys.mkdir(parents=True, exist_ok=True)
            pem = generate_signing_key()
            write_private(signing, pem)
            public.write_bytes(public_key_pem(pem))
        return signing, public

    def _task(self) -> Path:
        """A demo task for the scorer: hidden labels of its own, readable by the scorer alone."""
        scorer = self.directory / "scorer"
        tasks = scorer / "tasks.yaml"
        if not tasks.exists():
            scorer.mkdir(parents=True, exist_ok=True)
            labels = [random.SystemRandom().randint(0, 1) for _ in range(DEMO_TASK_SIZE)]
            write_private(
                scorer / "w2s-chat.json",
                json.dumps({"labels": labels, "split_seed": secrets.token_hex(16)}),
            )
            task = {
                "name": "w2s-chat",
                "labels": [0, 1],
                "baselines": {"weak": 0.62, "ceiling": 0.81},
                "labels_file": "w2s-chat.json",
            }
            tasks.write_text(yaml.safe_dump({"tasks": [task]}))
        return tasks

    def _upstream(self, ports: dict[str, int]) -> tuple[Service | None, str, Path]:
        """The gateway's upstream: the real API with the user's key, or the local stand-in."""
        key_file = self.directory / "upstream-api-key"
        real_key = os.environ.get("ANTHROPIC_API_KEY")
        if real_key:
            write_private(key_file, real_key)
            return None, "https://api.anthropic.com", key_file
        if not key_file.exists():
            write_private(key_file, secrets.token_hex(16))
        stub = Service(
            "upstream",
            command(
                sys.executable,
                "-m",
                "aar_common.anthropic_stub",
                # Agents then do a small, real piece of research, labelled offline.
                "--researcher",
                port=ports["upstream"],
                api_key=key_file.read_text(),
            ),
            ports["upstream"],
            {},
            health_path="/stub/usage",
        )
        return stub, f"http://127.0.0.1:{ports['upstream']}", key_file

    def start(self) -> dict[str, int]:
        self.directory.mkdir(parents=True, exist_ok=True)
        if running := self.running():
            if set(running) >= set(SERVICE_ORDER) - {"upstream"}:
                self.say("Demo services already running")
                return {name: s["port"] for name, s in running.items()}
            self.stop()
        signing, public = self._keys()
        tasks = self._task()
        state = self.control_plane.read_state()
        assert state is not None
        token_file = self.directory / "kube-token"
        write_private(token_file, state.token)
        ports = {name: free_port() for name in SERVICE_ORDER}
        upstream, upstream_url, api_key_file = self._upstream(ports)
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        venv = Path(sys.executable).parent
        data = self.directory
        services = [
            Service(
                "gateway",
                command(
                    venv / "aar-gateway", host="127.0.0.1", port=ports["gateway"],
                    upstream=upstream_url, api_key_file=api_key_file, public_key_file=public,
                    data_dir=data / "gateway",
                ),
                ports["gateway"],
                {},
            ),
            Service(
                "scorer",
                command(
                    venv / "aar-scorer", host="127.0.0.1", port=ports["scorer"], tasks=tasks,
                    public_key=public, data_dir=data / "scorer",
                ),
                ports["scorer"],
                {},
            ),
            Service(
                "forum",
                command(
                    venv / "aar-forum", host="127.0.0.1", port=ports["forum"],
                    public_key_file=public, data_dir=data / "forum",
                ),
                ports["forum"],
                {
                    "AAR_SCORER_URL": urls["scorer"],
                    "AAR_GATEWAY_URL": urls["gateway"],
                    # The web UI shows each agent's Pod state, read from the control plane.
                    "AAR_FORUM_KUBE_API": state.server,
                    "AAR_FORUM_KUBE_TOKEN_FILE": str(token_file),
                    "AAR_FORUM_KUBE_CA_FILE": str(self.control_plane.pki_dir / "ca.crt"),
                },
            ),
            Service(
                "operator",
                command(
                    venv / "aar-operator", "run", namespace=OPERATOR_NAMESPACE,
                    signing_key_file=signing, gateway_url=urls["gateway"],
                    forum_url=urls["forum"], scorer_url=urls["scorer"],
                    liveness_port=ports["operator"], metrics_port=0,
                ),
                ports["operator"],
                {"KUBECONFIG": str(self.control_plane.kubeconfig_path)},
            ),
        ]  # fmt: skip
        for service in [upstream, *services] if upstream else services:
            self.say(f"Starting {service.name} on port {service.port}")
            self._start(service)
        return ports

    def admin_credential(self) -> str:
        signing, _ = self._keys()
        return CredentialIssuer.from_file(signing).mint_admin("demo", ttl_seconds=7 * 86400)


def run(control_plane: ControlPlane, say: Callable[[str], None]) -> str:
    """Bring the whole demo up and return what to tell the human."""
    kubectl = Tool("kubectl", control_plane.kubeconfig_path)
    say("Installing the CRDs")
    kubectl.run("apply", "-f", str(REPO / "crds"))
    for namespace in (OPERATOR_NAMESPACE, RUN_NAMESPACE):
        manifest = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
        kubectl.apply(manifest)
    # The example asks for gVisor sandboxes; a cluster with gVisor installed has this object.
    kubectl.apply(
        {
            "apiVersion": "node.k8s.io/v1",
            "kind": "RuntimeClass",
            "metadata": {"name": "gvisor"},
            "handler": "runsc",
        }
    )
    demo = Demo(control_plane, say)
    ports = demo.start()
    say(f"Applying examples/run.yaml in namespace {RUN_NAMESPACE}")
    kubectl.run("apply", "--namespace", RUN_NAMESPACE, "-f", str(REPO / "examples" / "run.yaml"))
    run_manifest = yaml.safe_load((REPO / "examples" / "run.yaml").read_text())
    wanted = run_manifest["spec"]["agents"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        sandboxes = kubectl.json("get", "agentsandboxes", "--namespace", RUN_NAMESPACE)["items"]
        pods = kubectl.json("get", "pods", "--namespace", RUN_NAMESPACE)["items"]
        say(f"{len(sandboxes)}/{wanted} sandboxes, {len(pods)}/{wanted} pods")
        if len(sandboxes) >= wanted and len(pods) >= wanted:
            break
        time.sleep(2)
    table = kubectl.run("get", "researchruns,agentsandboxes", "--namespace", RUN_NAMESPACE)
    forum = f"http://127.0.0.1:{ports['forum']}"
    return (
        f"{table}\n"
        f"The operator made one sandbox per agent; with no kubelet here their Pods stay Pending\n"
        f"and each sandbox's PodScheduled condition says why.\n\n"
        f"Watch it:\n"
        f"  export KUBECONFIG={control_plane.kubeconfig_path}\n"
        f"  export PATH={bin_dir()}:$PATH\n"
        f"  kubectl get researchruns,agentsandboxes -n {RUN_NAMESPACE}\n"
        f"  kubectl describe agentsandbox w2s-chat-0 -n {RUN_NAMESPACE}\n"
        f"Web UI: {forum}/  (sign in with this admin credential, valid 7 days:)\n"
        f"  {demo.admin_credential()}\n"
        f"Metrics: {forum}/metrics, http://127.0.0.1:{ports['gateway']}/metrics, "
        f"http://127.0.0.1:{ports['scorer']}/metrics\n"
        f"Logs: {demo.directory / 'logs'}/   Stop everything: make cluster-down"
    )
