"""The shell script a reproduction Job's container runs (aar_operator.reproductions.WRAPPER),
run here as a process with its folders moved: each seed in an output folder of its own, its
predictions printed for the operator to read, the first failing seed ending it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from aar_operator import reproductions


def test_the_wrapper_runs_each_seed_in_a_folder_of_its_own_and_stops_at_a_failure(
    tmp_path: Path,
) -> None:
    """The container's own shell script, run here with /artifact and /output moved."""
    artifact, output = tmp_path / "artifact", tmp_path / "output"
    (artifact / "m").mkdir(parents=True)
    wrapper = reproductions.WRAPPER.replace(reproductions.ARTIFACT_DIR, str(artifact)).replace(
        reproductions.OUTPUT_DIR, str(output)
    )
    command = (
        'test -f m/ok || exit 3; echo "seed $AAR_SEED in $AAR_OUTPUT_DIR"; '
        'echo "[$AAR_SEED, 1]" > "$AAR_OUTPUT_DIR/predictions.json"'
    )

    def run() -> subprocess.CompletedProcess[str]:
        environ = {"AAR_COMMAND": command, "AAR_SEEDS": "0 1 2", "PATH": os.environ["PATH"]}
        return subprocess.run(
            ["/bin/sh", "-c", wrapper], env=environ, capture_output=True, text=True, check=False
        )

    (artifact / "m" / "ok").write_text("")
    done = run()
    assert done.returncode == 0, done.stderr
    predictions, rest = reproductions.predictions_from_log(done.stdout)
    assert predictions == {0: [0, 1], 1: [1, 1], 2: [2, 1]}
    assert f"seed 2 in {output}/seed-2" in rest
    (artifact / "m" / "ok").unlink()
    shutil.rmtree(output)  # a Job's /output is an empty volume of its own
    failed = run()
    assert failed.returncode == 3
    assert reproductions.predictions_from_log(failed.stdout)[0] == {}
    assert failed.stdout.count("<<<aar-predictions") == 1  # no seed after the failed one
