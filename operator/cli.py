"""`aar-operator`: run the operator (`run`) or write the CRDs made from its models (`crds`)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import kopf
from prometheus_client import start_http_server

from aar_operator import crds
from aar_operator.config import add_arguments, from_arguments
from aar_operator.main import register

# The repository's two copies of the CRDs: `crds/` for kubectl, the chart's for Helm.
REPO_ROOT = Path(__file__).resolve().parent.parent
CRD_DIRECTORIES = [REPO_ROOT / "crds", REPO_ROOT / "charts" / "aar" / "crds"]


def _run(args: argparse.Namespace) -> int:
    config = from_arguments(args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # Kopf logs every handled watch event; at hundreds of agents that drowns what matters.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    start_http_server(config.metrics_port)
    registry = kopf.OperatorRegistry()
    register(registry, config)
    kopf.run(
        registry=registry,
        # Namespaced RBAC (the chart's Roles in each run namespace) can watch only those.
        clusterwide=not config.namespaced,
        namespaces=config.run_namespaces if config.namespaced else (),
        # One replica (the chart's Deployment uses Recreate): no peering objects needed.
        standalone=True,
        liveness_endpoint=f"http://0.0.0.0:{config.liveness_port}/healthz",
    )
    return 0


def _crds(args: argparse.Namespace) -> int:
    directories = [Path(d) for d in args.directory] or CRD_DIRECTORIES
    if args.check:
        stale = crds.stale(directories)
        for path in stale:
            print(f"{path} is out of date; run `aar-operator crds`", file=sys.stderr)
        return 1 if stale else 0
    for path in crds.write(directories):
        print(f"Wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aar-operator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="reconcile ResearchRuns and AgentSandboxes")
    add_arguments(run)
    run.add_argument("--verbose", action="store_true", help="debug logging")
    run.set_defaults(handler=_run)
    generate = commands.add_parser("crds", help="write the CRDs generated from the models")
    generate.add_argument("directory", nargs="*", help="default: crds/ and charts/aar/crds/")
    generate.add_argument("--check", action="store_true", help="fail if a file is out of date")
    generate.set_defaults(handler=_crds)
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
