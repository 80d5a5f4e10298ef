"""The HTTP plumbing every service shares, over real HTTP on a loopback port."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, Field

from aar_common.credentials import (
    CredentialIssuer,
    CredentialVerifier,
    generate_signing_key,
    public_key_pem,
)
from aar_common.web import (
    DEFAULT_METRICS_PORT,
    GC_THRESHOLDS,
    METRICS_PORT_ENV,
    add_metrics_port,
    address,
    authenticate,
    json_response,
    listen,
    make_app,
    metrics_listener,
    read_model,
    serve,
)

KEY = generate_signing_key()
ISSUER = CredentialIssuer(KEY)


class Greeting(BaseModel):
    name: str = Field(min_length=1)
    times: int = Field(ge=1, le=3)


async def greet(request: web.Request) -> web.Response:
    principal = authenticate(request)
    body = await read_model(request, Greeting)
    return json_response({"by": principal.name, "text": " ".join([f"hi {body.name}"] * body.times)})


async def admin_only(request: web.Request) -> web.Response:
    authenticate(request, admin=True)
    return json_response({"ok": True})


@pytest.fixture
async def base_url(unused_tcp_port: int) -> AsyncIterator[str]:
    registry = CollectorRegistry()
    Counter("aar_test_things", "Things counted in a test", registry=registry).inc()
    app = make_app(CredentialVerifier(public_key_pem(KEY)), registry, client_max_size=200)
    app.router.add_post("/greet", greet)
    app.router.add_get("/admin", admin_only)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    yield f"http://127.0.0.1:{unused_tcp_port}"
    await runner.cleanup()


async def test_an_agent_credential_is_accepted_as_bearer_or_api_key(base_url: str) -> None:
    token = ISSUER.mint_agent("ns", "run", "run-1")
    async with aiohttp.ClientSession() as http:
        for headers in ({"Authorization": f"Bearer {token}"}, {"x-api-key": token}):
            async with http.post(
                f"{base_url}/greet", json={"name": "bo", "times": 2}, headers=headers
            ) as response:
                assert response.status == 200
                assert await response.json() == {"by": "run-1", "text": "hi bo hi bo"}


async def test_errors_are_json_that_say_what_is_wrong(base_url: str) -> None:
    agent = {"Authorization": f"Bearer {ISSUER.mint_agent('ns', 'run', 'run-1')}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base_url}/greet", json={"name": "bo", "times": 1}) as response:
            assert response.status == 401
            assert "missing credential" in (await response.json())["error"]["message"]
        async with http.post(
            f"{base_url}/greet", json={"name": "", "times": 9}, headers=agent
        ) as response:
            assert response.status == 400
            message = (await response.json())["error"]["message"]
            assert "name:" in message
            assert "times:" in message
        async with http.post(f"{base_url}/greet", data="x" * 500, headers=agent) as response:
            assert response.status == 413
            assert (await response.json())["error"]["type"] == "request_too_large"
        async with http.get(f"{base_url}/admin", headers=agent) as response:
            assert response.status == 403
        async with http.get(f"{base_url}/nowhere") as response:
            assert response.status == 404
            assert (await response.json())["error"]["type"] == "not_found_error"


async def test_health_is_served_and_metrics_are_not_on_the_api_port(base_url: str) -> None:
    admin = {"Authorization": f"Bearer {ISSUER.mint_admin('alice')}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base_url}/healthz") as response:
            assert await response.text() == "ok"
        async with http.get(f"{base_url}/metrics") as response:
            assert response.status == 404
        async with http.get(f"{base_url}/admin", headers=admin) as response:
            assert response.status == 200


async def test_serve_serves_metrics_on_the_metrics_socket_alone() -> None:
    registry = CollectorRegistry()
    Counter("aar_test_things", "Things counted in a test", registry=registry).inc()
    app = make_app(CredentialVerifier(public_key_pem(KEY)), registry)
    api, metrics = listen("127.0.0.1", 0), listen("127.0.0.1", 0)
    api_url, metrics_url = address(api), address(metrics)
    addresses: list[str] = []
    serving = asyncio.ensure_future(serve(app, sock=api, metrics=metrics, ready=addresses.append))
    try:
        for _ in range(100):
            if addresses:
                break
            await asyncio.sleep(0.02)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{metrics_url}/metrics") as response:
                assert response.status == 200
                assert "aar_test_things_total 1.0" in await response.text()
            async with http.get(f"{api_url}/metrics") as response:
                assert response.status == 404
            # The metrics port answers nothing else: not the API, not even its health.
            async with http.get(f"{metrics_url}/healthz") as response:
                assert response.status == 404
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving


_SERVE_AND_REPORT = """
import asyncio, gc, os, signal
from prometheus_client import CollectorRegistry
from aar_common.credentials import CredentialVerifier, generate_signing_key, public_key_pem
from aar_common.web import make_app, serve

app = make_app(CredentialVerifier(public_key_pem(generate_signing_key())), CollectorRegistry())

def ready(address):
    print(gc.get_freeze_count(), *gc.get_threshold(), flush=True)
    # Once serve() listens for it: a stop as the cluster sends it.
    asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGTERM)

asyncio.run(serve(app, host="127.0.0.1", port=0, ready=ready))
"""


def test_a_serving_process_keeps_what_it_started_with_out_of_collections() -> None:
    # In a process of its own: the collector's settings are process-wide.
    reported = subprocess.run(
        [sys.executable, "-c", _SERVE_AND_REPORT],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    frozen, *thresholds = map(int, reported)
    assert frozen > 10_000  # the imported modules, the app
    assert tuple(thresholds) == GC_THRESHOLDS


def test_listen_makes_tcp_and_unix_sockets_and_names_them(tmp_path: Path) -> None:
    with listen("127.0.0.1", 0) as tcp:
        port = tcp.getsockname()[1]
        assert address(tcp) == f"http://127.0.0.1:{port}"
        # A port in use is an OSError, for the caller to explain.
        with pytest.raises(OSError, match="in use"):
            listen("127.0.0.1", port)
    path = tmp_path / "service.sock"
    with listen(unix_socket=path) as first:
        assert address(first) == f"http://unix:{path}:"
    # A socket file left behind by a process that is gone is replaced; a file of another kind
    # is never removed.
    with listen(unix_socket=path) as second:
        assert address(second) == f"http://unix:{path}:"
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    with pytest.raises(OSError, match="in use"):
        listen(unix_socket=other)
    assert other.read_text() == "keep me"


async def test_serve_serves_a_socket_it_is_given(tmp_path: Path) -> None:
    app = make_app(CredentialVerifier(public_key_pem(KEY)), CollectorRegistry())
    addresses: list[str] = []
    path = tmp_path / "given.sock"
    serving = asyncio.ensure_future(
        serve(app, sock=listen(unix_socket=path), ready=addresses.append)
    )
    try:
        for _ in range(100):
            if addresses:
                break
            await asyncio.sleep(0.02)
        assert addresses == [f"http://unix:{path}:"]
        connector = aiohttp.UnixConnector(path=str(path))
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.get("http://service/healthz") as response,
        ):
            assert (response.status, await response.text()) == (200, "ok")
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving


def metrics_port(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_metrics_port(parser)
    port: int = parser.parse_args(argv).metrics_port
    return port


def test_the_metrics_port_comes_from_the_flag_else_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(METRICS_PORT_ENV, raising=False)
    assert metrics_port([]) == DEFAULT_METRICS_PORT == 9090
    monkeypatch.setenv(METRICS_PORT_ENV, "9100")  # as the chart sets it
    assert metrics_port([]) == 9100
    assert metrics_port(["--metrics-port", "0"]) == 0
    monkeypatch.setenv(METRICS_PORT_ENV, "ninety")
    with pytest.raises(SystemExit):
        metrics_port([])
    assert "--metrics-port: invalid int value: 'ninety'" in capsys.readouterr().err


def test_a_metrics_port_in_use_is_refused_with_what_to_change() -> None:
    assert metrics_listener("aar-test", "127.0.0.1", 0) is None  # 0: no metrics served
    with listen("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as refused:
            metrics_listener("aar-test", "127.0.0.1", port)
    assert f"aar-test: cannot serve /metrics on 127.0.0.1:{port}" in str(refused.value)
    assert "pass another --metrics-port" in str(refused.value)
