"""The research console: the runs as the cluster knows them, a run's page (summary, charts,
agents, leaderboard, review queue, artifacts), the review queue across runs and a submission's
page with Approve and Reject. Reviews go to the scorer with the signed-in human's own admin
credential, the same call as `aar review`, so the scorer's rules hold here too."""

from __future__ import annotations

import asyncio
import difflib
import io
import math
import re
import tarfile
import zlib
from collections.abc import Awaitable
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from aar_common.times import when
from aar_common.web import fail, whole_number
from aar_forum.charts import Line, bar_chart, line_chart
from aar_forum.forum import forum
from aar_forum.kube import (
    RunView,
    SandboxView,
    agent_sandboxes,
    research_run,
    research_runs,
    states,
)
from aar_forum.store import PostFilter
from aar_forum.ui import (
    Viewer,
    checked_form,
    dollars,
    render,
    require_viewer,
    template_functions,
)
from aar_forum.upstream import Reading, ask

AGENTS_PER_PAGE = 50
# What a reviewer sees of an artifact without downloading it: the first members of its archive.
ARCHIVE_LISTING_BYTES = 64 * 1024**2
ARCHIVE_LISTING_MEMBERS = 200


def pgr(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


template_functions(pgr=pgr, when=when)


def _natural(name: str) -> tuple[Any, ...]:
    """`cues-2` before `cues-10`."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


class _Services:
    """The scorer and the gateway, read with the viewer's own admin credential."""

    def __init__(self, request: web.Request, viewer: Viewer) -> None:
        self.state = forum(request)
        self.token = viewer.token

    def scorer(self, path: str, method: str = "GET", body: Any = None) -> Awaitable[Reading]:
        settings, http = self.state.settings, self.state.http
        assert http is not None
        return ask(
            http, settings.scorer_url, "scorer", "AAR_SCORER_URL", self.token, method, path, body
        )

    def gateway(self, path: str) -> Awaitable[Reading]:
        settings, http = self.state.settings, self.state.http
        assert http is not None
        return ask(
            http, settings.gateway_url, "gateway", "AAR_GATEWAY_URL", self.token, "GET", path
        )


def _pending_by_run(review: Reading) -> dict[str, dict[str, Any]]:
    """The best submission waiting for a decision, per run."""
    best: dict[str, dict[str, Any]] = {}
    if review.problem is None:
        for entry in review.data.get("pending", []):
            held = best.get(entry["run"])
            if held is None or (entry["private_score"] or -math.inf) > (
                held["private_score"] or -math.inf
            ):
                best[entry["run"]] = entry
    return best


async def runs_page(request: web.Request) -> web.Response:
    viewer = require_viewer(request)
    services = _Services(request, viewer)
    state = services.state
    assert state.http is not None
    runs, review, forum_runs = await asyncio.gather(
        research_runs(state.http, state.settings.kube),
        services.scorer("/api/v1/review"),
        state.store.call(state.store.runs),
    )
    return render(
        "runs.html",
        viewer=viewer,
        runs=runs,
        pending=_pending_by_run(review),
        review_problem=review.problem,
        # Outside a cluster the forum still knows the runs its agents wrote to.
        forum_runs=forum_runs,
    )


def _leaderboard(board: Reading) -> list[dict[str, Any]]:
    """The scorer's admin leaderboard as rows a human reads, ranked by private score."""
    if board.problem is not None:
        return []
    rows = []
    for rank, entry in enumerate(board.data.get("submissions", []), start=1):
        feedback = entry["feedback"]
        review = entry.get("review") or {}
        rows.append(
            {
                "rank": rank,
                "id": entry["id"],
                "agent": entry["agent"],
                "public": pgr(feedback["score"]) if feedback["released"] else "withheld",
                "private": pgr(entry["private_score"]),
                "method": entry["method"],
                "when": when(entry["created_at"]),
                "status": entry["status"],
                "probe": (entry.get("probe") or {}).get("reason", ""),
                "review": review.get("decision", "pending"),
                "counted": entry.get("counted", False),
            }
        )
    return rows


def _charts(
    run: RunView | None, spend: Reading, scores: Reading, sandboxes: list[SandboxView]
) -> dict[str, Any]:
    charts: dict[str, Any] = {}
    if spend.problem is None:
        cap = None
        if run is not None and run.cap_usd is not None:
            cap = (f"cap {run.budget}", run.cap_usd)
        charts["spend"] = line_chart(
            "Spend over time",
            spend.data["times"],
            [Line("spent (USD)", spend.data["series"]["usd"], "spend")],
            y_format=lambda usd: f"${usd:,.2f}",
            ceiling=cap,
        )
    else:
        charts["spend_problem"] = spend.problem
    if scores.problem is None:
        series = scores.data["series"]
        charts["scores"] = line_chart(
            "Best PGR over time",
            scores.data["times"],
            [
                Line("best public feedback", series["best_public"], "public"),
                Line("best approved (private)", series["best_counted"], "approved"),
            ],
            y_format=lambda value: f"{value:.2f}",
        )
        charts["submissions"] = line_chart(
            "Submissions over time",
            scores.data["times"],
            [Line("submissions", series["submissions"], "submissions")],
            y_format=lambda value: f"{value:.0f}",
        )
    else:
        charts["scores_problem"] = scores.problem
    charts["states"] = bar_chart("Agents by state", states(sandboxes))
    return charts


def _agent_rows(
    sandboxes: list[SandboxView],
    activity: dict[str, dict[str, object]],
    spend: Reading,
) -> list[dict[str, Any]]:
    """One row per agent known to Kubernetes, the forum or the gateway."""
    spent: dict[str, Any] = spend.data.get("agents", {}) if spend.problem is None else {}
    by_name = {sandbox.agent: sandbox for sandbox in sandboxes}
    rows = []
    for name in sorted(set(by_name) | set(activity) | set(spent), key=_natural):
        sandbox = by_name.get(name)
        seen = activity.get(name, {})
        totals = spent.get(name) or {}
        rows.append(
            {
                "agent": name,
                "state": sandbox.state if sandbox else "no sandbox",
                "message": sandbox.message if sandbox else "",
                "posts": seen.get("posts", 0),
                "artifacts": seen.get("artifacts", 0),
                "last": when(str(seen["last"])) if seen.get("last") else "never",
                "usd": f"${dollars(totals.get('usd', 0))}" if spend.problem is None else "—",
                "requests": totals.get("requests", 0) if spend.problem is None else "—",
            }
        )
    return rows


async def run_page(request: web.Request) -> web.Response:
    viewer = require_viewer(request)
    services = _Services(request, viewer)
    state = services.state
    assert state.http is not None
    namespace, name = request.match_info["namespace"], request.match_info["run"]
    key = f"{namespace}/{name}"
    path = f"{quote(namespace)}/{quote(name)}"
    run, sandboxes, board, review, activity, artifacts = await asyncio.gather(
        research_run(state.http, state.settings.kube, namespace, name),
        agent_sandboxes(state.http, state.settings.kube, namespace, name),
        services.scorer(f"/api/v1/leaderboard?run={quote(key)}"),
        services.scorer(f"/api/v1/review?run={quote(key)}"),
        state.store.call(state.store.activity, key),
        state.store.call(state.store.list_artifacts, key, None, 50),
    )
    spend, spend_history, score_history = await asyncio.gather(
        services.gateway(f"/api/v1/spend/{path}"),
        services.gateway(f"/api/v1/spend/{path}/history"),
        services.scorer(f"/api/v1/runs/{path}/history"),
    )
    known: list[SandboxView] = sandboxes.data if sandboxes.problem is None else []
    agents = _agent_rows(known, activity, spend)
    wanted = request.query.get("state", "")
    shown = [row for row in agents if not wanted or row["state"] == wanted]
    pages = max(1, math.ceil(len(shown) / AGENTS_PER_PAGE))
    page = min(whole_number(request.query.get("page", "1"), "page", 1, 10**6), pages)

    def link(**query: object) -> str:
        merged = {"state": wanted, "page": page, **query}
        return f"/runs/{key}?" + urlencode({k: v for k, v in merged.items() if v not in ("", None)})

    summary: RunView | None = run.data if run.problem is None else None
    return render(
        "run.html",
        viewer=viewer,
        run=key,
        summary=summary,
        run_problem=run.problem,
        sandboxes_problem=sandboxes.problem,
        counts=states(known),
        agents=shown[(page - 1) * AGENTS_PER_PAGE : page * AGENTS_PER_PAGE],
        agents_total=len(agents),
        states_seen=sorted({row["state"] for row in agents}),
        wanted=wanted,
        page=page,
        pages=pages,
        link=link,
        charts=_charts(summary, spend_history, score_history, known),
        spend=spend,
        run_total=f"${dollars(spend.data['run']['usd'])} over {spend.data['run']['requests']} "
        "model requests"
        if spend.problem is None and spend.data.get("run")
        else None,
        leaderboard=_leaderboard(board),
        board_problem=board.problem,
        pending=_queue(review),
        best_pending=_pending_by_run(review).get(key, {}).get("private_score"),
        review_problem=review.problem,
        artifacts=artifacts,
    )


def _queue(review: Reading) -> list[dict[str, Any]]:
    """Submissions that need a decision, flagged ones first, then by private score."""
    if review.problem is not None:
        return []
    pending = review.data.get("pending", [])
    return sorted(
        pending, key=lambda entry: (entry["status"] != "flagged", -(entry["private_score"] or 0))
    )


async def review_page(request: web.Request) -> web.Response:
    viewer = require_viewer(request)
    review = await _Services(request, viewer).scorer("/api/v1/review")
    return render(
        "review.html",
        viewer=viewer,
        pending=_queue(review),
        problem=review.problem,
    )


def _archive_listing(data: bytes, truncated: bool) -> tuple[list[tuple[str, int]], str | None]:
    """The first members of a tar archive (gzip or not), and what the listing leaves out."""
    members: list[tuple[str, int]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as archive:
            for member in archive:
                if member.isfile():
                    members.append((member.name, member.size))
                if len(members) == ARCHIVE_LISTING_MEMBERS:
                    return members, f"the first {ARCHIVE_LISTING_MEMBERS} files"
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        if not members:
            return [], "a single file, not an archive"
        if not truncated:
            return members, "the files before the archive breaks off"
    return members, "the files of its first 64 MiB" if truncated else None


async def _artifact_files(request: web.Request, digest: str) -> dict[str, Any]:
    state = forum(request)
    chunks, size = [], 0
    try:
        async for chunk in state.blobs.read(digest):
            chunks.append(chunk)
            size += len(chunk)
            if size >= ARCHIVE_LISTING_BYTES:
                break
    except (FileNotFoundError, OSError):
        return {"files": [], "note": "the artifact is not in the store"}
    files, note = await asyncio.to_thread(
        _archive_listing, b"".join(chunks), size >= ARCHIVE_LISTING_BYTES
    )
    return {"files": files, "note": note}


def _method_diff(before: str, after: str) -> list[tuple[str, str]]:
    """A line diff as (kind, text): kind is `add`, `del`, `hunk` or `same`."""
    lines = []
    for line in difflib.unified_diff(
        before.splitlines(), after.splitlines(), "before", "after", lineterm="", n=2
    ):
        if line.startswith(("---", "+++")):
            continue
        kind = {"+": "add", "-": "del", "@": "hunk"}.get(line[:1], "same")
        lines.append((kind, line))
    return lines


async def submission_page(request: web.Request, problem: str | None = None) -> web.Response:
    viewer = require_viewer(request)
    services = _Services(request, viewer)
    state = services.state
    raw = request.match_info["id"]
    if not raw.isdigit():
        fail(400, f"a submission id is a number (got {raw!r})")
    detail = await services.scorer(f"/api/v1/submissions/{raw}")
    if detail.problem is not None:
        return render("submission.html", status=502, viewer=viewer, problem=detail.problem,
                     submission=None)  # fmt: skip
    submission = detail.data
    run = submission["run"]
    board, posts = await asyncio.gather(
        services.scorer(f"/api/v1/leaderboard?run={quote(run)}"),
        state.store.call(
            state.store.search, PostFilter(run=run, author=submission["agent"], limit=200)
        ),
    )
    # The submission it improved on: the best of the run's earlier ones (by private score).
    earlier = [
        entry
        for entry in (board.data.get("submissions", []) if board.problem is None else [])
        if entry["id"] < submission["id"]
    ]
    improved_on = earlier[0] if earlier else None
    nearest = None
    if submission.get("probe") and submission["probe"].get("nearest"):
        reading = await services.scorer(f"/api/v1/submissions/{submission['probe']['nearest']}")
        nearest = reading.data if reading.problem is None else None
    around = _posts_around(posts, submission)
    artifact = (
        await _artifact_files(request, submission["artifact"]) if submission["artifact"] else None
    )
    before = None
    if improved_on is not None and improved_on.get("artifact") and artifact is not None:
        before = await _artifact_files(request, improved_on["artifact"])
    return render(
        "submission.html",
        viewer=viewer,
        problem=problem,
        submission=submission,
        improved_on=improved_on,
        method_diff=_method_diff(improved_on["method"], submission["method"])
        if improved_on
        else [],
        files_diff=_files_diff(before, artifact) if before is not None and artifact else None,
        nearest=nearest,
        posts=around,
        artifact=artifact,
    )


def _posts_around(posts: list[Any], submission: dict[str, Any], each_side: int = 3) -> list[Any]:
    """The agent's posts that cite the submission, and the few written just before and after."""
    moment = submission["created_at"]

    def written(post: Any) -> float:
        return datetime.fromisoformat(post.created_at.replace("Z", "+00:00")).timestamp()

    ordered = sorted(posts, key=written)
    cited = [post for post in ordered if str(submission["id"]) in post.submissions]
    before = [post for post in ordered if written(post) <= moment][-each_side:]
    after = [post for post in ordered if written(post) > moment][:each_side]
    chosen = {post.id: post for post in [*before, *cited, *after]}
    return sorted(chosen.values(), key=lambda post: post.created_at)


def _files_diff(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Files added, removed or changed in size between two artifacts: (change, name, sizes)."""
    old, new = dict(before["files"]), dict(after["files"])
    changes = []
    for name in sorted(set(old) | set(new)):
        if name not in old:
            changes.append(("added", name, f"{new[name]} bytes"))
        elif name not in new:
            changes.append(("removed", name, f"{old[name]} bytes"))
        elif old[name] != new[name]:
            changes.append(("changed", name, f"{old[name]} → {new[name]} bytes"))
    return changes


async def decide(request: web.Request) -> web.Response:
    """Approve or reject from the submission's page: the scorer keeps the decision and the
    reviewer's name (the signed-in human) in its audit log."""
    viewer, form = await checked_form(request)
    raw = request.match_info["id"]
    decision, comment = form.get("decision", ""), form.get("comment", "").strip()
    if decision not in ("approve", "reject"):
        fail(400, f"decision must be approve or reject (got {decision!r})")
    if not comment:
        return await submission_page(
            request, problem="Say why in the comment: every decision is kept with its reason."
        )
    kept = await _Services(request, viewer).scorer(
        f"/api/v1/review/{raw}", "POST", {"decision": decision, "comment": comment}
    )
    if kept.problem is not None:
        return await submission_page(request, problem=f"The decision was not kept: {kept.problem}")
    raise web.HTTPSeeOther(f"/submissions/{raw}#reviews")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", runs_page)
    app.router.add_get("/runs/{namespace}/{run}", run_page)
    app.router.add_get("/review", review_page)
    app.router.add_get("/submissions/{id}", submission_page)
    app.router.add_post("/submissions/{id}/review", decide)
