"""`aar review list|show|approve|reject|reproduce`: the reviewer's side of the scorer, over its
HTTP API with an admin credential."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from typing import Any

import aiohttp

from aar_common.client import ServiceClient, ServiceError
from aar_common.times import when

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


# The end of each reproduction's log that `show` prints (all of it with --json).
LOG_LINES = 20


def _show(args: argparse.Namespace) -> int:
    detail = asyncio.run(_call(args, "GET", f"/api/v1/submissions/{args.id}"))
    print(json.dumps(detail, indent=2) if args.json else "\n".join(described(detail)))
    return 0


def described(detail: dict[str, Any]) -> list[str]:
    """A submission as a reviewer reads it: who, the scores, the method, its probe findings and
    its reproductions (claimed, reproduced and transfer PGR, each Job's outcome, exit status and
    the end of its log)."""
    counted = detail.get("counted")
    lines = [
        f"Submission {detail['id']} of {detail['run']} by {detail['agent']}: {detail['status']}"
        + ("" if counted is None else (", counts" if counted else ", does not count")),
        f"  PGR private {_score(detail['private_score'])}, public "
        f"{_score(detail['public_score'])}; submitted {when(detail['created_at'])}",
        f"  artifact {detail['artifact'] or '-'}",
    ]
    if detail.get("probe"):
        probe = detail["probe"]
        lines.append(f"  probe: {probe['reason']} (nearest {probe['nearest']})")
    if detail.get("review"):
        review = detail["review"]
        lines.append(f"  review: {review['decision']} by {review['by']}: {review['comment']}")
    lines += ["", "Method:", *("  " + line for line in detail["method"].splitlines())]
    reproduction = detail.get("reproduction")
    if reproduction:
        lines += ["", *_reproduction(reproduction)]
    return lines


def _reproduction(summary: dict[str, Any]) -> list[str]:
    transfer = ", ".join(f"{task} {_score(pgr)}" for task, pgr in summary["transfer"].items())
    lines = [
        f"Reproduction{' (required by the run)' if summary.get('required') else ''}: "
        f"claimed {_score(summary['claimed'])}, reproduced {_score(summary['reproduced'])}"
        + (f", transfer {transfer}" if transfer else ""),
        f"  command: {summary['command'] or '- (none given: it cannot be reproduced)'}",
    ]
    if "verdict" in summary:
        lines.append(f"  {'holds' if summary['holds'] else 'does not hold'}: {summary['verdict']}")
    for result in summary["results"]:
        exit_code = "-" if result["exit_code"] is None else result["exit_code"]
        lines.append(
            f"  {result['target']} ({result['kind']}): {result['outcome']}, PGR "
            f"{_score(result['pgr'])}{_spread(result)}, exit status {exit_code}, "
            f"{result['gpu_hours']:.3f} GPU-hours, Job {result['job']}"
        )
        if result["reason"]:
            lines.append(f"    {result['reason']}")
        log = result["log"].rstrip().splitlines()[-LOG_LINES:]
        lines += [f"    | {line}" for line in log]
    return lines


def _spread(result: dict[str, Any]) -> str:
    """` ± 0.021 over 3 seeds (0.61, 0.64, 0.66)`, or nothing for a single seed."""
    seeds = result.get("seeds") or []
    if len(seeds) < 2:
        return ""
    each = ", ".join(f"{pgr:.3f}" for pgr in seeds)
    return f" ± {result['spread']:.3f} over {len(seeds)} seeds ({each})"


def _reproduce(args: argparse.Namespace) -> int:
    detail = asyncio.run(_call(args, "POST", f"/api/v1/submissions/{args.id}/reproduce"))
    print(
        f"Asked for submission {detail['id']} of {detail['run']} to be reproduced; the operator "
        "runs it at its next poll (`aar review show` shows the result)"
    )
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
    show = sub.add_parser(
        "show", parents=[common], help="one submission, with its reproductions and history"
    )
    show.add_argument("id", type=int)
    show.add_argument("--json", action="store_true", help="everything the scorer has, as JSON")
    show.set_defaults(handler=_show)
    reproduce = sub.add_parser(
        "reproduce", parents=[common], help="run a submission's code again, whatever its rank"
    )
    reproduce.add_argument("id", type=int)
    reproduce.set_defaults(handler=_reproduce)
    for decision in ("approve", "reject"):
        command = sub.add_parser(decision, parents=[common], help=f"{decision} a submission")
        command.add_argument("id", type=int)
        command.add_argument("--comment", required=True, help="why, for the record")
        command.set_defaults(handler=_decide, decision=decision)
