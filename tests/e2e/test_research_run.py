"""The product on the local node: aar installed with helm from images built here, a 3-agent run
of the offline researcher, and what a user expects of it: posts, artifacts and scored
submissions from every agent, spend equal to what the upstream reported, a human approval that
counts, agents that come back and resume, and a deleted run that leaves nothing.

The tests share one installation and run in file order, each building on the run's state."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from archives import tar_gz
from node_cluster import require_node

from aar_devcluster import deploy
from aar_devcluster.controlplane import ControlPlane
from aar_devcluster.demo import Demo, port_forward, run_manifest
from aar_devcluster.tools import Tool
from aar_trainer.demo import demo_w2s_flags

# The installation builds and imports every image (minutes when the code changed), and the
# agents train for real on two cores.
pytestmark = pytest.mark.timeout(1800)

RUN = run_manifest()["metadata"]["name"]
AGENTS = [f"{RUN}-{i}" for i in range(run_manifest()["spec"]["agents"])]
NS = deploy.RUN_NAMESPACE


@dataclass
class Installed:
    plane: ControlPlane
    kubectl: Tool
    admin: Tool
    credential: str
    logs: Path

    def get(self, namespace: str, service: str, path: str, health: str = "/healthz") -> Any:
        """GET a service's API through a port-forward, as an admin."""
        return self.request(namespace, service, "GET", path, health=health)

    def request(
        self,
        namespace: str,
        service: str,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        credential: str | None = None,
        health: str = "/healthz",
    ) -> Any:
        """Call a service's API through a port-forward, as an admin unless `credential` says
        otherwise; its JSON answer."""
        process, port = port_forward(
            self.plane.kubeconfig_path, namespace, service, self.logs / f"{service}.log", health
        )
        try:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}{path}",
                data=body,
                method=method,
                headers={
                    "Authorization": f"Bearer {credential or self.credential}",
                    **(headers or {}),
                },
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        finally:
            process.kill()
            process.wait()


def eventually(check: Callable[[], Any], what: str, timeout: float = 600, every: float = 3) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def pod_phases(kubectl: Tool) -> dict[str, str]:
    pods = kubectl.json("get", "pods", "-l", f"aar.dev/run={RUN}")["items"]
    return {p["metadata"]["name"]: p["status"].get("phase", "") for p in pods}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    require_node()
    plane = ControlPlane(
        tmp_path_factory.mktemp("research-cluster"), die_with_parent=True, with_node=True
    )
    plane.start(timeout=240)
    try:
        deploy.install(plane, lambda message: print(message, flush=True))
        kubectl = Tool("kubectl", plane.kubeconfig_path, NS)
        kubectl.apply(run_manifest())
        logs = tmp_path_factory.mktemp("forwards")
        yield Installed(
            plane,
            kubectl,
            Tool("kubectl", plane.kubeconfig_path),
            Demo(plane, print).admin_credential(),
            logs,
        )
    finally:
        plane.destroy()


def test_every_service_of_the_chart_is_ready(installed: Installed) -> None:
    for namespace in (deploy.SYSTEM_NAMESPACE, deploy.SCORER_NAMESPACE):
        for deployment in installed.admin.json("get", "deployments", "-n", namespace)["items"]:
            name = deployment["metadata"]["name"]
            assert deployment["status"].get("readyReplicas") == 1, name
            for container in deployment["spec"]["template"]["spec"]["containers"]:
                assert container.get("readinessProbe"), name
                assert container["resources"]["limits"], name


def test_every_agent_finishes_its_research(installed: Installed) -> None:
    phases = eventually(
        lambda: (
            (p := pod_phases(installed.kubectl))
            and len(p) == len(AGENTS)
            and all(phase in ("Succeeded", "Failed") for phase in p.values())
            and p
        ),
        what=f"the {len(AGENTS)} agents of {RUN} to finish",
        timeout=1200,
    )
    assert phases == dict.fromkeys(AGENTS, "Succeeded")


def test_every_agent_posted_published_and_submitted(installed: Installed) -> None:
    posts = installed.get(deploy.SYSTEM_NAMESPACE, "aar-forum", "/api/v1/posts?limit=200")["posts"]
    artifacts = installed.get(deploy.SYSTEM_NAMESPACE, "aar-forum", "/api/v1/artifacts?limit=200")
    board = installed.get(
        deploy.SCORER_NAMESPACE, "aar-scorer", f"/api/v1/leaderboard?run={NS}/{RUN}"
    )
    for agent in AGENTS:
        mine = [p for p in posts if p["author"] == agent]
        assert any(p["kind"] == "result" for p in mine), agent
        assert all("[offline researcher]" in (p["title"] + p["body"]) for p in mine), agent
        assert [a for a in artifacts["artifacts"] if a["author"] == agent], agent
        scored = [s for s in board["submissions"] if s["agent"] == agent]
        assert scored, agent
        assert all(s["status"] == "accepted" and s["private_score"] is not None for s in scored)


def test_the_runs_spend_is_what_the_upstream_reported(installed: Installed) -> None:
    reported = installed.get(deploy.SYSTEM_NAMESPACE, deploy.UPSTREAM, "/stub/usage", "/stub/usage")

    def spend_matches() -> dict[str, Any] | None:
        spend = installed.kubectl.json("get", "researchrun", RUN)["status"].get("spend", {})
        tokens = (spend.get("inputTokens"), spend.get("outputTokens"))
        return spend if tokens == (reported["input_tokens"], reported["output_tokens"]) else None

    spend = eventually(spend_matches, what="the run's status to show the metered spend")
    metered = installed.get(deploy.SYSTEM_NAMESPACE, "aar-gateway", f"/api/v1/spend/{NS}/{RUN}")
    assert float(spend["usd"]) == pytest.approx(float(metered["run"]["usd"]), abs=1e-6)
    assert float(spend["usd"]) > 0


def _prometheus(installed: Installed, query: str) -> list[dict[str, Any]]:
    url = installed.plane.node.prometheus_url
    assert url, "the node has no Prometheus"
    address = f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(address, timeout=10) as response:
        result: list[dict[str, Any]] = json.loads(response.read())["data"]["result"]
        return result


def _scraped_pods(installed: Installed) -> dict[str, int]:
    """Running Pods with a port named metrics (where each component serves /metrics, apart
    from its API port), per namespace, as the apiserver has them."""
    counts: dict[str, int] = {}
    for pod in installed.admin.json("get", "pods", "-A")["items"]:
        ports = [p.get("name") for c in pod["spec"]["containers"] for p in c.get("ports", [])]
        if pod["status"].get("phase") == "Running" and "metrics" in ports:
            namespace = pod["metadata"]["namespace"]
            counts[namespace] = counts.get(namespace, 0) + 1
    return counts


def test_prometheus_answers_for_the_runs_spend_and_pods(installed: Installed) -> None:
    metered = installed.get(deploy.SYSTEM_NAMESPACE, "aar-gateway", f"/api/v1/spend/{NS}/{RUN}")
    query = f'sum(aar_llm_spend_usd_total{{run="{NS}/{RUN}"}})'
    expected = float(metered["run"]["usd"])
    eventually(
        lambda: (
            (r := _prometheus(installed, query))
            and float(r[0]["value"][1]) == pytest.approx(expected, abs=1e-6)
        ),
        what=f"Prometheus to answer {query} with {expected}",
        timeout=60,
    )
    up = {
        r["metric"]["namespace"]: int(float(r["value"][1]))
        for r in _prometheus(installed, 'count by (namespace) (up{job="pods"} == 1)')
    }
    assert up == _scraped_pods(installed)
    url = installed.plane.node.prometheus_url
    with urllib.request.urlopen(f"{url}/api/v1/rules", timeout=10) as response:
        groups = json.loads(response.read())["data"]["groups"]
    assert [rule["name"] for group in groups for rule in group["rules"]]


def test_an_approved_submission_becomes_the_runs_best(
    installed: Installed, repo_root: Path
) -> None:
    process, port = port_forward(
        installed.plane.kubeconfig_path,
        deploy.SCORER_NAMESPACE,
        "aar-scorer",
        installed.logs / "review.log",
    )
    try:
        environment = {
            **os.environ,
            "AAR_SCORER_URL": f"http://127.0.0.1:{port}",
            "AAR_CREDENTIAL": installed.credential,
        }
        aar = str(Path(sys.executable).parent / "aar")
        listing = subprocess.run(
            [aar, "review", "list", "--run", f"{NS}/{RUN}"],
            env=environment, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        pending = [line.split()[0] for line in listing.splitlines()[1:]]
        # The run reproduces: a reviewer reads the reproductions before approving. Every
        # pending submission is run again (whatever its rank), and one whose claim held is
        # approved: the highest claims of tiny models are often luck that does not reproduce.
        for submission in pending:
            subprocess.run(
                [aar, "review", "reproduce", submission],
                env=environment, capture_output=True, text=True, check=True,
            )  # fmt: skip

        def reproduced() -> list[dict[str, Any]] | None:
            details = [
                json.loads(subprocess.run(
                    [aar, "review", "show", submission, "--json"],
                    env=environment, capture_output=True, text=True, check=True,
                ).stdout)
                for submission in pending
            ]  # fmt: skip
            fresh = deploy.DEMO_TASKS[1].name
            done = all(fresh in d["reproduction"]["reported"] for d in details)
            return details if done else None

        details = eventually(reproduced, what="the pending submissions' reproductions",
                             timeout=1200)  # fmt: skip
        held = [d for d in details if d["reproduction"]["holds"]]
        assert held, [d["reproduction"]["verdict"] for d in details]
        chosen, agent = str(held[0]["id"]), held[0]["agent"]
        subprocess.run(
            [aar, "review", "approve", chosen, "--comment", "read the method and the artifact"],
            env=environment, capture_output=True, text=True, check=True,
        )  # fmt: skip
    finally:
        process.kill()
        process.wait()
    best = eventually(
        lambda: installed.kubectl.json("get", "researchrun", RUN)["status"].get("best"),
        what="status.best after the approval",
        timeout=180,
    )
    assert (str(best["submission"]), best["agent"]) == (chosen, agent)
    # Reproduced on the fresh split within the run's tolerance, and on the transfer task.
    assert best["reproduced"] >= best["score"] - run_manifest()["spec"]["review"]["tolerance"]
    assert [t["task"] for t in best["transfer"]] == [deploy.DEMO_TASKS[2].name]
    printed = installed.kubectl.run("get", "researchrun", RUN)
    assert "REPRODUCED" in printed.splitlines()[0]


def _agent_credential(installed: Installed, agent: str) -> str:
    """The credential the operator minted for an agent, from its Secret."""
    secret = installed.kubectl.json("get", "secret", f"{agent}-credential")
    return base64.b64decode(secret["data"]["credential"]).decode()


def _publish(installed: Installed, credential: str, name: str, files: dict[str, bytes]) -> str:
    answer = installed.request(
        deploy.SYSTEM_NAMESPACE, "aar-forum", "POST", "/api/v1/artifacts", tar_gz(files),
        {"X-Aar-Filename": f"{name}.tar.gz", "Content-Type": "application/octet-stream"},
        credential,
    )  # fmt: skip
    return str(answer["digest"])


def _submit(
    installed: Installed, credential: str, predictions: list[Any], method: str, artifact: str,
    command: str,
) -> int:  # fmt: skip
    body = {"task": deploy.TASK, "predictions": predictions, "method": method,
            "artifact": artifact, "command": command}  # fmt: skip
    answer = installed.request(
        deploy.SCORER_NAMESPACE, "aar-scorer", "POST", "/api/v1/submissions",
        json.dumps(body).encode(), {"Content-Type": "application/json"}, credential,
    )  # fmt: skip
    assert answer["status"] in ("accepted", "flagged"), answer
    return int(answer["id"])


def _reproduced(installed: Installed, submission: int) -> dict[str, Any] | None:
    """The submission's detail once every target has reported."""
    detail: dict[str, Any] = installed.get(
        deploy.SCORER_NAMESPACE, "aar-scorer", f"/api/v1/submissions/{submission}"
    )
    targets = {task.name for task in deploy.DEMO_TASKS[1:]}
    return detail if set(detail["reproduction"]["reported"]) == targets else None


def test_reproductions_run_as_jobs_and_only_honest_code_counts(
    installed: Installed, tmp_path: Path
) -> None:
    """On the node, in the verification namespace, with no network: an honest `aar-train`
    method reproduces within tolerance; predictions copied from leaked labels reproduce near
    chance on the fresh split and the transfer task and never count; a method that reads the
    agent's workspace fails there."""
    credential = _agent_credential(installed, AGENTS[1])
    labels = json.loads(
        (installed.plane.state_dir / "demo-tasks" / deploy.TASK / "test-labels.json").read_text()
    )["labels"]
    # Honest: the run's own trainer, one seed, on whatever bundle the Job mounts. Its claim is
    # the same command run here on the run's bundle.
    honest_script = (
        "set -e\n"
        'aar-train w2s --task "$AAR_TASK_DIR" --weak-model "$AAR_TASK_DIR/models/weak" '
        '--strong-model "$AAR_TASK_DIR/models/strong" --method confident --seeds "${AAR_SEED:-0}" '
        '--no-ceiling --device cpu --threads 1 --quiet --out "$AAR_OUTPUT_DIR/w2s" '
        + " ".join(demo_w2s_flags())
        + "\n"
        'cp "$AAR_OUTPUT_DIR/w2s/predictions.json" "$AAR_OUTPUT_DIR/predictions.json"\n'
    )
    # The run's bundle as the agents have it: the task volume's own folder on this machine.
    claim = installed.kubectl.json("get", "pvc", f"aar-task-{deploy.TASK}")
    volume = installed.admin.json("get", "pv", claim["spec"]["volumeName"])
    bundle = Path(volume["spec"]["local"]["path"])
    claim_dir = tmp_path / "claim"
    subprocess.run(
        ["bash", "-c", honest_script],
        env={**os.environ, "AAR_TASK_DIR": str(bundle),
             "AAR_OUTPUT_DIR": str(claim_dir),
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    honest_predictions = json.loads((claim_dir / "predictions.json").read_text())
    honest = _submit(
        installed, credential, honest_predictions, "w2s confident, seed 0",
        _publish(installed, credential, "honest", {"honest/run.sh": honest_script.encode()}),
        "bash honest/run.sh",
    )  # fmt: skip
    # Leaked: the hidden labels themselves, and code that only prints them.
    leaked = _submit(
        installed, credential, labels, "a very good method",
        _publish(installed, credential, "leak", {"leak/answers.json": json.dumps(labels).encode()}),
        'cp leak/answers.json "$AAR_OUTPUT_DIR/predictions.json"',
    )  # fmt: skip
    # Outside: predictions the agent made in its workspace, which no Job has.
    outside = _submit(
        installed, credential, honest_predictions[::-1], "reuses my earlier run",
        _publish(installed, credential, "reuse", {"reuse/README.md": b"see my workspace"}),
        'cp /workspace/runs/naive/seed-0/predictions.json "$AAR_OUTPUT_DIR/predictions.json"',
    )  # fmt: skip

    process, port = port_forward(
        installed.plane.kubeconfig_path, deploy.SCORER_NAMESPACE, "aar-scorer",
        installed.logs / "reproduce.log",
    )  # fmt: skip
    environment = {**os.environ, "AAR_SCORER_URL": f"http://127.0.0.1:{port}",
                   "AAR_CREDENTIAL": installed.credential}  # fmt: skip
    aar = str(Path(sys.executable).parent / "aar")
    try:
        # The leaked one leads the run by public score: reproduced unasked. The others a
        # reviewer asks for.
        for submission in (honest, outside):
            subprocess.run([aar, "review", "reproduce", str(submission)], env=environment,
                           capture_output=True, text=True, check=True)  # fmt: skip
        details = {
            name: eventually(
                lambda s=submission: _reproduced(installed, s),
                what=f"the {name} submission's reproductions",
                timeout=1200,
            )
            for name, submission in (("honest", honest), ("leaked", leaked), ("outside", outside))
        }
        shown = subprocess.run([aar, "review", "show", str(outside)], env=environment,
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    finally:
        process.kill()
        process.wait()

    # The figures, for whoever reads the test's output.
    for name, detail in details.items():
        found = detail["reproduction"]
        each = {r["target"]: (r["outcome"], r["pgr"], r["seeds"], r["exit_code"])
                for r in found["results"]}  # fmt: skip
        print(f"{name}: claimed {found['claimed']}, reproduced {found['reproduced']}, {each}")
    tolerance = run_manifest()["spec"]["review"]["tolerance"]
    fresh, transfer = (task.name for task in deploy.DEMO_TASKS[1:])
    found = details["honest"]["reproduction"]
    assert {r["target"]: r["outcome"] for r in found["results"]} == {
        fresh: "succeeded",
        transfer: "succeeded",
    }
    assert found["reproduced"] >= found["claimed"] - tolerance, found
    assert found["holds"] is True, found
    # Each target ran the command once per seed of the run's spec.review.seeds, with its spread.
    seeds = run_manifest()["spec"]["review"]["seeds"]
    assert all(len(r["seeds"]) == seeds and r["spread"] is not None for r in found["results"])

    found = details["leaked"]["reproduction"]
    assert found["claimed"] > 1.0  # every answer right: above the ceiling
    assert abs(found["reproduced"]) < 0.5, found  # chance: the weak teacher, PGR about 0
    assert abs(found["transfer"][transfer]) < 0.5, found
    assert found["holds"] is False
    assert "did not reproduce" in found["verdict"]
    assert details["leaked"]["counted"] is False

    found = details["outside"]["reproduction"]
    assert {r["outcome"] for r in found["results"]} == {"failed"}
    assert all(r["exit_code"] == 1 for r in found["results"]), found
    assert "/workspace/runs/naive/seed-0/predictions.json" in found["results"][0]["log"]
    assert found["holds"] is False
    assert "exit status 1" in shown
    assert "No such file or directory" in shown

    # The Jobs ran in the verification namespace, their GPU time charged to the run.
    jobs = installed.admin.json("get", "jobs", "-n", deploy.VERIFY_NAMESPACE)["items"]
    assert {f"repro-{leaked}-{fresh}", f"repro-{honest}-{transfer}"} <= {
        job["metadata"]["name"] for job in jobs
    }
    status = eventually(
        lambda: (s := installed.kubectl.json("get", "researchrun", RUN)["status"])
        .get("reproductions", {}).get("gpuHours", 0) > 0 and s,
        what="the reproductions' GPU-hours in the run's status",
    )  # fmt: skip
    assert status["spend"]["gpuHours"] >= status["reproductions"]["gpuHours"]


def _resumed(installed: Installed, agent: str) -> bool:
    """The agent's current container took up its saved conversation from the workspace: it
    resumed it, or found it finished (an agent whose research was done), never started anew."""
    logs = installed.kubectl.run("logs", agent, check=False)
    took_up = '"message": "Resumed"' in logs or '"message": "The run had already finished"' in logs
    return took_up and '"message": "Started"' not in logs


def test_a_deleted_agent_pod_comes_back_and_resumes(installed: Installed) -> None:
    agent = AGENTS[0]
    before = installed.kubectl.json("get", "pod", agent)["metadata"]["uid"]
    installed.kubectl.run("delete", "pod", agent, "--wait=true", timeout=120)
    eventually(
        lambda: (
            (p := installed.kubectl.json("get", "pods", "-l", f"aar.dev/agent={agent}"))
            and p["items"]
            and p["items"][0]["metadata"]["uid"] != before
            and p["items"][0]["status"].get("phase") in ("Running", "Succeeded")
        ),
        what=f"{agent}'s Pod to come back",
        timeout=180,
    )
    eventually(lambda: _resumed(installed, agent), what=f"{agent} to resume", timeout=180)


def test_suspend_keeps_the_workspaces_and_resume_brings_the_agents_back(
    installed: Installed,
) -> None:
    kubectl = installed.kubectl
    kubectl.run("patch", "researchrun", RUN, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    eventually(lambda: not pod_phases(kubectl), what="the suspended run's Pods to go", timeout=180)
    claims = {c["metadata"]["name"] for c in kubectl.json("get", "pvc")["items"]}
    assert {f"{agent}-workspace" for agent in AGENTS} <= claims
    kubectl.run("patch", "researchrun", RUN, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    eventually(
        lambda: len(pod_phases(kubectl)) == len(AGENTS), what="the resumed Pods", timeout=180
    )
    for agent in AGENTS:
        eventually(lambda a=agent: _resumed(installed, a), what=f"{agent} to resume", timeout=240)


def test_deleting_the_run_leaves_nothing(installed: Installed) -> None:
    kubectl = installed.kubectl
    kubectl.run("delete", "researchrun", RUN, "--wait=true", timeout=180)

    def left() -> list[str]:
        names = []
        for kind in ("agentsandboxes", "pods", "serviceaccounts", "secrets", "networkpolicies"):
            for item in kubectl.json("get", kind)["items"]:
                name = item["metadata"]["name"]
                if name.startswith(f"{RUN}-"):
                    names.append(f"{kind}/{name}")
        for claim in kubectl.json("get", "pvc")["items"]:
            if claim["metadata"]["name"] != f"aar-task-{deploy.TASK}":
                names.append(f"pvc/{claim['metadata']['name']}")
        return names

    eventually(lambda: not left(), what="the run's objects to be collected", timeout=180)
    # Its reproductions in the verification namespace go too.
    eventually(
        lambda: (
            not installed.admin.json(
                "get", "jobs,configmaps", "-n", deploy.VERIFY_NAMESPACE, "-l", "aar.dev/run=" + RUN
            )["items"]
        ),
        what="the run's reproduction Jobs to be deleted",
        timeout=180,
    )
