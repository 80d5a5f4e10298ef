"""Start and stop a local Kubernetes cluster: etcd, kube-apiserver, kube-controller-manager
and kube-scheduler as local processes, with token and client-certificate authentication and
Node and RBAC authorization, and optionally one real node (`aar_devcluster.node`).

Without the node, Pods stay Pending and the scheduler says why in their PodScheduled condition:
what the cluster tier needs is the real API server (schemas, admission, RBAC, watches), the real
controllers (garbage collection, namespaces, service-account tokens, Deployments to Pods) and the
scheduler's verdicts. With it, Pods run.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from aar_common.ports import free_port
from aar_devcluster import pki
from aar_devcluster.kubeapi import ApiError, KubeApi
from aar_devcluster.node import FAKE_GPUS, GPU_RESOURCE, NODE_NAME, Node
from aar_devcluster.paths import binary

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
KUBERNETES_SERVICE_IP = "10.0.0.1"
# Link-local, used only on a machine whose sole interface is loopback.
FALLBACK_ADVERTISE_ADDRESS = "169.254.0.1"
PROCESS_ORDER = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


class ControlPlaneError(RuntimeError):
    """The control plane could not be started; the message says which part and why."""


@dataclass
class State:
    """What a running control plane needs to be found and stopped by another process."""

    etcd_client_port: int
    etcd_peer_port: int
    apiserver_port: int
    token: str
    scheduler_port: int = 0
    pids: dict[str, int] = field(default_factory=dict)
    with_node: bool = False

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"


def interface_addresses() -> list[str]:
    """The IPv4 addresses of this machine's network interfaces (SIOCGIFADDR per interface)."""
    siocgifaddr = 0x8915
    addresses = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _index, name in socket.if_nameindex():
            try:
                request = struct.pack("256s", name[:15].encode())
                reply = fcntl.ioctl(probe.fileno(), siocgifaddr, request)
            except OSError:  # an interface without an IPv4 address
                continue
            addresses.append(socket.inet_ntoa(reply[20:24]))
    return addresses


def advertise_address() -> str:
    """This machine's own non-loopback IPv4 address, which kube-apiserver publishes in the
    `kubernetes` Endpoints (it refuses a loopback one). Nothing connects to it here."""
    for address in interface_addresses():
        if not ipaddress.ip_address(address).is_loopback:
            return address
    return FALLBACK_ADVERTISE_ADDRESS


def kubeconfig(server: str, ca_pem: bytes, token: str, name: str = "aar-local") -> dict[str, Any]:
    """A kubeconfig for the admin user (token auth, group system:masters)."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": name,
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_pem).decode(),
                },
            }
        ],
        "users": [{"name": f"{name}-admin", "user": {"token": token}}],
        "contexts": [
            {"name": name, "context": {"cluster": name, "user": f"{name}-admin"}},
        ],
        "current-context": name,
    }


def write_private(path: Path, data: str | bytes) -> None:
    """Write a file only its owner can read, from the first byte on (keys, tokens)."""
    content = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "wb") as file:
        file.write(content)


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: the kernel kills it when the parent dies, so an
    interrupted or killed test session leaves no control-plane process behind."""
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _pid_runs_in(pid: int, state_dir: Path) -> bool:
    """Whether `pid` is still one of our processes (its command line names our state dir), so a
    recycled pid is never signalled."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str(state_dir).encode() in cmdline


class ControlPlane:
    """A control plane rooted at `state_dir` (data, certificates, logs, kubeconfig).

    `die_with_parent=True` ties the processes' lives to this Python process (tests);
    `False` leaves them running after it exits (`aar-devcluster up`), to be stopped with
    `stop()` from any process that knows the state dir. `with_node=True` adds a node
    (root only; `node.node_unavailable_reason()` says why not).
    """

    def __init__(
        self,
        state_dir: Path,
        bin_dir: Path | None = None,
        *,
        die_with_parent: bool = False,
        with_node: bool = False,
    ) -> None:
        self.state_dir = state_dir.resolve()
        self.bin_dir = bin_dir
        self.die_with_parent = die_with_parent
        self.with_node = with_node
        self._processes: dict[str, subprocess.Popen[bytes]] = {}
        self._node: Node | None = None

    @property
    def node(self) -> Node:
        """The node of this state dir (whether or not it runs)."""
        if self._node is None:
            kubelet = binary("kubelet", self.bin_dir)
            self._node = Node(self.state_dir, self.pki_dir, kubelet.parent)
        return self._node

    # --- paths ---------------------------------------------------------------------------------
    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def kubeconfig_path(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def state_path(self) -> Path:
        return self.state_dir / "state.json"

    def log_path(self, process: str) -> Path:
        return self.log_dir / f"{process}.log"

    # --- state ---------------------------------------------------------------------------------
    def read_state(self) -> State | None:
        try:
            return State(**json.loads(self.state_path.read_text()))
        except FileNotFoundError:
            return None

    def _write_state(self, state: State) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        write_private(tmp, json.dumps(asdict(state), indent=2))  # it holds the admin token
        tmp.replace(self.state_path)

    def running_pids(self) -> dict[str, int]:
        state = self.read_state()
        if state is None:
            return {}
        return {n: p for n, p in state.pids.items() if _pid_runs_in(p, self.state_dir)}

    def is_running(self) -> bool:
        """Every control-plane process runs, and the node too when this one has a node."""
        if set(self.running_pids()) != set(PROCESS_ORDER):
            return False
        return not self.with_node or self.node.running()

    # --- start ---------------------------------------------------------------------------------
    def _ensure_pki(self) -> None:
        """Certificates and keys are made once per state dir and reused on every start."""
        self.pki_dir.mkdir(parents=True, exist_ok=True)
        ca_crt = self.pki_dir / "ca.crt"
        if ca_crt.exists():
            self._ensure_kubelet_client_cert()
            return
        ca = pki.make_ca()
        serving = pki.make_serving_cert(
            ca,
            "kube-apiserver",
            dns_names=[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            # A node reaches the apiserver at its link's address and checks the name `kubernetes`.
            ip_addresses=["127.0.0.1", KUBERNETES_SERVICE_IP, advertise_address()],
        )
        service_accounts = pki.make_service_account_key()
        files = {
            "apiserver.crt": serving.public_pem,
            "apiserver.key": serving.private_pem,
            "sa.pub": service_accounts.public_pem,
            "sa.key": service_accounts.private_pem,
            "ca.key": ca.private_pem,
        }
        for name, data in files.items():
            write_private(self.pki_dir / name, data)
        # Written last: its presence marks a complete set.
        ca_crt.write_bytes(ca.public_pem)
        self._ensure_kubelet_client_cert()

    def _ensure_kubelet_client_cert(self) -> None:
        """The apiserver's client certificate for the kubelets' API (logs, exec, port-forward);
        made on its own so that a state dir from before nodes existed gets one too."""
        if (self.pki_dir / "kubelet-client.crt").exists():
            return
        ca = pki.KeyPair(
            (self.pki_dir / "ca.crt").read_bytes(), (self.pki_dir / "ca.key").read_bytes()
        )
        client = pki.make_client_cert(ca, "kube-apiserver-kubelet-client", ["system:masters"])
        write_private(self.pki_dir / "kubelet-client.key", client.private_pem)
        write_private(self.pki_dir / "kubelet-client.crt", client.public_pem)

    def _commands(self, state: State, advertise: str) -> dict[str, list[str]]:
        pki_dir, etcd_url = self.pki_dir, f"http://127.0.0.1:{state.etcd_client_port}"
        peer_url = f"http://127.0.0.1:{state.etcd_peer_port}"
        return {
            "etcd": [
                str(binary("etcd", self.bin_dir)),
                "--name=aar",
                f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=aar={peer_url}",
                "--logger=zap",
                "--log-level=warn",
            ],
            "kube-apiserver": [
                str(binary("kube-apiserver", self.bin_dir)),
                f"--etcd-servers={etcd_url}",
                f"--secure-port={state.apiserver_port}",
                "--insecure-port=0",
                "--bind-address=127.0.0.1",
                # Published as the `kubernetes` Service's endpoint: with a node, the host's end of
                # its link, where a forwarder passes connections on to the loopback port.
                f"--advertise-address={advertise}",
                f"--cert-dir={pki_dir}",
                f"--tls-cert-file={pki_dir / 'apiserver.crt'}",
                f"--tls-private-key-file={pki_dir / 'apiserver.key'}",
                f"--token-auth-file={pki_dir / 'tokens.csv'}",
                f"--client-ca-file={pki_dir / 'ca.crt'}",
                f"--kubelet-client-certificate={pki_dir / 'kubelet-client.crt'}",
                f"--kubelet-client-key={pki_dir / 'kubelet-client.key'}",
                "--kubelet-preferred-address-types=InternalIP",
                "--authorization-mode=Node,RBAC",
                f"--service-account-key-file={pki_dir / 'sa.pub'}",
                f"--service-account-signing-key-file={pki_dir / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                "--profiling=false",
                "--v=0",
            ],
            "kube-controller-manager": [
                str(binary("kube-controller-manager", self.bin_dir)),
                f"--kubeconfig={self.kubeconfig_path}",
                f"--service-account-private-key-file={pki_dir / 'sa.key'}",
                f"--root-ca-file={pki_dir / 'ca.crt'}",
                "--leader-elect=false",
                "--port=0",
                "--secure-port=0",
                # At the default 20 qps, token Secrets for hundreds of ServiceAccounts take minutes.
                "--kube-api-qps=500",
                "--kube-api-burst=1000",
                "--v=0",
            ],
            "kube-scheduler": [
                str(binary("kube-scheduler", self.bin_dir)),
                f"--kubeconfig={self.kubeconfig_path}",
                "--leader-elect=false",
                "--port=0",
                # Serves only /healthz to anyone (its default always-allowed path), for readiness.
                "--bind-address=127.0.0.1",
                f"--secure-port={state.scheduler_port}",
                f"--cert-dir={pki_dir / 'scheduler'}",
                "--kube-api-qps=500",
                "--kube-api-burst=1000",
                "--v=0",
            ],
        }

    def start(self, timeout: float = 90.0, progress: Callable[[str], None] | None = None) -> State:
        """Start all three processes and wait until the controllers are working.

        Reuses the data and certificates of an earlier start in the same state dir.
        Raises ControlPlaneError, with the tail of the failing process's log, on failure.
        """
        say = progress or (lambda _message: None)
        if self.is_running():
            state = self.read_state()
            assert state is not None
            return state
        self.stop()  # clear a half-stopped earlier start
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        self._ensure_pki()
        previous = self.read_state()
        token = previous.token if previous else secrets.token_hex(24)
        state = State(
            etcd_client_port=free_port(),
            etcd_peer_port=free_port(),
            apiserver_port=free_port(),
            token=token,
            scheduler_port=free_port(),
            with_node=self.with_node,
        )
        write_private(self.pki_dir / "tokens.csv", f'{token},admin,admin-uid,"system:masters"\n')
        admin = kubeconfig(state.server, (self.pki_dir / "ca.crt").read_bytes(), token)
        write_private(self.kubeconfig_path, yaml.safe_dump(admin))
        deadline = time.monotonic() + timeout
        try:
            advertise = advertise_address()
            if self.with_node:
                say("Preparing the node's network namespace")
                advertise = self.node.prepare(SERVICE_CLUSTER_IP_RANGE).host_ip
            commands = self._commands(state, advertise)
            for name, wait_ready in (
                ("etcd", lambda: self._etcd_healthy(state)),
                ("kube-apiserver", lambda: self._apiserver_ready(state)),
                ("kube-controller-manager", lambda: self._controllers_working(state)),
                ("kube-scheduler", lambda: self._scheduler_serving(state)),
            ):
                say(f"Starting {name}")
                self._spawn(name, commands[name], state)
                self._wait(name, wait_ready, deadline)
            if self.with_node:
                self._start_node(state, deadline, say)
        except BaseException:
            self.stop()
            raise
        say(f"Control plane ready at {state.server}")
        return state

    def _start_node(self, state: State, deadline: float, say: Callable[[str], None]) -> None:
        """Start the node, wait for it to be Ready, and advertise its stand-in GPUs."""
        self.node.start(
            state.apiserver_port, state.token, die_with_parent=self.die_with_parent, progress=say
        )
        say(f"Waiting for node {NODE_NAME} to be Ready")
        while not self._node_ready(state):
            if not self.node.running():
                raise ControlPlaneError(
                    f"the node stopped while starting; logs in {self.node.log_dir}/:\n"
                    + _tail(self.node.log_dir / "kubelet.log")
                )
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"node {NODE_NAME} did not become Ready in time; last lines of "
                    f"{self.node.log_dir / 'kubelet.log'}:\n"
                    + _tail(self.node.log_dir / "kubelet.log")
                )
            time.sleep(0.5)
        # An extended resource with no device behind it: GPU requests, limits and accounting
        # are real, while the trainer runs on the CPU.
        admin = KubeApi(state.server, state.token, self.pki_dir / "ca.crt")
        gpus = {"op": "add", "path": f"/status/capacity/{GPU_RESOURCE.replace('/', '~1')}"}
        try:
            admin.request(
                "PATCH",
                f"/api/v1/nodes/{NODE_NAME}/status",
                [{**gpus, "value": str(FAKE_GPUS)}],
                "application/json-patch+json",
            )
        except ApiError as error:
            raise ControlPlaneError(f"could not advertise the node's GPUs: {error}") from error
        say(f"Node {NODE_NAME} Ready with {FAKE_GPUS} {GPU_RESOURCE}")

    def _node_ready(self, state: State) -> bool:
        body = self._api_get(state, f"/api/v1/nodes/{NODE_NAME}")
        if body is None:
            return False
        conditions = json.loads(body).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _spawn(self, name: str, command: list[str], state: State) -> None:
        log = self.log_path(name).open("ab")
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                start_new_session=True,  # Ctrl-C in the terminal reaches us, not them
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        finally:
            log.close()
        self._processes[name] = process
        state.pids[name] = process.pid
        self._write_state(state)

    def _wait(self, name: str, ready: Callable[[], bool], deadline: float) -> None:
        process = self._processes[name]
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ControlPlaneError(
                    f"{name} exited with code {process.returncode} while starting; "
                    f"last lines of {self.log_path(name)}:\n{self.log_tail(name)}"
                )
            if ready():
                return
            time.sleep(0.2)
        raise ControlPlaneError(
            f"{name} did not become ready in time; "
            f"last lines of {self.log_path(name)}:\n{self.log_tail(name)}"
        )

    def log_tail(self, name: str, lines: int = 30) -> str:
        return _tail(self.log_path(name), lines)

    # --- readiness -----------------------------------------------------------------------------
    @staticmethod
    def _etcd_healthy(state: State) -> bool:
        body = _get(f"http://127.0.0.1:{state.etcd_client_port}/health")
        try:
            return body is not None and json.loads(body).get("health") == "true"
        except ValueError:
            return False

    def _api_get(self, state: State, path: str) -> bytes | None:
        """GET `path` from the apiserver as the admin user; None when it does not answer 2xx."""
        return _get(
            state.server + path,
            context=ssl.create_default_context(cafile=str(self.pki_dir / "ca.crt")),
            headers={"Authorization": f"Bearer {state.token}"},
        )

    def _apiserver_ready(self, state: State) -> bool:
        return self._api_get(state, "/readyz") == b"ok"

    @staticmethod
    def _scheduler_serving(state: State) -> bool:
        # Its self-signed serving certificate is made at start; the check is loopback only.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return _get(f"https://127.0.0.1:{state.scheduler_port}/healthz", context=context) == b"ok"

    def _controllers_working(self, state: State) -> bool:
        """The service-account and token controllers have run: the `default` ServiceAccount of
        `default` exists with its token Secret (without one, 1.20 refuses every Pod)."""
        body = self._api_get(state, "/api/v1/namespaces/default/secrets")
        if body is None:
            return False
        secret_list = json.loads(body)
        return any(
            s.get("type") == "kubernetes.io/service-account-token"
            and s["metadata"].get("annotations", {}).get("kubernetes.io/service-account.name")
            == "default"
            for s in secret_list.get("items", [])
        )

    # --- stop ----------------------------------------------------------------------------------
    def stop(self, grace: float = 10.0) -> None:
        """Stop every process of this control plane; safe to call twice and from a process other
        than the one that started it. Data and certificates stay.

        All processes are signalled before any is waited for, so a stop that is itself
        interrupted has still told every process to exit.
        """
        state = self.read_state()
        if (state is not None and state.with_node) or self.with_node:
            self.node.stop()
        pids = self.running_pids()
        for signal_number in (signal.SIGTERM, signal.SIGKILL):
            for name in reversed(PROCESS_ORDER):
                if name in pids and self._alive(name, pids[name]):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pids[name], signal_number)
            end = time.monotonic() + grace
            while time.monotonic() < end and any(self._alive(n, p) for n, p in pids.items()):
                time.sleep(0.05)
        for process in self._processes.values():
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
        self._processes.clear()
        state = self.read_state()
        if state is not None:
            state.pids = {}
            self._write_state(state)

    def _alive(self, name: str, pid: int) -> bool:
        process = self._processes.get(name)
        if process is not None:
            return process.poll() is None  # also reaps our own child
        return _pid_runs_in(pid, self.state_dir)  # a zombie's command line is empty

    def destroy(self) -> None:
        """Stop and delete the state dir with all its data."""
        self.stop()
        shutil.rmtree(self.state_dir, ignore_errors=True)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _get(
    url: str, *, context: ssl.SSLContext | None = None, headers: dict[str, str] | None = None
) -> bytes | None:
    """The body of a GET that answered 2xx within 2 s, or None (not up yet, refused, an error)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            body: bytes = response.read()
            return body
    except OSError:  # URLError and HTTPError are OSErrors
        return None
