"""`aar-agent` as the sandbox runs it, a real process: killed with SIGKILL it resumes from the
workspace where it was; SIGTERM lets the running step finish, saves, and exits 0; its stdout is
one JSON object per line."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

from agent_env import AGENT_COMMAND, finish, scrape, start_agent, wait_for

from aar_agent.loop import INTERRUPTED
from aar_agent.state import StateStore
from aar_devcluster.anthropic_stub import AnthropicStub, Reply, conversation_problem


def sent(request: dict[str, Any]) -> list[dict[str, Any]]:
    """A request's messages without the prompt-cache mark the agent puts on the newest block."""
    messages = json.loads(json.dumps(request["body"]["messages"]))
    for block in messages[-1]["content"]:
        block.pop("cache_control", None)
    return messages


def messages_of(workspace: Path) -> list[dict[str, Any]]:
    state = StateStore(workspace / ".aar").load()
    assert state is not None
    return state.messages


async def test_sigkill_mid_tool_call_resumes_with_the_call_marked_interrupted(
    stub: AnthropicStub, sandbox_env: dict[str, str], unused_tcp_port: int
) -> None:
    workspace = Path(sandbox_env["AAR_WORKSPACE"])
    stub.script(
        Reply.tool("write_file", {"path": "plan.md", "content": "1. baseline"}),
        Reply.tool("bash", {"command": "echo run >> runs.log; touch started; sleep 120"}),
    )
    first = await start_agent({**sandbox_env, "AAR_METRICS_PORT": str(unused_tcp_port)})
    await wait_for(workspace / "started", first)
    # Prometheus sees the first step, counted once its tool call ended, while the second runs.
    metrics = await scrape(f"http://127.0.0.1:{unused_tcp_port}")
    assert "aar_agent_steps_total 1.0" in metrics
    assert 'aar_agent_tool_calls_total{outcome="ok",tool="write_file"} 1.0' in metrics
    first.kill()
    await first.wait()
    # The state on disk has the call the process died in, still unanswered.
    before = messages_of(workspace)
    assert before[-1]["role"] == "assistant"
    assert before[-1]["content"][-1]["name"] == "bash"

    stub.script(
        Reply.tool("bash", {"command": "cat runs.log plan.md"}),
        Reply.text("Done."),
    )
    code, logs = await finish(await start_agent(sandbox_env))

    assert code == 0
    resumed = next(line for line in logs if line["message"] == "Resumed")
    assert resumed["interrupted_calls"] == 1
    assert resumed["step"] == 2
    # The first request after the restart carries the whole earlier conversation, and answers
    # the interrupted call instead of running it again.
    request = sent(stub.requests[2])
    assert conversation_problem(request) is None
    assert request[:4] == before
    assert request[4]["content"][0]["content"] == INTERRUPTED
    assert request[4]["content"][0]["is_error"] is True
    assert (workspace / "runs.log").read_text() == "run\n"
    final = stub.requests[3]["body"]["messages"][-1]["content"][0]["content"]
    assert final == "run\n1. baseline\n[exit code 0]"
    assert logs[-1]["message"] == "Exited"
    assert logs[-1]["outcome"] == "done"


async def test_sigkill_while_waiting_for_the_model_asks_again_on_restart(
    stub: AnthropicStub, sandbox_env: dict[str, str]
) -> None:
    workspace = Path(sandbox_env["AAR_WORKSPACE"])
    asked, killed = asyncio.Event(), asyncio.Event()

    async def answer_too_late(_: dict[str, Any]) -> Reply:
        asked.set()
        await killed.wait()
        return Reply.text("never delivered")

    stub.script(Reply.tool("bash", {"command": "touch ran"}))
    stub.responder = answer_too_late
    first = await start_agent(sandbox_env)
    await asyncio.wait_for(asked.wait(), 120)
    assert (workspace / "ran").exists()
    first.kill()
    await first.wait()
    killed.set()

    stub.script(Reply.text("Done."))
    code, _ = await finish(await start_agent(sandbox_env))

    assert code == 0
    # The same conversation is asked again: the answer the process never got is not invented.
    assert stub.requests[2]["body"]["messages"] == stub.requests[1]["body"]["messages"]


async def test_sigterm_finishes_the_running_step_saves_and_exits(
    stub: AnthropicStub, sandbox_env: dict[str, str]
) -> None:
    workspace = Path(sandbox_env["AAR_WORKSPACE"])
    stub.script(
        Reply.tool("bash", {"command": "touch started; sleep 2; echo step finished"}),
        Reply.tool("bash", {"command": "echo next step"}),
    )
    process = await start_agent(sandbox_env)
    await wait_for(workspace / "started", process)
    process.send_signal(signal.SIGTERM)
    code, logs = await finish(process)

    assert code == 0
    assert [line["message"] for line in logs][-3:] == ["Step", "Stopped", "Exited"]
    assert logs[-1]["outcome"] == "stopped"
    # The step in flight finished and was saved; no further model call was made.
    assert len(stub.requests) == 1
    saved = messages_of(workspace)
    assert saved[-1]["content"][0]["content"] == "step finished\n\n[exit code 0]"

    stub.script(Reply.text("Done."))
    code, _ = await finish(await start_agent(sandbox_env))
    assert code == 0
    assert sent(stub.requests[1])[:3] == saved
    assert "next step" in json.dumps(stub.requests[2]["body"]["messages"][-1])


async def test_sigterm_while_the_model_answers_still_runs_that_answers_calls(
    stub: AnthropicStub, sandbox_env: dict[str, str]
) -> None:
    workspace = Path(sandbox_env["AAR_WORKSPACE"])
    asked, signalled = asyncio.Event(), asyncio.Event()

    async def answer_after_the_signal(_: dict[str, Any]) -> Reply:
        asked.set()
        await signalled.wait()
        return Reply.tool("bash", {"command": "echo saved > result.txt"})

    stub.responder = answer_after_the_signal
    process = await start_agent(sandbox_env)
    await asyncio.wait_for(asked.wait(), 120)
    process.send_signal(signal.SIGTERM)
    # Nothing tells when the process has handled the signal, but it is handled either way: a
    # signal that arrives once the answer is in would stop the loop just the same.
    signalled.set()
    code, logs = await finish(process)

    assert code == 0
    assert logs[-1]["outcome"] == "stopped"
    assert (workspace / "result.txt").read_text() == "saved\n"
    assert len(stub.requests) == 1
    assert messages_of(workspace)[-1]["content"][0]["content"] == "[exit code 0]"


async def test_each_step_logs_one_json_line_with_tokens_tools_and_duration(
    stub: AnthropicStub, sandbox_env: dict[str, str]
) -> None:
    stub.script(Reply.tool("bash", {"command": "true"}), Reply.text("Done."))
    code, logs = await finish(await start_agent(sandbox_env))
    assert code == 0
    steps = [line for line in logs if line["message"] == "Step"]
    assert len(steps) == 3  # the last answers whether it is finished
    assert steps[0]["tools"] == ["bash"]
    assert steps[1]["tools"] == steps[2]["tools"] == []
    assert sum(s["output_tokens"] for s in steps) == stub.usage_reported["output_tokens"]
    assert all(s["input_tokens"] > 0 and s["duration_s"] >= 0 for s in steps)


async def test_a_metrics_port_in_use_is_reported_and_the_run_goes_on(
    stub: AnthropicStub, sandbox_env: dict[str, str]
) -> None:
    with socket.create_server(("0.0.0.0", 0)) as taken:
        port = taken.getsockname()[1]
        stub.script(Reply.text("Done."), Reply.text("Finished."))
        code, logs = await finish(await start_agent({**sandbox_env, "AAR_METRICS_PORT": str(port)}))
    assert code == 0
    assert logs[0]["level"] == "warning"
    assert f"Could not serve /metrics on port {port}" in logs[0]["message"]
    assert logs[-1]["outcome"] == "done"


async def test_a_missing_variable_exits_1_naming_it(sandbox_env: dict[str, str]) -> None:
    env = {k: v for k, v in sandbox_env.items() if k != "AAR_AGENT"}
    process = await asyncio.create_subprocess_exec(
        AGENT_COMMAND,
        env={k: v for k, v in {**os.environ, **env}.items() if k != "AAR_AGENT"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    code, logs = await finish(process)
    assert code == 1
    assert "AAR_AGENT: Field required" in logs[-1]["message"]
