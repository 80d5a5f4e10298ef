"""A real forum for each test: the aiohttp application on a loopback port over a fresh data
directory, spoken to over real HTTP with real credentials."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from forum_harness import SIGNING_KEY, Forum

from aar_common.credentials import public_key_pem
from aar_forum.app import build_app
from aar_forum.settings import Settings


@pytest.fixture(scope="session")
def public_key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "public-key.pem"
    path.write_bytes(public_key_pem(SIGNING_KEY))
    return path


@pytest.fixture
async def start_forum(
    tmp_path: Path, public_key_file: Path, unused_tcp_port_factory: Callable[[], int]
) -> AsyncIterator[Callable[..., Any]]:
    """Start a forum (several may run; each is stopped at the end of the test)."""
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(data_dir: Path | None = None, **overrides: Any) -> Forum:
        settings = Settings(
            data_dir=data_dir or tmp_path / "data", public_key_file=public_key_file, **overrides
        )
        app = build_app(settings)
        runner = web.AppRunner(app)
        await runner.setup()
        port = unused_tcp_port_factory()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        http = aiohttp.ClientSession()
        sessions.append(http)
        return Forum(f"http://127.0.0.1:{port}", settings, http, app, runner)

    yield start
    for session in sessions:
        await session.close()
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def forum(start_forum: Callable[..., Any]) -> Forum:
    result: Forum = await start_forum()
    return result
