"""`aar review list|show|approve|reject`: the reviewer's side of the scorer, over its HTTP API
with an admin credential."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from typing import Any

import aiohttp

from aar_common.client import ServiceClient, ServiceError

CREDENTIAL_ENV = "AAR_CREDENTIAL"
SCORER_URL_ENV = "AAR_SCORER_URL"


async def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    credential = args.credential or os.environ.get(CREDENTIAL_ENV)
    if not credential:
        raise SystemExit(
            f"aar review: no credential; pass --credential or set {CREDENTIAL_ENV} "
            "(mint one with `aar credential mint --admin NAME`)"
        )
    url = (args.scorer_url or os.environ.get(SCORER_URL_ENV) or "").rstrip("/")
    if not url:
        raise SystemExit(f"aar review: no scorer; pass --scorer-url or set {SCORER_URL_ENV}")
    scorer = ServiceClient("scorer", url, credential, timeout=aiohttp.ClientTimeout(total=30))
    try:
        async with scorer:
            return await scorer.request(method, path, json_body=body)
    except ServiceError as error:
        said = f"the scorer answered {error.status}: {error.message}" if error.status else error
        raise SystemExit(f"aar review: {said}") from error


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _list(args: argparse.Namespace) -> int:
    query = f"?run={args.run}" if args.run else ""
    pending = asyncio.run(_call(args, "GET", f"/api/v1/review{query}"))["pending"]
    if not pending:
        print("No submissions wait for review")
        return 0
    print(f"{'ID':>6}  {'RUN':<28} {'AGENT':<20} {'PRIVATE':>8} {'PUBLIC':>8}  STATUS")
    for entry in pending:
        status = entry["status"] + (f" ({entry['probe']['reason']})" if entry["probe"] else "")
        print(
            f"{entry['id']:>6}  {entry['run']:<28} {entry['agent']:<20} "
            f"{_score(entry['private_score']):>8} {_score(entry['public_score']):>8}  {status}"
        )
    return 0


def _show(args: argparse.Namespace) -> int:
    detail = asyncio.run(_call(args, "GET", f"/api/v1/submissions/{args.id}"))
    print(json.dumps(detail, indent=2))
    return 0


def _decide(args: argparse.Namespace) -> int:
    body = {"decision": args.decision, "comment": args.comment}
    detail = asyncio.run(_call(args, "POST", f"/api/v1/review/{args.id}", body))
    verb = "Approved" if args.decision == "approve" else "Rejected"
    print(f"{verb} submission {detail['id']} of {detail['run']} by {detail['agent']}")
    return 0


def add_review(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The `aar review` subcommand (declared in the entry-point group `aar.commands`)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--credential", help=f"an admin credential (default ${CREDENTIAL_ENV})")
    common.add_argument("--scorer-url", help=f"the scorer (default ${SCORER_URL_ENV})")
    review = commands.add_parser("review", help="review the submissions that score well")
    sub = review.add_subparsers(dest="review_command", required=True)
    listing = sub.add_parser("list", parents=[common], help="submissions waiting for a decision")
    listing.add_argument("--run", help="only this run: NAMESPACE/RUN")
    listing.set_defaults(handler=_list)
    show = sub.add_parser("show", parents=[common], help="one submission, with its history")
    show.add_argument("id", type=int)
    show.set_defaults(handler=_show)
    for decision in ("approve", "reject"):
        command = sub.add_parser(decision, parents=[common], help=f"{decision} a submission")
        command.add_argument("id", type=int)
        command.add_argument("--comment", required=True, help="why, for the record")
        command.set_defaults(handler=_decide, decision=decision)
