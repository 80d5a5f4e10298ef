"""The local node runs the operator's Pods as a cluster would: restricted, with volumes, stand-in
GPUs, cluster DNS and in-cluster API access; and nothing addressed to the cluster's ranges can
leave by a host interface."""

from __future__ import annotations

import http.server
import json
import secrets
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from node_cluster import start_cluster, wait_for_pod

from aar_devcluster import egress, images
from aar_devcluster.addons import DNS_IMAGE_TARGET
from aar_devcluster.controlplane import ControlPlane
from aar_devcluster.node import (
    FAKE_GPUS,
    GPU_RESOURCE,
    GUARD_CHAIN,
    NODE_NAME,
    guard_rules,
    install_guard,
    processes_naming,
)
from aar_devcluster.tools import Tool
from aar_operator import builders, naming
from aar_operator.builders import Sandbox
from aar_operator.config import OperatorConfig
from aar_operator.models import AgentSandboxSpec

# Starting a cluster with its node, and building an image when the code changed, take minutes.
pytestmark = pytest.mark.timeout(900)

SERVICE_RANGE = "10.0.0.0/24"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = start_cluster(tmp_path_factory.mktemp("node-cluster"), (DNS_IMAGE_TARGET, "agent"))
    yield plane
    plane.destroy()


@pytest.fixture
def kubectl(cluster: ControlPlane) -> Iterator[Tool]:
    namespace = f"t-node-{secrets.token_hex(3)}"
    admin = Tool("kubectl", cluster.kubeconfig_path)
    admin.run("create", "namespace", namespace)
    yield Tool("kubectl", cluster.kubeconfig_path, namespace)
    admin.run("delete", "namespace", namespace, "--wait=false")


def image(target: str = DNS_IMAGE_TARGET) -> str:
    return images.image_name(target, images.chart_version(images.repo_root()))


def python_pod(
    name: str, command: list[str], labels: dict[str, str] | None = None, **container: Any
) -> dict[str, Any]:
    """A Pod of the operator's image running `python COMMAND...` once."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": name,
                    "image": image(),
                    "imagePullPolicy": "Never",
                    "command": ["python", *command],
                    **container,
                }
            ],
        },
    }


def test_the_node_is_ready_and_advertises_stand_in_gpus(cluster: ControlPlane) -> None:
    node = Tool("kubectl", cluster.kubeconfig_path).json("get", "node", NODE_NAME)
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    assert ready[0]["status"] == "True"
    assert node["status"]["capacity"][GPU_RESOURCE] == str(FAKE_GPUS)
    assert node["status"]["allocatable"][GPU_RESOURCE] == str(FAKE_GPUS)


# Run inside the sandbox Pod: what a process there can see of its own confinement.
CONFINEMENT_PROBE = r"""
import json, os, socket, ssl, urllib.request, urllib.error
lines = open('/proc/self/status').read().splitlines()
status = dict(line.split(':\t', 1) for line in lines if ':\t' in line)
def writable(path):
    try:
        with open(os.path.join(path, 'probe'), 'w') as f: f.write('x')
        return True
    except OSError as e:
        return str(e)
def anonymous(path):
    context = ssl._create_unverified_context()
    try:
        return urllib.request.urlopen('https://kubernetes.default.svc' + path, context=context,
                                      timeout=5).status
    except urllib.error.HTTPError as e:
        return e.code
def resolves(name):
    try:
        return socket.gethostbyname(name)
    except OSError:
        return None
print(json.dumps({
    'uid': os.getuid(), 'gid': os.getgid(), 'groups': os.getgroups(),
    'cap_eff': status['CapEff'].strip(), 'cap_bnd': status['CapBnd'].strip(),
    'no_new_privs': status['NoNewPrivs'].strip(), 'seccomp': status['Seccomp'].strip(),
    'root_writable': writable('/'), 'workspace_writable': writable('/workspace'),
    'tmp_writable': writable('/tmp'), 'task_writable': writable('/task'),
    'token_mounted': os.path.exists('/var/run/secrets/kubernetes.io/serviceaccount'),
    'env_names': sorted(os.environ),
    'kube_dns': resolves('kube-dns.kube-system.svc.cluster.local'),
    'kubernetes': resolves('kubernetes.default'),
    'outside_name': resolves('pypi.org'),
    'anonymous_version': anonymous('/version'),
    'anonymous_secrets': anonymous('/api/v1/secrets'),
}))
"""


def sandbox_objects(
    namespace: str,
) -> tuple[Sandbox, list[dict[str, Any]]]:
    """The operator's own objects for one sandbox (ServiceAccount, credential Secret, workspace
    claim, Pod), without owner references (no AgentSandbox exists here to own them)."""
    spec = AgentSandboxSpec.model_validate(
        {
            "run": "node",
            "direction": "confinement",
            "task": {"name": "demo"},
            "sandbox": {
                "image": image("agent"),
                "resources": {"gpu": 1, "cpu": "1", "memory": "512Mi"},
                "storage": "1Gi",
            },
        }
    )
    sandbox = Sandbox(namespace, "node-0", "uid", spec, None)
    config = OperatorConfig()
    made = [
        builders.service_account(sandbox),
        builders.credential_secret(sandbox, "not-a-real-credential"),
        builders.workspace_pvc(sandbox),
        builders.pod(sandbox, config),
    ]
    for manifest in made:
        manifest["metadata"].pop("ownerReferences", None)
    pod = made[-1]
    container = pod["spec"]["containers"][0]
    container["imagePullPolicy"] = "Never"
    container["command"] = ["python", "-c", CONFINEMENT_PROBE]
    pod["spec"]["restartPolicy"] = "Never"
    return sandbox, made


def task_claim(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": naming.task_claim_name("demo"), "namespace": namespace},
        "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "1Gi"}}},
    }


def test_the_operators_sandbox_pod_runs_confined(kubectl: Tool) -> None:
    assert kubectl.namespace
    sandbox, made = sandbox_objects(kubectl.namespace)
    kubectl.apply(task_claim(kubectl.namespace), *made)
    name = naming.pod_name(sandbox.name)
    pod = wait_for_pod(kubectl, name, {"Succeeded", "Failed"})
    seen = json.loads(kubectl.run("logs", name))
    assert pod["status"]["phase"] == "Succeeded", seen
    assert (seen["uid"], seen["gid"]) == (1000, 1000)
    assert seen["cap_eff"] == seen["cap_bnd"] == "0000000000000000"
    assert seen["no_new_privs"] == "1"
    assert seen["seccomp"] == "2"  # a filter: RuntimeDefault is applied
    assert "Read-only file system" in str(seen["root_writable"])
    assert seen["workspace_writable"] is True  # a local volume that honours fsGroup
    assert seen["tmp_writable"] is True
    assert "Read-only file system" in str(seen["task_writable"])
    assert seen["token_mounted"] is False
    assert not [n for n in seen["env_names"] if "LABEL" in n or "KUBECONFIG" in n]
    # Cluster DNS knows the cluster's Services and nothing else.
    assert seen["kube_dns"] == "10.0.0.10"
    assert seen["kubernetes"] == "10.0.0.1"
    assert seen["outside_name"] is None
    # The apiserver answers an anonymous caller's discovery and refuses it everything else.
    assert seen["anonymous_version"] == 200
    assert seen["anonymous_secrets"] in (401, 403)
    # The stand-in GPU was allocated to it.
    limits = pod["spec"]["containers"][0]["resources"]["limits"]
    assert limits[GPU_RESOURCE] == "1"


def test_a_new_service_resolves_within_seconds(kubectl: Tool) -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "fresh"},
        "spec": {"selector": {"app": "none"}, "ports": [{"port": 80}]},
    }
    kubectl.apply(service)
    address = kubectl.json("get", "service", "fresh")["spec"]["clusterIP"]
    lookup = (
        "import socket, time\n"
        "for _ in range(40):\n"
        "    try:\n"
        f"        print(socket.gethostbyname('fresh.{kubectl.namespace}.svc.cluster.local'))\n"
        "        break\n"
        "    except OSError:\n"
        "        time.sleep(0.25)\n"
    )
    pod = python_pod("lookup", ["-c", lookup])
    kubectl.apply(pod)
    wait_for_pod(kubectl, "lookup", {"Succeeded"})
    assert kubectl.run("logs", "lookup").strip() == address


@pytest.fixture
def host_server() -> Iterator[int]:
    """An HTTP server on the host's loopback answering `relayed <path>`: a stand-in for the one
    outside endpoint (the Anthropic API is not reachable from here)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"relayed {self.path}".encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_a_pod_leaves_the_node_only_through_the_relay_by_its_claimed_name(
    cluster: ControlPlane, kubectl: Tool, host_server: int
) -> None:
    assert kubectl.namespace is not None
    relay = egress.open_egress(
        cluster.node,
        kubectl,
        kubectl.namespace,
        name="outside",
        dns_name="api.outside.test",
        destination=f"127.0.0.1:{host_server}",
        port=8443,
        listen_port=9444,
    )
    # The same Pod reaches the claimed name through the relay and no other outside name.
    fetch = (
        "import socket, time, urllib.request\n"
        "for _ in range(60):\n"
        "    try:\n"
        "        print(urllib.request.urlopen('http://api.outside.test:8443/v1/messages',"
        " timeout=2).read().decode()); break\n"
        "    except OSError:\n"
        "        time.sleep(0.5)\n"
        "try:\n"
        "    print(socket.gethostbyname('pypi.org'))\n"
        "except OSError:\n"
        "    print('no pypi.org')\n"
    )
    kubectl.apply(python_pod("leaver", ["-c", fetch]))
    wait_for_pod(kubectl, "leaver", {"Succeeded"})
    assert kubectl.run("logs", "leaver").splitlines() == ["relayed /v1/messages", "no pypi.org"]
    assert relay.endswith(":9444")
    # Asked again (a second `make demo`), the running relay is kept, not doubled.
    assert egress.start_relay(cluster.node, f"127.0.0.1:{host_server}", 9444) == relay
    marker = egress.relay_marker(cluster.node, f"127.0.0.1:{host_server}")
    assert len([pid for pid in processes_naming(marker) if _is_listener(pid)]) == 1


def _is_listener(pid: int) -> bool:
    # socat forks a child per connection: the listener is the one whose parent is no socat.
    try:
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        return b"socat" not in Path(f"/proc/{parent}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


def test_the_host_jumps_to_the_guard_before_any_other_rule(cluster: ControlPlane) -> None:
    rules = subprocess.run(
        ["iptables", "-S", GUARD_CHAIN], capture_output=True, text=True, check=True
    ).stdout
    for rule in guard_rules(SERVICE_RANGE):
        destination = rule[rule.index("-d") + 1]
        assert any(f"-d {destination} ! -o aarh+" in line for line in rules.splitlines()), rules
    for chain in ("OUTPUT", "FORWARD"):
        listing = subprocess.run(
            ["iptables", "-S", chain], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        assert listing[1] == f"-A {chain} -j {GUARD_CHAIN}", listing


@pytest.fixture
def stand_in_host() -> Iterator[str]:
    """A network namespace shaped like the host, with the guard installed as on the host: its
    `eth0` carries the default route and leads to a second namespace of ours that forwards
    nothing, so whatever is sent here stays on this machine."""
    name, sink = f"aarguard-{secrets.token_hex(3)}", f"aarsink-{secrets.token_hex(3)}"
    for namespace in (name, sink):
        subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        inside = ["ip", "-n", name]
        subprocess.run(
            [*inside, "link", "add", "eth0", "type", "veth", "peer", "name", "in0", "netns", sink],
            check=True,
        )
        subprocess.run([*inside, "addr", "add", "192.0.2.2/24", "dev", "eth0"], check=True)
        subprocess.run([*inside, "link", "set", "eth0", "up"], check=True)
        subprocess.run(["ip", "-n", sink, "link", "set", "in0", "up"], check=True)
        subprocess.run([*inside, "route", "add", "default", "dev", "eth0"], check=True)
        install_guard(SERVICE_RANGE, netns=name)
        yield name
    finally:
        for namespace in (name, sink):
            subprocess.run(["ip", "netns", "delete", namespace], check=False)


def _sent_through_eth0(netns: str, address: str) -> tuple[int, str]:
    """Send one UDP datagram to `address` from inside `netns`: how many packets eth0 transmitted
    meanwhile, and what sendto said."""
    script = (
        "import socket, sys\n"
        "def sent():\n"
        "    return int(open('/sys/class/net/eth0/statistics/tx_packets').read())\n"
        "before = sent()\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "try:\n"
        f"    s.sendto(b'x', ({address!r}, 9)); outcome = 'sent'\n"
        "except OSError as error:\n"
        "    outcome = error.strerror\n"
        "print(sent() - before, outcome)\n"
    )
    result = subprocess.run(
        ["ip", "netns", "exec", netns, "python3", "-c", script],
        capture_output=True,
        text=True,
        check=True,
    )
    count, outcome = result.stdout.strip().split(" ", 1)
    return int(count), outcome


@pytest.mark.parametrize(
    "address", ["10.244.0.7", "10.244.200.1", "10.0.0.1", "10.0.0.10", "198.18.0.2"]
)
def test_the_guard_keeps_cluster_addresses_off_host_interfaces(
    stand_in_host: str, address: str
) -> None:
    transmitted, outcome = _sent_through_eth0(stand_in_host, address)
    assert transmitted == 0
    assert outcome != "sent"


def test_the_guard_lets_other_traffic_through(stand_in_host: str) -> None:
    # 203.0.113.0/24 is documentation space, and the sink namespace forwards nothing.
    transmitted, outcome = _sent_through_eth0(stand_in_host, "203.0.113.9")
    assert (transmitted, outcome) == (1, "sent")


def test_pods_reach_each_other_through_a_service(kubectl: Tool, repo_root: Path) -> None:
    server = python_pod(
        "web",
        ["-m", "http.server", "8080", "--directory", "/etc"],
        {"app": "web"},
        readinessProbe={"tcpSocket": {"port": 8080}, "periodSeconds": 1},
    )
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    fetch = (
        "import urllib.request, time\n"
        "for _ in range(60):\n"
        "    try:\n"
        "        print(urllib.request.urlopen('http://web/hostname', timeout=2)"
        ".read().decode().strip()); break\n"
        "    except OSError:\n"
        "        time.sleep(0.5)\n"
    )
    client = python_pod("client", ["-c", fetch])
    kubectl.apply(server, service)
    kubectl.run("wait", "--for=condition=Ready", "pod/web", "--timeout=90s", timeout=100)
    kubectl.apply(client)
    wait_for_pod(kubectl, "client", {"Succeeded"})
    assert kubectl.run("logs", "client").strip() == "web"
