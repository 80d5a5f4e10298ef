"""A real Kubernetes node beside the local control plane, isolated from the host.

containerd, runc, the kubelet and kube-proxy run in a network namespace of their own, joined to
the host by one veth pair on a /30 of the benchmarking range (RFC 2544), and in a private mount
namespace (`aar_devcluster.noderun`). The pods' bridge, routes, iptables rules and mounts exist
only there and vanish with the node. The host gets the veth's end, a forwarder from that end to
the apiserver's loopback port, a guard chain in iptables that drops anything addressed to the pod,
Service or link ranges that would leave by another interface, and cgroups under `/aar-<id>`; all
of it is removed on stop. A node lives while its lease (`RUN_DIR/<id>.lease`) is held; what a
node left without one, after its processes were killed or lost, is removed by the next node that
starts or stops on the machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from aar_devcluster import pki

NODE_NAME = "aar-node"
POD_CIDR = "10.244.0.0/24"
# Every node's pods get addresses from this range; the guard drops it on every host interface.
POD_RANGE = "10.244.0.0/16"
CLUSTER_DNS_IP = "10.0.0.10"
# One /30 per node: never routed on the internet and not used by this machine's interfaces.
LINK_RANGE = ipaddress.ip_network("198.18.0.0/24")
# Extended resource advertised with no device behind it, so GPU requests and limits schedule.
FAKE_GPUS = 16
GPU_RESOURCE = "nvidia.com/gpu"
GUARD_CHAIN = "AAR-NODE-GUARD"
NETNS_PREFIX = "aar-"
# The kubelet sets these machine-wide; they are put back when the last node stops.
KUBELET_SYSCTLS = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops")
RUN_DIR = Path("/run/aar-node")
HOST_RECORD = RUN_DIR / "host.json"
# Held while a node changes what nodes share on the host: the guard, the sysctls, the link
# addresses. Outside RUN_DIR, which goes with the last node, so that every node locks one file.
HOST_LOCK = Path("/run/lock/aar-node.lock")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Host paths the kubelet, containerd and the CNI plugins use whatever their configuration says.
# The node's mount namespace covers each, so nothing lands in the host's copies: with a tmpfs, or
# with a directory of the node's (relative to its directory) for the kubelet's root, which holds
# the pods' volumes, and unix sockets whose paths may not exceed 108 bytes.
KUBELET_ROOT = "/var/lib/kubelet"
PRIVATE_PATHS: dict[str, str | None] = {
    "/run/containerd": None,
    "/run/netns": None,
    KUBELET_ROOT: "kubelet/root",
    "/var/lib/cni": None,
    "/var/log/pods": None,
    "/var/log/containers": None,
}
# Debian's Prometheus server, in the node's network namespace: it reaches the Pods, and the host
# reaches it at the node's address.
PROMETHEUS = Path("/usr/bin/prometheus")
PROMETHEUS_PORT = 9090
# The runner lists there the mount points it had to create on the host.
CREATED_PATHS = "created-paths.json"
REQUIRED_COMMANDS = ("containerd", "runc", "ctr", "ip", "iptables", "socat")
CNI_BIN_DIR = Path("/usr/lib/cni")


def _terminate_with_parent() -> None:
    """Runs in the child between fork and exec: the kernel sends it SIGTERM when the parent
    dies."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn_logged(
    command: list[str],
    log_path: Path,
    preexec: Callable[[], None] | None = None,
    new_session: bool = False,
    pass_fds: tuple[int, ...] = (),
) -> subprocess.Popen[bytes]:
    """Start a process with no input and its output appended to `log_path`."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
            preexec_fn=preexec,
            pass_fds=pass_fds,
        )


class NodeError(RuntimeError):
    """The node could not be set up or started; the message says which part, why and the fix."""


def node_unavailable_reason() -> str | None:
    """Why a node cannot run on this machine (not root, a tool missing), or None when it can."""
    if os.geteuid() != 0:
        return (
            "a local node needs root (containerd, the kubelet, iptables and network namespaces); "
            "run as root, or use the control plane alone"
        )
    missing = [c for c in REQUIRED_COMMANDS if shutil.which(c) is None]
    if not (CNI_BIN_DIR / "bridge").exists():
        missing.append("the CNI plugins (/usr/lib/cni)")
    if missing:
        return f"{', '.join(missing)} not installed: run `make tools`"
    return None


@dataclass(frozen=True)
class Link:
    """The node's network namespace and the veth pair joining it to the host."""

    node_id: str
    host_ip: str
    node_ip: str

    @property
    def netns(self) -> str:
        return f"{NETNS_PREFIX}{self.node_id}"

    @property
    def host_interface(self) -> str:
        return f"aarh{self.node_id}"

    @property
    def cgroup(self) -> str:
        """The cgroup, in every hierarchy, that holds the node's pods."""
        return f"/aar-{self.node_id}"


def node_id(state_dir: Path) -> str:
    """A short name for the node of one state dir; interface names allow 15 characters."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]


def _run(*command: str, check: bool = True, netns: str | None = None) -> str:
    """Run a command (in the node's network namespace with `netns`); raise NodeError with its
    output when it fails and `check` is set."""
    full = (["ip", "netns", "exec", netns] if netns else []) + list(command)
    result = subprocess.run(full, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise NodeError(
            f"{' '.join(full)} exited with {result.returncode}: {result.stderr.strip()}"
        )
    return result.stdout


def _succeeds(*command: str, netns: str | None = None) -> bool:
    """Whether a command (a check such as `iptables -C`) exits 0."""
    try:
        _run(*command, netns=netns)
    except NodeError:
        return False
    return True


def _addresses_in_use() -> set[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The /30s of the link range that some interface on the host already has."""
    used: set[ipaddress.IPv4Network | ipaddress.IPv6Network] = set()
    for line in _run("ip", "-o", "-4", "addr", "show").splitlines():
        address = ipaddress.ip_interface(line.split()[3])
        if address.ip in LINK_RANGE:
            used.add(ipaddress.ip_network(f"{address.ip}/30", strict=False))
    return used


def allocate_link(node: str) -> Link:
    """A free /30 of the link range for a node's veth pair."""
    used = _addresses_in_use()
    for subnet in LINK_RANGE.subnets(new_prefix=30):
        if subnet not in used:
            host, node_address = list(subnet.hosts())
            return Link(node, str(host), str(node_address))
    raise NodeError(f"every /30 of {LINK_RANGE} is in use by another node: stop one first")


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def create_network(link: Link) -> None:
    """The network namespace and the veth pair, addressed; the node side has no default route,
    so nothing from a pod can be routed anywhere but to the host's end of the link."""
    peer = f"aarn{link.node_id}"
    _run("ip", "netns", "add", link.netns)
    _run("ip", "link", "add", link.host_interface, "type", "veth", "peer", "name", peer)
    _run("ip", "link", "set", peer, "netns", link.netns)
    _run("ip", "addr", "add", f"{link.host_ip}/30", "dev", link.host_interface)
    _run("ip", "link", "set", link.host_interface, "up")
    inside = ["ip", "-n", link.netns]
    _run(*inside, "link", "set", "lo", "up")
    _run(*inside, "link", "set", peer, "name", "eth0")
    _run(*inside, "addr", "add", f"{link.node_ip}/30", "dev", "eth0")
    _run(*inside, "link", "set", "eth0", "up")
    # Pods reach the apiserver through the host's end: the host sees the node's address, never
    # a pod's, so it never has a reply to route towards the pod range.
    _run(
        "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", POD_RANGE, "-o", "eth0",
        "-j", "MASQUERADE", netns=link.netns,
    )  # fmt: skip


def delete_network(link: Link) -> None:
    """Remove the namespace (and with it the bridge, the pods' interfaces and its rules) and the
    veth pair. Safe when they are already gone."""
    if netns_exists(link.netns):
        _run("ip", "netns", "delete", link.netns, check=False)
    # Deleting the namespace deletes the pair; a pair left by a crash before the move is removed.
    _run("ip", "link", "delete", link.host_interface, check=False)


# --- the guard -----------------------------------------------------------------------------------


def guard_rules(service_range: str) -> list[list[str]]:
    """The guard chain's rules: anything for the pod, Service or link ranges that would leave
    by any interface but a node's veth is dropped, whether the host sends it or forwards it."""
    ranges = (POD_RANGE, service_range, str(LINK_RANGE))
    return [
        ["-d", r, "!", "-o", "aarh+", "-j", "REJECT", "--reject-with", "icmp-admin-prohibited"]
        for r in ranges
    ]


def install_guard(service_range: str, netns: str | None = None) -> None:
    """Create the guard chain (idempotent) and jump to it first from OUTPUT and FORWARD."""
    if not _succeeds("iptables", "-n", "-L", GUARD_CHAIN, netns=netns):
        _run("iptables", "-N", GUARD_CHAIN, netns=netns)
    _run("iptables", "-F", GUARD_CHAIN, netns=netns)
    for rule in guard_rules(service_range):
        _run("iptables", "-A", GUARD_CHAIN, *rule, "-m", "comment", "--comment", "aar node guard",
             netns=netns)  # fmt: skip
    for chain in ("OUTPUT", "FORWARD"):
        if not _succeeds("iptables", "-C", chain, "-j", GUARD_CHAIN, netns=netns):
            _run("iptables", "-I", chain, "-j", GUARD_CHAIN, netns=netns)


def remove_guard(netns: str | None = None) -> None:
    """Remove the jumps and the chain. Safe when they are gone."""
    for chain in ("OUTPUT", "FORWARD"):
        for _ in range(10):  # one jump each, unless an interrupted install left more
            try:
                _run("iptables", "-D", chain, "-j", GUARD_CHAIN, netns=netns)
            except NodeError:
                break
    _run("iptables", "-F", GUARD_CHAIN, check=False, netns=netns)
    _run("iptables", "-X", GUARD_CHAIN, check=False, netns=netns)


# --- which nodes live ---------------------------------------------------------------------------
@contextlib.contextmanager
def host_lock() -> Iterator[None]:
    """Exclusive, between the nodes of this machine, for changing what they share: so that no
    node removes the guard while another is between installing it and making its namespace."""
    HOST_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with HOST_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def lease_path(node: str) -> Path:
    return RUN_DIR / f"{node}.lease"


def take_lease(node: str) -> int:
    """A descriptor holding a shared lock on the node's lease for as long as it, or a copy of it
    (the runner inherits one), stays open: the kernel drops the lock when the last holder dies,
    however it dies, so a node whose processes are all gone is seen as gone."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(lease_path(node), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(descriptor, fcntl.LOCK_SH)
    return descriptor


def lease_held(node: str) -> bool:
    """Whether some process holds the node's lease."""
    try:
        descriptor = os.open(lease_path(node), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)
    return False


def known_nodes() -> set[str]:
    """Every node that has a network namespace, a lease or a socket dir on this machine."""
    nodes: set[str] = set()
    with contextlib.suppress(FileNotFoundError):
        names = os.listdir("/run/netns")
        nodes |= {n.removeprefix(NETNS_PREFIX) for n in names if n.startswith(NETNS_PREFIX)}
    with contextlib.suppress(FileNotFoundError):
        for entry in RUN_DIR.iterdir():
            if entry.suffix == ".lease":
                nodes.add(entry.stem)
            elif entry.is_dir():
                nodes.add(entry.name)
    return nodes


def node_alive(node: str) -> bool:
    """A node lives while its lease is held or anything runs in its namespace. A node left by a
    machine that lost its processes without a teardown (a killed container, a restart that kept
    /run) has neither, and would otherwise keep the shared guard and sysctls forever."""
    if lease_held(node):
        return True
    pids = _run("ip", "netns", "pids", f"{NETNS_PREFIX}{node}", check=False)
    return bool(pids.strip())


def remove_node_leftovers(node: str) -> None:
    """What a node leaves under its id alone: its containerd's shims and socket dir, its pods'
    cgroups, its namespace and veth pair, its lease."""
    kill_processes(str(socket_dir(node)))
    shutil.rmtree(socket_dir(node), ignore_errors=True)
    remove_cgroups(Link(node, "", "").cgroup)
    delete_network(Link(node, "", ""))
    with contextlib.suppress(FileNotFoundError):
        lease_path(node).unlink()


def other_nodes_alive(node: str) -> bool:
    """Whether another node still runs (the guard and sysctls are shared); removes, on the way,
    what dead nodes left. Call with the host lock held."""
    alive = False
    for other in known_nodes() - {node}:
        if node_alive(other):
            alive = True
        else:
            remove_node_leftovers(other)
    return alive


# --- what the node changes on the host ----------------------------------------------------------
def record_host_state() -> None:
    """Keep, once for all nodes, what the first node changes on the host: the machine-wide
    sysctls the kubelet sets, and whether `/run/netns` (which `ip netns` makes a mount point)
    existed."""
    if HOST_RECORD.exists():
        return
    record = {
        "sysctls": {k: Path("/proc/sys", k).read_text().strip() for k in KUBELET_SYSCTLS},
        "run_netns_existed": Path("/run/netns").exists(),
        "run_netns_mounted": os.path.ismount("/run/netns"),
    }
    HOST_RECORD.parent.mkdir(parents=True, exist_ok=True)
    HOST_RECORD.write_text(json.dumps(record))


def restore_host_state() -> None:
    """Put back what `record_host_state` kept, and forget it."""
    try:
        record = json.loads(HOST_RECORD.read_text())
    except FileNotFoundError:
        return
    for key, value in record["sysctls"].items():
        with contextlib.suppress(OSError):
            Path("/proc/sys", key).write_text(value)
    run_netns = Path("/run/netns")
    if not record["run_netns_mounted"] and os.path.ismount(run_netns):
        subprocess.run(["umount", str(run_netns)], capture_output=True, check=False)
    if not record["run_netns_existed"]:
        with contextlib.suppress(OSError):
            run_netns.rmdir()
    HOST_RECORD.unlink()
    with contextlib.suppress(OSError):
        HOST_RECORD.parent.rmdir()


# --- cgroups and processes -----------------------------------------------------------------------
def cgroup_dirs(cgroup: str) -> list[Path]:
    """The node's cgroup in every v1 hierarchy that has it."""
    return [
        h / cgroup.lstrip("/") for h in CGROUP_ROOT.iterdir() if (h / cgroup.lstrip("/")).is_dir()
    ]


def create_cgroups(cgroup: str) -> None:
    """The node's cgroup in every v1 hierarchy: the kubelet requires its cgroup root to exist.
    cpuset starts empty in a new v1 cgroup and must be copied from the parent first."""
    for hierarchy in CGROUP_ROOT.iterdir():
        if hierarchy.name == "unified" or not (hierarchy / "cgroup.procs").exists():
            continue
        directory = hierarchy / cgroup.lstrip("/")
        directory.mkdir(exist_ok=True)
        for name in ("cpuset.cpus", "cpuset.mems"):
            if (directory / name).exists() and not (directory / name).read_text().strip():
                (directory / name).write_text((hierarchy / name).read_text())


def remove_cgroups(cgroup: str, timeout: float = 10.0) -> None:
    """Kill every process in the node's cgroups (the pods' containers) and remove the cgroups,
    deepest first."""
    deadline = time.monotonic() + timeout
    for top in cgroup_dirs(cgroup):
        tree = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for directory in [*tree, top]:
            while True:
                try:
                    pids = [int(p) for p in (directory / "cgroup.procs").read_text().split()]
                except FileNotFoundError:
                    break
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                if time.monotonic() > deadline:
                    raise NodeError(f"processes in {directory} did not exit: {pids}")
                time.sleep(0.05)
            with contextlib.suppress(FileNotFoundError):
                directory.rmdir()


def processes_naming(marker: str) -> list[int]:
    """Pids whose command line contains `marker` (the node's state dir): the runner, containerd,
    its shims, the kubelet and kube-proxy."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill_processes(marker: str, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace`, every process whose command line names `marker`."""
    for signal_number in (signal.SIGTERM, signal.SIGKILL):
        pids = processes_naming(marker)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal_number)
        end = time.monotonic() + grace
        while time.monotonic() < end and processes_naming(marker):
            time.sleep(0.05)
        if not processes_naming(marker):
            return


# --- configuration files -------------------------------------------------------------------------
def socket_dir(node: str) -> Path:
    """Where the node's containerd listens: unix socket paths may not exceed 104 bytes, which a
    state dir under a test's temporary directory does. containerd's shims name it in their
    command lines, so it also marks them as the node's."""
    return RUN_DIR / node


def containerd_config(directory: Path, sockets: Path, cni_conf_dir: Path) -> str:
    """containerd's own state, sockets and CNI settings."""
    return f"""version = 2
root = "{directory}/root"
state = "{directory}/state"
plugin_dir = ""
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{sockets}/containerd.sock"
[ttrpc]
  address = "{sockets}/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "k8s.gcr.io/pause:3.2"
  enable_selinux = false
  # Some VMs drop CAP_SYS_RESOURCE from every process: oom_score_adj can never go below 0, and
  # runc fails to start any sandbox that asks for less.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "{shutil.which("runc") or "/usr/sbin/runc"}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni_conf_dir}"
"""


def cni_config(ipam_dir: Path) -> dict[str, Any]:
    """A bridge with host-local addresses; no masquerading: pods reach only the node."""
    return {
        "cniVersion": "0.4.0",
        "name": "aar-node",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_CIDR}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(ipam_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(link: Link, ca_file: Path, resolv_conf: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": link.cgroup,
        "cgroupsPerQOS": True,
        "enforceNodeAllocatable": ["pods"],
        "failSwapOn": False,
        # The node's own address: 1.20 refuses a loopback node IP, and this one is reachable only
        # from the host's end of the link.
        "address": link.node_ip,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca_file)},
        },
        "authorization": {"mode": "Webhook"},
        "clusterDomain": "cluster.local",
        "clusterDNS": [CLUSTER_DNS_IP],
        # Empty: pods never see the host's resolver, only the cluster's DNS.
        "resolvConf": str(resolv_conf),
        "staticPodPath": "",
        "serializeImagePulls": False,
        # Images are imported by hand and can never be pulled again: never collect them.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "2%",
            "imagefs.available": "2%",
            "nodefs.inodesFree": "1%",
        },
        "maxPods": 110,
    }


def prometheus_config(targets_file: Path, rules_dir: Path) -> dict[str, Any]:
    """Scrape the targets `aar_devcluster.targets` writes (every Running Pod's port named
    `metrics`: the chart's services and the operator) and evaluate the rules in `rules_dir`."""
    return {
        "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
        "rule_files": [str(rules_dir / "*.yml")],
        "scrape_configs": [
            {
                "job_name": "pods",
                "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "5s"}],
            }
        ],
    }


def component_kubeconfig(server: str, ca_file: Path, cert: Path, key: Path, user: str) -> str:
    """A kubeconfig with a client certificate; the apiserver's certificate is checked against the
    name `kubernetes`, since the node reaches it at the link's address."""
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "aar-local",
                    "cluster": {
                        "server": server,
                        "certificate-authority": str(ca_file),
                        "tls-server-name": "kubernetes",
                    },
                }
            ],
            "users": [
                {"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}
            ],
            "contexts": [{"name": "node", "context": {"cluster": "aar-local", "user": user}}],
            "current-context": "node",
        }
    )


@dataclass
class NodeState:
    """What a running node needs to be found and stopped by another process."""

    node_id: str
    host_ip: str
    node_ip: str
    runner_pid: int = 0

    @property
    def link(self) -> Link:
        return Link(self.node_id, self.host_ip, self.node_ip)


def write_node_state(directory: Path, state: NodeState) -> None:
    """Replace the node's state file in one step: a reader never sees half of it."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "state.tmp"
    tmp.write_text(json.dumps(state.__dict__))
    tmp.replace(directory / "state.json")


class Node:
    """The node of one control plane: its files live in `<state dir>/node`.

    Life cycle: `prepare()` before the apiserver starts (it needs the link's address to publish
    as the `kubernetes` Service's endpoint), `start()` once the apiserver is ready, `stop()` from
    any process.
    """

    def __init__(self, state_dir: Path, pki_dir: Path, bin_dir: Path) -> None:
        self.directory = state_dir.resolve() / "node"
        self.pki_dir = pki_dir
        self.bin_dir = bin_dir
        self.id = node_id(state_dir)
        self._processes: list[subprocess.Popen[bytes]] = []
        # This process's hold on the node's lease, from `prepare` to `stop`; the runner holds a
        # copy, so the node stays alive to others when this process exits first.
        self._lease: int | None = None

    @property
    def state_path(self) -> Path:
        return self.directory / "state.json"

    @property
    def log_dir(self) -> Path:
        return self.directory / "logs"

    @property
    def prometheus_url(self) -> str | None:
        """Where the node's Prometheus answers, from the host; None before `prepare`."""
        state = self.read_state()
        return f"http://{state.node_ip}:{PROMETHEUS_PORT}" if state else None

    @property
    def prometheus_rules(self) -> Path:
        return self.directory / "prometheus" / "rules"

    @property
    def containerd_socket(self) -> Path:
        return socket_dir(self.id) / "containerd.sock"

    def read_state(self) -> NodeState | None:
        try:
            return NodeState(**json.loads(self.state_path.read_text()))
        except FileNotFoundError:
            return None

    # --- prepare -------------------------------------------------------------------------------
    def prepare(self, service_range: str) -> Link:
        """Clear what a crashed earlier node left, then make the network and the guard."""
        reason = node_unavailable_reason()
        if reason:
            raise NodeError(reason)
        self.stop()
        with host_lock():
            other_nodes_alive(self.id)  # clears what dead nodes left, their addresses included
            self._lease = take_lease(self.id)
            record_host_state()
            install_guard(service_range)
            link = allocate_link(self.id)
            create_network(link)
        write_node_state(self.directory, NodeState(link.node_id, link.host_ip, link.node_ip))
        return link

    # --- start ---------------------------------------------------------------------------------
    def _ensure_pki(self, ca: pki.KeyPair) -> None:
        node_pki = self.directory / "pki"
        node_pki.mkdir(parents=True, exist_ok=True)
        for name, user, groups in (
            ("kubelet", f"system:node:{NODE_NAME}", ["system:nodes"]),
            ("kube-proxy", "system:kube-proxy", []),
        ):
            if (node_pki / f"{name}.crt").exists():
                continue
            pair = pki.make_client_cert(ca, user, groups)
            (node_pki / f"{name}.key").write_bytes(pair.private_pem)
            os.chmod(node_pki / f"{name}.key", 0o600)
            (node_pki / f"{name}.crt").write_bytes(pair.public_pem)

    def _write_configs(
        self, link: Link, apiserver_port: int, admin_token: str
    ) -> dict[str, dict[str, list[str]]]:
        """Every configuration file, and the command of each process the runner starts: `host`
        ones in the host's network namespace, `node` ones in the node's."""
        d, ca_file = self.directory, self.pki_dir / "ca.crt"
        for sub in ("containerd", "cni/net.d", "cni/ipam", "kubelet/root", "logs"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        socket_dir(self.id).mkdir(parents=True, exist_ok=True, mode=0o700)
        (d / "containerd" / "config.toml").write_text(
            containerd_config(d / "containerd", socket_dir(self.id), d / "cni" / "net.d")
        )
        (d / "cni" / "net.d" / "10-aar-node.conflist").write_text(
            json.dumps(cni_config(d / "cni" / "ipam"), indent=2)
        )
        resolv = d / "kubelet" / "pod-resolv.conf"
        resolv.write_text("")
        (d / "kubelet" / "config.yaml").write_text(
            yaml.safe_dump(kubelet_config(link, ca_file, resolv))
        )
        server = f"https://{link.host_ip}:{apiserver_port}"
        for name, user in (("kubelet", f"system:node:{NODE_NAME}"), ("kube-proxy", "proxy")):
            (d / f"{name}.kubeconfig").write_text(
                component_kubeconfig(
                    server, ca_file, d / "pki" / f"{name}.crt", d / "pki" / f"{name}.key", user
                )
            )
        socket = f"unix://{self.containerd_socket}"
        token_file = d / "pki" / "admin-token"
        token_file.write_text(admin_token)
        token_file.chmod(0o600)
        host = {
            "forwarder": [
                "socat",
                f"TCP-LISTEN:{apiserver_port},bind={link.host_ip},reuseaddr,fork",
                f"TCP:127.0.0.1:{apiserver_port}",
            ],
            "provisioner": [
                sys.executable,
                "-m",
                "aar_devcluster.provisioner",
                f"--server=https://127.0.0.1:{apiserver_port}",
                f"--token-file={token_file}",
                f"--ca-file={ca_file}",
                f"--root={d / 'volumes'}",
            ],
        }
        node = {
            "containerd": ["containerd", "--config", str(d / "containerd" / "config.toml")],
            "kubelet": [
                str(self.bin_dir / "kubelet"),
                f"--config={d / 'kubelet' / 'config.yaml'}",
                f"--kubeconfig={d / 'kubelet.kubeconfig'}",
                "--container-runtime=remote",
                f"--container-runtime-endpoint={socket}",
                f"--image-service-endpoint={socket}",
                f"--root-dir={KUBELET_ROOT}",
                f"--cert-dir={d / 'kubelet' / 'certs'}",
                f"--node-ip={link.node_ip}",
                f"--hostname-override={NODE_NAME}",
                "--v=1",
            ],
            "kube-proxy": [
                str(self.bin_dir / "kube-proxy"),
                f"--kubeconfig={d / 'kube-proxy.kubeconfig'}",
                f"--hostname-override={NODE_NAME}",
                "--proxy-mode=iptables",
                f"--cluster-cidr={POD_RANGE}",
                # Zero: never touch the machine-wide conntrack settings.
                "--conntrack-max-per-core=0",
                "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
                "--healthz-bind-address=127.0.0.1:10256",
                "--metrics-bind-address=127.0.0.1:10249",
                "--v=1",
            ],
        }
        if PROMETHEUS.exists():
            (d / "prometheus" / "rules").mkdir(parents=True, exist_ok=True)
            targets = d / "prometheus" / "targets.json"
            config = prometheus_config(targets, d / "prometheus" / "rules")
            (d / "prometheus" / "prometheus.yml").write_text(yaml.safe_dump(config))
            host["targets"] = [
                sys.executable, "-m", "aar_devcluster.targets",
                f"--server=https://127.0.0.1:{apiserver_port}", f"--token-file={token_file}",
                f"--ca-file={ca_file}", f"--out={targets}",
            ]  # fmt: skip
            node["prometheus"] = [
                str(PROMETHEUS),
                f"--config.file={d / 'prometheus' / 'prometheus.yml'}",
                f"--storage.tsdb.path={d / 'prometheus' / 'data'}",
                f"--web.listen-address={link.node_ip}:{PROMETHEUS_PORT}",
                "--web.enable-lifecycle",  # deploy reloads it after writing the chart's rules
            ]
        return {"host": host, "node": node}

    def start(
        self,
        apiserver_port: int,
        admin_token: str,
        *,
        die_with_parent: bool,
        progress: Callable[[str], None] | None = None,
    ) -> NodeState:
        """Start the node's processes and the forwarder from the link's host end to the
        apiserver; returns once containerd answers.

        Call `wait_ready` (through the control plane) for the Node object to be Ready.
        """
        say = progress or (lambda _message: None)
        state = self.read_state()
        if state is None or not netns_exists(state.link.netns):
            raise NodeError("the node's network is not prepared: call prepare() first")
        link = state.link
        ca = pki.KeyPair(
            (self.pki_dir / "ca.crt").read_bytes(), (self.pki_dir / "ca.key").read_bytes()
        )
        self._ensure_pki(ca)
        commands = self._write_configs(link, apiserver_port, admin_token)
        (self.directory / "commands.json").write_text(json.dumps(commands, indent=2))
        create_cgroups(link.cgroup)
        say(f"Starting containerd, the kubelet and kube-proxy in network namespace {link.netns}")
        runner = self._spawn(
            "node",
            [
                sys.executable,
                "-m",
                "aar_devcluster.noderun",
                "--netns",
                link.netns,
                "--commands",
                str(self.directory / "commands.json"),
                "--log-dir",
                str(self.log_dir),
                "--cgroup",
                link.cgroup,
            ],
            die_with_parent,
            # The runner keeps the node's lease for as long as it runs.
            pass_fds=(self._lease,) if self._lease is not None else (),
        )
        state.runner_pid = runner.pid
        write_node_state(self.directory, state)
        deadline = time.monotonic() + 30
        while not self.containerd_socket.exists():
            if runner.poll() is not None:
                raise NodeError(
                    f"the node's processes exited with code {runner.returncode} while starting; "
                    f"see {self.log_dir}/"
                )
            if time.monotonic() > deadline:
                raise NodeError(f"containerd did not start in 30 s; see {self.log_dir}/")
            time.sleep(0.1)
        return state

    def _spawn(
        self, name: str, command: list[str], die_with_parent: bool, pass_fds: tuple[int, ...] = ()
    ) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        process = spawn_logged(
            command,
            self.log_dir / f"{name}.log",
            # SIGTERM, not SIGKILL: the runner tears the node down when its owner dies.
            preexec=_terminate_with_parent if die_with_parent else None,
            new_session=True,
            pass_fds=pass_fds,
        )
        self._processes.append(process)
        return process

    def running(self) -> bool:
        state = self.read_state()
        if state is None or not state.runner_pid:
            return False
        try:
            return (
                str(self.directory).encode()
                in Path(f"/proc/{state.runner_pid}/cmdline").read_bytes()
            )
        except OSError:
            return False

    # --- stop ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every process of the node and remove everything it made on the host (see
        `teardown`). Safe to call twice, and after a crash."""
        state = self.read_state()
        # The runner stops the kubelet, then the containers, then containerd, and tears down.
        if state and state.runner_pid and self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(state.runner_pid, signal.SIGTERM)
            end = time.monotonic() + 40
            while time.monotonic() < end and self.running():
                time.sleep(0.1)
        for process in self._processes:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
        self._processes.clear()
        teardown(self.directory)
        if self._lease is not None:
            os.close(self._lease)
            self._lease = None


def teardown(directory: Path) -> None:
    """Remove what the node of `directory` made on the host, whatever state it was left in: its
    processes (containerd's shims outlive containerd), the pods' cgroups, the mount points made
    for its private mounts, its network namespace and veth pair, and, when no other node runs,
    the guard chain and the host settings the kubelet changed. Idempotent."""
    try:
        state: NodeState | None = NodeState(**json.loads((directory / "state.json").read_text()))
    except FileNotFoundError:
        state = None
    node = state.link.node_id if state else node_id(directory.parent)
    kill_processes(str(directory))
    record = directory / CREATED_PATHS
    with contextlib.suppress(FileNotFoundError):
        for path in json.loads(record.read_text()):
            with contextlib.suppress(OSError):
                Path(path).rmdir()  # empty on the host: the tmpfs lived in the node's namespace
        record.unlink()
    with host_lock():
        remove_node_leftovers(node)
        if not other_nodes_alive(node):
            remove_guard()
            restore_host_state()
    if state and state.runner_pid:
        state.runner_pid = 0
        write_node_state(directory, state)
