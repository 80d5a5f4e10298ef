"""Start-up time of the local control plane: cold (new state dir: certificates, an empty etcd)
and warm (the same state dir started again), against the 30 s target for a warm start.

    .venv/bin/python bench/controlplane.py [--rounds 3]

Prints one line per start, then one JSON object with the figures as the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from aar_devcluster.controlplane import ControlPlane

WARM_START_TARGET_S = 30.0


def timed_start(plane: ControlPlane) -> float:
    started = time.monotonic()
    plane.start(timeout=180)
    elapsed = time.monotonic() - started
    plane.stop()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cold, warm = [], []
    for round_ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="aar-bench-") as directory:
            plane = ControlPlane(Path(directory), die_with_parent=True)
            cold.append(timed_start(plane))
            warm.append(timed_start(plane))
            plane.destroy()
        print(f"round {round_ + 1}: cold start {cold[-1]:.1f} s, warm start {warm[-1]:.1f} s")
    figures = {
        "cold_start_s_median": round(statistics.median(cold), 2),
        "warm_start_s_median": round(statistics.median(warm), 2),
        "warm_start_s_max": round(max(warm), 2),
        "warm_start_target_s": WARM_START_TARGET_S,
        "rounds": args.rounds,
    }
    print(
        f"warm start: median {figures['warm_start_s_median']} s, max {figures['warm_start_s_max']}"
        f" s (target under {WARM_START_TARGET_S:.0f} s)"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
