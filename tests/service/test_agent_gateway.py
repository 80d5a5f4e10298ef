"""The agent behind the real gateway (`aar-gateway`, with the stand-in as its upstream): a spent
budget, as the gateway enforces it, ends the run with a note on the real forum; and a restart that
lost the model's answer asks again under the same Idempotency-Key, so the gateway replays the
answer instead of paying for it twice."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agent_env import AGENT, NAMESPACE, RUN, Service, finish, start_agent

from aar_agent.config import Settings
from aar_agent.loop import Agent, Outcome
from aar_devcluster.anthropic_stub import AnthropicStub, Reply

RUN_KEY = f"{NAMESPACE}/{RUN}"


async def test_the_gateways_budget_refusal_ends_the_run_with_a_note_on_the_forum(
    upstream_stub: tuple[AnthropicStub, str],
    gateway: Service,
    services: tuple[Service, Service],
    make_settings: Callable[..., Settings],
) -> None:
    upstream, _ = upstream_stub
    forum, _ = services
    gateway.call("PUT", f"/api/v1/budgets/{RUN_KEY}", {"usd": None, "agents": {AGENT: 1.0}})
    # 300k input tokens of claude-opus-4-6 at $5 a million: $1.50, over the $1 cap after one step.
    upstream.script(
        Reply.tool(
            "notebook_write",
            {"title": "sweep", "entry": "lr 1e-5 wins"},
            usage={"input_tokens": 300_000},
        ),
        Reply.text("never reached"),
    )
    agent = Agent(make_settings(anthropic_base_url=gateway.url, forum_url=forum.url))
    try:
        assert await agent.run() is Outcome.BUDGET_EXHAUSTED
    finally:
        await agent.close()

    assert upstream.messages_answered == 1  # the refused request never left the gateway
    spend = gateway.call("GET", f"/api/v1/spend/{RUN_KEY}")["agents"][AGENT]
    assert spend["requests"] == 1
    assert spend["input_tokens"] == 300_000
    notes = forum.call("GET", f"/api/v1/posts?run={RUN_KEY}&author={AGENT}")["posts"]
    assert len(notes) == 1
    assert notes[0]["kind"] == "error"
    assert f"the agent budget of {AGENT} is spent: cap $1" in notes[0]["body"]
    assert "lr 1e-5 wins" in notes[0]["body"]


def upstream_answers_started(gateway: Service, count: int) -> bool:
    """Whether the gateway has had `count` answers start from upstream (and so has begun
    relaying the last one to the agent)."""
    with urllib.request.urlopen(gateway.metrics_url + "/metrics", timeout=30) as response:
        metrics = response.read().decode()
    prefix = f'aar_llm_upstream_latency_seconds_count{{model="claude-opus-4-6",run="{RUN_KEY}"}}'
    lines = [line for line in metrics.splitlines() if line.startswith(prefix)]
    return bool(lines) and float(lines[0].split()[-1]) >= count


@pytest.mark.parametrize("killed", ["mid_stream", "before_the_first_byte"])
async def test_a_restart_that_lost_the_answer_gets_it_replayed_unbilled(
    upstream_stub: tuple[AnthropicStub, str],
    gateway: Service,
    sandbox_env: dict[str, str],
    killed: str,
) -> None:
    upstream, _ = upstream_stub
    gateway.call("PUT", f"/api/v1/budgets/{RUN_KEY}", {"usd": None, "agents": {}})
    env = {**sandbox_env, "ANTHROPIC_BASE_URL": gateway.url}
    workspace = Path(env["AAR_WORKSPACE"])
    asked, gone = asyncio.Event(), asyncio.Event()
    answer = Reply.tool("bash", {"command": "echo ran >> answers.log"}, text="x" * 400)

    async def lost_answer(_: dict[str, Any]) -> Reply:
        upstream.responder = None  # later requests take the scripted replies
        asked.set()
        if killed == "before_the_first_byte":
            await gone.wait()
        else:
            upstream.chunk_delay = 0.2  # long enough to kill the agent while it streams
        return answer

    upstream.script(Reply.tool("bash", {"command": "touch started"}))
    upstream.responder = lost_answer
    first = await start_agent(env)
    await asyncio.wait_for(asked.wait(), 120)
    if killed == "mid_stream":
        while not await asyncio.to_thread(upstream_answers_started, gateway, 2):
            assert first.returncode is None, "aar-agent exited before its second request"
            await asyncio.sleep(0.05)
    first.kill()
    await first.wait()
    # The upstream answers in full; the gateway reads it to the end, bills it and keeps it.
    upstream.chunk_delay = 0
    gone.set()

    upstream.script(Reply.text("Done."), Reply.text("Finished."))
    code, logs = await finish(await start_agent(env))

    assert code == 0, logs
    # The answer the killed process never read was run once, by the restarted one.
    assert (workspace / "answers.log").read_text() == "ran\n"
    # Upstream answered four requests; the restart's fifth was the gateway's kept answer.
    assert upstream.messages_answered == 4
    spend = gateway.call("GET", f"/api/v1/spend/{RUN_KEY}")["agents"][AGENT]
    assert spend["requests"] == 4
    assert [line["step"] for line in logs if line["message"] == "Step"] == [2, 3, 4]
