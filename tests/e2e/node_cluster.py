"""A control plane with its node for the e2e tier, and checks that the host is left as found."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from aar_devcluster import images
from aar_devcluster.addons import DNS_IMAGE_TARGET, install_cluster_dns
from aar_devcluster.controlplane import ControlPlane
from aar_devcluster.node import (
    GUARD_CHAIN,
    HOST_RECORD,
    node_id,
    node_unavailable_reason,
    socket_dir,
)
from aar_devcluster.tools import Tool


def require_node() -> None:
    """Skip without root, with the reason; fail when a tool the project installs is missing."""
    reason = node_unavailable_reason()
    if reason is None:
        return
    if os.geteuid() != 0:
        pytest.skip(reason)
    pytest.fail(reason, pytrace=False)


def start_cluster(state_dir: Path, targets: tuple[str, ...] = (DNS_IMAGE_TARGET,)) -> ControlPlane:
    """A control plane and node that die with this process, the images of `targets` (built or
    taken from the cache) imported, and cluster DNS running."""
    require_node()
    plane = ControlPlane(state_dir, die_with_parent=True, with_node=True)
    plane.start(timeout=240)
    try:
        built = images.build_images(targets)
        images.import_images([b.archive for b in built], plane.node.containerd_socket)
        version = images.chart_version(images.repo_root())
        install_cluster_dns(
            Tool("kubectl", plane.kubeconfig_path), images.image_name(DNS_IMAGE_TARGET, version)
        )
    except BaseException:
        plane.destroy()
        raise
    return plane


def wait_for_pod(kubectl: Tool, name: str, phases: set[str], timeout: float = 90) -> dict[str, Any]:
    """The Pod once its phase is one of `phases`; fails with its events when it never gets there."""
    deadline = time.monotonic() + timeout
    pod: dict[str, Any] = {}
    while time.monotonic() < deadline:
        pod = kubectl.json("get", "pod", name)
        if pod.get("status", {}).get("phase") in phases:
            return pod
        time.sleep(0.5)
    events = kubectl.run("get", "events", "--field-selector", f"involvedObject.name={name}")
    raise AssertionError(f"pod {name} never reached {phases}: {pod.get('status')}\n{events}")


def leftovers(state_dir: Path) -> dict[str, Any]:
    """What a node of `state_dir` could have left on the host: everything should be empty."""
    node = node_id(state_dir.resolve())
    # The node's own processes name its state dir; containerd's shims name its socket dir.
    markers = (str(state_dir.resolve()).encode(), str(socket_dir(node)).encode())
    processes = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                if any(marker in cmdline for marker in markers):
                    processes.append(int(entry.name))
            except OSError:
                continue
    mounts = [line for line in Path("/proc/mounts").read_text().splitlines() if node in line]
    mounts += [
        line
        for line in Path("/proc/mounts").read_text().splitlines()
        if str(state_dir.resolve()) in line
    ]
    cgroups = [str(h) for h in Path("/sys/fs/cgroup").iterdir() if (h / f"aar-{node}").exists()]
    links = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    namespaces = os.listdir("/run/netns") if Path("/run/netns").is_dir() else []
    return {
        "socket_dir": [str(socket_dir(node))] if socket_dir(node).exists() else [],
        "processes": processes,
        "mounts": mounts,
        "cgroups": cgroups,
        "interfaces": [line for line in links.splitlines() if node in line],
        "namespaces": [n for n in namespaces if node in n],
    }


def guard_installed() -> bool:
    result = subprocess.run(["iptables", "-S", GUARD_CHAIN], capture_output=True, check=False)
    return result.returncode == 0


def host_record() -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = json.loads(HOST_RECORD.read_text())
        return record
    except FileNotFoundError:
        return None
