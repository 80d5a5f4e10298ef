"""Scrape targets for the node's Prometheus: `python -m aar_devcluster.targets`, started with it.

Debian builds Prometheus without Kubernetes service discovery, so this process lists the Pods
every few seconds and writes every Running Pod's container port named `metrics` (where each
component serves /metrics, apart from its API port) to a file Prometheus reads
(`file_sd_configs`), labelled with namespace, pod and app.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from aar_devcluster.kubeapi import add_api_arguments, api_from, run_every

# The components' metrics ports (the chart's `metrics.port`); their API ports answer 404 there.
SCRAPED_PORT_NAMES = ("metrics",)


def targets(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One file_sd entry per scraped port of a Running Pod."""
    found = []
    for pod in pods:
        status, meta = pod.get("status", {}), pod["metadata"]
        if status.get("phase") != "Running" or not status.get("podIP"):
            continue
        for container in pod["spec"]["containers"]:
            for port in container.get("ports", []):
                if port.get("name") in SCRAPED_PORT_NAMES:
                    labels = meta.get("labels", {})
                    found.append(
                        {
                            "targets": [f"{status['podIP']}:{port['containerPort']}"],
                            "labels": {
                                "namespace": meta["namespace"],
                                "pod": meta["name"],
                                "app": labels.get("app.kubernetes.io/name", ""),
                            },
                        }
                    )
    return found


def write(path: Path, entries: list[dict[str, Any]]) -> None:
    """Atomically: Prometheus never reads a half-written file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries, indent=1))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aar_devcluster.targets")
    add_api_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="the file_sd JSON file")
    args = parser.parse_args(argv)
    api = api_from(args)
    run_every(3, lambda: write(args.out, targets(api.get("/api/v1/pods")["items"])), "Listing Pods")
    return 0


if __name__ == "__main__":
    sys.exit(main())
