"""A research run on the local node, end to end: from `kubectl apply` of an N-agent ResearchRun to
N agent Pods Running, and to the run's first scored submission (target: within 5 minutes with the
offline researcher), side by side with the node's own floor, N bare Pods of the agent image
created with `kubectl create` and timed to Running, in the same cluster.

    .venv/bin/python bench/e2e.py [--agents 9]

Needs root (the node). Images are built or taken from the cache first, outside the timings.
Prints the figures, then one JSON object with them as the last line.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from aar_devcluster import deploy
from aar_devcluster.controlplane import ControlPlane
from aar_devcluster.demo import Demo, port_forward, run_manifest
from aar_devcluster.node import node_unavailable_reason
from aar_devcluster.tools import Tool

FIRST_SUBMISSION_TARGET_S = 300.0


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def bare_pods(image: str, count: int) -> list[dict[str, Any]]:
    """The floor: Pods of the agent image that only sleep, with the sandbox's requests."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"bare-{i}", "labels": {"bench": "bare"}},
            "spec": {
                "containers": [
                    {
                        "name": "sleep",
                        "image": image,
                        "imagePullPolicy": "Never",
                        "command": ["sleep", "3600"],
                        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
                    }
                ]
            },
        }
        for i in range(count)
    ]


def millicores(quantity: str) -> int:
    """A Kubernetes CPU quantity ("250m", "2", "0.5") in millicores."""
    return int(quantity[:-1]) if quantity.endswith("m") else int(float(quantity) * 1000)


def cpu_share(plane: ControlPlane, agents: int) -> str:
    """What each agent can ask for once the services have theirs: the node's allocatable CPU
    less every running Pod's request, split evenly (a request is also the sandbox's limit, so
    asking for less than this leaves cores idle while the agents wait on their quota)."""
    admin = Tool("kubectl", plane.kubeconfig_path)
    node = admin.json("get", "nodes")["items"][0]
    free = millicores(node["status"]["allocatable"]["cpu"])
    for pod in admin.json("get", "pods", "--all-namespaces")["items"]:
        if pod["status"].get("phase") in ("Pending", "Running"):
            for container in pod["spec"]["containers"]:
                free -= millicores(
                    container.get("resources", {}).get("requests", {}).get("cpu", "0")
                )
    return f"{max(50, free // agents // 10 * 10)}m"


def running(kubectl: Tool, selector: str) -> int:
    pods = kubectl.json("get", "pods", "-l", selector)["items"]
    return sum(1 for p in pods if p["status"].get("phase") == "Running")


def wait_running(kubectl: Tool, selector: str, count: int, timeout: float = 600) -> float:
    started = time.monotonic()
    while running(kubectl, selector) < count:
        if time.monotonic() - started > timeout:
            raise SystemExit(f"{selector}: fewer than {count} Pods Running after {timeout:.0f} s")
        time.sleep(0.25)
    return time.monotonic() - started


def first_scored(plane: ControlPlane, credential: str, run: str, log: Path) -> bool:
    process, port = port_forward(plane.kubeconfig_path, deploy.SCORER_NAMESPACE, "aar-scorer", log)
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/v1/leaderboard?run={deploy.RUN_NAMESPACE}/{run}",
            headers={"Authorization": f"Bearer {credential}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            board = json.loads(response.read())
    finally:
        process.kill()
        process.wait()
    return any(s.get("private_score") is not None for s in board.get("submissions", []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=9)
    args = parser.parse_args()
    if reason := node_unavailable_reason():
        raise SystemExit(f"bench/e2e.py needs the local node: {reason}")
    with tempfile.TemporaryDirectory(prefix="aar-bench-e2e-") as scratch:
        plane = ControlPlane(Path(scratch) / "cluster", die_with_parent=True, with_node=True)
        started = time.monotonic()
        plane.start(timeout=240, progress=say)
        cluster_s = time.monotonic() - started
        try:
            started = time.monotonic()
            installation = deploy.install(plane, say)
            install_s = time.monotonic() - started
            kubectl = Tool("kubectl", plane.kubeconfig_path, deploy.RUN_NAMESPACE)

            say(f"Floor: {args.agents} bare Pods of {installation.agent_image}")
            kubectl.apply(*bare_pods(installation.agent_image, args.agents))
            bare_s = wait_running(kubectl, "bench=bare", args.agents)
            kubectl.run("delete", "pods", "-l", "bench=bare", "--wait=true", timeout=120)

            manifest = copy.deepcopy(run_manifest())
            run = manifest["metadata"]["name"]
            manifest["spec"]["agents"] = args.agents
            # The agents share what the services leave of the node's cores, evenly.
            share = cpu_share(plane, args.agents)
            manifest["spec"]["sandbox"]["resources"].update({"cpu": share, "memory": "1Gi"})
            credential = Demo(plane, say).admin_credential()
            say(f"Applying a {args.agents}-agent run, {share} of CPU each")
            applied = time.monotonic()
            kubectl.apply(manifest)
            agents_s = wait_running(kubectl, f"aar.dev/run={run}", args.agents)
            log = Path(scratch) / "forward.log"
            while not first_scored(plane, credential, run, log):
                if time.monotonic() - applied > 1800:
                    raise SystemExit("no scored submission within 30 minutes")
                time.sleep(5)
            submission_s = time.monotonic() - applied
        finally:
            plane.destroy()
    figures = {
        "agents": args.agents,
        "agent_cpu": share,
        "cluster_start_s": round(cluster_s, 1),
        "install_s": round(install_s, 1),
        "bare_pods_running_s": round(bare_s, 1),
        "agent_pods_running_s": round(agents_s, 1),
        "agent_pods_vs_bare": round(agents_s / bare_s, 2),
        "first_scored_submission_s": round(submission_s, 1),
        "first_submission_target_s": FIRST_SUBMISSION_TARGET_S,
        "first_submission_target_met": submission_s <= FIRST_SUBMISSION_TARGET_S,
    }
    print(f"cluster with its node up:          {cluster_s:7.1f} s")
    print(f"aar installed (images cached):     {install_s:7.1f} s  (import, DNS, helm, Ready)")
    print(f"{args.agents} bare Pods Running (floor):     {bare_s:7.1f} s")
    ratio = agents_s / bare_s
    print(f"{args.agents} agent Pods Running after apply: {agents_s:7.1f} s  ({ratio:.2f}x)")
    print(
        f"first scored submission:           {submission_s:7.1f} s  "
        f"(target {FIRST_SUBMISSION_TARGET_S:.0f} s)"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
