"""The store groups concurrent writes into shared commits; a bad write fails alone, and every
write that returned is in the file when it is opened again."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

from aar_scorer.store import CHECKPOINT_EVERY_COMMITS, Store

INSERT_RUN = (
    "INSERT INTO runs (run, task, review_required, registered_by, created_at) "
    "VALUES (?, ?, 1, 'test', 0)"
)


async def test_concurrent_writes_commit_and_a_bad_one_fails_alone(tmp_path: Path) -> None:
    store = Store(tmp_path / "scorer.db")

    async def writer(index: int) -> None:
        for round_ in range(5):
            await store.write((INSERT_RUN, (f"lab/run-{index}-{round_}", "toy")))

    bad = store.write((INSERT_RUN, ("lab/ok-part", "toy")), ("INSERT INTO nowhere VALUES (1)", ()))
    results = await asyncio.gather(
        *(writer(index) for index in range(200)), bad, return_exceptions=True
    )
    store.close()

    assert results[:200] == [None] * 200
    assert isinstance(results[200], sqlite3.OperationalError)
    reopened = Store(tmp_path / "scorer.db")
    runs = [row[0] for row in reopened.reader.execute("SELECT run FROM runs")]
    reopened.close()
    assert len(runs) == 1000
    assert "lab/ok-part" not in runs  # the failed write left nothing half-done


async def test_rows_refuse_to_change(tmp_path: Path) -> None:
    store = Store(tmp_path / "scorer.db")
    await store.write((INSERT_RUN, ("lab/run", "toy")))
    with pytest.raises(sqlite3.IntegrityError, match="runs are append-only"):
        await store.write(("UPDATE runs SET task = 'other'", ()))
    store.close()


async def test_writes_arriving_one_by_one_within_the_window_share_a_commit(
    tmp_path: Path,
) -> None:
    # A window far longer than the few loop turns between these writes: they are grouped.
    store = Store(tmp_path / "scorer.db", group_window=0.5)
    writes = []
    for index in range(3):
        writes.append(asyncio.ensure_future(store.write((INSERT_RUN, (f"lab/run-{index}", "toy")))))
        await asyncio.sleep(0)
    await asyncio.gather(*writes)
    assert store.commits == 1
    # Without a window, a write that arrives alone commits alone.
    unwindowed = Store(tmp_path / "other.db", group_window=0)
    for index in range(3):
        await unwindowed.write((INSERT_RUN, (f"lab/run-{index}", "toy")))
    assert unwindowed.commits == 3
    unwindowed.close()
    store.close()


async def test_a_failing_write_fails_alone_in_its_group(tmp_path: Path) -> None:
    store = Store(tmp_path / "scorer.db", group_window=0.5)
    writes = [
        asyncio.ensure_future(store.write((INSERT_RUN, ("lab/first", "toy")))),
        # Two statements, the second refused: the first must not stay either.
        asyncio.ensure_future(
            store.write(
                (INSERT_RUN, ("lab/half", "toy")),
                ("UPDATE runs SET task = 'other'", ()),
            )
        ),
        asyncio.ensure_future(store.write((INSERT_RUN, ("lab/last", "toy")))),
    ]
    outcomes = await asyncio.gather(*writes, return_exceptions=True)

    assert outcomes[0] is None
    assert outcomes[2] is None
    assert isinstance(outcomes[1], sqlite3.IntegrityError)
    runs = [row["run"] for row in store.reader.execute("SELECT run FROM runs ORDER BY id")]
    assert runs == ["lab/first", "lab/last"]
    assert store.commits == 1
    store.close()


async def test_the_loop_commits_and_a_thread_copies_the_wal_back(tmp_path: Path) -> None:
    store = Store(tmp_path / "scorer.db", group_window=0)
    executed_on: dict[str, set[int]] = {}
    for connection in (store._writer, store._checkpointer):
        connection.set_trace_callback(
            lambda sql: executed_on.setdefault(sql.split("(")[0], set()).add(threading.get_ident())
        )
    database = tmp_path / "scorer.db"
    before = database.stat().st_size

    for index in range(2 * CHECKPOINT_EVERY_COMMITS):
        await store.write((INSERT_RUN, (f"lab/run-{index}", "toy")))
    store.close()  # waits for a checkpoint under way

    assert executed_on["COMMIT"] == {threading.get_ident()}
    assert threading.get_ident() not in executed_on["PRAGMA wal_checkpoint"]
    # The writer never checkpoints on its own, so rows reached the database file through the
    # checkpoints alone.
    assert database.stat().st_size > before
    reopened = Store(database)
    assert reopened.next_id("runs") == 2 * CHECKPOINT_EVERY_COMMITS + 1
    reopened.close()
