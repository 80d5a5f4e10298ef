"""`aar-devcluster`: the local control plane for humans.

aar-devcluster install   build or fetch the binaries into ~/.cache/aar/bin (idempotent)
aar-devcluster up        start the control plane (etcd, kube-*) and, as root, its node
aar-devcluster demo      up, aar installed with helm on the node, examples/run-local.yaml watched
aar-devcluster status    say whether it runs and where
aar-devcluster down      stop it (and the demo's processes), keeping its data for the next `up`
aar-devcluster destroy   stop it and delete its data (the demo's too)
aar-devcluster images    build the images of images/Dockerfile into archives for the node
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from aar_devcluster import demo, images
from aar_devcluster.controlplane import ControlPlane, ControlPlaneError
from aar_devcluster.deploy import DeployError
from aar_devcluster.images import ImageBuildError
from aar_devcluster.node import NodeError, node_unavailable_reason
from aar_devcluster.paths import BinariesMissingError, bin_dir, cluster_dir, install_script
from aar_devcluster.tools import ToolError


def _progress(message: str) -> None:
    print(f"[aar-devcluster] {message}", file=sys.stderr, flush=True)


def how_to_use(control_plane: ControlPlane) -> str:
    """What a human types to point kubectl and helm at the cluster."""
    tools = bin_dir()
    return (
        f"Point kubectl and helm at it (the project's own binaries, kubectl 1.33 and helm 4):\n"
        f"  export KUBECONFIG={control_plane.kubeconfig_path}\n"
        f"  export PATH={tools}:$PATH\n"
        f"  kubectl get namespaces\n"
        f"Logs: {control_plane.log_dir}/   Stop: make cluster-down"
    )


def build_images(targets: list[str], force: bool, torch_index_url: str | None) -> int:
    """`aar-devcluster images`: progress on stderr, one archive path per line on stdout."""
    started = time.monotonic()
    try:
        built = images.build_images(
            targets, force=force, torch_index_url=torch_index_url, progress=_progress
        )
    except images.ImageBuildError as error:
        print(f"aar-devcluster: {error}", file=sys.stderr)
        return 1
    _progress(f"Images ready in {time.monotonic() - started:.1f} s")
    for result in built:
        print(result.archive)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aar-devcluster", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"where the cluster keeps data, certificates, logs and kubeconfig "
        f"(default {cluster_dir()})",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "install",
        help="install etcd, kube-apiserver, kube-controller-manager, kube-scheduler, "
        "kubectl and helm into the cache",
    )
    up = commands.add_parser("up", help="start the control plane in the background")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness")
    demo_command = commands.add_parser(
        "demo",
        help="up with a node, aar installed with helm from images built here, a 3-agent run "
        "watched until Ctrl-C",
    )
    demo_command.add_argument(
        "--watch-seconds",
        type=float,
        default=None,
        help="stop watching the run after this many seconds (0: do not watch; default: until "
        "Ctrl-C)",
    )
    commands.add_parser("status", help="say whether the control plane runs")
    commands.add_parser("down", help="stop the control plane, keep its data")
    commands.add_parser("destroy", help="stop the control plane and delete its data")
    build = commands.add_parser(
        "images",
        help=f"build images/Dockerfile's targets with buildah into `docker save` archives in "
        f"{images.images_dir()}, and the node's pause image",
    )
    build.add_argument(
        "targets",
        nargs="*",
        metavar="TARGET",
        help=f"targets to build: {', '.join(images.TARGETS)} (default: all)",
    )
    build.add_argument("--force", action="store_true", help="rebuild even when a stamp is current")
    build.add_argument(
        "--torch-index-url",
        help="where the agent image takes torch from (default: a local index of the CPU wheel "
        "on this machine)",
    )
    args = parser.parse_args(argv)

    if args.command == "install":
        return subprocess.call(["bash", str(install_script())])
    if args.command == "images":
        return build_images(args.targets or list(images.TARGETS), args.force, args.torch_index_url)

    without_node = node_unavailable_reason()
    control_plane = ControlPlane(args.state_dir or cluster_dir(), with_node=without_node is None)
    try:
        if args.command == "up":
            if without_node:
                _progress(f"Starting without a node: {without_node}")
            started = time.monotonic()
            state = control_plane.start(timeout=args.timeout, progress=_progress)
            _progress(f"Up in {time.monotonic() - started:.1f} s")
            print(f"Control plane running at {state.server}\n{how_to_use(control_plane)}")
        elif args.command == "demo":
            if without_node:
                raise demo.DemoError(f"the demo runs agents on a local node, and {without_node}")
            if not control_plane.is_running():
                control_plane.start(timeout=240, progress=_progress)
            print(demo.run(control_plane, _progress, args.watch_seconds))
        elif args.command == "status":
            if not control_plane.is_running():
                print(f"Not running (state dir {control_plane.state_dir})")
                return 1
            running = control_plane.read_state()
            assert running is not None
            print(f"Running at {running.server}, pids {running.pids}\n{how_to_use(control_plane)}")
        elif args.command == "down":
            demo.Demo(control_plane, _progress).stop()
            control_plane.stop()
            print(f"Stopped; data kept in {control_plane.state_dir}")
        elif args.command == "destroy":
            demo.Demo(control_plane, _progress).stop()
            control_plane.destroy()
            print(f"Stopped and deleted {control_plane.state_dir}")
    except (
        BinariesMissingError,
        ControlPlaneError,
        DeployError,
        ImageBuildError,
        NodeError,
        demo.DemoError,
        ToolError,
    ) as error:
        print(f"aar-devcluster: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
