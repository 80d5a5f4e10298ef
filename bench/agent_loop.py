"""What the agent loop itself costs per step, beside the model's own latency: the same streamed
conversation driven by the bare SDK (the baseline: no tools, no state) and by the agent (a cheap
tool call per step, state saved twice with fsync, the transcript appended, the context checked),
both against the local Messages-API stand-in running as its own process. Then, at the size of a
full 200k-token context window: one trim to half, one state save, one state load.

    .venv/bin/python bench/agent_loop.py [--steps 100] [--rounds 3] [--output-chars 2000]

Prints the figures, then one JSON object with them as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import anthropic

from aar_agent.config import Settings
from aar_agent.context import trim
from aar_agent.loop import Agent
from aar_agent.state import RunState, StateStore
from aar_devcluster.anthropic_stub import Reply

WINDOW_CHARS = 800_000  # about 200k tokens at four characters a token


def start_stub() -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "aar_devcluster.anthropic_stub", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    return process, process.stdout.readline().strip()


async def script(url: str, replies: list[Reply]) -> None:
    body = [dataclasses.asdict(reply) for reply in replies]
    async with aiohttp.ClientSession() as http, http.post(f"{url}/stub/replies", json=body) as r:
        r.raise_for_status()


async def baseline(url: str, steps: int, output: str, like: Agent) -> float:
    """Seconds per step for the bare SDK streaming the same growing conversation, with the
    agent's system prompt and tool definitions, so only the loop's own work differs."""
    client = anthropic.AsyncAnthropic(api_key="bench", base_url=url, max_retries=0)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Begin."}]
    await script(url, [Reply.tool("read_file", {"path": "data.txt"}) for _ in range(steps)])
    started = time.perf_counter()
    for _ in range(steps):
        async with client.messages.stream(
            model="claude-opus-4-6",
            max_tokens=1000,
            messages=messages,  # type: ignore[arg-type]
        ) as stream:
            reply = await stream.get_final_message()
        call = reply.content[-1]
        assert call.type == "tool_use"
        messages.append(
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": {}}],
            }
        )
        messages.append(
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": output}],
            }
        )
    elapsed = time.perf_counter() - started
    await client.close()
    return elapsed / steps


def bench_settings(url: str, steps: int, workspace: Path) -> Settings:
    return Settings(
        agent="bench-0",
        api_key="bench",
        anthropic_base_url=url,
        workspace=workspace,
        task_dir=workspace,
        metrics_port=0,
        max_steps=steps,
    )


async def agent_loop(url: str, steps: int, output: str, workspace: Path) -> float:
    """Seconds per step for the agent doing the same, with its tools, state and checks."""
    (workspace / "data.txt").write_text(output)
    await script(url, [Reply.tool("read_file", {"path": "data.txt"}) for _ in range(steps)])
    agent = Agent(bench_settings(url, steps, workspace))
    started = time.perf_counter()
    await agent.run()
    elapsed = time.perf_counter() - started
    await agent.close()
    assert agent.state.step == steps, agent.state.step
    return elapsed / steps


def full_window(output_chars: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Begin."}]
    step = 0
    while len(json.dumps(messages)) < WINDOW_CHARS:
        call_id = f"toolu_{step}"
        messages.append(
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Next I run the sweep."},
                    {"type": "tool_use", "id": call_id, "name": "bash", "input": {"command": "x"}},
                ],
            }
        )
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": call_id, "content": "o" * output_chars}
                ],
            }
        )
        step += 1
    return messages


def timed(function: Any, rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-chars", type=int, default=2000, help="tool output per step")
    args = parser.parse_args()
    output = "o" * args.output_chars
    process, url = start_stub()
    try:
        with tempfile.TemporaryDirectory(prefix="aar-bench-agent-") as directory:
            like = Agent(bench_settings(url, args.steps, Path(directory) / "unused"))
            await baseline(url, 10, output, like)  # warm-up: connections, the stub's caches
            sdk_runs, loop_runs = [], []
            # Alternating rounds, medians: the machine is shared and its load drifts.
            for round_ in range(args.rounds):
                sdk_runs.append(await baseline(url, args.steps, output, like))
                workspace = Path(directory) / f"workspace-{round_}"
                workspace.mkdir()
                loop_runs.append(await agent_loop(url, args.steps, output, workspace))
                print(
                    f"round {round_ + 1}: SDK {sdk_runs[-1] * 1000:.1f} ms a step, "
                    f"agent {loop_runs[-1] * 1000:.1f} ms a step"
                )
            await like.close()
            sdk, loop = statistics.median(sdk_runs), statistics.median(loop_runs)
            messages = full_window(args.output_chars)
            store = StateStore(Path(directory) / "window")
            state = RunState(messages=messages)
            trim_s = timed(lambda: trim(messages, WINDOW_CHARS // 2))
            save_s = timed(lambda: store.save(state))
            load_s = timed(store.load)
    finally:
        process.terminate()
        process.wait()
    overhead = loop - sdk
    print(f"bare SDK, streamed, {args.steps} steps: {sdk * 1000:.1f} ms a step (baseline, median)")
    print(f"agent loop, same conversation:       {loop * 1000:.1f} ms a step")
    print(f"agent overhead:                      {overhead * 1000:.1f} ms a step")
    print(
        f"full window ({len(messages)} messages, {len(json.dumps(messages)) // 1000} kB): "
        f"trim to half {trim_s * 1000:.1f} ms, save {save_s * 1000:.1f} ms, "
        f"load {load_s * 1000:.1f} ms"
    )
    print(
        json.dumps(
            {
                "steps": args.steps,
                "rounds": args.rounds,
                "output_chars": args.output_chars,
                "sdk_step_ms": round(sdk * 1000, 2),
                "agent_step_ms": round(loop * 1000, 2),
                "agent_overhead_ms": round(overhead * 1000, 2),
                "window_messages": len(messages),
                "window_trim_ms": round(trim_s * 1000, 2),
                "window_save_ms": round(save_s * 1000, 2),
                "window_load_ms": round(load_s * 1000, 2),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
