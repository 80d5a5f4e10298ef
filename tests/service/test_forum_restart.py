"""The forum as it is deployed (the `aar-forum` process): a crash or a restart loses nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from forum_harness import Forum, connected

from aar_common.credentials import PUBLIC_KEY_FILE_ENV


class Process:
    def __init__(self, data_dir: Path, public_key_file: Path, port: int) -> None:
        env = {
            **os.environ,
            "AAR_DATA_DIR": str(data_dir),
            PUBLIC_KEY_FILE_ENV: str(public_key_file),
            "AAR_METRICS_PORT": "0",  # no /metrics: not what these tests read
        }
        self.popen = subprocess.Popen(
            # The console script, as the image runs it.
            [Path(sys.executable).parent / "aar-forum", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.popen.stdout is not None
        line = self.popen.stdout.readline()
        assert line.startswith("aar-forum listening on"), line
        self.url = f"http://127.0.0.1:{port}"

    def stop(self, signum: int) -> int:
        self.popen.send_signal(signum)
        return self.popen.wait(timeout=30)


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        if process.popen.poll() is None:
            process.popen.kill()
            process.popen.wait()


async def test_a_killed_forum_restarts_with_every_post_and_artifact(
    tmp_path: Path,
    public_key_file: Path,
    unused_tcp_port: int,
    processes: list[Process],
) -> None:
    agent = Forum.agent("w2s-1")
    processes.append(Process(tmp_path, public_key_file, unused_tcp_port))
    url = processes[-1].url
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{url}/api/v1/posts",
            json={"kind": "result", "title": "Durable finding", "body": "survives kill -9"},
            headers=agent,
        ) as response:
            post = await response.json()
        async with http.post(f"{url}/api/v1/artifacts", data=b"checkpoint", headers=agent) as r:
            artifact = await r.json()
        # SIGKILL: no shutdown code runs; only what was committed can survive.
        assert processes[-1].stop(signal.SIGKILL) == -signal.SIGKILL

        processes.append(Process(tmp_path, public_key_file, unused_tcp_port))
        async with http.get(f"{url}/api/v1/posts?q=durable", headers=agent) as response:
            assert [p["id"] for p in (await response.json())["posts"]] == [post["id"]]
        async with http.get(
            f"{url}/api/v1/artifacts/{artifact['digest']}", headers=agent
        ) as response:
            assert await response.read() == b"checkpoint"
        async with http.post(
            f"{url}/api/v1/posts", json={"kind": "insight", "title": "after"}, headers=agent
        ) as response:
            assert (await response.json())["id"] > post["id"]


async def test_sigterm_ends_open_streams_and_exits_cleanly(
    tmp_path: Path,
    public_key_file: Path,
    unused_tcp_port: int,
    processes: list[Process],
) -> None:
    processes.append(Process(tmp_path, public_key_file, unused_tcp_port))
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{processes[-1].url}/api/v1/stream", headers=Forum.agent("w2s-1")) as stream,
    ):
        await connected(stream)
        code = await asyncio.to_thread(processes[-1].stop, signal.SIGTERM)
        assert code == 0
        assert await stream.content.read() == b""  # the stream was closed, not cut
