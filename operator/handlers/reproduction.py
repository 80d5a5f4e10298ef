"""A run's reproductions (docs/operator.md, Reproduction): ask the scorer which submissions to
run again, make one Job per submission and target in the verification namespace, report each
finished Job's predictions, exit status and log to the scorer with the verifier's credential,
and delete a run's Jobs when the run goes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from aar_common.api import ReproductionOutcome, ReproductionReport, WantedReproduction
from aar_operator import reproductions
from aar_operator.builders import MANAGER, Owner
from aar_operator.context import Context
from aar_operator.kube import ApiError, Ref
from aar_operator.models import API_VERSION, Reproductions, ResearchRunSpec, now_utc
from aar_operator.naming import task_claim_name
from aar_operator.reproductions import (
    COMPONENT,
    CONTAINER,
    GPU_HOURS,
    REPORTED,
    RUN_LABEL,
    RUN_NAMESPACE_LABEL,
    RUN_UID_LABEL,
    ArtifactError,
    RunRef,
)
from aar_operator.services import ServiceError

logger = logging.getLogger(__name__)

# A reproduction's log is read up to this much; its predictions are printed at its end.
LOG_LIMIT_BYTES = 16 << 20
# The kinds a run's reproductions leave in the verification namespace.
KINDS = (("batch/v1", "Job"), ("v1", "ConfigMap"))


async def reconcile_reproductions(
    context: Context, run: RunRef, spec: ResearchRunSpec, previous: Reproductions
) -> Reproductions:
    """Report the run's finished Jobs, start the ones the scorer wants, and count them. A
    problem (no verification namespace, a missing task volume, a service down) is said in the
    status and retried at the next poll; nothing is lost, as the scorer keeps asking."""
    services = context.services
    if services is None:
        return previous
    namespace = context.config.verification_namespace
    jobs_ref = Ref("batch/v1", "Job", namespace)
    problems: list[str] = []
    try:
        jobs = await context.kube.list(jobs_ref, {RUN_UID_LABEL: run.uid})
        for job in jobs:
            if REPORTED not in (job["metadata"].get("annotations") or {}):
                await _report_if_finished(context, job)
        wanted = await services.wanted_reproductions(run.namespace, run.name)
        existing = {job["metadata"]["name"] for job in jobs}
        if any(
            reproductions.job_name(w.submission, t.task) not in existing
            for w in wanted
            for t in w.targets
        ):
            await _create(context, reproductions.deny_all_policy(namespace))
        for one in wanted:
            for target in one.targets:
                name = reproductions.job_name(one.submission, target.task)
                if name not in existing and (
                    problem := await _start(context, run, spec, one, target.task)
                ):
                    problems.append(problem)
        jobs = await context.kube.list(jobs_ref, {RUN_UID_LABEL: run.uid})
    except ServiceError as error:
        return previous.model_copy(update={"message": f"reproductions wait: {error}"})
    except ApiError as error:
        return previous.model_copy(
            update={"message": f"reproductions wait: {_kube_problem(error, namespace)}"}
        )
    return _count(jobs, "; ".join(dict.fromkeys(problems)))


def _count(jobs: list[dict[str, Any]], message: str) -> Reproductions:
    reported = [j for j in jobs if REPORTED in (j["metadata"].get("annotations") or {})]
    hours = sum(float(j["metadata"]["annotations"].get(GPU_HOURS, 0.0)) for j in reported)
    return Reproductions(
        running=len(jobs) - len(reported),
        reported=len(reported),
        gpu_hours=round(hours, 6),
        message=message,
    )


def _kube_problem(error: ApiError, namespace: str) -> str:
    if error.status == 404 and "namespaces" in error.message:
        return (
            f"the verification namespace {namespace} does not exist: install the chart "
            "(verification.namespace) or create it, with the task volumes of the targets"
        )
    if error.status == 403:
        return (
            f"the operator may not manage Jobs in {namespace}: {error.message} (the chart's "
            "operator Role there grants it)"
        )
    return str(error)


async def _start(
    context: Context,
    run: RunRef,
    spec: ResearchRunSpec,
    wanted: WantedReproduction,
    target: str,
) -> str:
    """Make the Job for one submission and target; returns what stops it, or "" once made. An
    artifact no Job can take is reported as a failed reproduction, with the reason."""
    assert context.services is not None
    namespace = context.config.verification_namespace
    name = reproductions.job_name(wanted.submission, target)
    claim = Ref("v1", "PersistentVolumeClaim", namespace, task_claim_name(target))
    if await context.kube.get(claim) is None:
        return (
            f"the task volume {claim.name} is missing in {namespace}: provision the bundle of "
            f"task {target} there (docs/operator.md, Reproduction)"
        )
    try:
        filename, content = await context.services.artifact(
            wanted.artifact, reproductions.MAX_ARTIFACT_BYTES
        )
        files = reproductions.artifact_files(filename, content)
    except ArtifactError as refused:
        await context.services.report_reproduction(
            wanted.submission,
            ReproductionReport(
                target=target,
                outcome=ReproductionOutcome.FAILED,
                reason=f"not run: {refused}",
                job=f"{namespace}/{name}",
            ),
        )
        return ""
    config_map = reproductions.artifact_config_map(namespace, name, run, files)
    job = reproductions.job(namespace, run, spec, wanted, target, files)
    await _create(context, config_map)
    made = await _create(context, job)
    # The artifact goes with its Job (same namespace, so an ownerReference can say so).
    owner = Owner("batch/v1", "Job", name, made["metadata"]["uid"])
    await context.kube.patch(
        Ref.of(config_map), {"metadata": {"ownerReferences": [owner.reference()]}}
    )
    logger.info(
        f"Reproducing submission {wanted.submission} of {run.namespace}/{run.name} on "
        f"{target} as Job {namespace}/{name}"
    )
    return ""


async def _create(context: Context, manifest: dict[str, Any]) -> dict[str, Any]:
    """Create, or find what an earlier cycle (or an operator before a restart) created."""
    try:
        return await context.kube.create(manifest)
    except ApiError as error:
        if error.status != 409:
            raise
    found = await context.kube.get(Ref.of(manifest))
    assert found is not None, f"{manifest['kind']} {manifest['metadata']['name']} vanished"
    return found


async def _report_if_finished(context: Context, job: dict[str, Any]) -> None:
    """A finished Job's result, to the scorer; then the Job is marked reported, so that it is
    reported once (the scorer takes a repeat of the same report as the same)."""
    assert context.services is not None
    ended = reproductions.finished(job)
    if ended is None:
        return
    metadata = job["metadata"]
    namespace, name = metadata["namespace"], metadata["name"]
    pods = await context.kube.list(Ref("v1", "Pod", namespace), {"job-name": name})
    pod = pods[0] if pods else None
    log = ""
    if pod is not None:
        try:
            log = await context.kube.log(
                namespace, pod["metadata"]["name"], CONTAINER, LOG_LIMIT_BYTES
            )
        except (ApiError, aiohttp.ClientError) as error:
            log = f"(the log could not be read: {error})"
    by_seed, rest = reproductions.predictions_from_log(log)
    exit_code = reproductions.exit_code(pod)
    outcome, reason = ended.outcome, ended.reason
    if outcome is ReproductionOutcome.FAILED and exit_code is not None:
        reason = f"the command exited with status {exit_code}"
    predictions = None
    if outcome is ReproductionOutcome.SUCCEEDED:
        seeds = _seeds(job)
        missing = [seed for seed in seeds if seed not in by_seed]
        if missing:
            outcome = ReproductionOutcome.FAILED
            reason = (
                f"the command wrote no JSON list to $AAR_OUTPUT_DIR/predictions.json for seed "
                f"{', '.join(map(str, missing))}"
            )
        else:
            predictions = [by_seed[seed] for seed in seeds]
    hours = reproductions.gpu_hours(job, now_utc())
    report = ReproductionReport(
        target=metadata["labels"][reproductions.TARGET_LABEL],
        outcome=outcome,
        predictions=predictions,
        exit_code=exit_code,
        reason=reason,
        log=rest[-reproductions.LOG_TAIL_CHARS :],
        gpu_hours=hours,
        job=f"{namespace}/{name}",
    )
    await context.services.report_reproduction(
        int(metadata["labels"][reproductions.SUBMISSION_LABEL]), report
    )
    await context.kube.patch(
        Ref("batch/v1", "Job", namespace, name),
        {"metadata": {"annotations": {REPORTED: outcome.value, GPU_HOURS: str(hours)}}},
    )


def _seeds(job: dict[str, Any]) -> list[int]:
    """The seeds a Job ran its command with (its AAR_SEEDS)."""
    env = job["spec"]["template"]["spec"]["containers"][0].get("env", [])
    seeds = next((e.get("value", "") for e in env if e["name"] == "AAR_SEEDS"), "0")
    return [int(seed) for seed in seeds.split()]


# --- when runs go -----------------------------------------------------------------------------


async def remove(context: Context, run_uid: str) -> int:
    """Delete every Job and artifact of a run's reproductions; returns how many went."""
    namespace = context.config.verification_namespace
    gone = 0
    for api_version, kind in KINDS:
        ref = Ref(api_version, kind, namespace)
        for item in await context.kube.list(ref, {RUN_UID_LABEL: run_uid}):
            name = item["metadata"]["name"]
            if await context.kube.delete(Ref(api_version, kind, namespace, name)):
                gone += 1
    return gone


async def sweep(context: Context, known_runs: set[str]) -> int:
    """Delete the reproductions of runs that no longer exist (deleted while the operator was
    down, or recreated under the same name); returns how many went."""
    namespace = context.config.verification_namespace
    selector = {"app.kubernetes.io/component": COMPONENT, "app.kubernetes.io/managed-by": MANAGER}
    gone = 0
    checked: dict[str, bool] = {}
    for api_version, kind in KINDS:
        for item in await context.kube.list(Ref(api_version, kind, namespace), selector):
            labels = item["metadata"].get("labels") or {}
            uid = labels.get(RUN_UID_LABEL, "")
            if uid in known_runs:
                continue
            if uid not in checked:
                run = await context.kube.get(
                    Ref(
                        API_VERSION,
                        "ResearchRun",
                        labels.get(RUN_NAMESPACE_LABEL, ""),
                        labels.get(RUN_LABEL, ""),
                    )
                )
                checked[uid] = run is not None and run["metadata"]["uid"] == uid
            if not checked[uid] and await context.kube.delete(
                Ref(api_version, kind, namespace, item["metadata"]["name"])
            ):
                gone += 1
    return gone


async def sweep_forever(
    context: Context, known_runs: Callable[[], set[str]], interval: float
) -> None:
    """Sweep at start and every `interval` seconds; a failed sweep is logged and retried."""
    while True:
        try:
            if gone := await sweep(context, known_runs()):
                logger.info(f"Deleted {gone} reproduction objects of runs that are gone")
        except (ApiError, aiohttp.ClientError) as error:
            logger.warning(f"Could not sweep the reproductions of deleted runs: {error}")
        await asyncio.sleep(interval)
