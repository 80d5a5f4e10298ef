"""Context trimming: whatever it drops, the conversation it leaves is one the API accepts (every
tool_use answered by the next message, starting with the user), the task and the newest steps
are kept whole, and what was dropped is said on the first message."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import pytest

from aar_agent.context import conversation_chars, trim
from aar_devcluster.anthropic_stub import conversation_problem

TASK = "Begin your research."


def conversation(steps: int, seed: int) -> list[dict[str, Any]]:
    """A long run: each step an assistant turn with one to three tool calls (some with large
    inputs) and the user turn with their results (some large)."""
    rng = random.Random(seed)
    messages: list[dict[str, Any]] = [{"role": "user", "content": TASK}]
    for step in range(steps):
        calls = [
            {
                "type": "tool_use",
                "id": f"toolu_{step}_{n}",
                "name": rng.choice(["bash", "write_file", "forum_new"]),
                "input": {"command": f"step {step} " + "c" * rng.choice([10, 2000])},
            }
            for n in range(rng.randint(1, 3))
        ]
        messages.append({"role": "assistant", "content": [{"type": "text", "text": "ok"}, *calls]})
        results = [
            {
                "type": "tool_result",
                "tool_use_id": call["id"],
                "content": f"out {step} " + "o" * rng.choice([20, 5000, 20000]),
            }
            for call in calls
        ]
        messages.append({"role": "user", "content": results})
    return messages


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget", [1_000, 20_000, 60_000, 150_000, 10**9])
def test_trimming_always_leaves_a_conversation_the_api_accepts(seed: int, budget: int) -> None:
    original = conversation(40, seed)
    kept = copy.deepcopy(original)
    trimmed, report = trim(original, budget)

    assert original == kept  # the caller's list is not changed
    assert conversation_problem(trimmed) is None
    assert trimmed[-4:] == original[-4:]
    first = trimmed[0]["content"]
    assert (first if isinstance(first, str) else first[0]["text"]) == TASK
    if conversation_chars(original) <= budget:
        assert trimmed == original
        assert not report.trimmed
    else:
        assert report.trimmed
    # Whenever the newest steps alone fit, the result fits.
    floor = conversation_chars([original[0], *original[-4:]]) + 6_000  # the note is bounded
    if budget >= floor:
        assert conversation_chars(trimmed) <= budget


def test_old_outputs_go_first_and_whole_steps_only_when_that_is_not_enough() -> None:
    original = conversation(20, seed=1)
    size = conversation_chars(original)
    gently, report = trim(original, size - 10_000)
    assert report.outputs_dropped > 0
    assert report.messages_dropped == 0
    assert len(gently) == len(original)
    assert "[dropped from context to save space" in json.dumps(gently[1:3])

    hard, report = trim(original, 10_000)
    assert report.messages_dropped > 0
    assert report.messages_dropped % 2 == 0
    assert len(hard) == len(original) - report.messages_dropped
    note = hard[0]["content"][-1]["text"]
    assert note.startswith(f"[Context note] steps={report.messages_dropped // 2} ")
    assert "notebook" in note


def test_a_gentle_trim_stops_shrinking_once_the_conversation_fits() -> None:
    original = conversation(20, seed=1)
    budget = conversation_chars(original) - 10_000
    trimmed, report = trim(original, budget)
    assert report.outputs_dropped > 0
    assert conversation_chars(trimmed) <= budget
    # Oldest first: everything after the last message it changed is as it was, and that still
    # includes long old outputs that could have been shrunk.
    pairs = enumerate(zip(original, trimmed, strict=True))
    last = max(i for i, (before, after) in pairs if before != after)
    assert trimmed[last + 1 :] == original[last + 1 :]
    newer_old = json.dumps(original[last + 1 : -4])
    assert "o" * 5000 in newer_old
    # And it stopped at the first message that made it fit: without that one, it would not.
    assert conversation_chars([*trimmed[:last], *original[last:]]) > budget


def test_a_second_trim_adds_to_the_first_note() -> None:
    original = conversation(30, seed=2)
    once, first = trim(original, 30_000)
    grown = once + conversation(10, seed=3)[1:]
    twice, second = trim(grown, 30_000)
    assert conversation_problem(twice) is None
    steps = (first.messages_dropped + second.messages_dropped) // 2
    notes = [b for b in twice[0]["content"] if b["text"].startswith("[Context note]")]
    assert len(notes) == 1
    assert notes[0]["text"].startswith(f"[Context note] steps={steps} ")
