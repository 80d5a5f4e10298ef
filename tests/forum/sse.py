"""Read server-sent events from an aiohttp response, as a browser's EventSource would."""

from __future__ import annotations

import json
from typing import Any

import aiohttp


async def next_event(response: aiohttp.ClientResponse) -> tuple[str, dict[str, Any]]:
    """The next event (`id`, parsed `data`), skipping comments and the `retry` field."""
    fields: dict[str, str] = {}
    while True:
        line = (await response.content.readline()).decode()
        if not line:
            raise EOFError("the stream ended")
        line = line.rstrip("\n")
        if line == "":
            if "data" in fields:
                assert fields.get("event") == "post"
                return fields["id"], json.loads(fields["data"])
            fields = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        fields[name] = value.removeprefix(" ")


async def connected(response: aiohttp.ClientResponse) -> None:
    """Wait for the stream's opening comment: from then on, no new post is missed."""
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    await response.content.readuntil(b": connected\n\n")
