"""How a tool is declared: an async function decorated with its family's `ToolSet.tool(Input)`.
Its name is the tool's name, its docstring the description the model reads, and the input
model's JSON schema the input the model may send."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from aar_agent.config import Settings
from aar_agent.services import ServiceClient
from aar_agent.state import RunState


class ToolError(Exception):
    """The call could not be done; the message goes back to the model as an error result."""


class Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NoInput(Input):
    pass


@dataclass(eq=False)
class ToolContext:
    """What a tool acts on: the agent's settings, its saved state and its services."""

    settings: Settings
    state: RunState
    forum: ServiceClient
    scorer: ServiceClient

    def path(self, given: str) -> Path:
        """A path the model gave; relative paths are under the workspace."""
        path = Path(given)
        return path if path.is_absolute() else self.settings.workspace / path

    def output_file(self, call_id: str) -> Path:
        """Where the full output of one tool call is kept."""
        return self.settings.state_dir / "outputs" / f"{call_id}.log"


InputT = TypeVar("InputT", bound=Input)
Handler = Callable[[ToolContext, InputT, str], Awaitable[str]]


@dataclass
class Tool:
    name: str
    description: str
    input_model: type[Input]
    handler: Handler[Any]

    def definition(self) -> dict[str, Any]:
        """The tool as the Messages API takes it."""
        schema = self.input_model.model_json_schema()
        schema.pop("title", None)
        return {"name": self.name, "description": self.description, "input_schema": schema}


@dataclass
class ToolSet:
    """The tools of one family, in the order they are declared."""

    tools: list[Tool] = field(default_factory=list)

    def tool(self, input_model: type[InputT]) -> Callable[[Handler[InputT]], Handler[InputT]]:
        """Declare the decorated function `(context, arguments, call_id) -> text` as a tool."""

        def declare(handler: Handler[InputT]) -> Handler[InputT]:
            name = getattr(handler, "__name__", "")
            if not handler.__doc__:
                raise TypeError(f"tool {name} has no docstring; it is the model's description")
            # One paragraph: the docstring's line breaks are only the source's wrapping.
            description = " ".join(handler.__doc__.split())
            self.tools.append(Tool(name, description, input_model, handler))
            return handler

        return declare
