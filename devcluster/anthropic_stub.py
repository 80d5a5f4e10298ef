"""A local server that speaks the Anthropic Messages API, for tests, benchmarks and offline demos.

It stands in for api.anthropic.com, which cannot be reached from a test machine: `POST
/v1/messages` (JSON or server-sent events, with usage in `message_start` and `message_delta` as
the real API sends it) and `POST /v1/messages/count_tokens`. Replies are scripted (a queue, or a
function of the request); without a script it answers a short text, or, as the offline
researcher (`--researcher`, `aar_devcluster.offline_researcher`), drives the agent through a real
piece of research. Like the real API it refuses
a conversation whose tool_use/tool_result pairs do not match, and it keeps a ledger of the usage
it reported so a test can compare anyone's metering with it.

Scripting over HTTP (for a stub running as its own process): `POST /stub/replies` with a list of
replies, `GET /stub/requests`, `GET /stub/usage`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import itertools
import json
import math
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from aar_common.web import error_body, presented_token
from aar_devcluster import offline_researcher
from aar_gateway.pricing import USAGE_FIELDS


@dataclass
class Reply:
    """One scripted answer: content blocks (`{"type": "text", "text": ...}` or
    `{"type": "tool_use", "name": ..., "input": {...}}`), or an error to answer instead."""

    content: list[dict[str, Any]] = field(default_factory=list)
    stop_reason: str | None = None  # default: tool_use when a tool is called, else end_turn
    usage: dict[str, int] | None = None  # default: counted from the request and the content
    error_status: int | None = None
    error_type: str = "api_error"
    error_message: str = "scripted failure"
    retry_after: float | None = None
    delay: float = 0.0  # seconds before answering at all

    @classmethod
    def text(cls, text: str, **options: Any) -> Reply:
        return cls(content=[{"type": "text", "text": text}], **options)

    @classmethod
    def tool(cls, name: str, tool_input: dict[str, Any], text: str = "", **options: Any) -> Reply:
        blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
        blocks.append({"type": "tool_use", "name": name, "input": tool_input})
        return cls(content=blocks, **options)

    @classmethod
    def failure(cls, status: int, error_type: str, message: str, **options: Any) -> Reply:
        return cls(error_status=status, error_type=error_type, error_message=message, **options)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reply:
        return cls(**data)


Responder = Callable[[dict[str, Any]], Reply | Awaitable[Reply]]


def researcher_reply(body: dict[str, Any]) -> Reply:
    """The offline researcher's next turn for a request (a Responder)."""
    return Reply(content=offline_researcher.reply(body))


def estimate_tokens(value: Any) -> int:
    """A deterministic stand-in for tokenisation: about four characters a token."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return max(1, math.ceil(len(text) / 4))


def conversation_problem(messages: list[dict[str, Any]]) -> str | None:
    """What the real API would refuse in this conversation's tool_use/tool_result pairing."""
    if not messages:
        return "messages: at least one message is required"
    if messages[0].get("role") != "user":
        return "messages: the first message must use the user role"
    pending: set[str] = set()
    for index, message in enumerate(messages):
        content = message.get("content")
        blocks = content if isinstance(content, list) else []
        results = {b.get("tool_use_id") for b in blocks if b.get("type") == "tool_result"}
        if message.get("role") == "user":
            if pending - results:
                return (
                    f"messages.{index}: tool_use ids {sorted(pending - results)} were found "
                    "without tool_result blocks immediately after"
                )
            if results - pending:
                return (
                    f"messages.{index}: unexpected tool_use_id in tool_result blocks: "
                    f"{sorted(str(r) for r in results - pending)}; each tool_result must have a "
                    "corresponding tool_use block in the previous message"
                )
            pending = set()
        else:
            if pending:
                return (
                    f"messages.{index}: tool_use blocks must be answered by the user's next message"
                )
            pending = {b["id"] for b in blocks if b.get("type") == "tool_use"}
    return None


class AnthropicStub:
    """The server's state: scripted replies, requests seen, usage reported."""

    def __init__(
        self, api_key: str | None = None, chunk_size: int = 8, researcher: bool = False
    ) -> None:
        self.api_key = api_key
        self.chunk_size = chunk_size
        self.chunk_delay = 0.0
        self.replies: deque[Reply] = deque()
        # Scripted replies still come first: a test can queue a failure in front of it.
        self.responder: Responder | None = researcher_reply if researcher else None
        self.requests: list[dict[str, Any]] = []
        self.usage_reported = dict.fromkeys(USAGE_FIELDS, 0)
        self.messages_answered = 0
        self._ids = itertools.count(1)

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        app.router.add_post("/stub/replies", self._add_replies)
        app.router.add_get("/stub/requests", self._get_requests)
        app.router.add_get("/stub/usage", self._get_usage)
        return app

    def _error(self, status: int, error_type: str, message: str) -> web.Response:
        return web.json_response(error_body(status, message, error_type), status=status)

    def _check_key(self, request: web.Request) -> web.Response | None:
        if self.api_key is not None and presented_token(request) != self.api_key:
            return self._error(401, "authentication_error", "invalid x-api-key")
        return None

    async def _count_tokens(self, request: web.Request) -> web.Response:
        if refused := self._check_key(request):
            return refused
        body = await request.json()
        return web.json_response({"input_tokens": self._input_tokens(body)})

    def _input_tokens(self, body: dict[str, Any]) -> int:
        return estimate_tokens(
            [body.get("system", ""), body.get("messages", []), body.get("tools", [])]
        )

    async def _next_reply(self, body: dict[str, Any]) -> Reply:
        if self.replies:
            return self.replies.popleft()
        if self.responder is not None:
            reply = self.responder(body)
            return await reply if inspect.isawaitable(reply) else reply
        return Reply.text("Understood.")

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        if refused := self._check_key(request):
            return refused
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return self._error(400, "invalid_request_error", "body is not JSON")
        for required in ("model", "max_tokens", "messages"):
            if required not in body:
                return self._error(400, "invalid_request_error", f"{required}: Field required")
        if problem := conversation_problem(body["messages"]):
            return self._error(400, "invalid_request_error", problem)
        self.requests.append({"headers": dict(request.headers), "body": body})
        reply = await self._next_reply(body)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.error_status is not None:
            response = self._error(reply.error_status, reply.error_type, reply.error_message)
            if reply.retry_after is not None:
                response.headers["retry-after"] = str(reply.retry_after)
            return response
        message = self._message(body, reply)
        for name in USAGE_FIELDS:
            self.usage_reported[name] += message["usage"][name]
        self.messages_answered += 1
        if body.get("stream"):
            return await self._stream(request, message)
        return web.json_response(message, headers={"request-id": f"req_stub_{message['id']}"})

    def _message(self, body: dict[str, Any], reply: Reply) -> dict[str, Any]:
        content = []
        for block in reply.content:
            if block["type"] == "tool_use":
                block = {"id": f"toolu_stub_{next(self._ids):06d}", **block}
            content.append(block)
        calls_tool = any(block["type"] == "tool_use" for block in content)
        usage = {
            "input_tokens": self._input_tokens(body),
            "output_tokens": sum(
                estimate_tokens(block["text"] if block["type"] == "text" else block["input"])
                for block in content
            )
            or 1,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            **(reply.usage or {}),
        }
        return {
            "id": f"msg_stub_{next(self._ids):06d}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": content,
            "stop_reason": reply.stop_reason or ("tool_use" if calls_tool else "end_turn"),
            "stop_sequence": None,
            "usage": usage,
        }

    async def _stream(self, request: web.Request, message: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)

        async def send(event: str, data: dict[str, Any]) -> None:
            await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)

        # As the real API does: message_start carries input usage and a provisional output count;
        # message_delta carries the final, cumulative output count.
        start_usage = {**message["usage"], "output_tokens": 1}
        await send(
            "message_start",
            {
                "type": "message_start",
                "message": {**message, "content": [], "stop_reason": None, "usage": start_usage},
            },
        )
        await send("ping", {"type": "ping"})
        for index, block in enumerate(message["content"]):
            if block["type"] == "text":
                await send(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {"type": "text", "text": ""},
                    },
                )
                for delta in self._chunks(block["text"]):
                    await send(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "text_delta", "text": delta},
                        },
                    )
            else:
                await send(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {**block, "input": {}},
                    },
                )
                for delta in self._chunks(json.dumps(block["input"])):
                    await send(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": delta},
                        },
                    )
            await send("content_block_stop", {"type": "content_block_stop", "index": index})
        await send(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                "usage": {"output_tokens": message["usage"]["output_tokens"]},
            },
        )
        await send("message_stop", {"type": "message_stop"})
        await response.write_eof()
        return response

    def _chunks(self, text: str) -> list[str]:
        return [text[i : i + self.chunk_size] for i in range(0, len(text), self.chunk_size)] or [""]

    async def _add_replies(self, request: web.Request) -> web.Response:
        self.script(*(Reply.from_json(item) for item in await request.json()))
        return web.json_response({"queued": len(self.replies)})

    async def _get_requests(self, _: web.Request) -> web.Response:
        return web.json_response([entry["body"] for entry in self.requests])

    async def _get_usage(self, _: web.Request) -> web.Response:
        return web.json_response({**self.usage_reported, "messages": self.messages_answered})


async def start(
    stub: AnthropicStub, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve `stub`; returns the runner (call `cleanup()`) and its base URL."""
    listener = socket.create_server((host, port))
    runner = web.AppRunner(stub.app())
    await runner.setup()
    await web.SockSite(runner, listener).start()
    return runner, f"http://{host}:{listener.getsockname()[1]}"


@contextlib.asynccontextmanager
async def serving(stub: AnthropicStub) -> AsyncIterator[str]:
    """Serve `stub` on a free loopback port for the duration of the block; yields its URL."""
    runner, url = await start(stub)
    try:
        yield url
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description="a local stand-in for the Anthropic Messages API")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", help="refuse requests without this x-api-key")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between events")
    parser.add_argument(
        "--researcher",
        action="store_true",
        help="answer as the offline researcher: a scripted, honest piece of research through "
        "the agent's real tools, labelled [offline researcher] (see docs/agent.md)",
    )
    args = parser.parse_args()

    async def run() -> None:
        stub = AnthropicStub(api_key=args.api_key, researcher=args.researcher)
        stub.chunk_delay = args.chunk_delay
        runner, url = await start(stub, args.host, args.port)
        print(url, flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    asyncio.run(run())


if __name__ == "__main__":
    main()
