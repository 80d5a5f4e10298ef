"""A 900-agent ResearchRun materialised by the operator, side by side with `kubectl create -f` of
the same final objects, on one local control plane (issue 3's target: the operator within 2.0x
of kubectl, its peak RSS under 300 MB).

    .venv/bin/python bench/operator_scale.py [--agents 900]

Both sides start from an empty cluster: the operator first (it reconciles every AgentSandbox in
the cluster, so it must not see kubectl's), then its namespace is deleted and waited for, then
kubectl. kubectl creates the run, its AgentSandboxes and every child of every sandbox (without
status or owner references: it cannot know the owners' uids); the operator is handed only the
run and is timed until every child of every sandbox exists.
Prints the figures, then one JSON object with them as the last line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from aar_devcluster.controlplane import ControlPlane
from aar_devcluster.tools import Tool
from aar_operator import builders
from aar_operator.builders import Owner, Sandbox
from aar_operator.cli import CRD_DIRECTORIES
from aar_operator.config import OperatorConfig
from aar_operator.local import OperatorProcess
from aar_operator.models import API_VERSION, AgentSandboxSpec, ResearchRunSpec

RATIO_TARGET = 2.0
RSS_TARGET_MB = 300.0
KINDS = [
    "agentsandboxes",
    "serviceaccounts",
    "secrets",
    "persistentvolumeclaims",
    "pods",
    "networkpolicies",
]


def research_run(agents: int) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "ResearchRun",
        "metadata": {"name": "scale"},
        "spec": {
            "agents": agents,
            "directions": ["unsupervised elicitation", "data reweighting", "ensembling"],
            "task": {"name": "w2s-chat"},
            "sandbox": {
                "image": "agent:bench",
                "resources": {"gpu": 1, "cpu": "8", "memory": "64Gi"},
            },
            "budget": {"usd": 18000, "agentHours": 800},
        },
    }


def same_objects(namespace: str, run: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object the operator makes for `run`, built by the operator's own builders."""
    spec = ResearchRunSpec.model_validate(run["spec"])
    owner = Owner(API_VERSION, "ResearchRun", run["metadata"]["name"], "uid-of-run")
    objects = [{**run, "metadata": {**run["metadata"], "namespace": namespace}}]
    config = OperatorConfig()
    for index in range(spec.agents):
        made = builders.research_sandbox(namespace, owner, spec, index, None)
        sandbox = Sandbox(
            namespace,
            made["metadata"]["name"],
            f"uid-{index}",
            AgentSandboxSpec.model_validate(made["spec"]),
            owner,
        )
        children = [
            made,
            builders.service_account(sandbox),
            builders.credential_secret(sandbox, "aar1.bench.credential"),
            builders.workspace_pvc(sandbox),
            builders.network_policy(sandbox, config),
            builders.pod(sandbox, config),
        ]
        for child in children:
            # Owner uids exist only once the owners do; kubectl creates without them.
            child["metadata"].pop("ownerReferences", None)
        objects += children
    return objects


def count(kubectl: Tool, kind: str) -> int:
    return len(
        kubectl.run("get", kind, "-l", "aar.dev/run=scale", "-o", "name", timeout=300).split()
    )


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bench_kubectl(plane: ControlPlane, agents: int, workdir: Path) -> float:
    admin = Tool("kubectl", plane.kubeconfig_path)
    admin.run("create", "namespace", "bench-kubectl")
    manifest = workdir / "objects.yaml"
    manifest.write_text(yaml.safe_dump_all(same_objects("bench-kubectl", research_run(agents))))
    kubectl = Tool("kubectl", plane.kubeconfig_path, "bench-kubectl")
    started = time.monotonic()
    kubectl.run("create", "-f", str(manifest), timeout=3600)
    return time.monotonic() - started


def bench_operator(plane: ControlPlane, agents: int, workdir: Path) -> tuple[float, float]:
    admin = Tool("kubectl", plane.kubeconfig_path)
    admin.run("create", "namespace", "bench-operator")
    # The operator lives in a namespace of its own: it refuses runs in its own namespace.
    admin.run("create", "namespace", "bench-operator-home")
    kubectl = Tool("kubectl", plane.kubeconfig_path, "bench-operator")
    # No resync during the measurement: what is timed is the first materialisation.
    process = OperatorProcess(
        plane.kubeconfig_path,
        "bench-operator-home",
        workdir / "operator.log",
        resync=3600,
        verbose=False,
    )
    process.start()
    assert process.pid is not None
    try:
        time.sleep(5)  # let it log in and start watching: not part of materialising a run
        started = time.monotonic()
        kubectl.apply(research_run(agents))
        # The Pod is each sandbox's last child: when all Pods exist, so does everything else.
        while (pods := count(kubectl, "pods")) < agents:
            print(f"  operator: {pods}/{agents} Pods after {time.monotonic() - started:.0f} s")
            time.sleep(1)
        elapsed = time.monotonic() - started
        missing = {kind: agents - n for kind in KINDS if (n := count(kubectl, kind)) != agents}
        if missing:
            raise SystemExit(
                f"operator left objects missing: {missing}; see {workdir / 'operator.log'}"
            )
        return elapsed, peak_rss_mb(process.pid)
    finally:
        process.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=900)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aar-bench-") as directory:
        workdir = Path(directory)
        plane = ControlPlane(workdir / "plane", die_with_parent=True)
        plane.start(timeout=180)
        try:
            admin = Tool("kubectl", plane.kubeconfig_path)
            admin.run("apply", "-f", str(CRD_DIRECTORIES[0]))
            for crd in ("researchruns.aar.dev", "agentsandboxes.aar.dev"):
                admin.run("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
            objects = 1 + 6 * args.agents
            operator_s, rss_mb = bench_operator(plane, args.agents, workdir)
            print(f"operator: {objects} objects in {operator_s:.1f} s, peak RSS {rss_mb:.0f} MB")
            admin.run("delete", "namespace", "bench-operator", "--wait=true", timeout=1800)
            kubectl_s = bench_kubectl(plane, args.agents, workdir)
            print(f"kubectl create -f: {objects} objects in {kubectl_s:.1f} s")
        finally:
            plane.destroy()
    ratio = operator_s / kubectl_s
    print(
        f"operator / kubectl: {ratio:.2f}x (target under {RATIO_TARGET}x); "
        f"peak RSS {rss_mb:.0f} MB (target under {RSS_TARGET_MB:.0f} MB)"
    )
    figures = {
        "agents": args.agents,
        "objects": objects,
        "kubectl_create_s": round(kubectl_s, 2),
        "operator_s": round(operator_s, 2),
        "operator_to_kubectl_ratio": round(ratio, 3),
        "ratio_target": RATIO_TARGET,
        "operator_peak_rss_mb": round(rss_mb, 1),
        "rss_target_mb": RSS_TARGET_MB,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
