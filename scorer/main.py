"""`aar-scorer`: serve the scorer over HTTP (TCP or a Unix socket) until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from aar_common.credentials import PUBLIC_KEY_FILE_ENV, CredentialVerifier
from aar_common.web import add_metrics_port, address, listen, metrics_listener, serve
from aar_scorer.app import SCORER_KEY, build_app
from aar_scorer.intake import IntakeError
from aar_scorer.settings import (
    DATA_DIR_ENV,
    DEFAULT_INTAKE_WORKERS,
    INTAKE_WORKERS_ENV,
    TASKS_FILE_ENV,
    Settings,
)
from aar_scorer.store import Store
from aar_scorer.tasks import TaskConfigError, load_tasks, refuse_vacuous


def _worker_count(text: str) -> int:
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text} is not a worker count; pass 0 or more")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aar-scorer", description="aar scorer: hidden labels, bounded feedback, review"
    )
    parser.add_argument(
        "--tasks",
        default=os.environ.get(TASKS_FILE_ENV, "/etc/aar-scorer/tasks.yaml"),
        help=f"tasks file (YAML; default ${TASKS_FILE_ENV} or /etc/aar-scorer/tasks.yaml)",
    )
    parser.add_argument(
        "--data-dir",
        default=os.environ.get(DATA_DIR_ENV, "/var/lib/aar-scorer"),
        help=f"where scorer.db lives (default ${DATA_DIR_ENV} or /var/lib/aar-scorer)",
    )
    parser.add_argument(
        "--public-key",
        default=os.environ.get(PUBLIC_KEY_FILE_ENV),
        help=f"credential public key PEM (default ${PUBLIC_KEY_FILE_ENV})",
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--unix-socket", type=Path, help="serve on this Unix socket instead")
    add_metrics_port(parser)
    parser.add_argument(
        "--intake-workers",
        type=_worker_count,
        default=os.environ.get(INTAKE_WORKERS_ENV, str(DEFAULT_INTAKE_WORKERS)),
        help="processes that receive and parse submissions beside the one that decides; 0 "
        f"receives them in that one (default ${INTAKE_WORKERS_ENV} or {DEFAULT_INTAKE_WORKERS})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Read flags and the environment into Settings, then serve the scorer until SIGTERM."""
    args = _parser().parse_args(argv)
    if not args.public_key:
        raise SystemExit(f"aar-scorer: pass --public-key FILE or set {PUBLIC_KEY_FILE_ENV}")
    settings = Settings(
        tasks_file=args.tasks,
        data_dir=args.data_dir,
        public_key_file=args.public_key,
        intake_workers=args.intake_workers,
    )
    try:
        verifier = CredentialVerifier.from_file(settings.public_key_file)
    except OSError as error:
        raise SystemExit(f"aar-scorer: cannot read the public key: {error}") from error
    try:
        tasks = load_tasks(settings.tasks_file)
        bounds = refuse_vacuous(tasks)
    except TaskConfigError as error:
        raise SystemExit(f"aar-scorer: {error}") from error
    try:
        public = listen(args.host, args.port, args.unix_socket)
    except OSError as error:
        where = args.unix_socket or f"{args.host}:{args.port}"
        raise SystemExit(
            f"aar-scorer: cannot listen on {where}: {error}; pass another --port or --unix-socket"
        ) from error
    # Opened here, in the deciding process, and never handed to the intake workers: /metrics is
    # not on the public port, which the workers share and pass on.
    metrics = metrics_listener("aar-scorer", args.host, args.metrics_port)
    store = Store(settings.database)
    app = build_app(tasks, store, verifier, intake_workers=settings.intake_workers)

    def ready(_: str) -> None:
        names = ", ".join(sorted(tasks)) or "no tasks (list them in the tasks file)"
        print(f"Serving {names} on {address(public)}", flush=True)
        # What each task's feedback settings imply for the stated leakage bound.
        for line in bounds:
            print(line, flush=True)

    try:
        with public:
            serving = app[SCORER_KEY].intake.listen(public)
            asyncio.run(serve(app, sock=serving, metrics=metrics, ready=ready))
    except IntakeError as error:
        raise SystemExit(f"aar-scorer: {error}") from error
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
