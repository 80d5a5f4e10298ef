"""The agent's local tools on a real workspace: bash keeps its directory (also across a restart),
kills a command and its children at the timeout, does not wait for jobs left in the background,
and cuts long output with a note pointing at the full text; the file tools refuse ambiguous
edits; a tool is declared by its function's name, docstring and input model, and the definitions
the model receives are pinned; the system prompt carries the task, direction and rules."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import pytest
from pydantic import Field

from aar_agent.config import Settings
from aar_agent.prompt import system_prompt
from aar_agent.services import ServiceClient
from aar_agent.state import RunState
from aar_agent.tools import Toolbox, ToolError, read_predictions
from aar_agent.tools.notebook import notebook_excerpt
from aar_agent.tools.registry import Input, ToolContext, ToolSet

# The `tools` list of every Messages API request, as the model reads it. Change it together with
# a tool's name, docstring or input model, never by accident.
DEFINITIONS = Path(__file__).with_name("agent_tool_definitions.json")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    return Settings(
        agent="w2s-chat-0",
        api_key="unused",
        workspace=workspace,
        task_dir=tmp_path / "task",
        output_chars=2_000,
    )


def toolbox(settings: Settings, state: RunState | None = None) -> Toolbox:
    return Toolbox(
        settings,
        state or RunState(cwd=str(settings.workspace)),
        ServiceClient("forum", None, "unused"),
        ServiceClient("scorer", None, "unused"),
    )


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its parent to reap it does not count)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def wait_until_gone(pid: int) -> None:
    while alive(pid):
        time.sleep(0.01)


async def test_the_working_directory_carries_over_between_calls_and_restarts(
    settings: Settings,
) -> None:
    tools = toolbox(settings)
    assert await tools.call("bash", {"command": "mkdir -p a/b && cd a/b"}, "t1") == (
        "[exit code 0]",
        False,
    )
    text, _ = await tools.call("bash", {"command": "pwd; echo $HOME; mktemp"}, "t2")
    lines = text.splitlines()
    assert lines[0] == str(settings.workspace / "a" / "b")
    # Home and temporary files are on the workspace: the sandbox's root is read-only.
    assert lines[1] == str(settings.workspace)
    assert lines[2].startswith(f"{settings.workspace / '.tmp'}/")
    # A new process reads the directory back from the saved state.
    restarted = toolbox(settings, RunState.model_validate_json(tools.state.model_dump_json()))
    text, _ = await restarted.call("bash", {"command": "pwd; cd .. && exit 4"}, "t3")
    assert text.endswith("[exit code 4]")
    assert restarted.state.cwd == str(settings.workspace / "a")
    # A directory removed since falls back to the workspace instead of failing every call.
    await restarted.call("bash", {"command": f"rm -r {settings.workspace / 'a'}"}, "t4")
    text, _ = await restarted.call("bash", {"command": "pwd"}, "t5")
    assert text.startswith(f"{settings.workspace}\n")


@pytest.mark.timeout(60)
async def test_a_command_past_its_timeout_is_killed_with_its_children(settings: Settings) -> None:
    tools = toolbox(settings)
    text, is_error = await tools.call(
        "bash", {"command": "sleep 600 & echo $! > child; echo $$ > shell; wait", "timeout": 1}, "t"
    )
    assert not is_error
    assert "[killed after 1 s timeout" in text
    # SIGKILL is delivered, not awaited: wait for both to be gone (a hang here fails the test
    # at its time limit, which is what a command that outlived its timeout would do).
    for name in ("shell", "child"):
        await asyncio.to_thread(wait_until_gone, int((settings.workspace / name).read_text()))


async def test_a_job_left_in_the_background_does_not_hold_the_call(settings: Settings) -> None:
    tools = toolbox(settings)
    text, _ = await tools.call("bash", {"command": "sleep 600 & echo $! > job; echo started"}, "t")
    job = int((settings.workspace / "job").read_text())
    try:
        assert text == "started\n\n[exit code 0]"
        assert alive(job)  # a training run started with & keeps running after the call
    finally:
        os.kill(job, signal.SIGKILL)


async def test_long_output_is_cut_in_the_middle_and_kept_whole_in_a_file(
    settings: Settings,
) -> None:
    tools = toolbox(settings)
    text, _ = await tools.call("bash", {"command": "seq 1 20000"}, "toolu_long")
    full = settings.state_dir / "outputs" / "toolu_long.log"
    assert len(text) < 2_500
    assert text.startswith("1\n2\n3\n")
    assert text.endswith("19999\n20000\n\n[exit code 0]")
    assert f"characters omitted; the full output is in {full}" in text
    assert full.read_text().splitlines() == [str(n) for n in range(1, 20001)]
    # Any tool's long result is cut the same way.
    (settings.workspace / "wide.txt").write_text("w" * 50 + "\n" * 100 + "z" * 3000)
    text, _ = await tools.call("read_file", {"path": "wide.txt"}, "toolu_read")
    assert "characters omitted; the full output is in" in text
    assert (settings.state_dir / "outputs" / "toolu_read.log").read_text().endswith("z" * 3000)
    # Short outputs leave no file behind.
    await tools.call("bash", {"command": "echo short"}, "toolu_short")
    assert not (settings.state_dir / "outputs" / "toolu_short.log").exists()


async def test_file_tools_read_write_and_edit_and_say_how_to_fix_a_bad_call(
    settings: Settings,
) -> None:
    tools = toolbox(settings)
    await tools.call("write_file", {"path": "src/x.py", "content": "a = 1\nb = 1\nc = 2\n"}, "1")
    assert (settings.workspace / "src" / "x.py").exists()
    text, is_error = await tools.call(
        "edit_file", {"path": "src/x.py", "old_text": "= 1", "new_text": "= 3"}, "2"
    )
    assert is_error
    assert "occurs 2 times" in text
    assert "replace_all" in text
    text, is_error = await tools.call(
        "edit_file",
        {"path": "src/x.py", "old_text": "= 1", "new_text": "= 3", "replace_all": True},
        "3",
    )
    assert not is_error
    text, _ = await tools.call("read_file", {"path": "src/x.py", "offset": 2, "limit": 1}, "4")
    assert text == "     2\tb = 3\n[1 more lines; read on with offset=3]"
    text, is_error = await tools.call("read_file", {"path": "nowhere.txt"}, "5")
    assert is_error
    assert "is not a file" in text
    # An unexpected failure inside a tool comes back as an error result, not a crash.
    (settings.workspace / "model.bin").write_bytes(b"\xff\xfe\x00weights")
    text, is_error = await tools.call(
        "edit_file", {"path": "model.bin", "old_text": "a", "new_text": "b"}, "6"
    )
    assert is_error
    assert text.startswith("edit_file failed: UnicodeDecodeError")


async def test_the_notebook_keeps_entries_in_order_and_finds_them(settings: Settings) -> None:
    tools = toolbox(settings)
    assert (await tools.call("notebook_read", {}, "0"))[0] == "the notebook is empty"
    for n in range(3):
        await tools.call("notebook_write", {"title": f"entry {n}", "entry": f"seed {n}"}, str(n))
    text, _ = await tools.call("notebook_read", {"last": 2}, "r")
    assert "entry 0" not in text
    assert text.index("entry 1") < text.index("entry 2")
    text, _ = await tools.call("notebook_read", {"query": "SEED 0"}, "q")
    assert "entry 0" in text
    assert "entry 1" not in text


def test_a_submission_carries_the_newest_notebook_entries_that_fit(settings: Settings) -> None:
    assert notebook_excerpt(settings.workspace, 100) is None
    path = settings.workspace / "notebook.md"
    path.write_text("".join(f"## 2026-12-06 10:0{n} UTC: entry {n}\n\n{'x' * 30}\n\n"
                            for n in range(4)))  # fmt: skip
    excerpt = notebook_excerpt(settings.workspace, 130)
    assert excerpt is not None
    assert "entry 3" in excerpt
    assert "entry 2" in excerpt
    assert "entry 1" not in excerpt  # whole entries only, the newest first to go in
    assert len(excerpt) <= 130
    # One entry longer than the room: the newest alone, cut.
    path.write_text(f"## 2026-12-06 11:00 UTC: long\n\n{'y' * 500}\n\n")
    excerpt = notebook_excerpt(settings.workspace, 100)
    assert excerpt is not None
    assert excerpt.startswith("## 2026-12-06 11:00 UTC: long")
    assert excerpt.endswith(" …")
    assert len(excerpt) <= 100


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('["A", "B"]', ["A", "B"]),
        ("[1, 0, 1]", [1, 0, 1]),
        ("1\n0\n1\n", [1, 0, 1]),  # numbers stay numbers, as integer labels need
        ("yes\nno\n\n", ["yes", "no"]),
    ],
)
def test_predictions_are_read_as_a_json_list_or_one_a_line(
    tmp_path: Path, text: str, expected: list[object]
) -> None:
    path = tmp_path / "predictions"
    path.write_text(text)
    assert read_predictions(path) == expected


def test_a_predictions_file_that_is_no_list_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "predictions.json"
    path.write_text('{"predictions": [1, 0]}')
    with pytest.raises(ToolError, match="is not a list; write one list of predictions"):
        read_predictions(path)
    with pytest.raises(ToolError, match="write your predictions there first"):
        read_predictions(tmp_path / "missing.json")


async def test_services_the_sandbox_was_not_given_are_named(settings: Settings) -> None:
    text, is_error = await toolbox(settings).call("forum_new", {}, "t")
    assert is_error
    assert text == "the forum is not configured in this sandbox (AAR_FORUM_URL)"


def test_the_tool_definitions_the_model_receives_are_pinned(settings: Settings) -> None:
    definitions = toolbox(settings).definitions
    pinned = json.loads(DEFINITIONS.read_text())
    assert definitions == pinned
    # Byte for byte, key order too: the definitions open every request, so the prompt cache and
    # the requests' idempotency keys depend on their exact text.
    assert json.dumps(definitions) == json.dumps(pinned)


def test_a_tool_is_declared_by_its_name_docstring_and_input_model() -> None:
    toolset = ToolSet()

    class EchoInput(Input):
        text: str = Field(description="what to say back")

    @toolset.tool(EchoInput)
    async def echo(_: ToolContext, arguments: EchoInput, __: str) -> str:
        """Say the text
        back."""
        return arguments.text

    assert [tool.definition() for tool in toolset.tools] == [
        {
            "name": "echo",
            "description": "Say the text back.",
            "input_schema": {
                "additionalProperties": False,
                "properties": {
                    "text": {"description": "what to say back", "title": "Text", "type": "string"}
                },
                "required": ["text"],
                "type": "object",
            },
        }
    ]
    with pytest.raises(TypeError, match="tool mute has no docstring; it is the model's"):

        @toolset.tool(EchoInput)
        async def mute(_: ToolContext, __: EchoInput, ___: str) -> str:
            return ""


def test_the_system_prompt_has_the_task_direction_rules_and_tools(
    settings: Settings, tmp_path: Path
) -> None:
    task = tmp_path / "task"
    (task / "data").mkdir(parents=True)
    (task / "data" / "train.jsonl").write_text("{}")
    prompt = system_prompt(settings, ["bash", "forum_post"])
    # Without a README the bundle's files are listed.
    assert "data/train.jsonl" in prompt
    assert "choose the most promising direction yourself" in prompt
    assert "never try to read" in prompt.lower()
    assert "probing the scorer" in prompt
    assert "several seeds" in prompt
    assert "aar-train" in prompt
    assert "Tools: bash, forum_post." in prompt
    (task / "README.md").write_text("x" * 40_000)
    directed = settings.model_copy(update={"direction": "unsupervised elicitation"})
    prompt = system_prompt(directed, ["bash"])
    assert "unsupervised elicitation" in prompt
    assert f"[... cut; read the rest in {task / 'README.md'}]" in prompt
