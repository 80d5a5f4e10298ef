"""What the web UI makes of the scorer's and the gateway's answers."""

from __future__ import annotations

from aar_forum.ui import dollars
from aar_forum.upstream import rows


def test_other_services_answers_become_tables_of_text() -> None:
    columns, table = rows(
        {
            "run": "lab/w2s",
            "submissions": [
                {
                    "id": 1,
                    "created_at": 1_800_000_000,
                    "score": 0.8125,
                    "digest": "sha256:" + "a" * 64,
                },
                {"id": 2, "review": {"decision": "approve"}, "counted": True},
            ],
        }
    )
    assert columns == ["id", "created_at", "score", "digest", "review", "counted"]
    assert table[0] == {
        "id": "1",
        "created_at": "2027-01-15 08:00:00",
        "score": "0.8125",
        "digest": "sha256:aaaaaaaaaaaa…",
    }
    assert table[1]["review"] == '{"decision":"approve"}'
    assert table[1]["counted"] == "true"
    assert rows([]) == ([], [])


def test_dollars_read_as_the_gateway_sends_them() -> None:
    assert dollars("7.500000000") == "7.50"  # an exact decimal string
    assert dollars(12.5) == "12.50"
    assert dollars("n/a") == "n/a"
