"""The research loop: ask the model (streaming), run the tools it calls, feed the results back,
save, repeat, until the model ends its turn, the budget is spent, or SIGTERM asks it to stop.

Every step is saved on the workspace twice: after the model's answer (before any tool runs) and
after the tool results, so a crash at any point resumes from a valid conversation. Tool calls cut
off by a crash are answered, on resume, with an error saying their effect is unknown; they are
never run twice behind the model's back.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import time
from enum import StrEnum
from typing import Any

import anthropic

from aar_agent.config import Settings
from aar_agent.context import conversation_chars, trim
from aar_agent.prompt import system_prompt
from aar_agent.services import ServiceClient, ServiceError
from aar_agent.state import Finished, RunState, StateStore
from aar_agent.telemetry import Metrics, log
from aar_agent.tools import NOTEBOOK_FILE, Toolbox

# Fraction of the context window a request may fill before trimming, and what trimming aims
# for: trimming well below the trigger means it happens seldom, so the prompt cache holds.
TRIM_AT = 0.8
TRIM_TO = 0.5
DEFAULT_TOKENS_PER_CHAR = 0.3  # before the first answer calibrates it; English text is ~0.25
MAX_BACKOFF = 300.0

INTERRUPTED = (
    "The sandbox restarted (a crash or a pod restart) while this call was running; it may or "
    "may not have taken effect. Check (for example with bash) before repeating it."
)
ASK_IF_FINISHED = (
    "You ended your turn without calling a tool. Nobody will answer here. If your research is "
    "finished, end your turn again without a tool call and your run ends; otherwise carry on."
)
CUT_OFF = (
    "Your answer was cut off at max_tokens before this call was complete, so it was not run. "
    "Make smaller steps (for example write a long file in several parts)."
)


class Outcome(StrEnum):
    DONE = "done"  # the model ended its turn
    BUDGET_EXHAUSTED = "budget_exhausted"
    STOPPED = "stopped"  # SIGTERM: the step finished and the state is saved
    STEP_LIMIT = "step_limit"


class FatalError(Exception):
    """An error no retry will fix (a bad credential, a refused request); the message says why."""


def _block(block: Any) -> dict[str, Any]:
    """An SDK content block as the plain dict the API takes back."""
    if block.type == "text":
        return {"type": "text", "text": block.text}
    if block.type == "tool_use":
        return {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
    dumped: dict[str, Any] = block.model_dump(mode="json", exclude_none=True)
    return dumped


def _api_message(error: anthropic.APIStatusError) -> str:
    body = error.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", error.message))
    return error.message


def _with_cache_breakpoint(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A copy whose last block is marked for prompt caching, so each request reads the previous
    one's prefix from the cache. Only the copy sent is marked: the API allows four marks."""
    sent = copy.copy(messages)
    last = dict(sent[-1])
    content = last["content"]
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
    blocks[-1] = {**blocks[-1], "cache_control": {"type": "ephemeral"}}
    last["content"] = blocks
    sent[-1] = last
    return sent


class Agent:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        client: anthropic.AsyncAnthropic | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.client = client or anthropic.AsyncAnthropic(
            api_key=settings.api_key, base_url=settings.anthropic_base_url, max_retries=2
        )
        self.store = StateStore(settings.state_dir)
        self.state = RunState()
        self.forum = ServiceClient("forum", settings.forum_url, settings.api_key)
        self.scorer = ServiceClient("scorer", settings.scorer_url, settings.api_key)
        self.toolbox = Toolbox(settings, self.state, self.forum, self.scorer)
        self.system = system_prompt(settings, list(self.toolbox.tools))
        self._stop = asyncio.Event()
        self._failures = 0

    def request_stop(self) -> None:
        """Finish the current step, save, and return (what SIGTERM calls)."""
        if not self._stop.is_set():
            log(logging.INFO, "Stop requested; finishing the current step", step=self.state.step)
        self._stop.set()

    async def close(self) -> None:
        await self.forum.close()
        await self.scorer.close()
        await self.client.close()

    async def run(self) -> Outcome:
        budget_already_spent = self._prepare()
        steps_this_process = 0
        while True:
            if self.state.finished is Finished.DONE:
                return Outcome.DONE
            if self._stop.is_set():
                log(logging.INFO, "Stopped", step=self.state.step)
                return Outcome.STOPPED
            if self.settings.max_steps and steps_this_process >= self.settings.max_steps:
                log(logging.INFO, "Reached the step limit", step=self.state.step)
                return Outcome.STEP_LIMIT
            try:
                if await self.step():
                    steps_this_process += 1
            except anthropic.APIStatusError as error:
                if error.status_code != 402:
                    raise
                await self._end_on_budget(_api_message(error), note=not budget_already_spent)
                return Outcome.BUDGET_EXHAUSTED

    def _prepare(self) -> bool:
        """Load or start the state; returns whether an earlier start already ended on budget."""
        loaded = self.store.load()
        if loaded is None:
            self.state.cwd = str(self.settings.workspace)
            first = {
                "role": "user",
                "content": "Begin your research. Start by reading the task bundle, your notebook "
                "and the forum.",
            }
            self._append(first)
            self.store.save(self.state)
            log(logging.INFO, "Started", agent=self.settings.agent, model=self.settings.model)
            return False
        # Keep the same object: the toolbox holds a reference to it.
        for name in RunState.model_fields:
            setattr(self.state, name, getattr(loaded, name))
        if self.state.finished is Finished.DONE:
            log(logging.INFO, "The run had already finished", step=self.state.step)
            return False
        budget_already_spent = self.state.finished is Finished.BUDGET_EXHAUSTED
        if budget_already_spent:
            self.state.finished = None  # the budget may have been raised: ask once more
        self.state.restarts += 1
        last = self.state.messages[-1]
        pending = [
            b["id"]
            for b in (last["content"] if last["role"] == "assistant" else [])
            if isinstance(b, dict) and b.get("type") == "tool_use"
        ]
        if pending:
            self._append(
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": call_id,
                            "content": INTERRUPTED,
                            "is_error": True,
                        }
                        for call_id in pending
                    ],
                }
            )
        self.store.save(self.state)
        log(
            logging.INFO,
            "Resumed",
            step=self.state.step,
            restarts=self.state.restarts,
            interrupted_calls=len(pending),
        )
        return budget_already_spent

    def _append(self, message: dict[str, Any]) -> None:
        self.state.messages.append(message)
        self.store.record(message)

    async def step(self) -> bool:
        """One model call and its tool calls; returns False when the call failed and will be
        retried (after a back-off that a stop request cuts short)."""
        started = time.monotonic()
        self._fit_context()
        try:
            reply = await self._ask()
        except anthropic.APIStatusError as error:
            self.metrics.api_errors.labels(str(error.status_code)).inc()
            if error.status_code == 402:
                raise
            if error.status_code in (401, 403, 404):
                raise FatalError(
                    f"the gateway refused the agent ({error.status_code}): {_api_message(error)}"
                ) from error
            if error.status_code == 400 or error.status_code == 413:
                self._shrink_after_refusal(_api_message(error))
                return False
            await self._back_off(f"{error.status_code} {_api_message(error)}")
            return False
        except anthropic.APIConnectionError as error:
            self.metrics.api_errors.labels("0").inc()
            await self._back_off(str(error))
            return False
        self._failures = 0
        self.state.step += 1
        self._count_usage(reply.usage)
        content = [_block(b) for b in reply.content]
        asked_if_finished = self.state.messages[-1]["content"] == ASK_IF_FINISHED
        self._append({"role": "assistant", "content": content})
        calls = [b for b in content if b["type"] == "tool_use"]
        if not calls:
            if reply.stop_reason == "max_tokens":
                self._append({"role": "user", "content": "Continue."})
            elif asked_if_finished:
                self.state.finished = Finished.DONE
            else:
                # One turn ended without a tool call must not end days of work by accident.
                self._append({"role": "user", "content": ASK_IF_FINISHED})
        self.store.save(self.state)
        results = []
        for call in calls:
            if reply.stop_reason == "max_tokens" and call is calls[-1]:
                text, is_error = CUT_OFF, True
            else:
                text, is_error = await self.toolbox.call(call["name"], call["input"], call["id"])
            self.metrics.tool_calls.labels(call["name"], "error" if is_error else "ok").inc()
            results.append(
                {
                    "type": "tool_result",
                    "tool_use_id": call["id"],
                    "content": text,
                    **({"is_error": True} if is_error else {}),
                }
            )
        if results:
            self._append({"role": "user", "content": results})
            self.store.save(self.state)
        duration = time.monotonic() - started
        self.metrics.steps.inc()
        self.metrics.step_seconds.observe(duration)
        log(
            logging.INFO,
            "Step",
            step=self.state.step,
            duration_s=round(duration, 3),
            stop_reason=reply.stop_reason,
            tools=[c["name"] for c in calls],
            tool_errors=sum(1 for r in results if r.get("is_error")),
            input_tokens=reply.usage.input_tokens,
            output_tokens=reply.usage.output_tokens,
            cache_read_input_tokens=reply.usage.cache_read_input_tokens or 0,
            cache_creation_input_tokens=reply.usage.cache_creation_input_tokens or 0,
        )
        if self.state.finished is Finished.DONE:
            log(logging.INFO, "Finished: the model ended its turn", step=self.state.step)
        return True

    async def _ask(self) -> anthropic.types.Message:
        request: dict[str, Any] = {
            "model": self.settings.model,
            "max_tokens": self.settings.max_tokens,
            "system": [
                {"type": "text", "text": self.system, "cache_control": {"type": "ephemeral"}}
            ],
            "tools": self.toolbox.definitions,
            "messages": _with_cache_breakpoint(self.state.messages),
        }
        # Named after the request itself: asking the same again (an SDK retry, or a restart that
        # lost the answer) gets the gateway's kept answer, unbilled; anything else is new.
        digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
        key = f"{self.settings.agent}-{self.state.step + 1}-{digest[:32]}"
        # Streamed: long answers would outlast a plain request's timeout (the SDK refuses those).
        async with self.client.messages.stream(
            **request, extra_headers={"Idempotency-Key": key}
        ) as stream:
            reply = await stream.get_final_message()
        # Calibrate characters to tokens on what was actually counted, for the next trim.
        counted = (
            reply.usage.input_tokens
            + (reply.usage.cache_read_input_tokens or 0)
            + (reply.usage.cache_creation_input_tokens or 0)
        )
        self.state.tokens_per_char = counted / self._request_chars(self.state.messages)
        return reply

    def _request_chars(self, messages: list[dict[str, Any]]) -> int:
        return (
            len(self.system) + len(json.dumps(self.toolbox.definitions)) + len(json.dumps(messages))
        )

    def _count_usage(self, usage: anthropic.types.Usage) -> None:
        counts = {
            "input": usage.input_tokens,
            "output": usage.output_tokens,
            "cache_read": usage.cache_read_input_tokens or 0,
            "cache_creation": usage.cache_creation_input_tokens or 0,
        }
        for kind, count in counts.items():
            self.metrics.tokens.labels(kind).inc(count)
        totals = self.state.usage
        totals.input_tokens += counts["input"]
        totals.output_tokens += counts["output"]
        totals.cache_read_input_tokens += counts["cache_read"]
        totals.cache_creation_input_tokens += counts["cache_creation"]

    def _fit_context(self) -> None:
        """Trim the conversation when the next request would come near the context window."""
        per_char = self.state.tokens_per_char or DEFAULT_TOKENS_PER_CHAR
        window = self.settings.context_tokens - self.settings.max_tokens
        estimate = self._request_chars(self.state.messages) * per_char
        if estimate > window * TRIM_AT:
            self._trim_to(int(window * TRIM_TO / per_char) - self._request_chars([]))

    def _trim_to(self, budget_chars: int) -> bool:
        """Trim the conversation to `budget_chars` where it can; whether anything was dropped."""
        before = conversation_chars(self.state.messages)
        trimmed, report = trim(self.state.messages, max(0, budget_chars))
        if not report.trimmed:
            return False
        self.state.messages[:] = trimmed
        self.store.save(self.state)
        self.metrics.trims.inc()
        log(
            logging.INFO,
            "Trimmed the context",
            step=self.state.step,
            chars_before=before,
            chars_now=conversation_chars(trimmed),
            outputs_dropped=report.outputs_dropped,
            messages_dropped=report.messages_dropped,
        )
        return True

    def _shrink_after_refusal(self, message: str) -> None:
        """A 400 or 413 on a conversation the agent built: too long means the estimate was off,
        so halve what is there (again on each refusal); anything else is a bug no retry fixes."""
        if not any(words in message for words in ("too long", "too large", "too many")):
            raise FatalError(f"the API refused the conversation: {message}")
        if not self._trim_to(conversation_chars(self.state.messages) // 2):
            raise FatalError(
                f"the API refused the conversation and nothing is left to trim: {message}"
            )
        log(logging.WARNING, "Trimmed harder after the API refused the length", reason=message)

    async def _back_off(self, reason: str) -> None:
        self._failures += 1
        delay = min(MAX_BACKOFF, 2.0**self._failures)
        log(logging.WARNING, "Model call failed; retrying", reason=reason, retry_in_s=delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay)

    async def _end_on_budget(self, message: str, note: bool) -> None:
        """Save, and leave a last note on the forum so the others know why this agent stopped."""
        self.state.finished = Finished.BUDGET_EXHAUSTED
        self.store.save(self.state)
        log(
            logging.WARNING,
            "Budget exhausted; ending the run",
            step=self.state.step,
            reason=message,
        )
        if not note:
            return
        notebook = self.settings.workspace / NOTEBOOK_FILE
        recent = notebook.read_text()[-3000:] if notebook.exists() else "(the notebook is empty)"
        body = (
            f"{self.settings.agent} stopped after {self.state.step} steps: the gateway refused "
            f"further model calls.\n\n> {message}\n\nThe last part of its notebook:\n\n{recent}"
        )
        try:
            post = await self.forum.request(
                "POST",
                "/api/v1/posts",
                json_body={
                    "kind": "error",
                    "title": f"{self.settings.agent} stopped: budget spent",
                    "body": body,
                    "tags": ["budget"],
                    "parent": None,
                    "submissions": [],
                    "artifacts": [],
                },
            )
        except ServiceError as error:
            log(logging.ERROR, "Could not post the budget note", error=str(error))
            return
        log(logging.INFO, "Posted the budget note", post=post.get("id"))
