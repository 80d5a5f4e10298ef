"""A node leaves nothing on the host: not when stopped, not when its owner is killed.

Runs with no other node on the machine (the other modules' clusters are module-scoped and gone
by now), so the shared pieces (the guard chain, the kubelet's sysctls) must go too: kept while
another node lives, and not kept for one that died without a teardown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from node_cluster import guard_installed, host_record, leftovers, require_node

from aar_devcluster.node import (
    KUBELET_SYSCTLS,
    Link,
    allocate_link,
    create_network,
    host_lock,
    netns_exists,
    node_id,
    processes_naming,
    take_lease,
    teardown,
)

# Starting a cluster with its node, and building an image when the code changed, take minutes.
pytestmark = pytest.mark.timeout(900)

# Started in a child process: a cluster with its node, tied to that process's life, a Pod
# running on it and an egress relay (started apart from the node, so teardown must find it);
# prints "ready" and waits to be killed.
OWNER = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from node_cluster import start_cluster, wait_for_pod
from aar_devcluster.egress import start_relay
from aar_devcluster.tools import Tool
plane = start_cluster(Path(sys.argv[1]))
start_relay(plane.node, "127.0.0.1:9")
kubectl = Tool("kubectl", plane.kubeconfig_path, "default")
kubectl.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleeper"},
    "spec": {"containers": [{"name": "s", "image": "k8s.gcr.io/pause:3.2",
                             "imagePullPolicy": "Never"}]}})
wait_for_pod(kubectl, "sleeper", {"Running"})
print("ready", flush=True)
time.sleep(600)
"""


def sysctls() -> dict[str, str]:
    return {k: Path("/proc/sys", k).read_text().strip() for k in KUBELET_SYSCTLS}


def network_of_a_node(state_dir: Path) -> Link:
    """What a node has on the host between `prepare` and the start of its processes, or after
    they were all killed with no teardown: its namespace and veth pair."""
    with host_lock():
        link = allocate_link(node_id(state_dir))
        create_network(link)
    return link


def host_has(link: Link) -> bool:
    interfaces = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    return netns_exists(link.netns) or link.host_interface in interfaces


def wait_until_clean(state_dir: Path, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    left = leftovers(state_dir)
    while time.monotonic() < deadline and any(left.values()):
        time.sleep(0.5)
        left = leftovers(state_dir)
    return left


def test_killing_the_owner_tears_the_node_down(tmp_path: Path) -> None:
    require_node()
    # A record left by nodes that died holds what the host had before them.
    before = record["sysctls"] if (record := host_record()) else sysctls()
    dead_before_start = network_of_a_node(tmp_path / "dead-before")
    leases: list[int] = []
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(tmp_path / "cluster"), str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline()
        assert line.strip() == "ready", f"the owner exited with {owner.wait()} before its Pod ran"
        running = leftovers(tmp_path / "cluster")
        assert running["processes"]
        assert processes_naming("aar-egress:"), "the relay should run until the node goes"
        assert running["cgroups"]
        assert running["namespaces"]
        assert guard_installed()
        assert not host_has(dead_before_start), "starting a node removes what dead nodes left"
        dead_while_running = network_of_a_node(tmp_path / "dead-while")
        alive = network_of_a_node(tmp_path / "alive")
        leases.append(take_lease(alive.node_id))
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait()
        assert wait_until_clean(tmp_path / "cluster") == {
            "socket_dir": [],
            "processes": [],
            "mounts": [],
            "cgroups": [],
            "interfaces": [],
            "namespaces": [],
        }
        assert not host_has(dead_while_running), "a node's teardown removes what dead ones left"
        # Another node lives: the shared pieces stay.
        assert host_has(alive)
        assert guard_installed()
        assert host_record() is not None
        os.close(leases.pop())
        teardown(tmp_path / "alive" / "node")
        assert not host_has(alive)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (guard_installed() or host_record()):
            time.sleep(0.5)
        assert not guard_installed()
        assert host_record() is None
        assert sysctls() == before
        assert not Path("/var/lib/kubelet").exists()
        assert not processes_naming("aar-egress:")
    finally:
        if owner.poll() is None:
            os.killpg(owner.pid, signal.SIGKILL)
            owner.wait()
        for lease in leases:
            os.close(lease)
        for name in ("dead-before", "dead-while", "alive"):
            teardown(tmp_path / name / "node")
