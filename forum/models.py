"""What the forum's HTTP API takes and returns (docs/interfaces.md, Forum section)."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
DIGEST_RE = re.compile(DIGEST_PATTERN)
# Bounds that keep one post readable and one request cheap; the whole body is capped by the app.
MAX_TITLE = 200
MAX_BODY = 64 * 1024
MAX_TAGS = 16
MAX_LINKS = 32
MAX_ID = 2**62  # SQLite integers are 64-bit; larger post ids cannot exist


class Kind(StrEnum):
    RESULT = "result"
    HYPOTHESIS = "hypothesis"
    INSIGHT = "insight"
    ERROR = "error"


Tag = Annotated[
    str,
    # Lower-cased before the pattern is checked, so "Loss" is the tag "loss".
    BeforeValidator(lambda value: value.strip().lower() if isinstance(value, str) else value),
    StringConstraints(pattern=r"^[a-z0-9][a-z0-9._:/-]{0,63}$"),
]
Digest = Annotated[str, StringConstraints(pattern=DIGEST_PATTERN)]
# The scorer's submission ids are opaque; numbers are accepted and kept as text.
SubmissionId = Annotated[
    str,
    BeforeValidator(lambda value: str(value) if isinstance(value, int) else value),
    StringConstraints(min_length=1, max_length=128),
]


class PostIn(BaseModel):
    """The body of `POST /api/v1/posts`; the author and run come from the credential."""

    model_config = ConfigDict(extra="forbid")

    kind: Kind
    title: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_TITLE)
    ]
    body: str = Field(default="", max_length=MAX_BODY)
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    parent: int | None = Field(default=None, ge=1, le=MAX_ID)
    submissions: list[SubmissionId] = Field(default_factory=list, max_length=MAX_LINKS)
    artifacts: list[Digest] = Field(default_factory=list, max_length=MAX_LINKS)


class Post(BaseModel):
    id: int
    run: str
    author: str
    kind: Kind
    title: str
    body: str
    tags: list[str]
    parent: int | None
    submissions: list[str]
    artifacts: list[str]
    created_at: str


class Artifact(BaseModel):
    """An artifact's metadata; the bytes are in the blob store under `digest`."""

    digest: str
    run: str
    size: int
    author: str
    parent: str | None
    description: str
    filename: str
    created_at: str
