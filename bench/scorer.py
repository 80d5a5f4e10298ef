"""What the scorer's safety costs: 900 concurrent agents submitting 2,567-answer predictions over
real HTTP, to the real `aar-scorer` process (credentials, quotas, probe detection against every
earlier submission of the run, the Ladder, a durable SQLite row) and, side by side in the same
run, to a scoring-only baseline on the same HTTP stack (aar_common.web, the same intake parser,
the same packed scoring, nothing else).

    .venv/bin/python bench/scorer.py [--agents 900] [--runs 100] [--seconds 15]
                                     [--intake-workers 2]

The scorer runs as deployed: one deciding process and `--intake-workers` processes that receive
and parse submissions (aar_scorer.intake; default `aar-scorer`'s; with 0 the deciding process
receives them itself, as the baseline does). The baseline is one process, so the scorer may use
more cores than it: the CPU time per submission, side by side, says what the safety costs
whatever the cores. Server CPU figures include the intake workers.

Two figures per server:
- saturation: every agent submits again as soon as its answer arrives (closed loop); sustained
  submissions/s, and the latency that queueing behind 899 other agents gives;
- target load: agents submit at random times (Poisson) at a total rate of half the baseline's
  sustained rate, the throughput the scorer must reach; p50/p99 latency, measured from when each
  submission was due, so a late client counts against the server;
- capacity: the highest such rate at which p99 stays under 50 ms and every submission due is
  answered, found by bisection between 0 and the server's saturated rate (its first step is the
  target rate), with shorter phases.

Also the server's CPU time per submission (from /proc; for the scorer, with its intake workers'
share), which, unlike the rates, does not depend on what else a shared machine runs, and the load
generators' own CPU per submission over the measured window: they share the machine's cores
with the servers. Each phase runs `--rounds` times per server, alternating
which goes first; the figures are the medians. Prints the figures, then one JSON object with
them as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web
from prometheus_client import CollectorRegistry

from aar_common.credentials import (
    CredentialIssuer,
    CredentialVerifier,
    generate_signing_key,
    public_key_pem,
)
from aar_common.ports import free_port
from aar_common.web import json_response, make_app, read_body, serve
from aar_scorer.intake import BodyError, Parser, TaskFacts
from aar_scorer.probing import ProbeIndex
from aar_scorer.settings import DEFAULT_INTAKE_WORKERS
from aar_scorer.tasks import Probing, Task, load_tasks, write_task_files

ANSWERS = 2567
P99_TARGET_MS = 50.0
THROUGHPUT_TARGET = 0.5  # of the baseline's


def _baseline_app(tasks: dict[str, Task], verifier: CredentialVerifier) -> web.Application:
    """Scoring only: parse, validate and pack (the scorer's intake code, run in this process) and
    score; no credential, quota, probe or storage."""
    parser = Parser({name: TaskFacts(task.spec.labels, task.size) for name, task in tasks.items()})

    async def score(request: web.Request) -> web.Response:
        parsed = parser.parse(await read_body(request))
        if isinstance(parsed, BodyError):
            return json_response({"error": parsed.message}, status=400)
        if parsed.packed is None:
            return json_response({"error": parsed.answer_error}, status=400)
        public, private = tasks[parsed.task].accuracies(parsed.packed)
        return json_response({"public": public, "private": private})

    app = make_app(verifier, CollectorRegistry(), client_max_size=ANSWERS * 64 + 256 * 1024)
    app.router.add_post("/api/v1/submissions", score)
    return app


def _serve_baseline(tasks_file: str, public_key: str, port: int) -> None:
    app = _baseline_app(
        load_tasks(Path(tasks_file)), CredentialVerifier.from_file(Path(public_key))
    )
    asyncio.run(
        serve(
            app, host="127.0.0.1", port=port, ready=lambda a: print(f"Serving on {a}", flush=True)
        )
    )


@dataclass
class Load:
    """One load-generating process's share: whole runs, so a run's submissions stay distinct."""

    url: str
    agents: list[tuple[str, int]]  # (credential, run index)
    seed: int
    seconds: float
    warmup: float
    rate: float | None  # total submissions/s of this share (open loop), or None (closed loop)


# Eight answers, as they appear in a body, for each value of a random byte.
_EIGHT = [", ".join(str((byte >> bit) & 1) for bit in range(8)).encode() for byte in range(256)]


class _Bodies:
    """Submissions the scorer has not seen, in any run: probe detection compares each with the
    task's whole history, and a body sent twice is a near duplicate and refused. Each is new
    random answers, made from random bytes eight answers at a time (tens of microseconds)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def next(self) -> bytes:
        whole, rest = divmod(ANSWERS, 8)
        answers = b", ".join(_EIGHT[byte] for byte in self.rng.randbytes(whole))
        last = self.rng.getrandbits(rest)
        answers += b"".join(b", %d" % ((last >> bit) & 1) for bit in range(rest))
        return (
            b'{"task": "bench", "predictions": [' + answers
            + b'], "method": "bench", "artifact": null}'
        )  # fmt: skip


class _Connection:
    """One keep-alive HTTP/1.1 connection, written by hand: the load generator shares two cores
    with the servers, and a full HTTP client per request would measure the client."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def post(self, request: bytes) -> tuple[int, bytes]:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        return status, await self.reader.readexactly(length)


async def _generate(load: Load) -> dict[str, Any]:
    bodies = _Bodies(load.seed)
    host, port, path = _split(load.url)
    idle: dict[str, list[_Connection]] = {}  # per agent: its open connection, when not in use
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.5
    measure_from, end = start + load.warmup, start + load.warmup + load.seconds

    async def submit(credential: str, run: int, due: float) -> None:
        body = bodies.next()
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {credential}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        pool = idle.setdefault(credential, [])
        try:
            connection = (
                pool.pop() if pool else _Connection(*await asyncio.open_connection(host, port))
            )
            status, answer = await connection.post(request)
        except (ConnectionError, asyncio.IncompleteReadError):
            # Counted, not measured; the next submission opens a new connection.
            statuses["connection_error"] = statuses.get("connection_error", 0) + 1
            return
        done = loop.time()
        pool.append(connection)
        key = str(status)
        if status == 200 and b'"status"' in answer:
            key = json.loads(answer)["status"]
        statuses[key] = statuses.get(key, 0) + 1
        if measure_from <= due and done <= end:
            latencies.append(done - due)

    async def closed(credential: str, run: int) -> None:
        # Agents join over the first half of the warm-up, not in one burst of 900 connects.
        joins = start + random.Random(credential).uniform(0, load.warmup / 2)
        await asyncio.sleep(max(0.0, joins - loop.time()))
        while loop.time() < end:
            await submit(credential, run, loop.time())

    async def opened(credential: str, run: int, rate: float) -> None:
        # An agent submits when its next submission is due, or, if its previous one is still
        # unanswered then, as soon as it is answered; the wait counts in the latency.
        rng = random.Random(f"{credential}{load.seed}")
        due = start + rng.expovariate(rate)
        while due < end:
            await asyncio.sleep(max(0.0, due - loop.time()))
            await submit(credential, run, due)
            due += rng.expovariate(rate)

    # This process's CPU over the measured window, not counting making the bodies.
    cpu: list[float] = []
    loop.call_at(measure_from, lambda: cpu.append(time.process_time()))
    loop.call_at(end, lambda: cpu.append(time.process_time()))
    if load.rate is None:
        await asyncio.gather(*(closed(c, r) for c, r in load.agents))
    else:
        each = load.rate / len(load.agents)
        await asyncio.gather(*(opened(c, r, each) for c, r in load.agents))
    if len(cpu) < 2:  # the last agent was done before the window's end
        cpu.append(time.process_time())
    for pool in idle.values():
        for connection in pool:
            connection.writer.close()
    return {"latencies": latencies, "statuses": statuses, "cpu_seconds": cpu[1] - cpu[0]}


def _split(url: str) -> tuple[str, int, str]:
    address, _, path = url.removeprefix("http://").partition("/")
    host, _, port = address.partition(":")
    return host, int(port), "/" + path


def _worker(load: Load) -> dict[str, Any]:
    return asyncio.run(_generate(load))


def _drive(
    url: str,
    agents: list[tuple[str, int]],
    args: argparse.Namespace,
    rate: float | None,
    phase: int,
) -> dict[str, Any]:
    """Run the load from `args.clients` processes and combine what they measured."""
    shares: list[list[tuple[str, int]]] = [[] for _ in range(args.clients)]
    for credential, run in agents:
        shares[run % args.clients].append((credential, run))
    loads = [
        Load(
            url,
            share,
            # New bodies every phase and client: the task's history holds every earlier one.
            seed=phase * args.clients + index,
            seconds=args.seconds,
            warmup=args.warmup,
            rate=None if rate is None else rate * len(share) / len(agents),
        )
        for index, share in enumerate(shares)
    ]
    with multiprocessing.get_context("spawn").Pool(args.clients) as pool:
        parts = pool.map(_worker, loads)
    latencies = sorted(x for part in parts for x in part["latencies"])
    statuses: dict[str, int] = {}
    for part in parts:
        for key, count in part["statuses"].items():
            statuses[key] = statuses.get(key, 0) + count
    return {
        "per_s": round(len(latencies) / args.seconds, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2),
        "statuses": statuses,
        # The load generators share the machine with the server: context for every latency.
        "client_cpu_ms": round(
            1000 * sum(part["cpu_seconds"] for part in parts) / max(1, len(latencies)), 3
        ),
    }


def _start(command: list[str], expect: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if expect not in line:
        process.kill()
        raise SystemExit(f"bench: {command[0]} did not start: {line!r}")
    return process


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time a server has used (user + system, all its threads): its own, and its live child
    processes' (the scorer's intake workers). Unlike wall time, what a submission costs the
    server does not depend on what else the machine runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]
    return own, sum(sum(_cpu_seconds(child)) for child in children)


def _probe_history_at(stored: int, checks: int, packed: Callable[[], int]) -> dict[str, Any]:
    """Probe detection's figures with `stored` earlier submissions of the task."""
    index = ProbeIndex(Probing(), ANSWERS, 2)
    started = time.perf_counter()
    for submission in range(stored):
        index.add(submission, packed(), 1)
    built = time.perf_counter() - started
    figures: dict[str, Any] = {"build_seconds": round(built, 2)}
    # Settled, as a scorer is once it has read its history back: no merge under way.
    started = time.perf_counter()
    index.settle()
    figures["merge_ms"] = round(1000 * (time.perf_counter() - started), 1)

    def timed(name: str, queries: list[int], add: bool = False) -> None:
        seconds = []
        for number, query in enumerate(queries):
            started = time.perf_counter()
            verdict = index.check(query)
            if add:
                index.add(stored + 1 + number, query, verdict.walk_length, verdict.neighbors)
            seconds.append(time.perf_counter() - started)
        seconds.sort()
        figures[name] = {
            "median_us": round(1e6 * statistics.median(seconds), 1),
            "p99_us": round(1e6 * seconds[int(0.99 * (len(seconds) - 1))], 1),
        }
        print(
            f"{stored:>7} stored, {name}: median {figures[name]['median_us']} us, "
            f"p99 {figures[name]['p99_us']} us over {len(seconds)}"
        )

    timed("check_new", [packed() for _ in range(checks)])
    # A near duplicate of a stored one: found, compared in full, refused.
    original = packed()
    index.add(stored, original, 1)
    timed("check_near_duplicate", [original ^ (1 << (ANSWERS + 5)) ^ (1 << 5)] * checks)
    # Checking and keeping each, as the scorer does, merges (in their thread) included.
    timed("check_and_add", [packed() for _ in range(checks)], add=True)
    # What the previous design's check cost at this length: a pass over every prefix.
    generator = np.random.default_rng(0)
    prefix = generator.integers(0, 2**64, (4, stored), dtype=np.uint64)
    words = generator.integers(0, 2**64, 4, dtype=np.uint64)
    seconds = []
    for _ in range(200):
        started = time.perf_counter()
        bound = np.bitwise_count(prefix ^ words[:, np.newaxis]).sum(axis=0, dtype=np.uint16)
        np.flatnonzero(bound <= 40)
        seconds.append(time.perf_counter() - started)
    figures["previous_prefix_pass_median_us"] = round(1e6 * statistics.median(seconds), 1)
    print(
        f"{stored:>7} stored: built in {built:.1f} s, a merge of the newest takes "
        f"{figures['merge_ms']} ms; the previous design's pass over every prefix: median "
        f"{figures['previous_prefix_pass_median_us']} us"
    )
    return figures


def _probe_history(lengths: list[int], checks: int = 2000) -> None:
    """Probe detection (aar_scorer.probing) alone, in this process, at each history length side
    by side: the time to check a new submission against that many earlier ones of the task (and
    to add it), the time of one merge of the newest submissions into the block index (in a
    thread of its own, once per few thousand submissions), and what the previous design's one
    pass over every stored prefix costs at that length."""
    mask = (1 << ANSWERS) - 1
    rng = random.Random(0)

    def packed() -> int:
        ones = rng.getrandbits(ANSWERS)  # a binary task's two planes: answers 1, answers 0
        return (ones << ANSWERS) | (~ones & mask)

    results: dict[str, Any] = {"answers": ANSWERS, "checks": checks}
    for stored in lengths:
        results[str(stored)] = _probe_history_at(stored, checks, packed)
    if len(lengths) > 1:
        shortest, longest = str(min(lengths)), str(max(lengths))
        growth = (
            results[longest]["check_new"]["median_us"] / results[shortest]["check_new"]["median_us"]
        )
        results["check_new_growth"] = round(growth, 2)
        print(
            f"checking a new submission at {longest} stored costs {growth:.2f}x what it costs "
            f"at {shortest}"
        )
    print(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=900)
    parser.add_argument("--runs", type=int, default=100, help="agents are spread over this many")
    parser.add_argument("--seconds", type=float, default=15, help="measured, per phase")
    parser.add_argument("--warmup", type=float, default=3)
    # One is enough to saturate either server on a 2-core machine (it spends a fifth of the
    # server's CPU per submission), and each more competes with the servers for the cores.
    parser.add_argument("--clients", type=int, default=1, help="load-generating processes")
    parser.add_argument("--rounds", type=int, default=2, help="per server and phase; medians")
    parser.add_argument("--search-steps", type=int, default=4, help="bisection steps, capacity")
    parser.add_argument("--search-seconds", type=float, default=6, help="measured, per step")
    parser.add_argument(
        "--intake-workers",
        type=int,
        default=DEFAULT_INTAKE_WORKERS,
        help="the scorer's, as `aar-scorer` takes it (default its own)",
    )
    parser.add_argument("--serve-baseline", nargs=3, metavar=("TASKS", "KEY", "PORT"))
    parser.add_argument(
        "--probe-history",
        type=int,
        nargs="+",
        metavar="N",
        help="instead: time probe detection alone against N stored submissions of the task, "
        "for each N given (e.g. 10000 100000), side by side",
    )
    args = parser.parse_args()
    if args.probe_history is not None:
        _probe_history(args.probe_history)
        return
    if args.serve_baseline:
        tasks_file, key_file, port = args.serve_baseline
        _serve_baseline(tasks_file, key_file, int(port))
        return

    with tempfile.TemporaryDirectory(prefix="aar-bench-scorer-") as directory:
        root = Path(directory)
        key = generate_signing_key()
        issuer = CredentialIssuer(key)
        (root / "public-key.pem").write_bytes(public_key_pem(key))
        unlimited = {"per_agent": 10**9, "per_run": 10**9}
        task = {
            "name": "bench",
            "labels": [0, 1],
            "baselines": {"weak": 0.6, "ceiling": 0.8},
            "quota": unlimited,
            # Feedback open throughout, so that every submission goes through the Ladder; the
            # bound says nothing then, which the bench may allow itself.
            "feedback": {"leakage_budget": None, "allow_vacuous_bound": True},
        }
        labels = random.Random(0).choices([0, 1], k=ANSWERS)
        tasks_file = write_task_files(root / "tasks", [(task, labels, "bench-split-seed-0")])
        agents = [
            (
                issuer.mint_agent("bench", f"run-{index % args.runs}", f"agent-{index}"),
                index % args.runs,
            )
            for index in range(args.agents)
        ]
        scorer_port, baseline_port = free_port(), free_port()
        scorer = _start(
            [
                str(Path(sys.executable).parent / "aar-scorer"),
                "--tasks", str(tasks_file),
                "--data-dir", str(root / "data"),
                "--public-key", str(root / "public-key.pem"),
                "--host", "127.0.0.1",
                "--port", str(scorer_port),
                "--intake-workers", str(args.intake_workers),
            ],
            "Serving bench",
        )  # fmt: skip
        baseline = _start(
            [sys.executable, __file__, "--serve-baseline", str(tasks_file),
             str(root / "public-key.pem"), str(baseline_port)],
            "Serving on",
        )  # fmt: skip
        try:
            admin = {"Authorization": f"Bearer {issuer.mint_admin('bench')}"}

            async def register() -> None:
                async with aiohttp.ClientSession() as http:
                    for run in range(args.runs):
                        async with http.put(
                            f"http://127.0.0.1:{scorer_port}/api/v1/runs/bench/run-{run}",
                            json={"task": "bench", "review_required": False},
                            headers=admin,
                        ) as response:
                            response.raise_for_status()

            asyncio.run(register())
            urls = {
                "baseline": f"http://127.0.0.1:{baseline_port}/api/v1/submissions",
                "scorer": f"http://127.0.0.1:{scorer_port}/api/v1/submissions",
            }
            figures: dict[str, Any] = {"agents": args.agents, "runs": args.runs,
                                       "answers": ANSWERS, "seconds": args.seconds,
                                       "scorer_intake_workers": args.intake_workers}  # fmt: skip
            phases = iter(range(1000))
            pids = {"baseline": baseline.pid, "scorer": scorer.pid}

            def measure(kind: str, rate: float | None) -> None:
                # Alternate which server goes first, round by round: the machine's other load
                # drifts, and neither side should always get the quieter slot.
                rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
                for round_ in range(args.rounds):
                    order = list(urls) if round_ % 2 == 0 else list(reversed(urls))
                    for name in order:
                        own, workers = _cpu_seconds(pids[name])
                        result = _drive(urls[name], agents, args, rate, next(phases))
                        answered = sum(
                            n for key, n in result["statuses"].items() if key != "connection_error"
                        )
                        own_after, workers_after = _cpu_seconds(pids[name])
                        result["cpu_ms"] = (
                            1000 * (own_after + workers_after - own - workers) / answered
                        )
                        result["intake_cpu_ms"] = 1000 * (workers_after - workers) / answered
                        rounds[name].append(result)
                        print(
                            f"{name:>8} {kind:<10} round {round_ + 1}: "
                            f"{result['per_s']:7.1f} submissions/s, p50 {result['p50_ms']:7.1f} "
                            f"ms, p99 {result['p99_ms']:7.1f} ms, server CPU "
                            f"{result['cpu_ms']:.2f} ms each (intake workers "
                            f"{result['intake_cpu_ms']:.2f}), load generators "
                            f"{result['client_cpu_ms']:.2f} ms ({result['statuses']})"
                        )
                for name, results in rounds.items():
                    figures[f"{name}_{kind}"] = {
                        figure: round(statistics.median(r[figure] for r in results), 2)
                        for figure in (
                            "per_s", "p50_ms", "p99_ms", "cpu_ms", "intake_cpu_ms", "client_cpu_ms"
                        )
                    }  # fmt: skip

            def capacity(name: str) -> float:
                """The highest offered rate at which p99 stays under target, by bisection."""
                step_args = argparse.Namespace(**vars(args))
                step_args.seconds, step_args.warmup = args.search_seconds, 2
                low, high = 0.0, figures[f"{name}_saturation"]["per_s"]
                for _ in range(args.search_steps):
                    offered = (low + high) / 2
                    result = _drive(urls[name], agents, step_args, offered, next(phases))
                    # Answered as fast as due, or the p99 of a short phase would hide a queue
                    # that keeps growing.
                    within = result["p99_ms"] < P99_TARGET_MS and result["per_s"] >= 0.95 * offered
                    print(
                        f"{name:>8} capacity   at {offered:7.1f}/s: p99 {result['p99_ms']:7.1f} "
                        f"ms, answered {result['per_s']:7.1f}/s: {'within' if within else 'over'}"
                    )
                    low, high = (offered, high) if within else (low, offered)
                return low

            measure("saturation", None)
            rate = THROUGHPUT_TARGET * figures["baseline_saturation"]["per_s"]
            figures["target_rate_per_s"] = round(rate, 1)
            measure("target", rate)
            for name in urls:
                figures[f"{name}_capacity_per_s"] = round(capacity(name), 1)
        finally:
            for process in (scorer, baseline):
                process.terminate()
                process.wait(timeout=30)
    ratio = figures["scorer_saturation"]["per_s"] / figures["baseline_saturation"]["per_s"]
    figures["throughput_ratio"] = round(ratio, 3)
    cpu_ratio = figures["scorer_saturation"]["cpu_ms"] / figures["baseline_saturation"]["cpu_ms"]
    figures["cpu_ratio"] = round(cpu_ratio, 3)
    figures["p99_target_ms"] = P99_TARGET_MS
    # The machine's load when the run ended: on a shared machine, the context of every figure.
    figures["load_average_1m"] = round(os.getloadavg()[0], 2)
    figures["cpus"] = os.cpu_count()
    figures["meets_throughput_target"] = ratio >= THROUGHPUT_TARGET
    figures["meets_p99_target"] = figures["scorer_target"]["p99_ms"] < P99_TARGET_MS
    # Both at once: the rate the scorer answers within the p99 target, against the baseline's
    # sustained rate.
    capacity_ratio = figures["scorer_capacity_per_s"] / figures["baseline_saturation"]["per_s"]
    figures["capacity_ratio"] = round(capacity_ratio, 3)
    print(
        f"server CPU per submission at saturation: scorer "
        f"{figures['scorer_saturation']['cpu_ms']:.2f} ms, baseline "
        f"{figures['baseline_saturation']['cpu_ms']:.2f} ms ({cpu_ratio:.2f}x)"
    )
    print(
        f"scorer sustains {ratio:.0%} of the baseline's submissions/s "
        f"(target {THROUGHPUT_TARGET:.0%}); at {rate:.0f}/s its p99 is "
        f"{figures['scorer_target']['p99_ms']:.1f} ms (target under {P99_TARGET_MS:.0f} ms)"
    )
    print(
        f"scorer keeps p99 under {P99_TARGET_MS:.0f} ms up to "
        f"{figures['scorer_capacity_per_s']:.0f}/s = {capacity_ratio:.0%} of the baseline's "
        f"sustained rate (baseline: up to {figures['baseline_capacity_per_s']:.0f}/s)"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
