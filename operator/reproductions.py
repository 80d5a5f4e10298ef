"""Reproduction Jobs as pure functions (docs/operator.md, Reproduction): a leading submission's
code run again in the verification namespace on a target task's bundle, with no network, no
credential and no writable path but its output and scratch folders; and what a finished Job
says: its outcome, exit status, predictions and GPU-hours.

The artifact reaches the Job as a ConfigMap the operator fills: the method's code never fetches
anything, so the Job needs no token and no network at all.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aar_common.api import ReproductionOutcome, WantedReproduction
from aar_operator.builders import (
    GPU_RESOURCE,
    MANAGER,
    TASK_DIR,
    container_resources,
    container_security_context,
    pod_placement,
    pod_security_context,
)
from aar_operator.builders import (
    labels as component_labels,
)
from aar_operator.models import ResearchRunSpec, parse_duration, parse_time
from aar_operator.naming import task_claim_name

ARTIFACT_DIR = "/artifact"
OUTPUT_DIR = "/output"
PREDICTIONS_FILE = "predictions.json"
CONTAINER = "reproduce"
# What a ConfigMap holds at most (the apiserver's limit is 1 MiB, with the keys).
MAX_ARTIFACT_BYTES = 1_000_000
# The end of the Job's log kept for reviewers; the scorer takes at most 64 KiB.
LOG_TAIL_CHARS = 60_000
DENY_ALL_POLICY = "aar-reproductions-deny-all"

RUN_LABEL = "aar.dev/run"
RUN_NAMESPACE_LABEL = "aar.dev/run-namespace"
RUN_UID_LABEL = "aar.dev/run-uid"
SUBMISSION_LABEL = "aar.dev/submission"
TARGET_LABEL = "aar.dev/target"
COMPONENT = "reproduction"
# Set on a Job once its result reached the scorer: the outcome, and the GPU-hours it used.
REPORTED = "aar.dev/reported"
GPU_HOURS = "aar.dev/gpu-hours"

BEGIN = "<<<aar-predictions seed="
END = "aar-predictions>>>"
# Runs the submission's command in the artifact's folder once per seed (AAR_SEED, each with an
# empty AAR_OUTPUT_DIR of its own), and after each prints what it wrote between markers, so that
# the operator reads the predictions from the log: nothing of the Job's is written anywhere else.
# A seed whose command fails ends the Job with its exit status.
WRAPPER = f"""cd {ARTIFACT_DIR} || exit 125
for seed in $AAR_SEEDS; do
  out="{OUTPUT_DIR}/seed-$seed"
  mkdir -p "$out" || exit 125
  AAR_SEED="$seed" AAR_OUTPUT_DIR="$out" /bin/sh -c "$AAR_COMMAND"
  status=$?
  echo
  echo "{BEGIN}$seed"
  cat "$out/{PREDICTIONS_FILE}" 2>/dev/null
  echo
  echo '{END}'
  if [ "$status" -ne 0 ]; then exit "$status"; fi
done
"""


class ArtifactError(Exception):
    """An artifact a reproduction cannot take; the message says why and the fix."""


def job_name(submission: int, target: str) -> str:
    """`repro-<submission>-<target>`: one Job per submission and target, whoever asks again
    (an operator restart finds it instead of making a second). Submission ids are the scorer's,
    unique across runs."""
    name = f"repro-{submission}-{target}"
    if len(name) <= 63:
        return name
    # Pods take the Job's name as a label value: 63 characters at most.
    return f"repro-{submission}-{hashlib.sha256(target.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class RunRef:
    """The run a Job reproduces for: in another namespace, so labels, not an ownerReference
    (which cannot cross namespaces), tie the Job to it."""

    namespace: str
    name: str
    uid: str

    def labels(self) -> dict[str, str]:
        return {
            **component_labels(self.name, None, COMPONENT),
            RUN_NAMESPACE_LABEL: self.namespace,
            RUN_UID_LABEL: self.uid,
        }


def artifact_files(filename: str, content: bytes) -> dict[str, tuple[bytes, int]]:
    """The artifact as files under /artifact (path -> bytes and mode): a tar archive unpacked,
    any other file as itself. Links, devices and paths that climb out are refused, as the agent's
    own unpacking refuses them."""
    if len(content) > MAX_ARTIFACT_BYTES:
        raise ArtifactError(
            f"the artifact is {len(content):,} bytes; a reproduction takes up to "
            f"{MAX_ARTIFACT_BYTES:,}: publish the method's code without weights or data"
        )
    try:
        archive = tarfile.open(fileobj=io.BytesIO(content), mode="r:*")  # noqa: SIM115
    except tarfile.TarError:
        return {_safe_path(filename): (content, 0o444)}
    files: dict[str, tuple[bytes, int]] = {}
    total = 0
    with archive:
        for member in archive.getmembers():
            if member.isdir():
                continue
            if not member.isfile():
                raise ArtifactError(
                    f"the artifact holds {member.name!r}, which is not a plain file (a link or a "
                    "device); publish plain files only"
                )
            total += member.size
            if total > MAX_ARTIFACT_BYTES:
                raise ArtifactError(
                    f"the artifact unpacks to more than {MAX_ARTIFACT_BYTES:,} bytes: publish "
                    "the method's code without weights or data"
                )
            extracted = archive.extractfile(member)
            assert extracted is not None  # a regular file always has content
            executable = member.mode & 0o111
            files[_safe_path(member.name)] = (extracted.read(), 0o555 if executable else 0o444)
    if not files:
        raise ArtifactError("the artifact is an archive with no files in it")
    return files


def _safe_path(name: str) -> str:
    parts = [part for part in name.replace("\\", "/").split("/") if part not in ("", ".")]
    if not parts or ".." in parts or name.startswith("/"):
        raise ArtifactError(
            f"the artifact names a path outside its own folder ({name!r}); publish relative paths"
        )
    return "/".join(parts)


def artifact_config_map(
    namespace: str, name: str, run: RunRef, files: dict[str, tuple[bytes, int]]
) -> dict[str, Any]:
    """The artifact's files, keyed `f<i>` (ConfigMap keys cannot hold '/'); the Job's volume
    puts each back at its path. Immutable: what was reproduced cannot change underneath."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": run.labels()},
        "immutable": True,
        "binaryData": {
            f"f{i}": base64.b64encode(content).decode()
            for i, (content, _) in enumerate(files.values())
        },
    }


def job(
    namespace: str,
    run: RunRef,
    spec: ResearchRunSpec,
    wanted: WantedReproduction,
    target: str,
    files: dict[str, tuple[bytes, int]],
) -> dict[str, Any]:
    """The Job that runs `wanted`'s command on `target`'s bundle: the run's image and resources,
    the sandbox's security context, no service-account token, no retries, a deadline."""
    name = job_name(wanted.submission, target)
    labels = {
        **run.labels(),
        SUBMISSION_LABEL: str(wanted.submission),
        TARGET_LABEL: target,
    }
    env = {
        "AAR_COMMAND": wanted.command,
        "AAR_SEEDS": " ".join(str(seed) for seed in range(spec.review.seeds)),
        "AAR_TASK": target,
        "AAR_TASK_DIR": TASK_DIR,
        "AAR_OUTPUT_DIR": OUTPUT_DIR,
        "HOME": "/tmp",
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "containers": [
            {
                "name": CONTAINER,
                "image": spec.sandbox.image,
                "command": ["/bin/sh", "-c", WRAPPER],
                "workingDir": ARTIFACT_DIR,
                "env": [{"name": key, "value": value} for key, value in env.items()],
                "resources": container_resources(spec.sandbox),
                "securityContext": container_security_context(),
                "volumeMounts": [
                    {"name": "artifact", "mountPath": ARTIFACT_DIR, "readOnly": True},
                    {"name": "task", "mountPath": TASK_DIR, "readOnly": True},
                    {"name": "output", "mountPath": OUTPUT_DIR},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
            }
        ],
        "volumes": [
            {
                "name": "artifact",
                "configMap": {
                    "name": name,
                    "defaultMode": 0o444,
                    "items": [
                        {"key": f"f{i}", "path": path, "mode": mode}
                        for i, (path, (_, mode)) in enumerate(files.items())
                    ],
                },
            },
            {
                "name": "task",
                "persistentVolumeClaim": {"claimName": task_claim_name(target), "readOnly": True},
            },
            {"name": "output", "emptyDir": {"sizeLimit": "1Gi"}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "10Gi"}},
        ],
        **pod_placement(spec.sandbox),
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels,
            "annotations": {"aar.dev/artifact": wanted.artifact, "aar.dev/agent": wanted.agent},
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": int(parse_duration(spec.review.timeout).total_seconds()),
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


def deny_all_policy(namespace: str) -> dict[str, Any]:
    """No traffic in or out of any Pod of the verification namespace: not DNS, not the
    services, not the apiserver."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": DENY_ALL_POLICY,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": MANAGER, "app.kubernetes.io/part-of": "aar"},
        },
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
    }


# --- a finished Job ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    outcome: ReproductionOutcome
    reason: str


def finished(job: dict[str, Any]) -> Finished | None:
    """How a Job ended, or None while it runs."""
    for condition in (job.get("status") or {}).get("conditions", []):
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Complete":
            return Finished(ReproductionOutcome.SUCCEEDED, "")
        if condition.get("type") == "Failed":
            if condition.get("reason") == "DeadlineExceeded":
                deadline = job["spec"].get("activeDeadlineSeconds")
                return Finished(
                    ReproductionOutcome.TIMED_OUT,
                    f"the reproduction ran past its deadline of {deadline} s (spec.review.timeout)",
                )
            message = condition.get("message") or condition.get("reason") or "the Job failed"
            return Finished(ReproductionOutcome.FAILED, message)
    return None


def gpu_hours(job: dict[str, Any], now: datetime) -> float:
    """GPU-hours the Job held: its GPUs times the time from its start to its end."""
    status = job.get("status") or {}
    started = status.get("startTime")
    if not started:
        return 0.0
    ended = status.get("completionTime") or next(
        (
            c.get("lastTransitionTime")
            for c in status.get("conditions", [])
            if c.get("type") == "Failed" and c.get("status") == "True"
        ),
        None,
    )
    end = parse_time(ended) if ended else now
    limits = job["spec"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    gpus = int(limits.get(GPU_RESOURCE, 0))
    return round(gpus * max(0.0, (end - parse_time(started)).total_seconds()) / 3600, 6)


_BLOCK = re.compile(re.escape(BEGIN) + r"(\d+)\n(.*?)\n" + re.escape(END), re.DOTALL)


def predictions_from_log(log: str) -> tuple[dict[int, list[Any]], str]:
    """Each seed's JSON list of predictions as the wrapper printed it last (a seed whose
    command wrote none, or not a JSON list, is missing), and the log without them."""
    found: dict[int, list[Any]] = {}
    for block in _BLOCK.finditer(log):
        text = block.group(2).strip()
        try:
            predictions = json.loads(text) if text else None
        except ValueError:
            predictions = None
        seed = int(block.group(1))
        if isinstance(predictions, list):
            found[seed] = predictions
        else:
            found.pop(seed, None)
    return found, _BLOCK.sub("", log)


def exit_code(pod: dict[str, Any] | None) -> int | None:
    """The reproduction container's exit status, when it ran to an end."""
    for status in ((pod or {}).get("status") or {}).get("containerStatuses", []):
        if status.get("name") == CONTAINER:
            terminated = (status.get("state") or {}).get("terminated")
            if terminated is not None:
                return int(terminated.get("exitCode", 0))
    return None
