"""What the gateway's tests share: credentials, a gateway served in this process in front of an
upstream (the Messages-API stand-in, or an aiohttp app of a test's own) over a directory of its
own (its key files and its SQLite ledger), stopped and started again on the same directory for a
restart; and `aar-gateway` as its own process, killed and started again on its port. (A module of
its own, not conftest: test modules import it by name.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import pytest
from agent_env import REAL_API_KEY, scrape
from aiohttp import web

from aar_common.credentials import CredentialIssuer, generate_signing_key, public_key_pem
from aar_common.ports import free_port
from aar_common.web import REGISTRY_KEY, address, metrics_app
from aar_devcluster.anthropic_stub import AnthropicStub
from aar_gateway.app import build_app
from aar_gateway.settings import Settings

KEY = generate_signing_key()
ISSUER = CredentialIssuer(KEY)
ADMIN = ISSUER.mint_admin("operator")
HI = [{"role": "user", "content": "hi"}]


def write_keys(directory: Path, api_key: str = REAL_API_KEY, signing_key: bytes = KEY) -> None:
    """The files the gateway reads its secrets from: the real API key, and the public key of
    the credentials it accepts (by default those `Gateway.client` and `Gateway.admin` send)."""
    (directory / "api-key").write_text(api_key + "\n")
    (directory / "public-key.pem").write_bytes(public_key_pem(signing_key))


@dataclass
class Gateway:
    """A gateway on a loopback port in front of a stand-in, with a way to restart it; called as
    agents call it (through the SDK) and as the operator does (as admin). Never started, a
    handle on `aar-gateway` in its own process (`served_as_process`)."""

    stub: AnthropicStub
    stub_url: str
    directory: Path
    options: dict[str, Any] = field(default_factory=dict)
    url: str = ""
    metrics_url: str = ""  # /metrics, on a port of its own as `aar-gateway` serves it
    runner: web.AppRunner | None = None
    exporter: web.AppRunner | None = None

    def settings(self) -> Settings:
        return Settings(
            api_key_file=self.directory / "api-key",
            public_key_file=self.directory / "public-key.pem",
            data_dir=self.directory / "data",
            upstream=self.stub_url,
            # The tests read series per agent; the default (off) has its own test.
            **{"per_agent_metrics": True, **self.options},
        )

    async def start(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        app = build_app(self.settings())
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.SockSite(self.runner, listener).start()
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        metrics = socket.create_server(("127.0.0.1", 0))
        self.exporter = web.AppRunner(metrics_app(app[REGISTRY_KEY]))
        await self.exporter.setup()
        await web.SockSite(self.exporter, metrics).start()
        self.metrics_url = address(metrics)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.exporter is not None:
            await self.exporter.cleanup()
            self.exporter = None

    def client(
        self, agent: str = "w2s-1", run: str = "w2s", namespace: str = "ns", **options: Any
    ) -> anthropic.AsyncAnthropic:
        options.setdefault("max_retries", 0)
        return anthropic.AsyncAnthropic(
            api_key=ISSUER.mint_agent(namespace, run, agent), base_url=self.url, **options
        )

    async def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.request(
                method,
                self.url + path,
                json=body,
                headers={"Authorization": f"Bearer {ADMIN}"},
            ) as response,
        ):
            return response.status, await response.json()

    async def budget(
        self, usd: float | None, agents: dict[str, float | None] | None = None
    ) -> None:
        status, answer = await self.admin(
            "PUT", "/api/v1/budgets/ns/w2s", {"usd": usd, "agents": agents or {}}
        )
        assert status == 200, answer

    async def spend(self) -> dict[str, Any]:
        status, answer = await self.admin("GET", "/api/v1/spend/ns/w2s")
        assert status == 200, answer
        result: dict[str, Any] = answer
        return result

    async def metrics(self) -> str:
        return await scrape(self.metrics_url)

    async def hang_up_on_a_stream(self, model: str) -> None:
        """Ask as agent w2s-1 for a streamed answer, and hang up after its first bytes."""
        credential = ISSUER.mint_agent("ns", "w2s", "w2s-1")
        body = {"model": model, "max_tokens": 500, "messages": HI, "stream": True}
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                self.url + "/v1/messages", json=body, headers={"x-api-key": credential}
            ) as response,
        ):
            assert b"message_start" in await response.content.readany()
            response.close()


@contextlib.asynccontextmanager
async def gateway_before(upstream: web.Application, directory: Path) -> AsyncIterator[Gateway]:
    """Serve `upstream` on a loopback port as the gateway's upstream, and start a gateway in
    front of it over `directory` (its key files written there); both stopped on the way out."""
    runner = web.AppRunner(upstream)
    await runner.setup()
    try:
        listener = socket.create_server(("127.0.0.1", 0))
        await web.SockSite(runner, listener).start()
        write_keys(directory)
        instance = Gateway(AnthropicStub(), address(listener), directory)
        await instance.start()
        try:
            yield instance
        finally:
            await instance.stop()
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def started(*gateways: Gateway, usd: float | None) -> AsyncIterator[None]:
    """Start each gateway over its directory (made where missing, its key files written), with
    a budget of `usd` registered for ns/w2s (none with None); all stopped on the way out."""
    try:
        for instance in gateways:
            instance.directory.mkdir(exist_ok=True)
            write_keys(instance.directory)
            await instance.start()
            if usd is not None:
                await instance.budget(usd)
        yield
    finally:
        for instance in gateways:
            await instance.stop()


def stream_breaking_off(input_tokens: int) -> web.Application:
    """An upstream that starts a stream (its message_start reports `input_tokens` and one output
    token), then drops the connection."""

    async def breaking(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        start = {
            "type": "message_start",
            "message": {
                "id": "msg_broken",
                "usage": {"input_tokens": input_tokens, "output_tokens": 1},
            },
        }
        await response.write(f"event: message_start\ndata: {json.dumps(start)}\n\n".encode())
        assert request.transport is not None
        request.transport.abort()  # the upstream connection drops mid-answer
        return response

    app = web.Application()
    app.router.add_post("/v1/messages", breaking)
    return app


async def stream_broken_off(client: anthropic.AsyncAnthropic, model: str, max_tokens: int) -> None:
    """Ask for a streamed answer that the upstream breaks off: the agent is told so."""
    with pytest.raises(anthropic.APIStatusError) as broken:
        async with client.messages.stream(
            model=model, max_tokens=max_tokens, messages=HI
        ) as stream:
            await stream.get_final_message()
    assert "the upstream stream broke off" in str(broken.value)


def unreachable_url() -> str:
    """A loopback URL nothing listens on (its port was bound, then closed)."""
    with socket.create_server(("127.0.0.1", 0)) as closed:
        return address(closed)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 when absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{"):
            sample, value = line.rsplit(" ", 1)
            found = ",".join(sorted(sample[len(name) + 1 : -1].split(",")))
            if found == wanted:
                return float(value)
    return 0.0


def process_env(directory: Path, upstream: str) -> dict[str, str]:
    """`aar-gateway`'s environment for the key files `write_keys` put in `directory`."""
    return {
        "AAR_GATEWAY_UPSTREAM": upstream,
        "AAR_ANTHROPIC_API_KEY_FILE": str(directory / "api-key"),
        "AAR_CREDENTIAL_PUBLIC_KEY_FILE": str(directory / "public-key.pem"),
        "AAR_DATA_DIR": str(directory / "data"),
    }


async def serve_process(env: dict[str, str], port: int) -> asyncio.subprocess.Process:
    """`aar-gateway` as its own process, configured by environment as in its container."""
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "aar-gateway"),
        *("--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"),
        env={**os.environ, **env},
        stderr=asyncio.subprocess.PIPE,
    )
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            if process.returncode is not None:
                assert process.stderr is not None
                raise AssertionError((await process.stderr.read()).decode())
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                    if response.status == 200:
                        return process
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
    process.kill()
    raise AssertionError("aar-gateway did not answer /healthz")


@dataclass
class GatewayProcess:
    """`aar-gateway` as its own process on one port, which it keeps when killed and started
    again."""

    env: dict[str, str]
    port: int
    process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.process = await serve_process(self.env, self.port)

    async def kill(self) -> None:
        """SIGKILL: no cleanup, nothing flushed or run on the way out."""
        assert self.process is not None
        self.process.kill()
        await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()


@contextlib.asynccontextmanager
async def served_as_process(
    gateway: Gateway, env: dict[str, str] | None = None
) -> AsyncIterator[GatewayProcess]:
    """Serve `gateway` as `aar-gateway` in its own process on a free port, and point its `url`
    there; stopped on the way out. The process is configured by `env` alone: by default over
    the gateway's directory (its key files written there) in front of its upstream."""
    if env is None:
        write_keys(gateway.directory)
        env = process_env(gateway.directory, gateway.stub_url)
    served = GatewayProcess(env, free_port())
    await served.start()
    gateway.url = served.url
    try:
        yield served
    finally:
        await served.stop()
