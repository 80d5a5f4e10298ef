"""`make demo`: the whole system on one machine, as a user runs it in a cluster.

The local cluster starts with its node; aar is installed with `helm install` from images built
here (`aar_devcluster.deploy`); a ResearchRun of three agents (`examples/run-local.yaml`) is
applied, and its progress is shown until the user stops watching (Ctrl-C). Without
`ANTHROPIC_API_KEY` the agents' model is the offline researcher, labelled as such wherever its
words appear. The forum's web UI is forwarded to a loopback port (`kubectl port-forward`, kept
running until `make cluster-down`).

State (the forwarder's pid and port) lives in `<cluster state dir>/demo/`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from aar_common.credentials import CredentialIssuer
from aar_common.ports import free_port
from aar_devcluster import deploy
from aar_devcluster.controlplane import ControlPlane, write_private
from aar_devcluster.node import node_unavailable_reason
from aar_devcluster.paths import bin_dir, binary
from aar_devcluster.tools import Tool

REPO = Path(__file__).resolve().parent.parent
RUN_FILE = REPO / "examples" / "run-local.yaml"
SIGNING_KEY_SECRET = "aar-credential-signing-key"
SIGNING_KEY_FIELD = "signing-key.pem"


class DemoError(RuntimeError):
    """The demo could not start; the message says which step and how to fix it."""


class Demo:
    """The demo's own processes: the port-forward to the forum's web UI."""

    def __init__(self, control_plane: ControlPlane, say: Callable[[str], None]) -> None:
        self.control_plane = control_plane
        self.say = say
        self.directory = control_plane.state_dir / "demo"
        self.state_path = self.directory / "state.json"

    def _read_state(self) -> dict[str, int]:
        try:
            state: dict[str, int] = json.loads(self.state_path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return state

    def _ours(self, pid: int) -> bool:
        """A recycled pid is never taken for ours: our forwarder names our kubeconfig."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return str(self.control_plane.kubeconfig_path).encode() in cmdline

    def forum_port(self) -> int | None:
        state = self._read_state()
        return state.get("port") if state and self._ours(state.get("pid", 0)) else None

    def forward_forum(self) -> int:
        """The forum's web UI on a loopback port; reuses a forward that runs."""
        if port := self.forum_port():
            return port
        self.directory.mkdir(parents=True, exist_ok=True)
        process, port = port_forward(
            self.control_plane.kubeconfig_path,
            deploy.SYSTEM_NAMESPACE,
            "aar-forum",
            self.directory / "port-forward.log",
        )
        write_private(self.state_path, json.dumps({"pid": process.pid, "port": port}))
        return port

    def stop(self) -> None:
        """Stop the port-forward; safe when none runs."""
        state = self._read_state()
        if state and self._ours(state.get("pid", 0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(state["pid"], signal.SIGTERM)
        if self.state_path.exists():
            write_private(self.state_path, "{}")

    def admin_credential(self) -> str:
        """An admin credential for the web UI and `aar review`, signed with the operator's key."""
        kubectl = Tool("kubectl", self.control_plane.kubeconfig_path, deploy.SYSTEM_NAMESPACE)
        data = kubectl.json("get", "secret", SIGNING_KEY_SECRET)["data"][SIGNING_KEY_FIELD]
        issuer = CredentialIssuer(base64.b64decode(data))
        return issuer.mint_admin("demo", ttl_seconds=7 * 86400)


def port_forward(
    kubeconfig: Path,
    namespace: str,
    service: str,
    log_path: Path,
    health_path: str = "/healthz",
    timeout: float = 30,
) -> tuple[subprocess.Popen[bytes], int]:
    """`kubectl port-forward` of a Service's port 8080 to a free loopback port, once it answers
    `health_path`. Pods' addresses are not routed from the host: the kubelet forwards instead."""
    port = free_port()
    command = [
        str(binary("kubectl")), "--kubeconfig", str(kubeconfig), "-n", namespace,
        "port-forward", "--address=127.0.0.1", f"service/{service}", f"{port}:8080",
    ]  # fmt: skip
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}{health_path}", timeout=2),
        ):
            return process, port
        time.sleep(0.3)
    process.kill()
    process.wait()
    raise DemoError(
        f"{namespace}/{service} could not be forwarded to 127.0.0.1:{port}; see {log_path}"
    )


def run_manifest() -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load(RUN_FILE.read_text())
    return manifest


def forum_posts(port: int, credential: str, limit: int = 3) -> list[dict[str, Any]]:
    """The newest posts, through the forwarded forum; empty when it does not answer."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/posts?limit={limit}",
        headers={"Authorization": f"Bearer {credential}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            posts: list[dict[str, Any]] = json.loads(response.read())["posts"]
            return posts
    except (OSError, ValueError, KeyError):
        return []


def progress(kubectl: Tool, run: str, posts: list[dict[str, Any]]) -> str:
    """One screen of the run: agents by state, spend, submissions, best score, newest posts."""
    researchrun = kubectl.json("get", "researchrun", run)
    sandboxes = kubectl.json("get", "agentsandboxes", "-l", f"aar.dev/run={run}")["items"]
    pods = {p["metadata"]["name"]: p for p in kubectl.json("get", "pods")["items"]}
    states: Counter[str] = Counter()
    for sandbox in sandboxes:
        pod = pods.get(sandbox["metadata"]["name"])
        states[pod["status"].get("phase", "Pending") if pod else "NoPod"] += 1
    status = researchrun.get("status", {})
    spend = status.get("spend", {})
    best = status.get("best") or {}
    lines = [
        time.strftime("%H:%M:%S")
        + f"  run {run}: agents "
        + (", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none yet")
        + f"  |  spend ${float(spend.get('usd', 0)):.4f}"
        + f" ({spend.get('inputTokens', 0)} in / {spend.get('outputTokens', 0)} out tokens)"
        + (f"  |  best {best.get('score')} ({best.get('agent')})" if best else "  |  best: none")
    ]
    for post in posts:
        title = post.get("title") or post.get("body", "")[:60]
        lines.append(f"    {post.get('kind', 'post'):8} {post.get('author', '?'):10} {title}")
    return "\n".join(lines)


def watch(demo: Demo, kubectl: Tool, run: str, seconds: float | None) -> None:
    """Print the run's progress every few seconds until Ctrl-C (or for `seconds`)."""
    port = demo.forward_forum()
    credential = demo.admin_credential()
    end = time.monotonic() + seconds if seconds is not None else float("inf")
    demo.say("Watching the run; Ctrl-C stops watching (the run goes on)")
    with contextlib.suppress(KeyboardInterrupt):
        while time.monotonic() < end:
            print(progress(kubectl, run, forum_posts(port, credential)), flush=True)
            time.sleep(5)


def run(
    control_plane: ControlPlane, say: Callable[[str], None], watch_seconds: float | None
) -> str:
    """Bring the whole demo up, watch it, and return what to tell the human."""
    reason = node_unavailable_reason()
    if reason:
        raise DemoError(f"the demo runs agents on a local node, and {reason}")
    installation = deploy.install(control_plane, say, os.environ.get("ANTHROPIC_API_KEY") or None)
    manifest = run_manifest()
    name = manifest["metadata"]["name"]
    kubectl = Tool("kubectl", control_plane.kubeconfig_path, deploy.RUN_NAMESPACE)
    say(f"Applying {RUN_FILE.relative_to(REPO)} ({manifest['spec']['agents']} agents)")
    kubectl.apply(manifest)
    demo = Demo(control_plane, say)
    if watch_seconds != 0:
        watch(demo, kubectl, name, watch_seconds)
    port = demo.forward_forum()
    credential = demo.admin_credential()
    table = kubectl.run("get", "researchruns,agentsandboxes,pods")
    model = (
        "the offline researcher (no ANTHROPIC_API_KEY set)" if installation.offline else "Claude"
    )
    return (
        f"{table}\n"
        f"{manifest['spec']['agents']} agents run in Pods on the local node; their model is "
        f"{model}.\n\n"
        f"Watch it:\n"
        f"  export KUBECONFIG={control_plane.kubeconfig_path}\n"
        f"  export PATH={bin_dir()}:$PATH\n"
        f"  kubectl get researchruns,agentsandboxes,pods -n {deploy.RUN_NAMESPACE}\n"
        f"  kubectl logs -n {deploy.RUN_NAMESPACE} {name}-0 -f\n"
        f"Research console: http://127.0.0.1:{port}/runs/{deploy.RUN_NAMESPACE}/{name}\n"
        f"  (sign in with this admin credential, valid 7 days:)\n"
        f"  {credential}\n"
        f"Review from the command line (the same decisions as the console's):\n"
        f"  kubectl port-forward -n {deploy.SCORER_NAMESPACE} service/aar-scorer 8081:8080 &\n"
        f"  export AAR_SCORER_URL=http://127.0.0.1:8081 AAR_CREDENTIAL={credential}\n"
        f"  aar review list\n"
        f"  aar review approve ID --comment 'why'   (or reject)\n"
        f"Metrics, on each component's metrics port (9090; never on its API port, 8080):\n"
        f"  kubectl port-forward -n {deploy.SYSTEM_NAMESPACE} "
        f"deployment/{deploy.RELEASE}-operator 9094:9090\n"
        f"  kubectl port-forward -n {deploy.SYSTEM_NAMESPACE} service/aar-forum 9091:9090\n"
        f"  kubectl port-forward -n {deploy.SYSTEM_NAMESPACE} service/aar-gateway 9092:9090\n"
        f"  kubectl port-forward -n {deploy.SCORER_NAMESPACE} service/aar-scorer 9093:9090\n"
        f"  then http://127.0.0.1:9094/metrics (9091, 9092, 9093)\n"
        f"Prometheus (every service scraped, the chart's alert rules loaded): "
        f"{control_plane.node.prometheus_url}/\n"
        f"Stop everything: make cluster-down"
    )
