"""The gateway's durable state in SQLite: budgets, a ledger row per billed upstream exchange, and
running totals per agent and per run, written in the same transaction as the ledger row.

The ledger is keyed by the gateway's request id, one per upstream exchange, and a row is inserted
at most once: recording the same exchange again changes nothing, so no path can bill it twice.
Totals are also kept in memory (loaded at start), so budget checks never wait for the disk.

Why a billed request's row is written just after its answer goes out rather than before: the
money is spent when the upstream answers, not when the agent reads the answer, so holding the
answer back for the fsync (milliseconds on most disks) would add latency to every request and
shorten no window in which a crash can lose spend: that window runs from the upstream's answer to
the commit either way. A graceful stop (SIGTERM) writes everything pending before it exits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from aar_common.api import History
from aar_common.sqlite import open_database, transaction
from aar_gateway.pricing import Usage, nano_to_usd

SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
    run TEXT PRIMARY KEY,          -- namespace/run
    cap_nano INTEGER,              -- null: no cap on the run as a whole
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_budgets (
    run TEXT NOT NULL REFERENCES budgets(run) ON DELETE CASCADE,
    agent TEXT NOT NULL,
    cap_nano INTEGER,
    PRIMARY KEY (run, agent)
);
CREATE TABLE IF NOT EXISTS ledger (
    request_id TEXT PRIMARY KEY,
    run TEXT NOT NULL,
    agent TEXT NOT NULL,
    model TEXT NOT NULL,
    price_version TEXT NOT NULL,
    message_id TEXT,
    upstream_request_id TEXT,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cache_creation_input_tokens INTEGER NOT NULL,
    cache_read_input_tokens INTEGER NOT NULL,
    cost_nano INTEGER NOT NULL,
    complete INTEGER NOT NULL,     -- 0: the stream ended before message_stop
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_by_run ON ledger (run, created_at);
-- Answers kept for a retry that sends the same Idempotency-Key (run/agent/key), a day long.
CREATE TABLE IF NOT EXISTS replays (
    key TEXT PRIMARY KEY,
    request_id TEXT NOT NULL REFERENCES ledger(request_id),
    digest TEXT NOT NULL,          -- sha256 of the request body
    content_type TEXT NOT NULL,
    body BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS replays_created_at ON replays (created_at);
-- agent '' is the run's own row: the sum over its agents, kept so a check reads one row.
CREATE TABLE IF NOT EXISTS totals (
    run TEXT NOT NULL,
    agent TEXT NOT NULL,
    cost_nano INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cache_creation_input_tokens INTEGER NOT NULL DEFAULT 0,
    cache_read_input_tokens INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run, agent)
);
"""

log = logging.getLogger(__name__)

RUN_ROW = ""
REPLAY_SECONDS = 24 * 3600  # how long a retry with the same Idempotency-Key gets the same answer
T = TypeVar("T")


@dataclass
class Totals:
    cost_nano: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    requests: int = 0

    def add(self, usage: Usage, cost_nano: int, sign: int = 1) -> None:
        self.cost_nano += sign * cost_nano
        self.input_tokens += sign * usage.input_tokens
        self.output_tokens += sign * usage.output_tokens
        self.cache_creation_input_tokens += sign * usage.cache_creation_input_tokens
        self.cache_read_input_tokens += sign * usage.cache_read_input_tokens
        self.requests += sign


@dataclass(frozen=True)
class Budget:
    """A run's caps in nano-dollars (None: uncapped); an agent not listed has no cap of its own."""

    cap_nano: int | None
    agents: dict[str, int | None]


@dataclass(frozen=True)
class Replay:
    """An answer kept for a retry with the same Idempotency-Key."""

    key: str
    digest: str
    content_type: str
    body: bytes


@dataclass(frozen=True)
class Exchange:
    """One upstream exchange that consumed tokens, as it goes into the ledger."""

    request_id: str
    run: str
    agent: str
    model: str
    price_version: str
    usage: Usage
    cost_nano: int
    message_id: str | None = None
    upstream_request_id: str | None = None
    complete: bool = True
    replay: Replay | None = None


class Store:
    """Budgets and spend. Writes go through one thread, so the event loop never blocks on fsync
    and SQLite sees one writer."""

    def __init__(self, path: Path) -> None:
        self._db = open_database(path, SCHEMA)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aar-gateway-db")
        self.budgets: dict[str, Budget] = {}
        self.totals: dict[tuple[str, str], Totals] = {}
        self.failure: str | None = None  # why the last write failed: spend is not being kept
        self._queued: list[tuple[Exchange, asyncio.Future[bool]]] = []
        self._committing = False
        self._last: asyncio.Future[bool] | None = None
        self._unwritten_replays: dict[str, Replay] = {}
        self._load()

    def _load(self) -> None:
        agent_caps: dict[str, dict[str, int | None]] = {}
        for row in self._db.execute("SELECT run, agent, cap_nano FROM agent_budgets"):
            agent_caps.setdefault(row["run"], {})[row["agent"]] = row["cap_nano"]
        for row in self._db.execute("SELECT run, cap_nano FROM budgets"):
            self.budgets[row["run"]] = Budget(row["cap_nano"], agent_caps.get(row["run"], {}))
        for row in self._db.execute(
            "SELECT run, agent, cost_nano, input_tokens, output_tokens, "
            "cache_creation_input_tokens, cache_read_input_tokens, requests FROM totals"
        ):
            self.totals[(row["run"], row["agent"])] = Totals(*row[2:])

    def close(self) -> None:
        """Finish every write, queued ones included, then close the database."""
        self._writer.shutdown(wait=True)
        if self._queued:  # their batch never started: the loop is busy closing us
            self._write_exchanges([exchange for exchange, _ in self._queued])
            self._queued = []
        self._db.close()

    def spent(self, run: str, agent: str = RUN_ROW) -> Totals:
        return self.totals.get((run, agent), Totals())

    def agents_of(self, run: str) -> dict[str, Totals]:
        return {
            agent: totals
            for (run_key, agent), totals in self.totals.items()
            if run_key == run and agent != RUN_ROW
        }

    async def set_budget(self, run: str, budget: Budget) -> None:
        """Replace a run's caps (the operator sends the whole budget each time)."""
        await self._serially(self._write_budget, run, budget)
        self.budgets[run] = budget

    def record(self, exchange: Exchange) -> asyncio.Future[bool]:
        """Count an exchange now, and write it to the ledger and the totals in the background.

        Counted first, so every budget check sees the spend at once; the write follows off the
        request's path. Writes are group-committed: while one transaction is being made durable,
        the exchanges that arrive meanwhile queue up and go in the next, so a busy gateway pays
        one fsync per batch rather than per request, and the disk never falls behind. The future
        resolves False if the ledger already had the exchange (the count is then taken back, so
        memory agrees with the disk), or if the write failed (then `failure` says why).
        """
        self._count(exchange, 1)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queued.append((exchange, future))
        if exchange.replay is not None:
            self._unwritten_replays[exchange.replay.key] = exchange.replay
        self._last = future
        if not self._committing:
            self._commit_queued()
        return future

    def _commit_queued(self) -> None:
        batch, self._queued = self._queued, []
        self._committing = True
        job = asyncio.get_running_loop().run_in_executor(
            self._writer, self._write_exchanges, [exchange for exchange, _ in batch]
        )
        job.add_done_callback(partial(self._committed, batch))

    def _committed(
        self, batch: list[tuple[Exchange, asyncio.Future[bool]]], job: asyncio.Future[list[bool]]
    ) -> None:
        self._committing = False
        error = job.exception() if not job.cancelled() else RuntimeError("the writer stopped")
        if error is not None:
            self.failure = f"{type(error).__name__}: {error}"
            log.error("Could not record %d exchanges: %s", len(batch), self.failure)
        results = job.result() if error is None else [False] * len(batch)
        for (exchange, future), inserted in zip(batch, results, strict=True):
            if error is None and not inserted:
                self._count(exchange, -1)
            if exchange.replay is not None:
                self._unwritten_replays.pop(exchange.replay.key, None)
            future.set_result(inserted)
        if self._queued:
            self._commit_queued()

    async def replay(self, key: str) -> Replay | None:
        """The answer kept under `key`: recorded already, whether or not yet on disk."""
        if (unwritten := self._unwritten_replays.get(key)) is not None:
            return unwritten
        return await self._serially(self._read_replay, key)

    def _read_replay(self, key: str) -> Replay | None:
        row = self._db.execute(
            "SELECT digest, content_type, body FROM replays WHERE key = ? AND created_at > ?",
            (key, time.time() - REPLAY_SECONDS),
        ).fetchone()
        return None if row is None else Replay(key, row[0], row[1], bytes(row[2]))

    async def flush(self) -> None:
        """Wait until everything recorded or written so far is on disk."""
        if self._last is not None:
            await asyncio.shield(self._last)  # batches commit in order: the last one is enough
        await self._serially(_nothing)

    def _count(self, exchange: Exchange, sign: int) -> None:
        for agent in (exchange.agent, RUN_ROW):
            self.totals.setdefault((exchange.run, agent), Totals()).add(
                exchange.usage, exchange.cost_nano, sign
            )

    async def _serially(self, job: Callable[..., T], *args: object) -> T:
        """Run `job` on the database's one thread, after everything queued before it."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._writer, partial(job, *args))

    def _write_budget(self, run: str, budget: Budget) -> None:
        with transaction(self._db):
            self._db.execute(
                "INSERT INTO budgets (run, cap_nano, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(run) DO UPDATE SET cap_nano = excluded.cap_nano, "
                "updated_at = excluded.updated_at",
                (run, budget.cap_nano, time.time()),
            )
            self._db.execute("DELETE FROM agent_budgets WHERE run = ?", (run,))
            self._db.executemany(
                "INSERT INTO agent_budgets (run, agent, cap_nano) VALUES (?, ?, ?)",
                [(run, agent, cap) for agent, cap in budget.agents.items()],
            )

    def _write_exchanges(self, batch: list[Exchange]) -> list[bool]:
        with transaction(self._db):
            return [self._insert_exchange(exchange) for exchange in batch]

    def _insert_exchange(self, exchange: Exchange) -> bool:
        usage = exchange.usage
        inserted = self._db.execute(
            "INSERT INTO ledger (request_id, run, agent, model, price_version, message_id, "
            "upstream_request_id, input_tokens, output_tokens, cache_creation_input_tokens, "
            "cache_read_input_tokens, cost_nano, complete, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(request_id) DO NOTHING",
            (
                exchange.request_id,
                exchange.run,
                exchange.agent,
                exchange.model,
                exchange.price_version,
                exchange.message_id,
                exchange.upstream_request_id,
                usage.input_tokens,
                usage.output_tokens,
                usage.cache_creation_input_tokens,
                usage.cache_read_input_tokens,
                exchange.cost_nano,
                int(exchange.complete),
                time.time(),
            ),
        ).rowcount
        if not inserted:
            return False
        if (replay := exchange.replay) is not None:
            now = time.time()
            self._db.execute("DELETE FROM replays WHERE created_at < ?", (now - REPLAY_SECONDS,))
            self._db.execute(
                "INSERT OR REPLACE INTO replays "
                "(key, request_id, digest, content_type, body, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    replay.key,
                    exchange.request_id,
                    replay.digest,
                    replay.content_type,
                    replay.body,
                    now,
                ),
            )
        for agent in (exchange.agent, RUN_ROW):
            self._db.execute(
                "INSERT INTO totals (run, agent, cost_nano, input_tokens, output_tokens, "
                "cache_creation_input_tokens, cache_read_input_tokens, requests) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 1) "
                "ON CONFLICT(run, agent) DO UPDATE SET "
                "cost_nano = cost_nano + excluded.cost_nano, "
                "input_tokens = input_tokens + excluded.input_tokens, "
                "output_tokens = output_tokens + excluded.output_tokens, "
                "cache_creation_input_tokens = cache_creation_input_tokens "
                "+ excluded.cache_creation_input_tokens, "
                "cache_read_input_tokens = cache_read_input_tokens "
                "+ excluded.cache_read_input_tokens, "
                "requests = requests + 1",
                (
                    exchange.run,
                    agent,
                    exchange.cost_nano,
                    usage.input_tokens,
                    usage.output_tokens,
                    usage.cache_creation_input_tokens,
                    usage.cache_read_input_tokens,
                ),
            )
        return True

    async def ledger_size(self) -> int:
        """Rows in the ledger (through the writer: the connection has one user at a time)."""
        return await self._serially(self._count_ledger)

    async def spend_history(self, run: str, end: float, points: int) -> History | None:
        """The run's spend in dollars over time (cumulative), or None before its first request."""
        return await self._serially(self._read_spend_history, run, end, points)

    def _read_spend_history(self, run: str, end: float, points: int) -> History | None:
        first = self._db.execute(
            "SELECT min(created_at) FROM ledger WHERE run = ?", (run,)
        ).fetchone()[0]
        if first is None:
            return None
        end = max(end, first)
        span = max(end - first, 1e-9)
        # Summed per step in SQLite: a run's ledger may hold millions of rows.
        per_step = [0] * points
        for step, cost_nano in self._db.execute(
            "SELECT min(CAST((created_at - ?) * ? / ? AS INTEGER), ?), sum(cost_nano) "
            "FROM ledger WHERE run = ? GROUP BY 1",
            (first, points, span, points - 1, run),
        ):
            per_step[max(step, 0)] += cost_nano
        spent = 0
        cumulative: list[float | None] = []
        for cost_nano in per_step:
            spent += cost_nano
            cumulative.append(float(nano_to_usd(spent)))
        return History(
            start=first,
            end=end,
            times=History.steps(first, end, points),
            series={"usd": cumulative},
        )

    def _count_ledger(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM ledger").fetchone()[0])


def _nothing() -> None:
    return None
