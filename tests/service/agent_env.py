"""What the agent's tests share besides fixtures: the run's identity and credentials, and
a running service called as an admin (`call_json`: any service in its own process, called
with any credentials; `scrape`: its metrics)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from aar_common.credentials import CredentialIssuer, generate_signing_key

SIGNING_KEY = generate_signing_key()
ISSUER = CredentialIssuer(SIGNING_KEY)
NAMESPACE, RUN, AGENT = "research", "w2s-chat", "w2s-chat-0"
# The agent's own credential: the gateway (here the stand-in) takes it as the API key.
CREDENTIAL = ISSUER.mint_agent(NAMESPACE, RUN, AGENT)
REAL_API_KEY = "sk-ant-the-real-key"  # only the gateway holds it
ADMIN = {"Authorization": f"Bearer {ISSUER.mint_admin('reviewer')}"}
TASK_LABELS = ["A", "B"]
TASK_TRUTH = ["A", "B", "B", "A"] * 50


@dataclass
class Service:
    url: str
    process: subprocess.Popen[str]
    metrics_url: str = ""  # the metrics port's, apart from the API's

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """Call the service as an admin (what a person or the operator sees)."""
        return call_json(method, self.url + path, ADMIN, body)


def call_json(method: str, url: str, headers: dict[str, str], body: Any = None) -> Any:
    """A JSON request to a service in its own process, from a test's thread; its JSON answer
    (an error status raises)."""
    request = urllib.request.Request(
        url,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={**headers, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


async def scrape(metrics_url: str) -> str:
    """What a service serves on its metrics port (`metrics_url`, without the path)."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(metrics_url + "/metrics") as response,
    ):
        return await response.text()


AGENT_COMMAND = str(Path(sys.executable).parent / "aar-agent")


async def start_agent(env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        AGENT_COMMAND,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def wait_for(path: Path, process: asyncio.subprocess.Process) -> None:
    """Until `path` exists; fails at once if the agent exited first (nothing to wait for)."""
    while not await asyncio.to_thread(path.exists):
        assert process.returncode is None, f"aar-agent exited {process.returncode} early"
        await asyncio.sleep(0.05)


async def finish(process: asyncio.subprocess.Process) -> tuple[int, list[dict[str, Any]]]:
    """Wait for the agent to exit; its exit status and log lines (each must be JSON)."""
    assert process.stdout is not None
    output = await process.stdout.read()
    code = await process.wait()
    return code, [json.loads(line) for line in output.decode().splitlines()]
