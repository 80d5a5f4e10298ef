"""aar installed on the local cluster's node as a user installs it: images built here and imported,
`helm install charts/aar`, the Secrets and the task volume a user makes, then a ResearchRun.

Without `ANTHROPIC_API_KEY` the gateway's upstream is the Messages-API stand-in running the
offline researcher (`aar_devcluster.offline_researcher`), as a Pod of its own, so every agent's
loop, tools, training, posts and submissions are real while no request leaves the machine.
With a key, the gateway reaches api.anthropic.com through the node's one relay (egress.py).
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from aar_devcluster import egress, images
from aar_devcluster.addons import DNS_IMAGE_TARGET, install_cluster_dns, one_pod_deployment
from aar_devcluster.controlplane import ControlPlane
from aar_devcluster.tools import Tool
from aar_operator.naming import task_claim_name

REPO = Path(__file__).resolve().parent.parent
RELEASE = "aar"
SYSTEM_NAMESPACE = "aar-system"
SCORER_NAMESPACE = "aar-scorer"
RUN_NAMESPACE = "research"
VERIFY_NAMESPACE = "aar-verify"
UPSTREAM = "aar-upstream"
UPSTREAM_PORT = 8080
# `aar-train demo`'s task: its bundle and tiny models go on the task volume.
TASK = "cues"
# Accuracies of `aar-train w2s` on the demo task (docs/trainer.md): what PGR is measured against.
TASK_BASELINES = {"weak": 0.61, "ceiling": 0.96}


@dataclass(frozen=True)
class DemoTask:
    """A task `aar-train demo` makes, on the volume the operator mounts for it."""

    name: str
    namespace: str
    demo_args: tuple[str, ...]
    baselines: dict[str, float]


# The run's task, and where its leading submissions are reproduced (docs/scorer.md,
# Reproduction): a fresh draw of its examples (same words, same models), and a transfer task of
# the same kind with other words and other tiny models. Baselines as for TASK_BASELINES.
DEMO_TASKS = (
    DemoTask(TASK, RUN_NAMESPACE, (), TASK_BASELINES),
    DemoTask(
        f"{TASK}-fresh", VERIFY_NAMESPACE, ("--split-seed", "1"), {"weak": 0.63, "ceiling": 0.97}
    ),
    DemoTask(
        f"{TASK}-transfer", VERIFY_NAMESPACE, ("--seed", "7"), {"weak": 0.62, "ceiling": 0.96}
    ),
)
CHART_COMPONENTS = ("operator", "forum", "scorer", "gateway")

Say = Callable[[str], None]


class DeployError(RuntimeError):
    """aar could not be installed on the local cluster; the message says which step and why."""


@dataclass(frozen=True)
class Installation:
    """What a user needs to find what was installed."""

    version: str
    agent_image: str
    offline: bool


def import_all(plane: ControlPlane, say: Say) -> str:
    """Build (or take from the cache) every image and import it into the node; the version."""
    built = images.build_images(progress=say)
    started = time.monotonic()
    images.import_images([b.archive for b in built], plane.node.containerd_socket)
    say(f"Imported {len(built)} images into the node in {time.monotonic() - started:.0f} s")
    return images.chart_version(images.repo_root())


def upstream_stand_in(image: str, api_key: str) -> list[dict[str, Any]]:
    """The Messages-API stand-in with the offline researcher, as a Deployment and Service."""
    labels = {"app.kubernetes.io/name": UPSTREAM, "app.kubernetes.io/part-of": "aar"}
    container = {
        "name": "upstream",
        "image": image,
        "imagePullPolicy": "Never",
        "command": [
            "python",
            "-m",
            "aar_devcluster.anthropic_stub",
            "--host=0.0.0.0",
            f"--port={UPSTREAM_PORT}",
            "--researcher",
            # Expanded by the kubelet from the Secret below: the key is never in the Pod's spec.
            "--api-key=$(AAR_STUB_API_KEY)",
        ],
        "env": [
            {
                "name": "AAR_STUB_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": "anthropic-api-key", "key": "api-key"}},
            }
        ],
        "ports": [{"name": "api", "containerPort": UPSTREAM_PORT}],  # not "metrics": not scraped
        "readinessProbe": {"tcpSocket": {"port": UPSTREAM_PORT}, "periodSeconds": 2},
        "resources": {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"cpu": "1", "memory": "256Mi"},
        },
    }
    meta = {"name": UPSTREAM, "namespace": SYSTEM_NAMESPACE, "labels": labels}
    return [
        one_pod_deployment(meta, labels, container),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {"selector": labels, "ports": [{"name": "api", "port": UPSTREAM_PORT}]},
        },
    ]


def chart_values(version: str, offline: bool) -> dict[str, Any]:
    """The chart's values for this machine: images imported by hand, the demo task, and the
    stand-in upstream when offline."""
    values: dict[str, Any] = {
        name: {"image": {"tag": version, "pullPolicy": "Never"}} for name in CHART_COMPONENTS
    }
    values["scorer"]["tasks"] = [
        {
            "name": TASK,
            "metric": "accuracy",
            "labels": [0, 1],
            "baselines": TASK_BASELINES,
            # The demo task has 250 public labels: under the default budget (1/8 of them) a
            # blind guess's own spread leaves no room for feedback at all. A budget just under
            # n/4 on a coarser grid gives the demo's agents 14 released-or-not answers before
            # its feedback closes, which the demo then shows.
            "feedback": {"step": 0.1, "leakage_budget": 0.24},
            "reproduction": {"fresh": DEMO_TASKS[1].name, "transfer": [DEMO_TASKS[2].name]},
        },
        *(
            {
                "name": target.name,
                "labels": [0, 1],
                "baselines": target.baselines,
                "verification_only": True,
            }
            for target in DEMO_TASKS[1:]
        ),
    ]
    if offline:
        values["gateway"]["upstream"] = f"http://{UPSTREAM}.{SYSTEM_NAMESPACE}:{UPSTREAM_PORT}"
    return values


def secret(name: str, namespace: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": "Opaque",
        "stringData": data,
    }


def namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def task_volume(kubectl: Tool, plane: ControlPlane, task: DemoTask, say: Say) -> Path:
    """The task's read-only bundle volume in its namespace, filled with `aar-train demo`'s
    bundle and models; returns the file of the hidden test labels (for the scorer alone)."""
    # The name the operator mounts in every sandbox, or reproduction Job, of this task.
    claim_name = task_claim_name(task.name)
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim_name, "namespace": task.namespace},
        "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    kubectl.apply(claim)
    deadline = time.monotonic() + 60
    volume = ""
    while not volume:
        volume = kubectl.json("get", "pvc", "-n", task.namespace, claim_name)["spec"].get(
            "volumeName", ""
        )
        if time.monotonic() > deadline:
            raise DeployError(
                f"the volume of task {task.name} was not provisioned in 60 s; see "
                f"{plane.node.log_dir}"
            )
        time.sleep(0.5)
    directory = Path(
        kubectl.json("get", "pv", volume)["spec"]["local"]["path"]
    )  # on this machine: the node's volumes live in its state dir
    work = plane.state_dir / "demo-tasks" / task.name
    labels = work / "test-labels.json"
    if not (directory / "task.json").exists() or not labels.exists():
        say(f"Writing the {task.name} task's bundle and models onto its volume")
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run(
            [str(Path(sys.executable).parent / "aar-train"), "demo", str(work), *task.demo_args],
            check=True,
            capture_output=True,
        )
        for item in (work / "task").iterdir():
            shutil.copy2(item, directory / item.name)
        shutil.copytree(work / "models", directory / "models", dirs_exist_ok=True)
        # Readable by the agents' uid; the volume is mounted read-only.
        for path in [directory, *directory.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    return labels


def install(plane: ControlPlane, say: Say, api_key: str | None = None) -> Installation:
    """Install aar on the running cluster and node; idempotent (helm upgrade --install)."""
    if not plane.node.running():
        raise DeployError("the cluster has no running node: start it with `aar-devcluster up`")
    kubectl = Tool("kubectl", plane.kubeconfig_path)
    helm = Tool("helm", plane.kubeconfig_path, SYSTEM_NAMESPACE)
    version = import_all(plane, say)
    say("Starting cluster DNS")
    install_cluster_dns(kubectl, images.image_name(DNS_IMAGE_TARGET, version))
    offline = not api_key
    for name in (SYSTEM_NAMESPACE, RUN_NAMESPACE):
        kubectl.apply(namespace(name))
    key = api_key or secrets.token_hex(16)
    kubectl.apply(secret("anthropic-api-key", SYSTEM_NAMESPACE, {"api-key": key}))
    if offline:
        say("Starting the offline researcher (the gateway's upstream; no API key set)")
        kubectl.apply(*upstream_stand_in(images.image_name("gateway", version), key))
    else:
        relay = egress.open_egress(plane.node, kubectl, SYSTEM_NAMESPACE)
        say(f"Relaying {egress.ANTHROPIC_API} from the node through {relay} (its only way out)")
    labels = {DEMO_TASKS[0].name: task_volume(kubectl, plane, DEMO_TASKS[0], say)}
    values = plane.state_dir / "chart-values.json"
    values.write_text(json.dumps(chart_values(version, offline)))
    say("Installing charts/aar with helm")
    helm.run(
        "upgrade", "--install", RELEASE, str(REPO / "charts" / "aar"),
        "-f", str(values), timeout=120,
    )  # fmt: skip
    # The reproduction targets' volumes are in the verification namespace the chart makes.
    for target in DEMO_TASKS[1:]:
        labels[target.name] = task_volume(kubectl, plane, target, say)
    kubectl.apply(
        secret(
            "aar-scorer-labels",
            SCORER_NAMESPACE,
            {f"{name}.json": path.read_text() for name, path in labels.items()},
        )
    )
    load_alert_rules(plane, helm, values, say)
    wait_ready(kubectl, say)
    return Installation(version, images.image_name("agent", version), offline)


def load_alert_rules(plane: ControlPlane, helm: Tool, values: Path, say: Say) -> None:
    """The chart's alert rules (its PrometheusRule, rendered) into the node's Prometheus."""
    url = plane.node.prometheus_url
    if url is None or not plane.node.prometheus_rules.is_dir():
        say("No Prometheus on the node (Debian's prometheus is not installed): run `make tools`")
        return
    rendered = helm.run(
        "template", RELEASE, str(REPO / "charts" / "aar"), "-f", str(values),
        "--set", "monitoring.prometheusRule.enabled=true",
        "--show-only", "templates/monitoring-prometheusrule.yaml",
    )  # fmt: skip
    groups = yaml.safe_load(rendered)["spec"]["groups"]
    (plane.node.prometheus_rules / "aar.yml").write_text(yaml.safe_dump({"groups": groups}))
    deadline = time.monotonic() + 60
    while True:
        try:
            request = urllib.request.Request(f"{url}/-/reload", method="POST")
            with urllib.request.urlopen(request, timeout=5):
                break
        except OSError as error:
            if time.monotonic() > deadline:
                raise DeployError(
                    f"Prometheus at {url} did not reload its rules: {error}"
                ) from error
            time.sleep(1)
    say(f"Prometheus at {url} scrapes every service and evaluates the chart's alert rules")


def wait_ready(kubectl: Tool, say: Say, timeout: float = 300) -> None:
    """Every Deployment of the release (and the stand-in) Ready."""
    for namespace_name, deployment in [
        (SYSTEM_NAMESPACE, f"{RELEASE}-operator"),
        (SYSTEM_NAMESPACE, "aar-gateway"),
        (SYSTEM_NAMESPACE, "aar-forum"),
        (SCORER_NAMESPACE, "aar-scorer"),
    ]:
        say(f"Waiting for {namespace_name}/{deployment}")
        kubectl.run(
            "-n", namespace_name, "rollout", "status", f"deployment/{deployment}",
            f"--timeout={int(timeout)}s", timeout=timeout + 10,
        )  # fmt: skip
