"""The scorer's durable record: runs, every submission and every review decision, append-only.

Triggers refuse UPDATE and DELETE, so nothing once written is ever changed: a run's new
settings, and a reviewer's new decision, are new rows and the latest one counts.

Writes are grouped: whatever was queued within a short window after the oldest queued write
arrived goes into one transaction. With `synchronous=FULL` each commit waits for the disk and
costs a fixed amount of CPU (the WAL write, the flush), and agents submitting one at a time
would otherwise pay it for about one submission each. A caller's write is durable when its await
returns.

The COMMIT runs on the event loop, which waits for the flush (a fraction of a millisecond on a
local disk, a few on a network volume; the window bounds how often). In a thread it would be
slower, not faster: under load the event loop holds the interpreter lock, and the thread waits
up to the switch interval (5 ms) each time it needs it back, so commits took tens of
milliseconds, every one of them in some answer's latency. What does take long, copying the WAL
back into the database (a checkpoint), runs in a thread on its own connection, which needs the
lock only to start and finish, and never blocks the writer.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aar_common.sqlite import open_database

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    run TEXT NOT NULL,
    task TEXT NOT NULL,
    review_required INTEGER NOT NULL,
    registered_by TEXT NOT NULL,
    created_at REAL NOT NULL,
    -- Reproduction (docs/scorer.md): whether a submission counts only once reproduced, within
    -- what tolerance of its claim, on which transfer tasks (JSON list), for how many leaders.
    reproduce INTEGER NOT NULL DEFAULT 0,
    tolerance REAL NOT NULL DEFAULT 0.1,
    transfer TEXT NOT NULL DEFAULT '[]',
    reproduce_top INTEGER NOT NULL DEFAULT 3
);
CREATE INDEX IF NOT EXISTS runs_by_run ON runs (run, id);

CREATE TABLE IF NOT EXISTS submissions (
    id INTEGER PRIMARY KEY,
    run TEXT NOT NULL,
    agent TEXT NOT NULL,
    task TEXT NOT NULL,
    created_at REAL NOT NULL,
    digest TEXT NOT NULL,
    packed BLOB NOT NULL,
    method TEXT NOT NULL,
    artifact TEXT,
    status TEXT NOT NULL CHECK (status IN ('accepted', 'flagged', 'refused')),
    probe_reason TEXT,
    probe_nearest INTEGER,
    probe_distance INTEGER,
    walk_length INTEGER NOT NULL,
    public_accuracy REAL,
    private_accuracy REAL,
    released INTEGER NOT NULL,
    feedback_score REAL,
    feedback_message TEXT NOT NULL,
    -- 1: answered while the task's feedback was open, counted against its leakage budget
    feedback_open INTEGER NOT NULL DEFAULT 1,
    -- the shell command that makes the predictions again from the artifact
    command TEXT
);
CREATE INDEX IF NOT EXISTS submissions_by_run ON submissions (run, created_at);
CREATE INDEX IF NOT EXISTS submissions_by_task ON submissions (task, id);
CREATE INDEX IF NOT EXISTS submissions_by_agent ON submissions (run, agent, created_at);

CREATE TABLE IF NOT EXISTS reviews (
    id INTEGER PRIMARY KEY,
    submission INTEGER NOT NULL REFERENCES submissions (id),
    decision TEXT NOT NULL CHECK (decision IN ('approve', 'reject')),
    comment TEXT NOT NULL,
    reviewer TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reviews_by_submission ON reviews (submission, id);

CREATE TABLE IF NOT EXISTS reproductions (
    id INTEGER PRIMARY KEY,
    submission INTEGER NOT NULL REFERENCES submissions (id),
    target TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('fresh', 'transfer')),
    outcome TEXT NOT NULL CHECK (outcome IN ('succeeded', 'failed', 'timed_out', 'invalid')),
    accuracy REAL,
    accuracies TEXT,
    exit_code INTEGER,
    reason TEXT NOT NULL,
    log TEXT NOT NULL,
    gpu_hours REAL NOT NULL,
    job TEXT NOT NULL,
    reported_by TEXT NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (submission, target)
);

CREATE TABLE IF NOT EXISTS reproduction_requests (
    id INTEGER PRIMARY KEY,
    submission INTEGER NOT NULL UNIQUE REFERENCES submissions (id),
    requested_by TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""

# Columns added since the first schema: a database from before gets them with their defaults.
_ADDED_COLUMNS = {
    "submissions": {
        # every scored answer there was open
        "feedback_open": "INTEGER NOT NULL DEFAULT 1",
        "command": "TEXT",
        "notebook": "TEXT",
    },
    "runs": {
        "reproduce": "INTEGER NOT NULL DEFAULT 0",
        "tolerance": "REAL NOT NULL DEFAULT 0.1",
        "transfer": "TEXT NOT NULL DEFAULT '[]'",
        "reproduce_top": "INTEGER NOT NULL DEFAULT 3",
    },
}

_APPEND_ONLY = "".join(
    f"""
CREATE TRIGGER IF NOT EXISTS {table}_no_{verb.lower()} BEFORE {verb} ON {table}
BEGIN SELECT RAISE(ABORT, '{table} are append-only: add a row instead'); END;
"""
    for table in ("runs", "submissions", "reviews", "reproductions", "reproduction_requests")
    for verb in ("UPDATE", "DELETE")
)

Statement = tuple[str, Sequence[Any]]

# How long a write may wait for others to share its commit. A commit costs about as much CPU as
# scoring a submission and stalls the event loop for the flush; at two thousand submissions a
# second, 3 ms groups about six into each, for a few milliseconds of latency, well inside the
# scorer's 50 ms target. A longer window saves commits but adds its length to every answer; with
# parsing in intake workers (aar_scorer.intake) the event loop has CPU to spare for the commits.
GROUP_WINDOW_SECONDS = 0.003

# Commits between checkpoints, about SQLite's own default of 1,000 WAL pages.
CHECKPOINT_EVERY_COMMITS = 100


@dataclass
class _Job:
    statements: list[Statement]
    future: asyncio.Future[None]
    queued: float  # loop time


class Store:
    """A reader and a writer connection, used from the event loop, and a third connection that
    checkpoints the WAL in a thread."""

    def __init__(self, path: Path, group_window: float = GROUP_WINDOW_SECONDS) -> None:
        self.path = path
        self.group_window = group_window
        self.reader = open_database(path, SCHEMA + _APPEND_ONLY)
        for table, added in _ADDED_COLUMNS.items():
            columns = {row[1] for row in self.reader.execute(f"PRAGMA table_info({table})")}
            for column, definition in added.items():
                if column not in columns:
                    self.reader.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        self._writer = open_database(path)
        # The writer never checkpoints on its own: that would stall the loop for milliseconds.
        self._writer.execute("PRAGMA wal_autocheckpoint=0")
        self._checkpointer = open_database(path)
        self._checkpoints = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._checkpoint: Future[Any] | None = None
        self._queue: list[_Job] = []
        self._flusher: asyncio.Task[None] | None = None
        self.commits = 0  # transactions committed so far: how well writes are grouped

    def next_id(self, table: str) -> int:
        """The id the next row of `table` gets; ids are assigned by the one process that writes."""
        row = self.reader.execute(f"SELECT COALESCE(MAX(id), 0) + 1 FROM {table}").fetchone()
        return int(row[0])

    async def write(self, *statements: Statement) -> None:
        """Apply the statements atomically; returns once they are on disk."""
        loop = asyncio.get_running_loop()
        job = _Job(list(statements), loop.create_future(), loop.time())
        self._queue.append(job)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        await job.future

    async def _flush(self) -> None:
        # Whatever queued up during the window goes into one transaction, run here on the event
        # loop (see the module's docstring for why the COMMIT is not handed to a thread).
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                # Not longer than the window after the oldest write: writes queued while the
                # previous group was committed have waited already.
                delay = self._queue[0].queued + self.group_window - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                jobs, self._queue = self._queue, []
                try:
                    outcomes = self._apply(jobs)
                    self._writer.execute("COMMIT")
                    self.commits += 1
                except sqlite3.Error as error:
                    if self._writer.in_transaction:
                        self._writer.execute("ROLLBACK")
                    outcomes = [error] * len(jobs)
                for job, outcome in zip(jobs, outcomes, strict=True):
                    if job.future.done():
                        continue
                    if outcome is None:
                        job.future.set_result(None)
                    else:
                        job.future.set_exception(outcome)
                if self.commits % CHECKPOINT_EVERY_COMMITS == 0:
                    self._start_checkpoint()
        finally:
            self._flusher = None

    def _start_checkpoint(self) -> None:
        if self._checkpoint is not None and not self._checkpoint.done():
            return  # the last one is still copying; the next one will catch up
        # PASSIVE: copy what no reader still needs, without waiting for any connection.
        self._checkpoint = self._checkpoints.submit(
            self._checkpointer.execute, "PRAGMA wal_checkpoint(PASSIVE)"
        )

    def _apply(self, jobs: list[_Job]) -> list[sqlite3.Error | None]:
        """Run the jobs' statements in one open transaction; one bad job fails alone."""
        self._writer.execute("BEGIN IMMEDIATE")
        try:
            # Writes the service makes are valid, so all of them go in one pass at first...
            for job in jobs:
                self._execute(job)
            return [None] * len(jobs)
        except sqlite3.Error:
            # ...and only when one fails are they redone one savepoint each, to find which.
            self._writer.execute("ROLLBACK")
        outcomes: list[sqlite3.Error | None] = []
        self._writer.execute("BEGIN IMMEDIATE")
        for job in jobs:
            self._writer.execute("SAVEPOINT job")
            try:
                self._execute(job)
            except sqlite3.Error as error:
                self._writer.execute("ROLLBACK TO job")
                outcomes.append(error)
            else:
                outcomes.append(None)
            self._writer.execute("RELEASE job")
        return outcomes

    def _execute(self, job: _Job) -> None:
        for sql, parameters in job.statements:
            self._writer.execute(sql, parameters)

    def close(self) -> None:
        """Close the connections; call it once nothing writes any more."""
        self._checkpoints.shutdown(wait=True)  # a checkpoint under way finishes first
        self._writer.close()
        self.reader.close()
        self._checkpointer.close()
