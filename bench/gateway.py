"""What the gateway adds to a model call: latency per request and time to first token of a
stream, through the gateway against calling the same local Messages-API stand-in directly, side by
side, in the same run. The stand-in, each gateway and this client are separate processes; the
gateway's SQLite database is on disk (every billed request is an fsync'd commit).

    .venv/bin/python bench/gateway.py [--requests 400] [--streams 20] [--chunk-delay 0.02]

Two figures, against their targets:
- added latency: p50 and p99 of a small non-streaming request (target: p50 added under 2 ms);
- unbuffered streaming: with the stand-in pausing between events, the first text delta arrives
  through the gateway about as soon as directly, long before the stream ends (a buffering proxy
  would deliver it at the end).
Prints figures, then one JSON object with them as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp

from aar_common.credentials import CredentialIssuer, generate_signing_key, public_key_pem

ADDED_P50_TARGET_MS = 2.0
REAL_KEY = "sk-ant-bench"
MODEL = "claude-opus-4-6"
BODY = {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
STREAM_TEXT = "weak labels, strong student. " * 14  # 406 characters: 51 deltas of 8


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port: int = probe.getsockname()[1]
        return port


def _wait_healthy(url: str, process: subprocess.Popen[bytes]) -> None:
    import urllib.error
    import urllib.request

    for _ in range(300):
        if process.poll() is not None:
            raise SystemExit(f"bench: {process.args} exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    raise SystemExit(f"bench: {url} did not come up")


@contextmanager
def _processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            process.terminate()
        for process in started:
            process.wait(timeout=10)


def _stub(started: list[subprocess.Popen[bytes]], chunk_delay: float) -> str:
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aar_common.anthropic_stub",
            "--port",
            str(port),
            "--api-key",
            REAL_KEY,
            "--chunk-delay",
            str(chunk_delay),
        ],
        stdout=subprocess.DEVNULL,
    )
    started.append(process)
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url + "/stub/usage", process)
    return url


def _gateway(started: list[subprocess.Popen[bytes]], directory: Path, upstream: str) -> str:
    port = _free_port()
    directory.mkdir()
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "aar-gateway"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env={
            **os.environ,
            "AAR_GATEWAY_UPSTREAM": upstream,
            "AAR_ANTHROPIC_API_KEY_FILE": str(directory.parent / "api-key"),
            "AAR_CREDENTIAL_PUBLIC_KEY_FILE": str(directory.parent / "public-key.pem"),
            "AAR_DATA_DIR": str(directory),
        },
        stderr=subprocess.DEVNULL,
    )
    started.append(process)
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url + "/healthz", process)
    return url


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def _one_message(http: aiohttp.ClientSession, url: str, key: str) -> float:
    started = time.perf_counter()
    async with http.post(url + "/v1/messages", json=BODY, headers={"x-api-key": key}) as response:
        await response.read()
        assert response.status == 200, await response.text()
    return time.perf_counter() - started


async def _one_stream(
    http: aiohttp.ClientSession, url: str, key: str, stub: str
) -> tuple[float, float]:
    """Seconds to the first text delta and to the end of the stream."""
    async with http.post(
        stub + "/stub/replies", json=[{"content": [{"type": "text", "text": STREAM_TEXT}]}]
    ):
        pass
    started = time.perf_counter()
    first = 0.0
    async with http.post(
        url + "/v1/messages", json={**BODY, "stream": True}, headers={"x-api-key": key}
    ) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            if not first and line.startswith(b"event: content_block_delta"):
                first = time.perf_counter() - started
    return first, time.perf_counter() - started


async def measure(
    args: argparse.Namespace, urls: dict[str, str], agent_key: str
) -> dict[str, float]:
    keys = {"direct": REAL_KEY, "gateway": agent_key}
    latency: dict[str, list[float]] = {"direct": [], "gateway": []}
    async with aiohttp.ClientSession() as http:
        for _ in range(20):  # warm the connections, the gateway's upstream pool and the caches
            for path in latency:
                await _one_message(http, urls[f"{path}_fast"], keys[path])
        for _ in range(args.requests):  # interleaved, so both see the same machine load
            for path in latency:
                latency[path].append(await _one_message(http, urls[f"{path}_fast"], keys[path]))
        first: dict[str, list[float]] = {"direct": [], "gateway": []}
        whole: dict[str, list[float]] = {"direct": [], "gateway": []}
        for _ in range(args.streams):
            for path in first:
                ttft, total = await _one_stream(
                    http, urls[f"{path}_slow"], keys[path], urls["direct_slow"]
                )
                first[path].append(ttft)
                whole[path].append(total)
    ms = 1000.0
    figures = {
        "direct_p50_ms": statistics.median(latency["direct"]) * ms,
        "direct_p99_ms": _percentile(latency["direct"], 0.99) * ms,
        "gateway_p50_ms": statistics.median(latency["gateway"]) * ms,
        "gateway_p99_ms": _percentile(latency["gateway"], 0.99) * ms,
        "ttft_direct_p50_ms": statistics.median(first["direct"]) * ms,
        "ttft_gateway_p50_ms": statistics.median(first["gateway"]) * ms,
        "stream_direct_p50_ms": statistics.median(whole["direct"]) * ms,
        "stream_gateway_p50_ms": statistics.median(whole["gateway"]) * ms,
    }
    figures["added_p50_ms"] = figures["gateway_p50_ms"] - figures["direct_p50_ms"]
    figures["added_p99_ms"] = figures["gateway_p99_ms"] - figures["direct_p99_ms"]
    figures["ttft_added_p50_ms"] = figures["ttft_gateway_p50_ms"] - figures["ttft_direct_p50_ms"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="non-streaming, per path")
    parser.add_argument("--streams", type=int, default=20, help="streams, per path")
    parser.add_argument("--chunk-delay", type=float, default=0.02, help="stand-in's event pause")
    args = parser.parse_args()
    signing_key = generate_signing_key()
    issuer = CredentialIssuer(signing_key)
    with tempfile.TemporaryDirectory(prefix="aar-bench-gateway-", dir=Path.cwd()) as temp:
        directory = Path(temp)
        (directory / "api-key").write_text(REAL_KEY)
        (directory / "public-key.pem").write_bytes(public_key_pem(signing_key))
        with _processes() as started:
            urls = {
                "direct_fast": _stub(started, 0.0),
                "direct_slow": _stub(started, args.chunk_delay),
            }
            urls["gateway_fast"] = _gateway(started, directory / "fast", urls["direct_fast"])
            urls["gateway_slow"] = _gateway(started, directory / "slow", urls["direct_slow"])
            admin = issuer.mint_admin("bench")
            for gateway in ("gateway_fast", "gateway_slow"):
                asyncio.run(_register(urls[gateway], admin))
            figures = asyncio.run(measure(args, urls, issuer.mint_agent("bench", "run", "run-1")))
    figures = {name: round(value, 3) for name, value in figures.items()}
    print(f"non-streaming request, {args.requests} each, interleaved (ms):")
    print(f"  {'':10}{'p50':>10}{'p99':>10}")
    for path in ("direct", "gateway"):
        print(f"  {path:10}{figures[f'{path}_p50_ms']:>10.3f}{figures[f'{path}_p99_ms']:>10.3f}")
    print(f"  {'added':10}{figures['added_p50_ms']:>10.3f}{figures['added_p99_ms']:>10.3f}")
    pause = f"{args.chunk_delay * 1000:.0f} ms"
    print(f"stream of 51 text deltas, {pause} apart, {args.streams} each (ms):")
    print(f"  {'':10}{'first delta':>14}{'whole stream':>14}")
    for path in ("direct", "gateway"):
        print(
            f"  {path:10}{figures[f'ttft_{path}_p50_ms']:>14.3f}"
            f"{figures[f'stream_{path}_p50_ms']:>14.3f}"
        )
    verdict = "met" if figures["added_p50_ms"] < ADDED_P50_TARGET_MS else "NOT met"
    print(
        f"added p50 {figures['added_p50_ms']:.3f} ms: target under {ADDED_P50_TARGET_MS} ms "
        f"{verdict}; first delta through the gateway {figures['ttft_added_p50_ms']:+.3f} ms "
        f"against direct, with the whole stream taking {figures['stream_gateway_p50_ms']:.0f} ms"
    )
    figures["added_p50_target_ms"] = ADDED_P50_TARGET_MS
    figures["requests"] = args.requests
    figures["streams"] = args.streams
    figures["chunk_delay_s"] = args.chunk_delay
    print(json.dumps(figures))


async def _register(url: str, admin: str) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.put(
            url + "/api/v1/budgets/bench/run",
            json={"usd": None, "agents": {}},
            headers={"Authorization": f"Bearer {admin}"},
        ) as response,
    ):
        assert response.status == 200, await response.text()


if __name__ == "__main__":
    main()
