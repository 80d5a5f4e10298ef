"""The workspace: bash, and reading, writing and editing files."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field

from aar_agent.shell import run_bash
from aar_agent.tools.registry import Input, ToolContext, ToolError, ToolSet

toolset = ToolSet()


class BashInput(Input):
    command: str = Field(description="bash script to run")
    timeout: float | None = Field(
        default=None, gt=0, description="seconds before the command is killed (default: 600)"
    )


@toolset.tool(BashInput)
async def bash(context: ToolContext, arguments: BashInput, call_id: str) -> str:
    """Run a bash script in your workspace. The working directory is kept between calls. Output
    (stdout and stderr) longer than the limit is cut in the middle and saved in full to a file
    named in the note. Run long training in the background (nohup ... &> log &) and check on it.
    """
    settings = context.settings
    cwd = Path(context.state.cwd) if context.state.cwd else settings.workspace
    if not cwd.is_dir():
        cwd = settings.workspace
    output_file = context.output_file(call_id)
    # The sandbox's root filesystem is read-only: caches (pip, Hugging Face, torch) and
    # temporary files go to the workspace, which also keeps them across restarts.
    temporary = settings.workspace / ".tmp"
    temporary.mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(settings.workspace), "TMPDIR": str(temporary)}
    timeout = arguments.timeout or settings.bash_timeout
    result = await run_bash(arguments.command, cwd, timeout, output_file, env)
    context.state.cwd = result.cwd
    status = (
        f"[killed after {timeout:g} s timeout: run long jobs in the background]"
        if result.timed_out
        else f"[exit code {result.exit_code}]"
    )
    # Short outputs need no file; long ones keep theirs for the note to point at.
    if len(result.output) <= settings.output_chars:
        output_file.unlink(missing_ok=True)
    return f"{result.output}\n{status}" if result.output else status


class ReadFileInput(Input):
    path: str = Field(description="file to read; relative paths are under the workspace")
    offset: int = Field(default=1, ge=1, description="first line to show (1-based)")
    limit: int = Field(default=500, ge=1, le=5000, description="at most this many lines")


@toolset.tool(ReadFileInput)
async def read_file(context: ToolContext, arguments: ReadFileInput, _: str) -> str:
    """Read a text file, with line numbers."""
    path = context.path(arguments.path)
    if not path.is_file():
        raise ToolError(f"{path} is not a file (list folders with bash: ls)")
    lines = path.read_text(errors="replace").splitlines()
    start = arguments.offset - 1
    shown = lines[start : start + arguments.limit]
    text = "\n".join(f"{start + i + 1:6}\t{line}" for i, line in enumerate(shown))
    if start + arguments.limit < len(lines):
        text += (
            f"\n[{len(lines) - start - len(shown)} more lines; "
            f"read on with offset={start + len(shown) + 1}]"
        )
    return text or f"[{path} has {len(lines)} lines; nothing at offset {arguments.offset}]"


class WriteFileInput(Input):
    path: str = Field(description="file to create or overwrite; parent folders are created")
    content: str


@toolset.tool(WriteFileInput)
async def write_file(context: ToolContext, arguments: WriteFileInput, _: str) -> str:
    """Create or overwrite a text file."""
    path = context.path(arguments.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(arguments.content)
    return f"wrote {len(arguments.content)} characters to {path}"


class EditFileInput(Input):
    path: str
    old_text: str = Field(description="exact text to replace; must occur once in the file")
    new_text: str
    replace_all: bool = Field(default=False, description="replace every occurrence")


@toolset.tool(EditFileInput)
async def edit_file(context: ToolContext, arguments: EditFileInput, _: str) -> str:
    """Replace exact text in a file (once, unless replace_all)."""
    path = context.path(arguments.path)
    if not path.is_file():
        raise ToolError(f"{path} is not a file; create it with write_file")
    text = path.read_text()
    count = text.count(arguments.old_text)
    if count == 0:
        raise ToolError(f"old_text was not found in {path}; read the file and copy it exactly")
    if count > 1 and not arguments.replace_all:
        raise ToolError(
            f"old_text occurs {count} times in {path}; add surrounding lines to make it "
            "unique, or pass replace_all"
        )
    path.write_text(text.replace(arguments.old_text, arguments.new_text))
    return f"replaced {count if arguments.replace_all else 1} occurrence(s) in {path}"
