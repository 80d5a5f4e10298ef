"""bench/trainer_gpu.py runs end to end on the CPU with --tiny (the GPU figures need a GPU):
it prints its figures and one JSON object last, and aar's loop pads far less than the plain
loop it is compared with. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_tiny_prints_figures_with_json_last(repo_root: Path) -> None:
    run = "qwen3-4b-lora-r8"
    command = [sys.executable, "bench/trainer_gpu.py", "--tiny", "--threads", "1"]
    command += ["--examples", "48", "--runs", run]
    result = subprocess.run(
        command, cwd=repo_root, capture_output=True, text=True, check=True, timeout=280
    )
    lines = result.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert any(line.startswith(f"{run}: plain HF loop") for line in lines[:-1])
    assert figures["tiny"] is True
    assert figures[f"{run}_plain_tokens_per_s"] > 0
    assert figures[f"{run}_aar_tokens_per_s"] > 0
    assert figures[f"{run}_speedup"] > 0
    # Padded to 512, the plain loop wastes about half its tokens on this length distribution.
    assert figures[f"{run}_plain_padding_fraction"] > 0.4
    assert figures[f"{run}_aar_padding_fraction"] < figures[f"{run}_plain_padding_fraction"] / 2
    # No peak FLOP/s is known for a CPU, so no MFU is made up.
    assert figures[f"{run}_aar_mfu"] is None
