"""A node leaves nothing on the host: not when stopped, not when its owner is killed.

Runs with no other node on the machine (the other modules' clusters are module-scoped and gone
by now), so the shared pieces (the guard chain, the kubelet's sysctls) must go too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from node_cluster import guard_installed, host_record, leftovers, require_node

from aar_devcluster.node import KUBELET_SYSCTLS, processes_naming

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


def wait_until_clean(state_dir: Path, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    left = leftovers(state_dir)
    while time.monotonic() < deadline and any(left.values()):
        time.sleep(0.5)
        left = leftovers(state_dir)
    return left


def test_killing_the_owner_tears_the_node_down(tmp_path: Path) -> None:
    require_node()
    before = sysctls()
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
