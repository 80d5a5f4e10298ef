"""aar_common.sqlite: a transaction keeps all its statements or none, and says why it failed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from aar_common.sqlite import open_database, transaction

SCHEMA = "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL);"


def test_a_transaction_commits_together_or_not_at_all(tmp_path: Path) -> None:
    database = open_database(tmp_path / "notes.db", SCHEMA)
    with transaction(database) as db:
        db.execute("INSERT INTO notes (text) VALUES ('kept')")

    def insert_then_fail() -> None:
        with transaction(database) as db:
            db.execute("INSERT INTO notes (text) VALUES ('undone with the next one')")
            db.execute("INSERT INTO notes (text) VALUES (NULL)")

    with pytest.raises(sqlite3.IntegrityError):
        insert_then_fail()

    assert not database.in_transaction
    database.close()
    reopened = open_database(tmp_path / "notes.db")
    assert [row["text"] for row in reopened.execute("SELECT text FROM notes")] == ["kept"]
    reopened.close()
