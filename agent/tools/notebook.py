"""The private notebook, `<workspace>/notebook.md`, which survives restarts and trimming."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from pydantic import Field

from aar_agent.tools.registry import Input, ToolContext, ToolSet

NOTEBOOK_FILE = "notebook.md"

toolset = ToolSet()


class NotebookWriteInput(Input):
    title: str = Field(description="one line: what this entry is about")
    entry: str = Field(description="markdown: what you did, saw, and concluded")


@toolset.tool(NotebookWriteInput)
async def notebook_write(context: ToolContext, arguments: NotebookWriteInput, _: str) -> str:
    """Add an entry to your private notebook (workspace notebook.md). It survives restarts and
    context trimming: record plans, results and decisions here."""
    path = context.settings.workspace / NOTEBOOK_FILE
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    with path.open("a") as file:
        file.write(f"## {stamp}: {arguments.title}\n\n{arguments.entry.strip()}\n\n")
    return f"added to {path}"


def notebook_entries(workspace: Path) -> list[str]:
    """The notebook's entries, oldest first, each with its `## <time>: <title>` line."""
    path = workspace / NOTEBOOK_FILE
    if not path.exists():
        return []
    entries = ["## " + e for e in path.read_text().split("\n## ") if e.strip()]
    if entries:
        entries[0] = entries[0].removeprefix("## ")
    return entries


def notebook_excerpt(workspace: Path, chars: int) -> str | None:
    """The newest whole entries that fit in `chars` (the newest alone, cut, when it is longer);
    None for an empty notebook."""
    entries = [entry.strip() for entry in notebook_entries(workspace)]
    kept: list[str] = []
    for entry in reversed(entries):
        if sum(len(e) + 2 for e in kept) + len(entry) > chars:
            break
        kept.insert(0, entry)
    if kept:
        return "\n\n".join(kept)
    return entries[-1][: chars - 2] + " …" if entries else None


class NotebookReadInput(Input):
    last: int = Field(default=10, ge=1, le=200, description="the newest N entries")
    query: str | None = Field(default=None, description="only entries containing this text")


@toolset.tool(NotebookReadInput)
async def notebook_read(context: ToolContext, arguments: NotebookReadInput, _: str) -> str:
    """Read the newest entries of your notebook."""
    entries = notebook_entries(context.settings.workspace)
    if not entries:
        return "the notebook is empty"
    if arguments.query:
        entries = [e for e in entries if arguments.query.lower() in e.lower()]
    return "\n".join(entries[-arguments.last :]) or f"no entry mentions {arguments.query!r}"
