"""Reproduction Jobs as the operator builds and reads them: the artifact's files as a Job sees
them (and what is refused), the predictions in a finished Job's log, its outcome and GPU-hours."""

from __future__ import annotations

import io
import tarfile
from datetime import UTC, datetime

import pytest
from archives import tar_gz

from aar_common.api import ReproductionOutcome, ReproductionTarget, WantedReproduction
from aar_operator import reproductions
from aar_operator.models import ResearchRunSpec
from aar_operator.reproductions import ArtifactError, RunRef

SPEC = ResearchRunSpec.model_validate(
    {
        "agents": 2,
        "task": {"name": "w2s-chat"},
        "sandbox": {"image": "agent:1", "resources": {"gpu": 2, "cpu": "4", "memory": "8Gi"}},
        "review": {"reproduce": True, "timeout": "1h30m"},
    }
)
WANTED = WantedReproduction(
    submission=12,
    agent="run-0",
    artifact="sha256:" + "a" * 64,
    command="python m/train.py",
    targets=[ReproductionTarget(task="w2s-chat-fresh", kind="fresh")],
)
RUN = RunRef("lab", "run", "uid-1")


def test_a_folder_artifact_keeps_its_paths_and_executable_bits() -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data, mode in [("m/train.py", b"x", 0o755), ("m/notes.md", b"y", 0o644)]:
            member = tarfile.TarInfo(name)
            member.size, member.mode = len(data), mode
            archive.addfile(member, io.BytesIO(data))
    files = reproductions.artifact_files("m.tar.gz", buffer.getvalue())
    assert files == {"m/train.py": (b"x", 0o555), "m/notes.md": (b"y", 0o444)}


def test_a_single_file_artifact_is_itself() -> None:
    assert reproductions.artifact_files("train.py", b"print(1)") == {
        "train.py": (b"print(1)", 0o444)
    }


@pytest.mark.parametrize(
    ("member", "problem"),
    [
        (tarfile.SYMTYPE, "not a plain file"),
        (tarfile.LNKTYPE, "not a plain file"),
        (tarfile.CHRTYPE, "not a plain file"),
    ],
)
def test_links_and_devices_are_refused(member: bytes, problem: str) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("m/labels")
        info.type, info.linkname = member, "/task/test-labels.json"
        archive.addfile(info)
    with pytest.raises(ArtifactError, match=problem):
        reproductions.artifact_files("m.tar", buffer.getvalue())


@pytest.mark.parametrize("name", ["../escape.py", "/etc/passwd", "m/../../x"])
def test_paths_out_of_the_folder_are_refused(name: str) -> None:
    with pytest.raises(ArtifactError, match="outside its own folder"):
        reproductions.artifact_files("m.tar.gz", tar_gz({name: b"x"}))


def test_an_artifact_too_large_for_a_job_is_refused_with_the_fix() -> None:
    with pytest.raises(ArtifactError, match="without weights or data"):
        reproductions.artifact_files("w.bin", b"0" * (reproductions.MAX_ARTIFACT_BYTES + 1))
    big = tar_gz({"m/a": b"0" * 600_000, "m/b": b"1" * 600_000})
    with pytest.raises(ArtifactError, match="unpacks to more than"):
        reproductions.artifact_files("m.tar.gz", big)


def test_job_names_are_one_per_submission_and_target_and_fit_a_label() -> None:
    assert reproductions.job_name(7, "w2s-chat-fresh") == "repro-7-w2s-chat-fresh"
    long = reproductions.job_name(123456, "t" * 63)
    assert len(long) <= 63
    assert long == reproductions.job_name(123456, "t" * 63)
    assert long != reproductions.job_name(123456, "t" * 62 + "u")


def test_the_job_runs_the_command_with_no_credential_and_no_retry() -> None:
    files = {"m/train.py": (b"x", 0o555)}
    job = reproductions.job("aar-verify", RUN, SPEC, WANTED, "w2s-chat-fresh", files)
    assert job["metadata"]["name"] == "repro-12-w2s-chat-fresh"
    assert job["spec"]["activeDeadlineSeconds"] == 5400
    assert job["spec"]["backoffLimit"] == 0
    pod = job["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {e["name"] for e in container["env"]} == {
        "AAR_COMMAND", "AAR_SEEDS", "AAR_TASK", "AAR_TASK_DIR", "AAR_OUTPUT_DIR", "HOME",
    }  # fmt: skip
    assert pod["volumes"][0]["configMap"]["items"] == [
        {"key": "f0", "path": "m/train.py", "mode": 0o555}
    ]


def test_predictions_are_each_seeds_last_block_the_wrapper_printed() -> None:
    log = (
        "epoch 1\n<<<aar-predictions seed=0\n[9, 9]\naar-predictions>>>\n"  # the method's own
        "epoch 2\n\n<<<aar-predictions seed=0\n[0, 1, 1]\n\naar-predictions>>>\n"
        "seed 1\n\n<<<aar-predictions seed=1\n[1, 1, 1]\naar-predictions>>>\n"
    )
    predictions, rest = reproductions.predictions_from_log(log)
    assert predictions == {0: [0, 1, 1], 1: [1, 1, 1]}
    assert "epoch 2" in rest
    assert "seed 1" in rest
    assert "[0, 1, 1]" not in rest


@pytest.mark.parametrize(
    "log",
    [
        "crashed before the wrapper printed anything",
        "\n<<<aar-predictions seed=0\n\naar-predictions>>>\n",
        "\n<<<aar-predictions seed=0\nnot json\naar-predictions>>>\n",
        '\n<<<aar-predictions seed=0\n{"a": 1}\naar-predictions>>>\n',
    ],
)
def test_no_predictions_when_the_command_wrote_no_json_list(log: str) -> None:
    assert reproductions.predictions_from_log(log)[0] == {}


def job_with(status: dict[str, object]) -> dict[str, object]:
    return reproductions.job("v", RUN, SPEC, WANTED, "t", {"a": (b"", 0o444)}) | {"status": status}


def test_a_finished_job_says_how_it_ended() -> None:
    assert reproductions.finished(job_with({"active": 1})) is None
    done = reproductions.finished(
        job_with({"conditions": [{"type": "Complete", "status": "True"}]})
    )
    assert done is not None
    assert done.outcome is ReproductionOutcome.SUCCEEDED
    late = reproductions.finished(
        job_with(
            {"conditions": [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]}
        )
    )
    assert late is not None
    assert late.outcome is ReproductionOutcome.TIMED_OUT
    assert "deadline of 5400 s" in late.reason
    failed = reproductions.finished(
        job_with({"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimit"}]})
    )
    assert failed is not None
    assert failed.outcome is ReproductionOutcome.FAILED


def test_gpu_hours_are_the_jobs_gpus_times_its_time() -> None:
    job = job_with({"startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T01:30:00Z"})
    assert reproductions.gpu_hours(job, datetime.now(UTC)) == 3.0
    running = job_with({"startTime": "2026-01-01T00:00:00Z"})
    assert reproductions.gpu_hours(running, datetime(2026, 1, 1, 0, 30, tzinfo=UTC)) == 1.0
    assert reproductions.gpu_hours(job_with({}), datetime.now(UTC)) == 0.0


def test_the_exit_code_is_the_reproduction_containers() -> None:
    pod = {
        "status": {
            "containerStatuses": [
                {"name": "reproduce", "state": {"terminated": {"exitCode": 3}}},
            ]
        }
    }
    assert reproductions.exit_code(pod) == 3
    assert reproductions.exit_code({"status": {}}) is None
    assert reproductions.exit_code(None) is None
