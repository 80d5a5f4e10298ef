"""The node's supervisor: `python -m aar_devcluster.noderun`, started by `Node.start`.

It starts the forwarder from the link's host end to the apiserver and the volume provisioner
while still in the host's network namespace, then enters the node's network namespace and a
private mount namespace (with a tmpfs over each of the host paths the kubelet and containerd use
whatever they are told), and runs containerd, the kubelet and kube-proxy there. On SIGTERM or
SIGINT, or when one of them exits, it stops the kubelet and kube-proxy, kills the pods'
containers, then stops containerd; the mount namespace, with every mount made in it, goes when
its last process does.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from aar_devcluster.node import (
    CREATED_PATHS,
    PRIVATE_PATHS,
    kill_processes,
    remove_cgroups,
    spawn_logged,
    teardown,
)

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 1 << 19
# Then any other node process (Prometheus).
START_ORDER = ("containerd", "kubelet", "kube-proxy")

_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def enter_network_namespace(name: str) -> None:
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"setns into {name}")
    finally:
        os.close(fd)


def make_private_mounts(paths: dict[str, str | None], node_dir: Path) -> list[Path]:
    """A mount namespace of our own that still sees the host's mounts, with a tmpfs over each
    path, or the node's own directory where one is named. The mount points this had to make on
    the host are listed first, so that whoever stops the node removes them even after a crash."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare the mount namespace")
    _check(_libc.mount(None, b"/", None, MS_REC | MS_SLAVE, None), "make / a slave mount")
    created = [Path(p) for p in paths if not Path(p).exists()]
    (node_dir / CREATED_PATHS).write_text(json.dumps([str(p) for p in created]))
    for path, source in paths.items():
        Path(path).mkdir(parents=True, exist_ok=True)
        if source is None:
            result = _libc.mount(b"tmpfs", path.encode(), b"tmpfs", 0, b"mode=0755")
        else:
            (node_dir / source).mkdir(parents=True, exist_ok=True)
            result = _libc.mount(
                str(node_dir / source).encode(), path.encode(), None, MS_BIND, None
            )
        _check(result, f"mount {source or 'a tmpfs'} on {path}")
    return created


def _die_with_parent() -> None:
    _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Supervisor:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = False

    def spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        process = spawn_logged(command, self.log_dir / f"{name}.log", _die_with_parent)
        self.processes[name] = process
        return process

    def stop(self, name: str, grace: float = 10.0) -> None:
        process = self.processes.get(name)
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def first_exited(self, names: tuple[str, ...]) -> str | None:
        for name in names:
            process = self.processes.get(name)
            if process is not None and process.poll() is not None:
                return name
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aar_devcluster.noderun")
    parser.add_argument("--netns", required=True)
    parser.add_argument(
        "--commands", type=Path, required=True, help="JSON: {host|node: {name: argv}}"
    )
    parser.add_argument("--log-dir", type=Path, required=True)
    parser.add_argument("--cgroup", required=True, help="the cgroup that holds the pods")
    args = parser.parse_args(argv)
    commands: dict[str, dict[str, list[str]]] = json.loads(args.commands.read_text())
    node_dir = str(args.commands.parent)
    supervisor = Supervisor(args.log_dir)

    def on_signal(_signum: int, _frame: object) -> None:
        supervisor.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    # Kept to come back: the host-side teardown runs here too, so a node whose owner died (and
    # sent us SIGTERM) leaves nothing behind.
    host_network = os.open("/proc/self/ns/net", os.O_RDONLY)
    host_mounts = os.open("/proc/self/ns/mnt", os.O_RDONLY)
    # The forwarder and the provisioner talk to the apiserver's loopback port: started before
    # the namespaces are entered, they stay in the host's.
    for name, command in commands["host"].items():
        supervisor.spawn(name, command)
    enter_network_namespace(args.netns)
    created = make_private_mounts(PRIVATE_PATHS, args.commands.parent)
    try:
        others = [n for n in commands["node"] if n not in START_ORDER]
        for name in [*START_ORDER, *others]:
            supervisor.spawn(name, commands["node"][name])
            print(f"Started {name} (pid {supervisor.processes[name].pid})", flush=True)
        while not supervisor.stopping:
            # Only the node's own processes are vital; Prometheus or a helper exiting is logged.
            exited = supervisor.first_exited(START_ORDER)
            if exited is not None:
                code = supervisor.processes[exited].returncode
                print(f"{exited} exited with code {code}; stopping the node", flush=True)
                break
            time.sleep(0.2)
    finally:
        # The kubelet first, so it restarts no container; then the containers; then containerd
        # and its shims, which would otherwise outlive it.
        for name in ("kubelet", "kube-proxy"):
            supervisor.stop(name)
        with contextlib.suppress(Exception):
            remove_cgroups(args.cgroup)
        supervisor.stop("containerd")
        kill_processes(node_dir)
        for name in commands["host"]:
            supervisor.stop(name, grace=2)
        for path in created:
            _libc.umount2(str(path).encode(), 2)  # MNT_DETACH
        _check(_libc.setns(host_mounts, CLONE_NEWNS), "return to the host's mount namespace")
        _check(_libc.setns(host_network, CLONE_NEWNET), "return to the host's network namespace")
        teardown(Path(node_dir))
        print("Stopped and removed the node's network, cgroups and mount points", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
