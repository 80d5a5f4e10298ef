"""The tools the model can call. Each family's module declares its tools beside their code
(`registry.ToolSet.tool`): an async function whose name, docstring and pydantic input model are
what the model sees. A tool answers text; a ToolError becomes an `is_error` result whose message
tells the model what to do instead."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from aar_agent.config import Settings
from aar_agent.services import ServiceClient, ServiceError
from aar_agent.state import RunState
from aar_agent.telemetry import log
from aar_agent.tools import artifacts, forum, notebook, scorer, workspace
from aar_agent.tools.notebook import NOTEBOOK_FILE
from aar_agent.tools.registry import ToolContext, ToolError
from aar_agent.tools.scorer import read_predictions
from aar_common.validation import describe

__all__ = ["NOTEBOOK_FILE", "ToolError", "Toolbox", "read_predictions", "truncate"]

# The order the model reads them in.
TOOLSETS = (
    workspace.toolset,
    notebook.toolset,
    forum.toolset,
    scorer.toolset,
    artifacts.toolset,
)


def truncate(text: str, limit: int, note: str) -> str:
    """Head and tail of `text` within `limit` characters, with a note on what was left out."""
    if len(text) <= limit:
        return text
    half = limit // 2
    omitted = len(text) - 2 * half
    return f"{text[:half]}\n[... {omitted} characters omitted; {note} ...]\n{text[-half:]}"


class Toolbox(ToolContext):
    """The tools of one agent, bound to its workspace, state and services."""

    def __init__(
        self, settings: Settings, state: RunState, forum: ServiceClient, scorer: ServiceClient
    ) -> None:
        super().__init__(settings, state, forum, scorer)
        self.tools = {tool.name: tool for toolset in TOOLSETS for tool in toolset.tools}
        # Built once: the loop sends them, and measures them, on every step.
        self.definitions = [tool.definition() for tool in self.tools.values()]

    async def call(self, name: str, raw_input: Any, call_id: str) -> tuple[str, bool]:
        """Run one tool call; returns (text for the model, whether it is an error)."""
        tool = self.tools.get(name)
        if tool is None:
            return f"there is no tool named {name!r}; the tools are {sorted(self.tools)}", True
        try:
            arguments = tool.input_model.model_validate(raw_input)
        except ValidationError as error:
            return f"bad input for {name}: {describe(error, whole='input')}", True
        try:
            text = await tool.handler(self, arguments, call_id)
        except (ToolError, ServiceError) as error:
            return str(error), True
        except Exception as error:
            # A tool's own bug (or an odd file: binary, unreadable) must not end days of work;
            # the model reads what happened, and the log keeps the stack for people.
            log(logging.ERROR, "Tool failed", tool=name, exc_info=True)
            return f"{name} failed: {type(error).__name__}: {error}", True
        return self._limit(text, call_id), False

    def _limit(self, text: str, call_id: str) -> str:
        if len(text) <= self.settings.output_chars:
            return text
        saved = self.output_file(call_id)
        if not saved.exists():  # bash has written it already; other tools have not
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(text)
        note = f"the full output is in {saved}; read parts of it with read_file or grep"
        return truncate(text, self.settings.output_chars, note)
