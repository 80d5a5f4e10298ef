"""Start-up time of the local control plane once its binaries are built and cached (a warm
start), against the 30 s target: into a new state dir (certificates made, an empty etcd) and
again into the same state dir (its data kept). Building the binaries, once per machine, is not
timed here: `make tools` prints its progress and takes about 4 minutes on 2 cores.

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
    fresh, again = [], []
    for round_ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="aar-bench-") as directory:
            plane = ControlPlane(Path(directory), die_with_parent=True)
            fresh.append(timed_start(plane))
            again.append(timed_start(plane))
            plane.destroy()
        print(
            f"round {round_ + 1}: new state dir {fresh[-1]:.1f} s, same state dir {again[-1]:.1f} s"
        )
    figures = {
        "start_new_state_s_median": round(statistics.median(fresh), 2),
        "start_same_state_s_median": round(statistics.median(again), 2),
        "warm_start_s_max": round(max(fresh + again), 2),
        "warm_start_target_s": WARM_START_TARGET_S,
        "rounds": args.rounds,
    }
    print(
        f"warm start: slowest of {2 * args.rounds} was {figures['warm_start_s_max']} s "
        f"(target under {WARM_START_TARGET_S:.0f} s)"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
