"""What each component the chart deploys holds in memory and spends in CPU, idle and under a
little load: the figures its `resources` defaults in charts/aar/values.yaml are sized from.

    .venv/bin/python bench/footprint.py [--agents 9] [--requests 300] [--no-operator]

Each service runs as its own process on a loopback port, as `aar-forum`, `aar-gateway` and
`aar-scorer` (with its default intake workers) run in their containers; the gateway answers from
the local Messages-API stand-in. Memory is the whole process tree's, counted as a container's
cgroup counts it (memory_mib): idle after start-up, and the highest seen under load. Load is
`--agents` agents over real HTTP: posts, searches and 16 MiB artifact uploads on the forum, model
requests (half of them streamed) through the gateway, full-size submissions to the scorer. The
operator, given the local control plane's binaries (`make tools`), reconciles one run of
`--agents` agents and resyncs it. Prints a line per component, then one JSON object with the
figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp

from aar_common.credentials import CredentialIssuer, generate_signing_key, public_key_pem
from aar_common.ports import free_port
from aar_scorer.tasks import write_task_files

BIN = Path(sys.executable).parent
ANSWERS = 2567  # the reference task's test set
MODEL = "claude-opus-4-6"


def tree(pid: int) -> list[int]:
    """`pid` and every live process below it."""
    children = [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]
    return [pid, *(p for child in children for p in tree(child))]


def kib(pid: int, fields: tuple[str, ...]) -> int:
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in fields:
            total += int(value.split()[0])
    return total


def memory_mib(pid: int) -> float:
    """The tree's memory as its container's cgroup would count it: the first process's resident
    set, and only the private pages of the processes it forked (the scorer's intake workers),
    whose shared pages are already counted."""
    children = tree(pid)[1:]
    private = ("Private_Clean", "Private_Dirty")
    return (kib(pid, ("Rss",)) + sum(kib(child, private) for child in children)) / 1024


class Sampler(threading.Thread):
    """The highest memory_mib seen while it runs, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, memory_mib(pid), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.peak = max(self.peak, memory_mib(self.pid))


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


def start(command: list[str], env: dict[str, str], health: str) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        command,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"footprint: {command[0]} exited with {process.returncode}")
        if answers(health):
            return process
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"footprint: {command[0]} did not answer {health}")


def measure(name: str, pid: int, load: Callable[[], Coroutine[Any, Any, int]]) -> dict[str, Any]:
    """Idle memory, then the load's CPU time and the peak memory it brought."""
    time.sleep(2)  # settle after start-up
    idle = memory_mib(pid)
    sampler = Sampler(pid)
    sampler.start()
    cpu, started = cpu_seconds(pid), time.monotonic()
    requests = asyncio.run(load())
    elapsed = time.monotonic() - started
    used = cpu_seconds(pid) - cpu
    sampler.done.set()
    sampler.join()
    figures = {
        "idle_mib": round(idle, 1),
        "after_load_mib": round(memory_mib(pid), 1),
        "peak_mib": round(sampler.peak, 1),
        "processes": len(tree(pid)),
        "requests": requests,
        "load_seconds": round(elapsed, 2),
        "cpu_seconds": round(used, 2),
        "cores_busy": round(used / elapsed, 2),
    }
    print(
        f"{name}: idle {idle:.0f} MiB, peak {sampler.peak:.0f} MiB over "
        f"{figures['processes']} process(es); {requests} requests in {elapsed:.1f} s used "
        f"{used:.2f} CPU s ({figures['cores_busy']:.2f} cores)"
    )
    return figures


async def gather_limited(jobs: list[Callable[[], Awaitable[None]]], agents: int) -> int:
    gate = asyncio.Semaphore(agents)

    async def one(job: Callable[[], Awaitable[None]]) -> None:
        async with gate:
            await job()

    await asyncio.gather(*(one(job) for job in jobs))
    return len(jobs)


def bench_forum(root: Path, issuer: CredentialIssuer, agents: int, requests: int) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start(
        [str(BIN / "aar-forum"), "--host", "127.0.0.1", "--port", str(port)],
        {
            "AAR_DATA_DIR": str(root / "forum"),
            "AAR_METRICS_PORT": str(free_port()),
            "AAR_CREDENTIAL_PUBLIC_KEY_FILE": str(root / "public-key.pem"),
            "AAR_FORUM_WRITES_PER_MINUTE": "0",
            "AAR_FORUM_READS_PER_MINUTE": "0",
        },
        url + "/healthz",
    )
    heads = [
        {"Authorization": f"Bearer {issuer.mint_agent('bench', 'run', f'run-{i}')}"}
        for i in range(agents)
    ]
    words = ["weak", "strong", "student", "teacher", "labels", "ensemble", "reweighting"]
    rng = random.Random(0)

    async def load() -> int:
        async with aiohttp.ClientSession() as http:

            def post(i: int) -> Callable[[], Awaitable[None]]:
                async def job() -> None:
                    body = {
                        "kind": "insight",
                        "title": f"finding {i}",
                        "body": " ".join(rng.choices(words, k=400)),
                    }
                    async with http.post(
                        url + "/api/v1/posts", json=body, headers=heads[i % agents]
                    ) as r:
                        assert r.status == 201, await r.text()
                    async with http.get(
                        url + "/api/v1/posts", params={"q": rng.choice(words)}, headers=heads[0]
                    ) as r:
                        assert r.status == 200, await r.text()

                return job

            def upload(i: int) -> Callable[[], Awaitable[None]]:
                async def job() -> None:
                    async with http.post(
                        url + "/api/v1/artifacts", data=os.urandom(16 * 2**20), headers=heads[i]
                    ) as r:
                        assert r.status == 201, await r.text()

                return job

            jobs = [post(i) for i in range(requests)] + [upload(i) for i in range(agents)]
            return await gather_limited(jobs, agents)

    try:
        return measure("forum", process.pid, load)
    finally:
        process.terminate()
        process.wait(timeout=30)


def bench_gateway(
    root: Path, issuer: CredentialIssuer, agents: int, requests: int
) -> dict[str, Any]:
    stub_port, port = free_port(), free_port()
    stub = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aar_devcluster.anthropic_stub",
            "--port",
            str(stub_port),
            "--api-key",
            "sk-ant-bench",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    (root / "api-key").write_text("sk-ant-bench")
    url = f"http://127.0.0.1:{port}"
    try:
        time.sleep(1)
        process = start(
            [str(BIN / "aar-gateway"), "--host", "127.0.0.1", "--port", str(port)],
            {
                "AAR_GATEWAY_UPSTREAM": f"http://127.0.0.1:{stub_port}",
                "AAR_ANTHROPIC_API_KEY_FILE": str(root / "api-key"),
                "AAR_CREDENTIAL_PUBLIC_KEY_FILE": str(root / "public-key.pem"),
                "AAR_DATA_DIR": str(root / "gateway"),
                "AAR_METRICS_PORT": str(free_port()),
            },
            url + "/healthz",
        )
        admin = {"Authorization": f"Bearer {issuer.mint_admin('bench')}"}
        keys = [issuer.mint_agent("bench", "run", f"run-{i}") for i in range(agents)]
        body = {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}

        async def load() -> int:
            async with aiohttp.ClientSession() as http:
                async with http.put(
                    url + "/api/v1/budgets/bench/run", json={"usd": 1000}, headers=admin
                ) as r:
                    assert r.status == 200, await r.text()

                def message(i: int) -> Callable[[], Awaitable[None]]:
                    async def job() -> None:
                        headers = {"x-api-key": keys[i % agents]}
                        stream = {**body, "stream": i % 2 == 0}
                        async with http.post(
                            url + "/v1/messages", json=stream, headers=headers
                        ) as r:
                            await r.read()
                            assert r.status == 200, r.status

                    return job

                return await gather_limited([message(i) for i in range(requests)], agents)

        try:
            return measure("gateway", process.pid, load)
        finally:
            process.terminate()
            process.wait(timeout=30)
    finally:
        stub.terminate()
        stub.wait(timeout=30)


def bench_scorer(
    root: Path, issuer: CredentialIssuer, agents: int, requests: int
) -> dict[str, Any]:
    task = {
        "name": "bench",
        "labels": [0, 1],
        "baselines": {"weak": 0.6, "ceiling": 0.8},
        "quota": {"per_agent": 10**9, "per_run": 10**9},
    }
    labels = random.Random(0).choices([0, 1], k=ANSWERS)
    tasks_file = write_task_files(root / "tasks", [(task, labels, "bench-split-seed-0")])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start(
        [
            str(BIN / "aar-scorer"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--tasks",
            str(tasks_file),
            "--data-dir",
            str(root / "scorer"),
            "--public-key",
            str(root / "public-key.pem"),
        ],
        {"AAR_METRICS_PORT": str(free_port())},
        url + "/healthz",
    )
    admin = {"Authorization": f"Bearer {issuer.mint_admin('bench')}"}
    heads = [
        {"Authorization": f"Bearer {issuer.mint_agent('bench', 'run', f'run-{i}')}"}
        for i in range(agents)
    ]
    rng = random.Random(1)

    async def load() -> int:
        async with aiohttp.ClientSession() as http:
            async with http.put(
                url + "/api/v1/runs/bench/run",
                json={"task": "bench", "review_required": False},
                headers=admin,
            ) as r:
                assert r.status == 200, await r.text()

            def submit(i: int) -> Callable[[], Awaitable[None]]:
                async def job() -> None:
                    predictions = rng.choices([0, 1], k=ANSWERS)
                    body = {"task": "bench", "predictions": predictions, "method": "bench"}
                    async with http.post(
                        url + "/api/v1/submissions", json=body, headers=heads[i % agents]
                    ) as r:
                        assert r.status == 200, await r.text()

                return job

            return await gather_limited([submit(i) for i in range(requests)], agents)

    try:
        return measure("scorer", process.pid, load)
    finally:
        process.terminate()
        process.wait(timeout=30)


def bench_operator(root: Path, agents: int) -> dict[str, Any] | None:
    from aar_devcluster.controlplane import ControlPlane
    from aar_devcluster.paths import BinariesMissingError
    from aar_devcluster.tools import Tool
    from aar_operator.cli import CRD_DIRECTORIES
    from aar_operator.local import OperatorProcess

    plane = ControlPlane(root / "plane", die_with_parent=True)
    try:
        plane.start(timeout=180)
    except BinariesMissingError as missing:
        print(f"operator: left out ({missing})")
        return None
    try:
        admin = Tool("kubectl", plane.kubeconfig_path)
        admin.run("apply", "-f", str(CRD_DIRECTORIES[0]))
        for crd in ("researchruns.aar.dev", "agentsandboxes.aar.dev"):
            admin.run("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
        admin.run("create", "namespace", "bench")
        # The operator lives in a namespace of its own: it refuses runs in its own namespace.
        admin.run("create", "namespace", "bench-operator")
        kubectl = Tool("kubectl", plane.kubeconfig_path, "bench")
        operator = OperatorProcess(
            plane.kubeconfig_path, "bench-operator", root / "operator.log", resync=10, verbose=False
        )
        operator.start()
        assert operator.pid is not None
        pid = operator.pid
        # Idle means logged in and watching: its health endpoint answers once start-up is done.
        health = f"http://127.0.0.1:{operator.liveness_port}/healthz"
        deadline = time.monotonic() + 60
        while not answers(health):
            if time.monotonic() > deadline:
                raise SystemExit(f"footprint: the operator never became healthy: {operator.log()}")
            time.sleep(0.5)
        run = {
            "apiVersion": "aar.dev/v1alpha1",
            "kind": "ResearchRun",
            "metadata": {"name": "bench"},
            "spec": {
                "agents": agents,
                "task": {"name": "w2s-chat"},
                "sandbox": {"image": "agent:bench"},
                "budget": {"usd": 100},
            },
        }

        async def load() -> int:
            kubectl.apply(run)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                names = kubectl.run("get", "pods", "-l", "aar.dev/run=bench", "-o", "name")
                if len(names.split()) >= agents:
                    break
                await asyncio.sleep(1)
            await asyncio.sleep(25)  # two resyncs of every object
            return agents

        try:
            return measure("operator", pid, load)
        finally:
            operator.stop()
    finally:
        plane.destroy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=9)
    parser.add_argument("--requests", type=int, default=300, help="per service")
    parser.add_argument("--no-operator", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aar-bench-footprint-") as directory:
        root = Path(directory)
        key = generate_signing_key()
        issuer = CredentialIssuer(key)
        (root / "public-key.pem").write_bytes(public_key_pem(key))
        figures: dict[str, Any] = {"agents": args.agents, "requests": args.requests}
        figures["forum"] = bench_forum(root, issuer, args.agents, args.requests)
        figures["gateway"] = bench_gateway(root, issuer, args.agents, args.requests)
        figures["scorer"] = bench_scorer(root, issuer, args.agents, args.requests)
        if not args.no_operator:
            figures["operator"] = bench_operator(root, args.agents)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
