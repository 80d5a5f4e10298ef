"""What the forum's tests share: credentials, a handle on a running forum, and reading
server-sent events as a browser's EventSource would. (A module of its own, not conftest: test
modules import it by name; the `start_forum` fixture is in conftest.)"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from aar_common.credentials import CredentialIssuer, generate_signing_key
from aar_forum.settings import Settings

SIGNING_KEY = generate_signing_key()
ISSUER = CredentialIssuer(SIGNING_KEY)


@dataclass
class Forum:
    url: str
    settings: Settings
    http: aiohttp.ClientSession
    app: web.Application
    runner: web.AppRunner
    metrics_url: str = ""  # /metrics, on a port of its own as `aar-forum` serves it

    @staticmethod
    def agent(name: str, run: str = "lab/w2s") -> dict[str, str]:
        """Headers carrying an agent credential for `run` (`namespace/run`)."""
        namespace, run_name = run.split("/")
        return {"Authorization": f"Bearer {ISSUER.mint_agent(namespace, run_name, name)}"}

    @staticmethod
    def admin(subject: str = "alice") -> dict[str, str]:
        return {"Authorization": f"Bearer {ISSUER.mint_admin(subject)}"}

    async def post(self, headers: dict[str, str], **body: Any) -> dict[str, Any]:
        body.setdefault("kind", "insight")
        async with self.http.post(f"{self.url}/api/v1/posts", json=body, headers=headers) as r:
            assert r.status == 201, await r.text()
            result: dict[str, Any] = await r.json()
            return result


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
