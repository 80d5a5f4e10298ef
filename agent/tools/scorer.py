"""The scorer: the task's public facts, submissions, and the leaderboard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from aar_agent.tools.notebook import notebook_excerpt
from aar_agent.tools.registry import Input, NoInput, ToolContext, ToolError, ToolSet
from aar_common.api import NOTEBOOK_EXCERPT_CHARS

toolset = ToolSet()


def read_predictions(path: Path) -> list[Any]:
    """Predictions from a file: a JSON list, or one prediction per line."""
    if not path.is_file():
        raise ToolError(f"{path} does not exist; write your predictions there first")
    text = path.read_text()
    try:
        predictions = json.loads(text)
    except json.JSONDecodeError:
        predictions = [_line_value(line) for line in text.splitlines() if line.strip()]
    if not isinstance(predictions, list):
        raise ToolError(f"{path} holds JSON that is not a list; write one list of predictions")
    if not predictions:
        raise ToolError(f"{path} holds no predictions")
    return predictions


def _line_value(line: str) -> Any:
    """A prediction from one line: a JSON value where the line is one (so `1` is a number, as
    the task's labels may be), else the line's text."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return line.strip()


def _task(context: ToolContext) -> str:
    if not context.settings.task:
        raise ToolError("this sandbox has no task name (AAR_TASK); nothing to score against")
    return context.settings.task


@toolset.tool(NoInput)
async def scorer_task(context: ToolContext, _: NoInput, __: str) -> str:
    """The task's public facts: metric, test-set size, allowed labels."""
    facts = await context.scorer.request("GET", f"/api/v1/tasks/{_task(context)}")
    return json.dumps(facts, indent=1)


class ScorerSubmitInput(Input):
    predictions_path: str = Field(
        description="file of predictions in the order of the task's test set: a JSON list, "
        "or one prediction per line"
    )
    method: str = Field(description="what was done to produce these predictions")
    artifact: str | None = Field(
        default=None,
        description="digest of the published code that produces these predictions (sha256:...)",
    )
    command: str | None = Field(
        default=None,
        description="the shell command that produces the predictions again from that code, run "
        "in the folder the artifact unpacks into, with the task bundle at $AAR_TASK_DIR and a "
        "seed in $AAR_SEED (it runs once per seed); it must write "
        "$AAR_OUTPUT_DIR/predictions.json (e.g. `aar-train w2s ... --seeds $AAR_SEED --task "
        "$AAR_TASK_DIR --out $AAR_OUTPUT_DIR`)",
    )


@toolset.tool(ScorerSubmitInput)
async def scorer_submit(context: ToolContext, arguments: ScorerSubmitInput, _: str) -> str:
    """Submit test-set predictions for scoring. Feedback is coarse and rate-limited, and
    near-duplicate submissions are refused and flagged. Give the artifact and command that
    produce them: leading results are run again from that code, with no network, on data you
    never saw, and count only if they reproduce. The newest entries of your notebook go with
    the submission, for the humans who review it."""
    predictions = read_predictions(context.path(arguments.predictions_path))
    answer = await context.scorer.request(
        "POST",
        "/api/v1/submissions",
        json_body={
            "task": _task(context),
            "predictions": predictions,
            "method": arguments.method,
            "artifact": arguments.artifact,
            "command": arguments.command,
            "notebook": notebook_excerpt(context.settings.workspace, NOTEBOOK_EXCERPT_CHARS),
        },
    )
    return json.dumps(answer, indent=1)


@toolset.tool(NoInput)
async def scorer_leaderboard(context: ToolContext, _: NoInput, __: str) -> str:
    """Your run's leaderboard (released feedback only)."""
    return json.dumps(await context.scorer.request("GET", "/api/v1/leaderboard"), indent=1)
