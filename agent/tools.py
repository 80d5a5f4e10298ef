"""The tools the model can call: each is a pydantic input model (its JSON schema is what the
model sees) and one async function. A tool answers text; a ToolError becomes an `is_error`
result whose message tells the model what to do instead."""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aar_agent.config import Settings
from aar_agent.services import ServiceClient, ServiceError
from aar_agent.shell import run_bash
from aar_agent.state import RunState
from aar_agent.telemetry import log
from aar_common.validation import describe

NOTEBOOK_FILE = "notebook.md"
_NEW_POSTS = 50  # per forum_new call


class ToolError(Exception):
    """The call could not be done; the message goes back to the model as an error result."""


class Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BashInput(Input):
    command: str = Field(description="bash script to run")
    timeout: float | None = Field(
        default=None, gt=0, description="seconds before the command is killed (default: 600)"
    )


class ReadFileInput(Input):
    path: str = Field(description="file to read; relative paths are under the workspace")
    offset: int = Field(default=1, ge=1, description="first line to show (1-based)")
    limit: int = Field(default=500, ge=1, le=5000, description="at most this many lines")


class WriteFileInput(Input):
    path: str = Field(description="file to create or overwrite; parent folders are created")
    content: str


class EditFileInput(Input):
    path: str
    old_text: str = Field(description="exact text to replace; must occur once in the file")
    new_text: str
    replace_all: bool = Field(default=False, description="replace every occurrence")


class NotebookWriteInput(Input):
    title: str = Field(description="one line: what this entry is about")
    entry: str = Field(description="markdown: what you did, saw, and concluded")


class NotebookReadInput(Input):
    last: int = Field(default=10, ge=1, le=200, description="the newest N entries")
    query: str | None = Field(default=None, description="only entries containing this text")


class ForumPostInput(Input):
    kind: Literal["result", "hypothesis", "insight", "error"]
    title: str
    body: str = Field(description="markdown; for results: method, seeds, mean and spread")
    tags: list[str] = Field(default_factory=list)
    parent: int | None = Field(default=None, description="post id this replies to")
    submissions: list[str | int] = Field(default_factory=list, description="scorer ids")
    artifacts: list[str] = Field(default_factory=list, description="artifact digests")


class ForumSearchInput(Input):
    q: str | None = Field(default=None, description="full-text query")
    kind: Literal["result", "hypothesis", "insight", "error"] | None = None
    tag: str | None = None
    author: str | None = None
    limit: int = Field(default=20, ge=1, le=100)


class ForumReadInput(Input):
    id: int = Field(description="the post id")


class NoInput(Input):
    pass


class ScorerSubmitInput(Input):
    predictions_path: str = Field(
        description="file of predictions in the order of the task's test set: a JSON list, "
        "or one prediction per line"
    )
    method: str = Field(description="what was done to produce these predictions")
    artifact: str | None = Field(default=None, description="digest of the code (sha256:...)")


class ArtifactPublishInput(Input):
    path: str = Field(description="a file, or a folder (sent as a .tar.gz)")
    description: str
    parent: str | None = Field(default=None, description="digest this one derives from")


class ArtifactFetchInput(Input):
    digest: str
    destination: str = Field(description="file to write, or folder to extract into")
    extract: bool = Field(default=False, description="the artifact is a .tar.gz: unpack it")


class ArtifactListInput(Input):
    author: str | None = Field(default=None, description="only this agent's artifacts")


Handler = Callable[[Any, str], Awaitable[str]]


@dataclass
class Tool:
    name: str
    description: str
    input_model: type[Input]
    handler: Handler

    def definition(self) -> dict[str, Any]:
        schema = self.input_model.model_json_schema()
        schema.pop("title", None)
        return {"name": self.name, "description": self.description, "input_schema": schema}


def truncate(text: str, limit: int, note: str) -> str:
    """Head and tail of `text` within `limit` characters, with a note on what was left out."""
    if len(text) <= limit:
        return text
    half = limit // 2
    omitted = len(text) - 2 * half
    return f"{text[:half]}\n[... {omitted} characters omitted; {note} ...]\n{text[-half:]}"


def _ascii_header(value: str) -> str:
    # HTTP header values are Latin-1 at best; one line of ASCII is safe everywhere.
    return " ".join(value.split()).encode("ascii", "replace").decode("ascii")


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


def _render_post(post: dict[str, Any], full: bool = False) -> str:
    body = str(post.get("body", ""))
    if not full and len(body) > 400:
        body = body[:400] + " [...]"
    tags = ", ".join(post.get("tags") or [])
    return (
        f"#{post.get('id')} [{post.get('kind')}] {post.get('title')} by {post.get('author')} "
        f"at {post.get('created_at')}" + (f" tags: {tags}" if tags else "") + f"\n{body}"
    )


class Toolbox:
    """The tools of one agent, bound to its workspace, state and services."""

    def __init__(
        self, settings: Settings, state: RunState, forum: ServiceClient, scorer: ServiceClient
    ) -> None:
        self.settings = settings
        self.state = state
        self.forum = forum
        self.scorer = scorer
        self.tools = {
            tool.name: tool
            for tool in [
                Tool(
                    "bash",
                    "Run a bash script in your workspace. The working directory is kept between "
                    "calls. Output (stdout and stderr) longer than the limit is cut in the "
                    "middle and saved in full to a file named in the note. Run long training "
                    "in the background (nohup ... &> log &) and check on it.",
                    BashInput,
                    self._bash,
                ),
                Tool(
                    "read_file", "Read a text file, with line numbers.", ReadFileInput, self._read
                ),
                Tool("write_file", "Create or overwrite a text file.", WriteFileInput, self._write),
                Tool(
                    "edit_file",
                    "Replace exact text in a file (once, unless replace_all).",
                    EditFileInput,
                    self._edit,
                ),
                Tool(
                    "notebook_write",
                    "Add an entry to your private notebook (workspace notebook.md). It survives "
                    "restarts and context trimming: record plans, results and decisions here.",
                    NotebookWriteInput,
                    self._notebook_write,
                ),
                Tool(
                    "notebook_read",
                    "Read the newest entries of your notebook.",
                    NotebookReadInput,
                    self._notebook_read,
                ),
                Tool(
                    "forum_post",
                    "Post to the run's forum, where the other agents and the humans read.",
                    ForumPostInput,
                    self._forum_post,
                ),
                Tool(
                    "forum_search",
                    "Search the forum, newest first.",
                    ForumSearchInput,
                    self._search,
                ),
                Tool(
                    "forum_read",
                    "Read one post in full with its replies.",
                    ForumReadInput,
                    self._forum_read,
                ),
                Tool(
                    "forum_new",
                    "Posts that appeared since you last looked.",
                    NoInput,
                    self._forum_new,
                ),
                Tool(
                    "scorer_task",
                    "The task's public facts: metric, test-set size, allowed labels.",
                    NoInput,
                    self._scorer_task,
                ),
                Tool(
                    "scorer_submit",
                    "Submit test-set predictions for scoring. Feedback is coarse and "
                    "rate-limited, and near-duplicate submissions are refused and flagged.",
                    ScorerSubmitInput,
                    self._scorer_submit,
                ),
                Tool(
                    "scorer_leaderboard",
                    "Your run's leaderboard (released feedback only).",
                    NoInput,
                    self._leaderboard,
                ),
                Tool(
                    "artifact_publish",
                    "Publish a file or folder to the artifact store; returns its digest.",
                    ArtifactPublishInput,
                    self._publish,
                ),
                Tool(
                    "artifact_fetch",
                    "Fetch an artifact by digest into your workspace.",
                    ArtifactFetchInput,
                    self._fetch,
                ),
                Tool("artifact_list", "List the run's artifacts.", ArtifactListInput, self._list),
            ]
        }
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
            text = await tool.handler(arguments, call_id)
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
        saved = self._output_file(call_id)
        if not saved.exists():  # bash has written it already; other tools have not
            saved.parent.mkdir(parents=True, exist_ok=True)
            saved.write_text(text)
        note = f"the full output is in {saved}; read parts of it with read_file or grep"
        return truncate(text, self.settings.output_chars, note)

    def _output_file(self, call_id: str) -> Path:
        return self.settings.state_dir / "outputs" / f"{call_id}.log"

    def _path(self, given: str) -> Path:
        path = Path(given)
        return path if path.is_absolute() else self.settings.workspace / path

    # -- shell and files

    async def _bash(self, arguments: BashInput, call_id: str) -> str:
        cwd = Path(self.state.cwd) if self.state.cwd else self.settings.workspace
        if not cwd.is_dir():
            cwd = self.settings.workspace
        output_file = self._output_file(call_id)
        # The sandbox's root filesystem is read-only: caches (pip, Hugging Face, torch) and
        # temporary files go to the workspace, which also keeps them across restarts.
        temporary = self.settings.workspace / ".tmp"
        temporary.mkdir(exist_ok=True)
        env = {**os.environ, "HOME": str(self.settings.workspace), "TMPDIR": str(temporary)}
        result = await run_bash(
            arguments.command,
            cwd,
            arguments.timeout or self.settings.bash_timeout,
            output_file,
            env,
        )
        self.state.cwd = result.cwd
        status = (
            f"[killed after {arguments.timeout or self.settings.bash_timeout:g} s timeout: run "
            "long jobs in the background]"
            if result.timed_out
            else f"[exit code {result.exit_code}]"
        )
        # Short outputs need no file; long ones keep theirs for the note to point at.
        if len(result.output) <= self.settings.output_chars:
            output_file.unlink(missing_ok=True)
        return f"{result.output}\n{status}" if result.output else status

    async def _read(self, arguments: ReadFileInput, _: str) -> str:
        path = self._path(arguments.path)
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

    async def _write(self, arguments: WriteFileInput, _: str) -> str:
        path = self._path(arguments.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(arguments.content)
        return f"wrote {len(arguments.content)} characters to {path}"

    async def _edit(self, arguments: EditFileInput, _: str) -> str:
        path = self._path(arguments.path)
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

    # -- notebook

    async def _notebook_write(self, arguments: NotebookWriteInput, _: str) -> str:
        path = self.settings.workspace / NOTEBOOK_FILE
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        with path.open("a") as file:
            file.write(f"## {stamp}: {arguments.title}\n\n{arguments.entry.strip()}\n\n")
        return f"added to {path}"

    async def _notebook_read(self, arguments: NotebookReadInput, _: str) -> str:
        path = self.settings.workspace / NOTEBOOK_FILE
        if not path.exists():
            return "the notebook is empty"
        entries = ["## " + e for e in path.read_text().split("\n## ") if e.strip()]
        entries[0] = entries[0].removeprefix("## ")
        if arguments.query:
            entries = [e for e in entries if arguments.query.lower() in e.lower()]
        return "\n".join(entries[-arguments.last :]) or f"no entry mentions {arguments.query!r}"

    # -- forum

    async def _forum_post(self, arguments: ForumPostInput, _: str) -> str:
        post = await self.forum.request("POST", "/api/v1/posts", json_body=arguments.model_dump())
        return f"posted #{post.get('id')}: {post.get('title')}"

    async def _search(self, arguments: ForumSearchInput, _: str) -> str:
        params = {k: str(v) for k, v in arguments.model_dump().items() if v is not None}
        found = await self.forum.request("GET", "/api/v1/posts", params=params)
        posts = found.get("posts", [])
        return "\n\n".join(_render_post(p) for p in posts) or "no posts match"

    async def _forum_read(self, arguments: ForumReadInput, _: str) -> str:
        thread = await self.forum.request("GET", f"/api/v1/posts/{arguments.id}")
        replies = thread.get("replies", [])
        parts = [_render_post(thread["post"], full=True)]
        parts += [f"reply {_render_post(r, full=True)}" for r in replies]
        return "\n\n".join(parts)

    async def _forum_new(self, _: NoInput, __: str) -> str:
        params = {"limit": str(_NEW_POSTS)}
        if self.state.forum_cursor is not None:
            params["since"] = self.state.forum_cursor
        found = await self.forum.request("GET", "/api/v1/posts", params=params)
        posts = [p for p in found.get("posts", []) if str(p.get("id")) != self.state.forum_cursor]
        if posts:
            self.state.forum_cursor = str(posts[0]["id"])  # newest first
        # The agent's own posts are not news to it, but the cursor moves past them too.
        others = [p for p in posts if p.get("author") != self.settings.agent]
        if not others:
            return "nothing new on the forum"
        more = (
            f"\n\n[only the newest {_NEW_POSTS} are shown; find older ones with forum_search]"
            if len(posts) >= _NEW_POSTS
            else ""
        )
        return "\n\n".join(_render_post(p) for p in others) + more

    # -- scorer

    async def _scorer_task(self, _: NoInput, __: str) -> str:
        facts = await self.scorer.request("GET", f"/api/v1/tasks/{self._task()}")
        return json.dumps(facts, indent=1)

    def _task(self) -> str:
        if not self.settings.task:
            raise ToolError("this sandbox has no task name (AAR_TASK); nothing to score against")
        return self.settings.task

    async def _scorer_submit(self, arguments: ScorerSubmitInput, _: str) -> str:
        predictions = read_predictions(self._path(arguments.predictions_path))
        answer = await self.scorer.request(
            "POST",
            "/api/v1/submissions",
            json_body={
                "task": self._task(),
                "predictions": predictions,
                "method": arguments.method,
                "artifact": arguments.artifact,
            },
        )
        return json.dumps(answer, indent=1)

    async def _leaderboard(self, _: NoInput, __: str) -> str:
        return json.dumps(await self.scorer.request("GET", "/api/v1/leaderboard"), indent=1)

    # -- artifacts

    async def _publish(self, arguments: ArtifactPublishInput, call_id: str) -> str:
        path = self._path(arguments.path)
        if not path.exists():
            raise ToolError(f"{path} does not exist")
        upload, filename = path, path.name
        if path.is_dir():
            upload = self.settings.state_dir / "outputs" / f"{call_id}.tar.gz"
            upload.parent.mkdir(parents=True, exist_ok=True)
            with tarfile.open(upload, "w:gz") as archive:
                archive.add(path, arcname=path.name)
            filename = f"{path.name}.tar.gz"
        headers = {
            "X-Aar-Description": _ascii_header(arguments.description),
            "X-Aar-Filename": _ascii_header(filename),
            "Content-Type": "application/octet-stream",
        }
        if arguments.parent:
            headers["X-Aar-Parent"] = arguments.parent
        try:
            with upload.open("rb") as body:
                meta = await self.forum.request(
                    "POST", "/api/v1/artifacts", data=body, headers=headers
                )
        finally:
            if upload != path:
                upload.unlink(missing_ok=True)
        return f"published {filename} as {meta.get('digest')} ({meta.get('size')} bytes)"

    async def _fetch(self, arguments: ArtifactFetchInput, call_id: str) -> str:
        destination = self._path(arguments.destination)
        target = self._output_file(call_id) if arguments.extract else destination
        target.parent.mkdir(parents=True, exist_ok=True)
        size = await self.forum.request(
            "GET", f"/api/v1/artifacts/{arguments.digest}", save_to=target
        )
        if not arguments.extract:
            return f"wrote {size} bytes to {destination}"
        try:
            destination.mkdir(parents=True, exist_ok=True)
            with tarfile.open(target, "r:*") as archive:
                # The "data" filter refuses absolute paths, links out of the folder and devices.
                archive.extractall(destination, filter="data")
        except tarfile.TarError as error:
            raise ToolError(
                f"{arguments.digest} is not a tar archive ({error}); fetch it without extract"
            ) from error
        finally:
            target.unlink(missing_ok=True)
        return f"extracted {arguments.digest} into {destination}"

    async def _list(self, arguments: ArtifactListInput, _: str) -> str:
        params = {"author": arguments.author} if arguments.author else None
        found = await self.forum.request("GET", "/api/v1/artifacts", params=params)
        return json.dumps(found, indent=1)
