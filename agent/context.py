"""Keeping a long run's conversation inside the model's context window.

Two passes, oldest first, stopping as soon as the conversation fits: first old tool outputs (and
long tool inputs, such as a file written in full) are replaced by a short note, then whole old
exchanges (an assistant turn and the user turn that answers it) are dropped and listed in a note
on the first message. Both keep every tool_use paired with its tool_result, which the API
requires; nothing is lost for good, since the transcript on the workspace keeps every message.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

# Outputs shorter than this are kept: the note replacing them would save little.
_KEEP_CHARS = 300
_NOTE_PREFIX = "[Context note]"
_NOTE_LINES = 40  # the dropped-steps note lists at most this many tool calls, newest kept


@dataclass
class TrimReport:
    outputs_dropped: int = 0
    messages_dropped: int = 0

    @property
    def trimmed(self) -> bool:
        return bool(self.outputs_dropped or self.messages_dropped)


def conversation_chars(messages: list[dict[str, Any]]) -> int:
    return len(json.dumps(messages))


def _dropped(length: int) -> str:
    return (
        f"[dropped from context to save space: {length} characters; the full text is in "
        ".aar/transcript.jsonl on the workspace]"
    )


def _shrink_tool_result(block: dict[str, Any]) -> bool:
    content = block.get("content")
    text = content if isinstance(content, str) else json.dumps(content)
    if content is None or len(text) <= _KEEP_CHARS or text.startswith("[dropped"):
        return False
    block["content"] = _dropped(len(text))
    return True


def _shrink_tool_input(block: dict[str, Any]) -> bool:
    changed = False
    for key, value in block.get("input", {}).items():
        if isinstance(value, str) and len(value) > _KEEP_CHARS and not value.startswith("[dropped"):
            block["input"][key] = _dropped(len(value))
            changed = True
    return changed


def _shrink(block: dict[str, Any]) -> bool:
    if block.get("type") == "tool_result":
        return _shrink_tool_result(block)
    if block.get("type") == "tool_use":
        return _shrink_tool_input(block)
    return False


def _call_summary(block: dict[str, Any]) -> str:
    brief = json.dumps(block.get("input", {}))
    if len(brief) > 100:
        brief = brief[:97] + "..."
    return f"- {block.get('name')} {brief}"


def _add_note(first: dict[str, Any], steps: int, calls: list[str]) -> None:
    """Record on the first message which steps were dropped, merged with any earlier note."""
    content = first["content"]
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
    earlier_steps, earlier_calls = 0, []
    kept = []
    for block in blocks:
        text = block.get("text", "") if block.get("type") == "text" else ""
        if text.startswith(_NOTE_PREFIX):
            header, *lines = text.split("\n")
            earlier_steps = int(header.split("steps=")[1].split()[0])
            earlier_calls = [line for line in lines if line.startswith("- ")]
        else:
            kept.append(block)
    steps += earlier_steps
    calls = (earlier_calls + calls)[-_NOTE_LINES:]
    note = (
        f"{_NOTE_PREFIX} steps={steps} earlier steps were dropped to fit the context window. "
        "Your notebook (notebook_read) and the files on your workspace hold what you recorded; "
        "the most recent tool calls among those dropped were:\n" + "\n".join(calls)
    )
    first["content"] = [*kept, {"type": "text", "text": note}]


def trim(
    messages: list[dict[str, Any]], budget_chars: int, keep_recent: int = 4
) -> tuple[list[dict[str, Any]], TrimReport]:
    """A copy of `messages` that fits in `budget_chars` where it can, and what was dropped.

    The first message (the task) and the last `keep_recent` messages are always kept whole.
    """
    report = TrimReport()
    result = copy.deepcopy(messages)
    # Sizes per message, kept current as messages change, so a trim costs one pass and not one
    # serialisation of the whole conversation per message (json.dumps joins items with ", ").
    sizes = [len(json.dumps(message)) for message in result]

    def total() -> int:
        return sum(sizes) + 2 * max(0, len(sizes) - 1) + 2

    if total() <= budget_chars:
        return result, report
    protected_from = max(1, len(result) - keep_recent)
    for index in range(1, protected_from):
        message = result[index]
        for block in message["content"] if isinstance(message["content"], list) else []:
            if _shrink(block):
                report.outputs_dropped += 1
        sizes[index] = len(json.dumps(message))
        if total() <= budget_chars:
            return result, report
    # Drop (assistant, user) pairs right after the first message: the pairing stays valid and
    # the conversation still starts with the user and alternates.
    while (
        total() > budget_chars
        and len(result) - 2 >= 1 + keep_recent
        and result[1]["role"] == "assistant"
        and result[2]["role"] == "user"
    ):
        content = result[1]["content"]
        blocks = content if isinstance(content, list) else []
        del result[1:3]
        del sizes[1:3]
        report.messages_dropped += 2
        # The note grows the first message, so it is rewritten before the next size check.
        _add_note(result[0], 1, [_call_summary(b) for b in blocks if b.get("type") == "tool_use"])
        sizes[0] = len(json.dumps(result[0]))
    return result, report
