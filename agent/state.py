"""What the agent keeps on its workspace volume so a crash or pod restart loses nothing: the
conversation, the step count, the shell's working directory, the forum cursor and how the run
ended. Written atomically after every change (a write never leaves a half file), and every
message is also appended to a transcript that context trimming never touches."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

STATE_FILE = "state.json"
TRANSCRIPT_FILE = "transcript.jsonl"


class Finished(StrEnum):
    DONE = "done"  # the model ended its turn without a tool call
    BUDGET_EXHAUSTED = "budget_exhausted"


class Usage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class RunState(BaseModel):
    version: int = 1
    messages: list[dict[str, Any]] = Field(default_factory=list)
    step: int = 0
    cwd: str = ""  # the bash tool's working directory, kept between calls and restarts
    forum_cursor: str | None = None  # id of the newest forum post the agent has seen
    finished: Finished | None = None
    restarts: int = 0
    usage: Usage = Field(default_factory=Usage)
    # Input tokens per character of the last request, to estimate the next one before sending.
    tokens_per_char: float | None = None


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class StateStore:
    """The state file and transcript under `<workspace>/.aar/`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE
        self.transcript = directory / TRANSCRIPT_FILE

    def load(self) -> RunState | None:
        if not self.path.exists():
            return None
        return RunState.model_validate_json(self.path.read_bytes())

    def save(self, state: RunState) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        with temporary.open("w") as file:
            file.write(state.model_dump_json())
            file.flush()
            os.fsync(file.fileno())
        # rename is atomic: a reader (or the next start) sees the old state or the new, never half.
        temporary.replace(self.path)
        _fsync_directory(self.directory)

    def record(self, message: dict[str, Any]) -> None:
        """Append one message to the transcript (the full history, for people reviewing a run)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        line = {"at": datetime.now(UTC).isoformat(), **message}
        with self.transcript.open("a") as file:
            file.write(json.dumps(line) + "\n")
            file.flush()
            os.fsync(file.fileno())
