"""Reservations: a request's worst-case cost, held against its agent's and its run's budget from
the moment it is let through until its answer ends, so that requests in flight together can never
spend past a cap.

The worst case is every input token at the dearest rate the API may bill it at, plus `max_tokens`
of output. Input tokens are bounded from the body without asking anyone: a token is at least one
byte of UTF-8 text, so a body of n bytes carries at most n tokens of text (its JSON syntax and
escapes only make the bound looser), plus an allowance for what the API adds to the prompt and the
body does not spell out: the tool-use system prompt when there are tools (346 tokens on current
models), and the definitions behind Anthropic's own client tools (`bash`, `text_editor`,
`computer`: up to about 1,200 tokens each). Images and documents are not text, and their token
counts follow pixels and pages rather than bytes; a body with any is counted by the upstream's
`count_tokens` (free, one round trip, only for such requests), and the count is raised by a tenth
since the API calls it an estimate.

Server tools (web search, web fetch, code execution, MCP servers) are refused: the API runs them
in a loop on its side and adds what they return to the input as it goes, so no bound on a
request's cost can be known before it starts.

A hold is released when its request's real cost is recorded (the two happen in one step of the
event loop, so no budget check sees neither), and in every other way a request can end (a refusal
upstream, an error, an unreachable upstream) by the handler's `finally`. Holds live in memory
only: after a restart there are none, because every request that held one ended with the process
that admitted it. Nothing stale can block a budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from aar_gateway.store import RUN_ROW

TOOL_PROMPT_TOKENS = 1_000  # the tool-use system prompt: 346 tokens today, with room to grow
ANTHROPIC_TOOL_TOKENS = 2_000  # each Anthropic-defined client tool's hidden definition
COUNT_MARGIN = 10  # count_tokens' figure is raised by 1/COUNT_MARGIN: the API calls it an estimate
# Tools the agent runs itself, with a definition in the API's prompt: bounded by the allowance.
CLIENT_TOOL_TYPES = ("custom", "bash_", "text_editor_", "computer_", "memory_")
# Content whose token count follows pixels and pages, not bytes: counted upstream.
COUNTED_BLOCKS = frozenset({"image", "document", "container_upload"})


def unbounded_by(body: dict[str, Any]) -> str | None:
    """What in the body makes its cost impossible to bound in advance (server tools), if any."""
    if body.get("mcp_servers"):
        return "mcp_servers (the API calls MCP servers itself and adds their results to the input)"
    for tool in body.get("tools") or []:
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and not kind.startswith(CLIENT_TOOL_TYPES):
            return (
                f"the server tool {kind!r} (the API runs it itself and adds what it returns to "
                "the input, as often as the model asks)"
            )
    return None


def needs_count(raw: bytes, body: dict[str, Any]) -> bool:
    """Whether the body holds an image, a document or a file, whose tokens bytes do not bound."""
    # Most bodies name none of those types anywhere: a substring test spares walking them (unless
    # the JSON has escapes, which could spell a type otherwise).
    if b"\\u" not in raw and not any(f'"{kind}"'.encode() in raw for kind in COUNTED_BLOCKS):
        return False
    return _holds_counted(body)


def _holds_counted(value: Any) -> bool:
    if isinstance(value, dict):
        return value.get("type") in COUNTED_BLOCKS or any(_holds_counted(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_counted(item) for item in value)
    return False


def prompt_allowance(body: dict[str, Any]) -> int:
    """Input tokens the API adds that the body does not spell out."""
    tools = [tool for tool in body.get("tools") or [] if isinstance(tool, dict)]
    if not tools:
        return 0
    typed = sum(1 for tool in tools if tool.get("type") not in (None, "custom"))
    return TOOL_PROMPT_TOKENS + typed * ANTHROPIC_TOOL_TOKENS


def input_bound(body_bytes: int, body: dict[str, Any], counted: int | None = None) -> int:
    """At most how many input tokens the request can be billed for: from the body's size, or
    from the upstream's count of it when it holds images or documents."""
    if counted is not None:
        return counted + math.ceil(counted / COUNT_MARGIN)
    return body_bytes + prompt_allowance(body)


@dataclass(frozen=True)
class WorstCase:
    """What a request may cost at most, and how that was worked out (for a refusal's message)."""

    input_tokens: int
    max_tokens: int
    nano: int
    output_nano_per_token: int
    input_basis: str  # e.g. "from the body's 1,234 bytes"


@dataclass(eq=False)
class Hold:
    """One request's reservation; released once, by whichever path ends the request first."""

    run: str
    agent: str
    nano: int
    released: bool = field(default=False)


class Reservations:
    """The worst-case costs of requests in flight, per agent and per run (agent '')."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, str], int] = {}
        self._requests: dict[tuple[str, str], int] = {}

    def held(self, run: str, agent: str = RUN_ROW) -> int:
        """Nano-dollars held by requests in flight."""
        return self._held.get((run, agent), 0)

    def in_flight(self, run: str, agent: str = RUN_ROW) -> int:
        """How many requests hold a reservation."""
        return self._requests.get((run, agent), 0)

    def hold(self, run: str, agent: str, nano: int) -> Hold:
        self._add(run, agent, nano, 1)
        return Hold(run, agent, nano)

    def release(self, hold: Hold) -> bool:
        """Give the hold back; False when it was already (releasing twice changes nothing)."""
        if hold.released:
            return False
        hold.released = True
        self._add(hold.run, hold.agent, -hold.nano, -1)
        return True

    def _add(self, run: str, agent: str, nano: int, requests: int) -> None:
        for key in ((run, agent), (run, RUN_ROW)):
            self._held[key] = self._held.get(key, 0) + nano
            self._requests[key] = self._requests.get(key, 0) + requests
            if not self._requests[key]:
                del self._held[key], self._requests[key]
