"""Submission bodies read, validated and packed: the same code in an intake worker and, without
workers, in the deciding process."""

from __future__ import annotations

import time
from collections.abc import Mapping

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from aar_common.api import NOTEBOOK_EXCERPT_CHARS
from aar_common.validation import describe
from aar_common.web import presented_token, too_large
from aar_scorer.intake.protocol import BodyError, ParsedSubmission, Submission, TaskFacts
from aar_scorer.packing import Packer

SUBMISSIONS_PATH = "/api/v1/submissions"


class SubmissionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1)
    predictions: list[StrictInt | StrictStr] = Field(min_length=1)
    method: str = Field(min_length=1, max_length=20_000, description="what was done")
    artifact: str | None = Field(default=None, pattern=r"^sha256:[0-9a-f]{64}$")
    command: str | None = Field(
        default=None,
        min_length=1,
        max_length=4000,
        description="the shell command that makes these predictions again from the artifact "
        "(run in its folder, with $AAR_TASK_DIR and $AAR_OUTPUT_DIR)",
    )
    notebook: str | None = Field(
        default=None,
        max_length=NOTEBOOK_EXCERPT_CHARS,
        description="the newest entries of the agent's notebook when it submitted, for reviewers",
    )


class Parser:
    """Parses bodies for a set of tasks; the same code in a worker and on the event loop."""

    def __init__(self, tasks: Mapping[str, TaskFacts]) -> None:
        self._tasks = {name: (Packer(facts.labels), facts.size) for name, facts in tasks.items()}

    def parse(self, raw: bytes) -> ParsedSubmission | BodyError:
        try:
            body = SubmissionRequest.model_validate_json(raw)
        except ValidationError as error:
            return BodyError(f"invalid request body: {describe(error)}")
        packed = answer_error = None
        known = self._tasks.get(body.task)
        if known is not None:
            packer, size = known
            if len(body.predictions) != size:
                answer_error = (
                    f"predictions has {len(body.predictions)} answers; task {body.task} needs "
                    f"exactly {size}, one per item in the task bundle's order"
                )
            else:
                try:
                    packed = packer.pack(body.predictions)
                except ValueError as error:
                    answer_error = f"predictions: {error}"
        return ParsedSubmission(
            body.task,
            body.method,
            body.artifact,
            packed,
            answer_error,
            body.command,
            body.notebook,
        )


async def receive(request: web.Request, parser: Parser) -> Submission:
    """A submission request as the deciding process takes it: the same in a worker and there."""
    arrived = time.monotonic()
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as error:
        parsed: ParsedSubmission | BodyError = BodyError(too_large(error), error.status)
    else:
        parsed = parser.parse(raw)
    return Submission(presented_token(request), parsed, arrived)
