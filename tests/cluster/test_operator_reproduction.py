"""Reproductions on a real apiserver: a leading submission of a run that reproduces becomes
exactly one Job per target in the verification namespace, locked down field by field; the
namespace is shut off the network; a Job that runs past its deadline is reported to the scorer
as timed out; an operator restart makes no second Job; an artifact whose stored bytes no longer
match its digest is never run; deleting the run (with the operator up, or while it is down)
deletes its Jobs and their artifacts.

The cluster tier has no node, so the Jobs' Pods never start: the job controller still ends a
Job at its deadline, which is the path tested here. Jobs that run are the e2e tier's."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from archives import tar_gz
from operator_process import OperatorProcess, eventually, names
from service_processes import LABELS, Services, call, publish

from aar_devcluster.controlplane import ControlPlane
from aar_devcluster.tools import Tool

FRESH = "w2s-chat-fresh"
TRANSFER = "w2s-chat-transfer"
TARGETS = [FRESH, TRANSFER]
COMMAND = "python method/train.py --task $AAR_TASK_DIR --out $AAR_OUTPUT_DIR"
METHOD = {"method/train.py": b"print('training')\n", "method/README.md": b"confidence loss\n"}
REPRODUCTION = "app.kubernetes.io/component=reproduction"


@pytest.fixture
def reproducing_services(tmp_path: Path, control_plane: ControlPlane) -> Iterator[Services]:
    """The services, with w2s-chat reproduced on a fresh split and a transfer task, and the
    forum the operator fetches artifacts from."""
    verification = {"baselines": {"weak": 0.6, "ceiling": 0.9}, "labels": [0, 1]}
    running = Services(
        tmp_path,
        {"reproduction": {"fresh": FRESH, "transfer": [TRANSFER]}},
        more_tasks=[
            ({"name": FRESH, "verification_only": True, **verification}, LABELS),
            ({"name": TRANSFER, "verification_only": True, **verification}, LABELS[:30]),
        ],
    )
    running.start()
    state = control_plane.read_state()
    assert state is not None
    running.start_forum(state.server, state.token, control_plane.pki_dir / "ca.crt")
    yield running
    running.stop()


@pytest.fixture
def verification(
    more_namespaces: Callable[[str], str], control_plane: ControlPlane
) -> tuple[str, Tool]:
    """The verification namespace, with the targets' task volumes provisioned."""
    name = more_namespaces("verify")
    kubectl = Tool("kubectl", control_plane.kubeconfig_path, name)
    for target in TARGETS:
        kubectl.apply(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": f"aar-task-{target}", "namespace": name},
                "spec": {
                    "accessModes": ["ReadOnlyMany"],
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            }
        )
    return name, kubectl


def registered(kubectl: Tool) -> None:
    def reachable() -> bool:
        status = kubectl.json("get", "rr", "verified").get("status") or {}
        return any(
            c["type"] == "ServicesReachable" and c["status"] == "True"
            for c in status.get("conditions", [])
        )

    eventually(reachable, what="the run registered with the gateway and the scorer")


def run_manifest(timeout: str) -> dict[str, Any]:
    return {
        "apiVersion": "aar.dev/v1alpha1",
        "kind": "ResearchRun",
        "metadata": {"name": "verified"},
        "spec": {
            "agents": 1,
            "task": {"name": "w2s-chat"},
            "sandbox": {
                "image": "agent:test",
                "resources": {"gpu": 1, "cpu": "2", "memory": "4Gi"},
            },
            "budget": {"usd": 5},
            "review": {"required": False, "reproduce": True, "timeout": timeout},
        },
    }


def submit_with_code(services: Services, namespace: str, artifact: str, **body: Any) -> int:
    """A submission of the run's agent with its artifact and COMMAND; its id."""
    status, answer = call(
        f"{services.scorer}/api/v1/submissions",
        services.agent(namespace, "verified", "verified-0"),
        {"task": "w2s-chat", "predictions": LABELS, "method": "confidence loss",
         "artifact": artifact, "command": COMMAND, **body},
        method="POST",
    )  # fmt: skip
    assert status == 200, answer
    return int(answer["id"])


def test_a_leading_submission_is_reproduced_by_one_locked_down_job_per_target(
    control_plane: ControlPlane,
    kubectl: Tool,
    namespace: str,
    operator_namespace: str,
    crds: None,
    reproducing_services: Services,
    verification: tuple[str, Tool],
    tmp_path: Path,
) -> None:
    services = reproducing_services
    verify, in_verify = verification

    def operator() -> OperatorProcess:
        return services.operator(
            control_plane.kubeconfig_path,
            operator_namespace,
            tmp_path / "operator.log",
            AAR_VERIFICATION_NAMESPACE=verify,
        )

    first = operator()
    first.start()
    try:
        # Long enough to read the Jobs before their deadline; then shortened below.
        kubectl.apply(run_manifest("30s"))
        registered(kubectl)
        agent = services.agent(namespace, "verified", "verified-0")
        artifact = publish(services.forum, agent, "method.tar.gz", tar_gz(METHOD))
        submission = submit_with_code(services, namespace, artifact)
        jobs = eventually(
            lambda: len(found := in_verify.json("get", "jobs")["items"]) == 2 and found,
            what="two reproduction Jobs",
        )
        assert sorted(j["metadata"]["name"] for j in jobs) == [
            f"repro-{submission}-{FRESH}",
            f"repro-{submission}-{TRANSFER}",
        ]
        run_uid = kubectl.json("get", "rr", "verified")["metadata"]["uid"]
        job = next(j for j in jobs if j["metadata"]["name"].endswith(FRESH))
        assert_locked_down(job, namespace, run_uid, submission, artifact)
        assert_artifact_mounted(in_verify, job, run_uid)
        assert_deny_all(in_verify)
        uids = {j["metadata"]["name"]: j["metadata"]["uid"] for j in jobs}
    finally:
        first.stop()
        print(f"--- operator log (tail) ---\n{first.log()}")

    # A restart finds the Jobs it made: the same ones, no second.
    second = operator()
    second.start()
    try:
        # The Jobs end at their deadline (no node runs their Pods): reported as timed out.
        def reported() -> list[str]:
            jobs = in_verify.json("get", "jobs", "-l", REPRODUCTION)["items"]
            return sorted(
                j["metadata"].get("annotations", {}).get("aar.dev/reported", "") for j in jobs
            )

        eventually(lambda: reported() == ["timed_out", "timed_out"], timeout=120,
                   what="both Jobs reported as timed out")  # fmt: skip
        jobs = in_verify.json("get", "jobs")["items"]
        assert {j["metadata"]["name"]: j["metadata"]["uid"] for j in jobs} == uids
        status, found = call(f"{services.scorer}/api/v1/submissions/{submission}", services.admin())
        assert status == 200, found
        outcomes = {r["target"]: r for r in found["reproduction"]["results"]}
        assert sorted(outcomes) == TARGETS
        assert outcomes[FRESH]["outcome"] == "timed_out"
        assert "deadline of 30 s" in outcomes[FRESH]["reason"]
        assert outcomes[FRESH]["job"] == f"{verify}/repro-{submission}-{FRESH}"
        # Not reproduced: it does not count, and the run says why nothing is best.
        assert call(f"{services.scorer}/api/v1/runs/{namespace}/verified/best",
                    services.admin())[0] == 404  # fmt: skip
        status_of_run = eventually(
            lambda: (s := kubectl.json("get", "rr", "verified").get("status", {}))
            .get("reproductions", {}).get("reported") == 2 and s,
            what="the run's status counting two reported reproductions",
        )  # fmt: skip
        assert status_of_run["reproductions"]["running"] == 0

        # Deleting the run deletes its Jobs and artifacts in the verification namespace.
        kubectl.run("delete", "rr", "verified", "--wait=false")
        eventually(lambda: names(in_verify, "jobs,configmaps", REPRODUCTION) == [],
                   what="the run's Jobs and artifacts deleted")  # fmt: skip
    finally:
        second.stop()
        print(f"--- operator log (tail) ---\n{second.log()}")


def assert_locked_down(
    job: dict[str, Any], namespace: str, run_uid: str, submission: int, artifact: str
) -> None:
    metadata, spec = job["metadata"], job["spec"]
    assert metadata["labels"]["aar.dev/run"] == "verified"
    assert metadata["labels"]["aar.dev/run-namespace"] == namespace
    assert metadata["labels"]["aar.dev/run-uid"] == run_uid
    assert metadata["labels"]["aar.dev/submission"] == str(submission)
    assert metadata["labels"]["aar.dev/target"] == FRESH
    assert metadata["annotations"]["aar.dev/artifact"] == artifact
    assert spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == 30
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    [container] = pod["containers"]
    assert container["image"] == "agent:test"
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"},
    }
    env = {e["name"]: e.get("value") for e in container["env"]}
    # No credential of any kind: only where things are and what to run.
    assert env == {
        "AAR_COMMAND": COMMAND,
        "AAR_SEEDS": "0 1 2",
        "AAR_TASK": FRESH,
        "AAR_TASK_DIR": "/task",
        "AAR_OUTPUT_DIR": "/output",
        "HOME": "/tmp",
    }
    assert all("valueFrom" not in e for e in container["env"])
    mounts = {
        m["mountPath"]: (m["name"], m.get("readOnly", False)) for m in container["volumeMounts"]
    }
    assert mounts == {
        "/artifact": ("artifact", True),
        "/task": ("task", True),
        "/output": ("output", False),
        "/tmp": ("tmp", False),
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["task"]["persistentVolumeClaim"] == {
        "claimName": f"aar-task-{FRESH}",
        "readOnly": True,
    }
    assert volumes["artifact"]["configMap"]["name"] == metadata["name"]
    assert "emptyDir" in volumes["output"]
    assert "emptyDir" in volumes["tmp"]
    assert sorted(volumes) == ["artifact", "output", "task", "tmp"]


def assert_artifact_mounted(in_verify: Tool, job: dict[str, Any], run_uid: str) -> None:
    """The artifact's files, as published, in an immutable ConfigMap that goes with its Job."""
    config_map = in_verify.json("get", "configmap", job["metadata"]["name"])
    assert config_map["immutable"] is True
    assert config_map["metadata"]["labels"]["aar.dev/run-uid"] == run_uid
    [owner] = config_map["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"]) == ("Job", job["metadata"]["uid"])
    items = job["spec"]["template"]["spec"]["volumes"][0]["configMap"]["items"]
    files = {
        item["path"]: base64.b64decode(config_map["binaryData"][item["key"]]) for item in items
    }
    assert files == METHOD


def assert_deny_all(in_verify: Tool) -> None:
    [policy] = in_verify.json("get", "networkpolicies")["items"]
    assert policy["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}


def test_a_run_deleted_while_the_operator_is_down_loses_its_jobs_when_it_is_back(
    control_plane: ControlPlane,
    kubectl: Tool,
    namespace: str,
    operator_namespace: str,
    crds: None,
    reproducing_services: Services,
    verification: tuple[str, Tool],
    tmp_path: Path,
) -> None:
    services = reproducing_services
    verify, in_verify = verification
    environment = {"AAR_VERIFICATION_NAMESPACE": verify}
    first = services.operator(
        control_plane.kubeconfig_path, operator_namespace, tmp_path / "first.log", **environment
    )
    first.start()
    try:
        kubectl.apply(run_manifest("1h"))
        registered(kubectl)
        agent = services.agent(namespace, "verified", "verified-0")
        submit_with_code(services, namespace, publish(services.forum, agent, "method.tar.gz",
                                                      tar_gz(METHOD)))  # fmt: skip
        # An artifact whose stored bytes no longer match its digest is not run: what is
        # reproduced is what the submission named, byte for byte.
        damaged = publish(services.forum, agent, "other.tar.gz", tar_gz({"m/x.py": b"x = 1\n"}))
        blob = services.directory / "forum" / "artifacts" / "sha256" / damaged.split(":")[1]
        blob.write_bytes(tar_gz({"m/x.py": b"import os; os.system('curl ...')\n"}))
        damaged_one = submit_with_code(services, namespace, damaged, predictions=LABELS[::-1])

        def refused() -> list[str]:
            _, found = call(f"{services.scorer}/api/v1/submissions/{damaged_one}",
                            services.admin())  # fmt: skip
            return [r["reason"] for r in found["reproduction"]["results"]]

        reasons = eventually(lambda: len(r := refused()) == 2 and r, what="damaged: reported")
        assert all("do not match that digest" in reason for reason in reasons), reasons
        assert len(names(in_verify, "jobs", REPRODUCTION)) == 2  # none for the damaged one
    finally:
        first.stop()
    kubectl.run("delete", "rr", "verified", "--wait=true")
    assert len(names(in_verify, "jobs", REPRODUCTION)) == 2  # nobody deleted them yet
    second = services.operator(
        control_plane.kubeconfig_path, operator_namespace, tmp_path / "second.log", **environment
    )
    second.start()
    try:
        eventually(lambda: names(in_verify, "jobs,configmaps", REPRODUCTION) == [],
                   what="the gone run's Jobs and artifacts swept")  # fmt: skip
    finally:
        second.stop()
        print(f"--- operator log (tail) ---\n{second.log()}")
