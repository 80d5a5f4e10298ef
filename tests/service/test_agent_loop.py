"""The research loop in-process against the Messages-API stand-in: tools run and their results
flow back over a streamed conversation, trimming keeps long conversations valid, and the
gateway's answers (errors, a bad credential) end or pause the loop as they should."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest

from aar_agent.config import Settings
from aar_agent.loop import ASK_IF_FINISHED, Agent, FatalError, Outcome
from aar_agent.state import Finished, StateStore
from aar_devcluster.anthropic_stub import AnthropicStub, Reply, conversation_problem


def tool_results(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The tool_result blocks of the last message of a request the stub received."""
    content = request["body"]["messages"][-1]["content"]
    return [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]


def result_text(request: dict[str, Any]) -> str:
    return "\n".join(str(b["content"]) for b in tool_results(request))


async def run_agent(settings: Settings) -> tuple[Agent, Outcome]:
    agent = Agent(settings)
    try:
        outcome = await agent.run()
    finally:
        await agent.close()
    return agent, outcome


async def test_tools_run_and_their_results_flow_back_over_streams(
    stub: AnthropicStub, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    stub.script(
        Reply.tool("bash", {"command": "mkdir -p exp && cd exp && echo hello > out.txt"}),
        Reply.tool("bash", {"command": "pwd; cat out.txt"}),
        Reply.tool("write_file", {"path": "exp/train.py", "content": "lr = 0.1\nseed = 1\n"}),
        Reply.tool("edit_file", {"path": "exp/train.py", "old_text": "0.1", "new_text": "0.01"}),
        Reply.tool("read_file", {"path": "exp/train.py"}),
        Reply.tool("notebook_write", {"title": "lr sweep", "entry": "0.01 looks stable"}),
        Reply.tool("notebook_read", {"query": "stable"}),
        Reply.tool("bash", {"command": "exit 3"}),
        Reply.text("I am done."),
    )
    agent, outcome = await run_agent(settings)

    assert outcome is Outcome.DONE
    requests = stub.requests
    assert len(requests) == 10  # the last asks whether the model is finished; it is
    assert all(r["body"]["stream"] is True for r in requests)
    assert all(r["body"]["model"] == "claude-opus-4-6" for r in requests)
    # Each step's request carries its own Idempotency-Key, for the gateway to replay a retry.
    keys = [r["headers"]["Idempotency-Key"] for r in requests]
    assert keys[0].startswith("w2s-chat-0-1-")
    assert len(set(keys)) == len(keys)
    # Each result answers the call before it, with what the tool actually did.
    assert result_text(requests[1]) == "[exit code 0]"
    assert result_text(requests[2]) == f"{settings.workspace / 'exp'}\nhello\n\n[exit code 0]"
    assert "wrote 18 characters" in result_text(requests[3])
    assert "replaced 1 occurrence" in result_text(requests[4])
    assert "     1\tlr = 0.01" in result_text(requests[5])
    assert "added to" in result_text(requests[6])
    assert "0.01 looks stable" in result_text(requests[7])
    assert tool_results(requests[8])[0]["content"] == "[exit code 3]"
    assert (settings.workspace / "exp" / "train.py").read_text() == "lr = 0.01\nseed = 1\n"
    # The system prompt carries the task, the direction, the rules and the trainer's CLI.
    system = requests[0]["body"]["system"][0]["text"]
    assert "Predict which of two replies people preferred" in system
    assert "data reweighting" in system
    assert "aar-train" in system
    assert "several seeds" in system
    tools = {tool["name"] for tool in requests[0]["body"]["tools"]}
    assert {"bash", "forum_post", "scorer_submit", "artifact_publish", "notebook_write"} <= tools
    state = StateStore(settings.state_dir).load()
    assert state is not None
    assert state.finished is Finished.DONE
    assert state.step == 10
    assert state.usage.output_tokens == stub.usage_reported["output_tokens"]
    registry = agent.metrics.registry
    assert registry.get_sample_value("aar_agent_steps_total") == 10
    assert (
        registry.get_sample_value("aar_agent_tool_calls_total", {"tool": "bash", "outcome": "ok"})
        == 3
    )
    assert (
        registry.get_sample_value("aar_agent_tokens_total", {"kind": "output"})
        == stub.usage_reported["output_tokens"]
    )


async def test_several_calls_in_one_turn_run_in_order_and_are_answered_together(
    stub: AnthropicStub, make_settings: Callable[..., Settings]
) -> None:
    stub.script(
        Reply(
            content=[
                {"type": "text", "text": "Three things at once."},
                {"type": "tool_use", "name": "write_file", "input": {"path": "a", "content": "1"}},
                {"type": "tool_use", "name": "bash", "input": {"command": "cat a; echo 2 >> a"}},
                {"type": "tool_use", "name": "read_file", "input": {"path": "a"}},
            ]
        ),
        Reply.text("Done."),
        Reply.text("Finished."),
    )
    _, outcome = await run_agent(make_settings())
    assert outcome is Outcome.DONE
    calls = [b for b in stub.requests[1]["body"]["messages"][-2]["content"] if "id" in b]
    answers = tool_results(stub.requests[1])
    assert [a["tool_use_id"] for a in answers] == [c["id"] for c in calls]
    assert [a["content"] for a in answers][1:] == ["1\n[exit code 0]", "     1\t12"]


async def test_one_turn_without_a_tool_call_asks_before_ending_the_run(
    stub: AnthropicStub, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    stub.script(
        Reply.text("The sweep is running; I will wait for it."),
        Reply.tool("bash", {"command": "touch carried-on"}),
        Reply.text("All done."),
        Reply.text("Yes, finished."),
    )
    _, outcome = await run_agent(settings)
    assert outcome is Outcome.DONE
    assert len(stub.requests) == 4
    assert stub.requests[1]["body"]["messages"][-1]["content"][0]["text"] == ASK_IF_FINISHED
    assert (settings.workspace / "carried-on").exists()


async def test_a_bad_tool_call_is_answered_with_an_error_the_model_can_act_on(
    stub: AnthropicStub, make_settings: Callable[..., Settings]
) -> None:
    stub.script(
        Reply.tool("bash", {"cmd": "ls"}),
        Reply.tool("edit_file", {"path": "missing.py", "old_text": "a", "new_text": "b"}),
        Reply.tool("teleport", {}),
        Reply.text("Stopping."),
    )
    agent, outcome = await run_agent(make_settings())
    assert outcome is Outcome.DONE
    first, second, third = (tool_results(r)[0] for r in stub.requests[1:4])
    assert first["is_error"] is True
    assert "bad input for bash: command: Field required" in first["content"]
    assert "create it with write_file" in second["content"]
    assert "there is no tool named 'teleport'" in third["content"]
    assert (
        agent.metrics.registry.get_sample_value(
            "aar_agent_tool_calls_total", {"tool": "bash", "outcome": "error"}
        )
        == 1
    )


async def test_long_runs_are_trimmed_and_every_request_stays_valid(
    stub: AnthropicStub, make_settings: Callable[..., Settings]
) -> None:
    # A small window: the system prompt and tools take about 3k tokens, each output about 1.5k.
    settings = make_settings(context_tokens=14_000, max_tokens=1_000)
    steps = 30
    stub.script(
        *(
            Reply.tool("bash", {"command": f"echo step {i} $(head -c 6000 /dev/zero | tr '\\0' x)"})
            for i in range(steps)
        ),
        Reply.text("Finished."),
    )
    agent, outcome = await run_agent(settings)

    # The stand-in refuses any request whose tool_use/tool_result pairs do not match, so every
    # step reaching it, and the run ending on its own terms, is the validity check.
    assert outcome is Outcome.DONE
    assert len(stub.requests) == steps + 2  # and the question whether it is finished
    for request in stub.requests:
        assert conversation_problem(request["body"]["messages"]) is None
    assert agent.metrics.registry.get_sample_value("aar_agent_context_trims_total")
    largest = max(r["body"]["messages"] and len(json.dumps(r["body"])) for r in stub.requests)
    # Without trimming the last request would carry all 30 outputs (over 180k characters).
    assert largest < 4 * (settings.context_tokens - settings.max_tokens)
    last = stub.requests[steps]["body"]["messages"]  # the one answering the last output
    assert "[Context note] steps=" in json.dumps(last[0])
    # The newest output is whole; what was dropped from the context is kept in the transcript.
    assert "step 29 " + "x" * 6000 in json.dumps(last[-1])
    transcript = (settings.state_dir / "transcript.jsonl").read_text()
    assert all(f"step {i} " + "x" * 6000 in transcript for i in range(steps))


async def test_a_call_cut_off_at_max_tokens_is_not_run(
    stub: AnthropicStub, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    stub.script(
        Reply.tool("bash", {"command": "touch ran"}, stop_reason="max_tokens"),
        Reply.text("Finished."),
    )
    _, outcome = await run_agent(settings)
    assert outcome is Outcome.DONE
    assert not (settings.workspace / "ran").exists()
    answer = tool_results(stub.requests[1])[0]
    assert answer["is_error"] is True
    assert "cut off at max_tokens" in answer["content"]


async def test_an_overloaded_api_is_retried_after_a_back_off(
    stub: AnthropicStub, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("aar_agent.loop.MAX_BACKOFF", 0.1)
    # Three failures exhaust the SDK's own two retries; the loop's back-off then tries again.
    stub.script(
        *(Reply.failure(529, "overloaded_error", "Overloaded") for _ in range(3)),
        Reply.tool("bash", {"command": "echo after"}),
        Reply.text("Finished."),
    )
    agent, outcome = await run_agent(make_settings())
    assert outcome is Outcome.DONE
    assert "after" in result_text(stub.requests[-2])
    assert (
        agent.metrics.registry.get_sample_value("aar_agent_api_errors_total", {"status": "529"})
        == 1
    )


async def test_a_prompt_too_long_refusal_trims_harder_and_carries_on(
    stub: AnthropicStub, make_settings: Callable[..., Settings]
) -> None:
    # The estimate says it fits (a 200k window), but the API counts otherwise: trim and retry.
    big = "echo $(head -c 30000 /dev/zero | tr '\\0' y)"
    stub.script(
        *(Reply.tool("bash", {"command": big}) for _ in range(8)),
        Reply.failure(400, "invalid_request_error", "prompt is too long: 201000 tokens > 200000"),
        Reply.tool("bash", {"command": "echo still here"}),
        Reply.text("Finished."),
        Reply.text("Finished."),
    )
    agent, outcome = await run_agent(make_settings())
    assert outcome is Outcome.DONE
    refused, retried = stub.requests[8]["body"], stub.requests[9]["body"]
    assert retried["messages"] != refused["messages"]
    assert len(json.dumps(retried["messages"])) < len(json.dumps(refused["messages"])) / 2
    assert conversation_problem(retried["messages"]) is None
    assert "still here" in result_text(stub.requests[10])
    assert agent.metrics.registry.get_sample_value("aar_agent_context_trims_total") == 1


class WatchedEvent(asyncio.Event):
    """The agent's stop event, telling the test when the loop starts waiting on it."""

    def __init__(self, waiting: asyncio.Event) -> None:
        super().__init__()
        self.waiting = waiting

    async def wait(self) -> Literal[True]:
        self.waiting.set()
        return await super().wait()


async def test_sigterm_during_a_back_off_stops_without_waiting_it_out(
    stub: AnthropicStub, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    stub.script(*(Reply.failure(529, "overloaded_error", "Overloaded") for _ in range(3)))
    agent = Agent(make_settings())
    backing_off = asyncio.Event()
    monkeypatch.setattr(agent, "_stop", WatchedEvent(backing_off))
    running = asyncio.create_task(agent.run())
    # The SDK's two retries fail, then the loop's own back-off (2 s, then longer) begins.
    await backing_off.wait()
    agent.request_stop()
    assert await running is Outcome.STOPPED
    await agent.close()
    assert len(stub.requests) == 3


async def test_a_refused_credential_ends_the_run_with_the_reason(
    make_settings: Callable[..., Settings],
) -> None:
    agent = Agent(make_settings(api_key="aar1.someone-else"))
    with pytest.raises(FatalError, match="the gateway refused the agent \\(401\\)"):
        await agent.run()
    await agent.close()


async def test_an_ended_run_does_not_start_again(
    stub: AnthropicStub, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings()
    stub.script(Reply.text("Nothing to do."))
    await run_agent(settings)
    _, outcome = await run_agent(settings)
    assert outcome is Outcome.DONE
    assert len(stub.requests) == 2  # the answer, and the question whether it is finished


def test_workspace_paths_come_from_the_environment(tmp_path: Path) -> None:
    from aar_agent.config import ConfigError, settings_from_env

    with pytest.raises(ConfigError) as raised:
        settings_from_env({"AAR_WORKSPACE": str(tmp_path), "AAR_MAX_STEPS": "-1"})
    message = str(raised.value)
    assert "AAR_AGENT: Field required" in message
    assert "ANTHROPIC_API_KEY (or AAR_CREDENTIAL): Field required" in message
    assert "AAR_MAX_STEPS: Input should be greater than or equal to 0" in message
