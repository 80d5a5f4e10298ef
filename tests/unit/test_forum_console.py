"""What the console makes of the cluster's objects and the services' answers: summaries,
charts, leaderboard rows, the review order, artifact listings and diffs."""

from __future__ import annotations

import random
import re
from typing import Any

from archives import tar_gz

from aar_common.times import when
from aar_forum.charts import Line, bar_chart, line_chart
from aar_forum.console import (
    _archive_listing,
    _files_diff,
    _leaderboard,
    _method_diff,
    _queue,
)
from aar_forum.kube import RunView, SandboxView, states
from aar_forum.ui import dollars
from aar_forum.upstream import Reading


def run_object(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "namespace": "lab",
            "name": "w2s",
            "creationTimestamp": "2026-12-05T10:00:00Z",
        },
        "spec": {"agents": 9, "model": "claude-opus-4-6", "task": {"name": "w2s-chat"}, **spec},
        **({"status": status} if status is not None else {}),
    }


def test_a_run_reads_as_its_status_says() -> None:
    view = RunView.of(
        run_object(
            {
                "conditions": [
                    {"type": "Ready", "status": "False", "reason": "BudgetExhausted",
                     "message": "the run spent $75.00 of its $100.00 budget"},
                ],
                "agents": {"desired": 9, "ready": 0, "scheduled": 0, "suspended": 9},
                "spent": "$75.00",
                "budget": "$100.00",
                "best": {"score": 0.61, "agent": "w2s-3", "submission": "12"},
                "ends": "2026-12-10T10:00:00Z",
            }
        )
    )  # fmt: skip
    assert (view.key, view.state, view.ready) == ("lab/w2s", "BudgetExhausted", False)
    assert view.spent_fraction == 0.75
    assert (view.best, view.best_agent) == (0.61, "w2s-3")
    assert (view.model, view.task, view.agents["suspended"]) == ("claude-opus-4-6", "w2s-chat", 9)


def test_a_run_without_status_or_cap_says_so() -> None:
    fresh = RunView.of(run_object())
    assert fresh.state == "Pending"
    assert "not reconciled" in fresh.message
    assert fresh.spent_fraction is None
    assert fresh.best is None
    unlimited = RunView.of(run_object({"spent": "$1,250.00", "budget": "unlimited"}))
    assert unlimited.spent_fraction is None
    over = RunView.of(run_object({"spent": "$1,250.00", "budget": "$1,000.00"}))
    assert over.spent_fraction == 1.0  # the bar is full, not past its end


def test_agents_by_state_commonest_first() -> None:
    def sandbox(name: str, reason: str) -> SandboxView:
        return SandboxView.of(
            {
                "metadata": {"name": name},
                "status": {"conditions": [{"type": "Ready", "status": "False", "reason": reason}]},
            }
        )

    found = [sandbox("a", "PodPending"), sandbox("b", "PodRunning"), sandbox("c", "PodPending")]
    assert states(found) == [("PodPending", 2), ("PodRunning", 1)]


def test_one_time_format_for_unix_times_and_rfc3339() -> None:
    assert when(1_800_000_000) == "2027-01-15 08:00 UTC"
    assert when("2027-01-15T08:00:00Z") == "2027-01-15 08:00 UTC"
    assert when("2027-01-15T09:00:00+01:00") == "2027-01-15 08:00 UTC"
    assert when(None) == when("") == "—"
    assert dollars("12.345678901") == "12.35"


def test_a_line_chart_lifts_its_pen_over_missing_values_and_escapes_its_text() -> None:
    svg = str(
        line_chart(
            "Best <PGR>",
            [0.0, 60.0, 120.0, 180.0],
            [Line("approved", [None, 0.2, None, 0.5], "approved"), Line("all", [1, 2, 3, 4], "x")],
            ceiling=("cap $5.00", 5.0),
        )
    )
    assert "Best &lt;PGR&gt;" in svg
    assert "<PGR>" not in svg
    paths = dict(re.findall(r'data-series="([^"]+)" d="([^"]*)"', svg))
    assert paths["approved"].count("M") == 2
    assert "L" not in paths["approved"]
    assert paths["all"].startswith("M")
    assert paths["all"].count("L") == 3
    assert 'class="ceiling"' in svg
    assert "cap $5.00" in svg
    assert "nothing yet" in str(line_chart("Spend", [], []))
    assert "nothing yet" in str(line_chart("Spend", [1.0], [Line("s", [None], "s")]))


def test_a_bar_chart_scales_to_its_longest_bar() -> None:
    svg = str(bar_chart("Agents by state", [("PodRunning", 8), ("PodPending", 2)]))
    widths = [float(w) for w in re.findall(r'd="M[\d.]+,[\d.]+ h([\d.]+)', svg)]
    assert widths[0] == 4 * widths[1]


def entry(id: int, status: str, private: float | None, **more: Any) -> dict[str, Any]:
    return {
        "id": id, "run": "lab/w2s", "agent": f"w2s-{id}", "created_at": 1_800_000_000,
        "method": "m", "artifact": None, "status": status, "probe": None,
        "private_score": private, "public_score": private,
        "feedback": {"score": 0.5, "released": id % 2 == 1, "message": ""},
        "review": None, **more,
    }  # fmt: skip


def test_leaderboard_rows_label_withheld_feedback_and_review_state() -> None:
    rows = _leaderboard(
        Reading(
            data={
                "submissions": [
                    entry(1, "accepted", 0.9, review={"decision": "approve"}, counted=True),
                    entry(2, "flagged", 0.8, probe={"reason": "near_duplicate"}),
                ]
            }
        )
    )
    assert [(r["rank"], r["public"], r["review"], r["counted"]) for r in rows] == [
        (1, "0.500", "approve", True),
        (2, "withheld", "pending", False),
    ]
    assert rows[1]["probe"] == "near_duplicate"
    assert rows[0]["when"] == "2027-01-15 08:00 UTC"
    assert _leaderboard(Reading(problem="scorer unavailable")) == []


def test_the_queue_puts_flagged_submissions_first() -> None:
    queue = _queue(
        Reading(
            data={
                "pending": [
                    entry(1, "accepted", 0.9),
                    entry(2, "flagged", 0.5),
                    entry(3, "accepted", 0.95),
                    entry(4, "flagged", 0.7),
                ]
            }
        )
    )
    assert [e["id"] for e in queue] == [4, 2, 3, 1]


def test_artifacts_are_listed_and_compared_by_their_files() -> None:
    before = tar_gz({"exp/train.py": b"a = 1\n", "exp/old.json": b"{}"})
    after = tar_gz({"exp/train.py": b"a = 1.5\n", "exp/new.json": b"[]"})
    old, note = _archive_listing(before, truncated=False)
    assert old == [("exp/train.py", 6), ("exp/old.json", 2)]
    assert note is None
    new, _ = _archive_listing(after, truncated=False)
    assert _files_diff({"files": old}, {"files": new}) == [
        ("added", "exp/new.json", "2 bytes"),
        ("removed", "exp/old.json", "2 bytes"),
        ("changed", "exp/train.py", "6 → 8 bytes"),
    ]
    assert _archive_listing(b"def loss(): ...", truncated=False) == (
        [],
        "a single file, not an archive",
    )
    # Files that do not compress, so that half the archive holds some of them, not all.
    large = tar_gz({f"exp/{n}.bin": random.Random(n).randbytes(40_000) for n in range(3)})
    head = large[: len(large) // 2]
    listed, note = _archive_listing(head, truncated=True)
    assert listed[0] == ("exp/0.bin", 40_000)
    assert len(listed) < 3
    assert note == "the files of its first 64 MiB"
    assert _archive_listing(head, truncated=False)[1] == "the files before the archive breaks off"


def test_the_method_diff_marks_what_changed() -> None:
    diff = _method_diff("confidence loss\nalpha 0.75\nthree seeds", "confidence loss\nalpha 0.8")
    kinds = [kind for kind, _ in diff]
    assert kinds[0] == "hunk"
    assert ("del", "-alpha 0.75") in diff
    assert ("add", "+alpha 0.8") in diff
    assert ("del", "-three seeds") in diff
    assert ("same", " confidence loss") in diff
    assert _method_diff("same", "same") == []
