"""What the gateway's tests share: a gateway served in this process in front of the Messages-API
stand-in, over a directory of its own (its key files and its SQLite ledger), stopped and started
again on the same directory for a restart. (A module of its own, not conftest: test modules
import it by name.)"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from aar_common.credentials import public_key_pem
from aar_common.web import REGISTRY_KEY, address, metrics_app
from aar_devcluster.anthropic_stub import AnthropicStub
from aar_gateway.app import build_app
from aar_gateway.settings import Settings


def write_keys(directory: Path, api_key: str, signing_key: bytes) -> None:
    """The files the gateway reads its secrets from: the real API key, and the public key of
    the credentials it accepts."""
    (directory / "api-key").write_text(api_key + "\n")
    (directory / "public-key.pem").write_bytes(public_key_pem(signing_key))


@dataclass
class Gateway:
    """A gateway on a loopback port in front of a stand-in, with a way to restart it."""

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
            **self.options,
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
