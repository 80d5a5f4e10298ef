"""Status maths: validation beyond the schema, why a run stops, conditions, agent-hours."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from prometheus_client import REGISTRY, generate_latest

from aar_operator import metrics
from aar_operator.budget import agent_budget
from aar_operator.config import OperatorConfig, add_arguments, from_arguments
from aar_operator.models import Best, ResearchRunSpec, Spend, format_time, money
from aar_operator.services import RunSpend, Totals, budget_request
from aar_operator.status import (
    Stop,
    aggregate,
    budget_stop,
    pod_scheduled,
    run_stop,
    running_seconds,
    set_condition,
    validate_run,
    with_default_cap,
)

CREATED = datetime(2026, 11, 1, tzinfo=UTC)


def spec(**overrides: Any) -> ResearchRunSpec:
    base: dict[str, Any] = {
        "agents": 3,
        "task": {"name": "t"},
        "sandbox": {"image": "i"},
        "budget": {"usd": 30},
    }
    return ResearchRunSpec.model_validate({**base, **overrides})


def test_a_valid_run_has_no_problems() -> None:
    assert (
        validate_run(
            "w2s", spec(directions=["a", "b"], budget={"deadline": "120h", "usd": 30}), CREATED
        )
        == []
    )


def test_more_directions_than_agents_is_invalid_and_says_how_to_fix_it() -> None:
    [problem] = validate_run("w2s", spec(directions=["a", "b", "c", "d"]), CREATED)
    assert "4 entries but spec.agents is 3" in problem
    assert "raise spec.agents" in problem


def test_a_deadline_before_creation_is_invalid() -> None:
    [problem] = validate_run(
        "w2s", spec(budget={"deadline": "2026-10-01T00:00:00Z", "usd": 30}), CREATED
    )
    assert "before the run was created" in problem


def test_a_deadline_that_is_neither_duration_nor_time_is_invalid() -> None:
    [problem] = validate_run("w2s", spec(budget={"deadline": "next week", "usd": 30}), CREATED)
    assert "neither a duration" in problem


def test_a_run_name_too_long_for_its_agent_names_is_invalid() -> None:
    [problem] = validate_run("r" * 62, spec(agents=12), CREATED)
    assert "shorten the run's name to at most 60" in problem


def reason(stop: Stop | None) -> str | None:
    return None if stop is None else stop.reason


def test_stop_reasons_in_order() -> None:
    now = CREATED + timedelta(hours=1)
    spent = Spend(usd="100.00")
    assert run_stop(spec(), CREATED, now, Spend()) is None
    # Suspended before a passed deadline, a passed deadline before a spent budget.
    everything = spec(suspend=True, budget={"deadline": "30m", "usd": 100})
    assert reason(run_stop(everything, CREATED, now, spent)) == "Suspended"
    late = spec(budget={"deadline": "30m", "usd": 100})
    assert reason(run_stop(late, CREATED, now, spent)) == "DeadlineExceeded"
    assert reason(run_stop(late, CREATED, now - timedelta(minutes=31), spent)) == "BudgetExhausted"
    absolute = spec(budget={"deadline": "2026-11-01T02:00:00Z"})
    assert run_stop(absolute, CREATED, now, Spend()) is None
    passed = run_stop(absolute, CREATED, now + timedelta(hours=1), Spend())
    assert reason(passed) == "DeadlineExceeded"
    assert "2026-11-01T02:00:00Z has passed" in passed.message  # type: ignore[union-attr]


def test_budget_exhausted_at_the_cap_in_dollars_or_agent_hours() -> None:
    now = CREATED
    capped = spec(budget={"usd": 100, "agentHours": 10})
    assert run_stop(capped, CREATED, now, Spend(usd="99.99", agent_hours=9.9)) is None
    dollars = run_stop(capped, CREATED, now, Spend(usd="100.00"))
    assert dollars is not None
    assert dollars.reason == "BudgetExhausted"
    assert "$100.00" in dollars.message
    hours = run_stop(capped, CREATED, now, Spend(agent_hours=10.0))
    assert reason(hours) == "BudgetExhausted"
    assert "10.00 of its 10 agent-hours" in hours.message  # type: ignore[union-attr]


def test_condition_transition_time_moves_only_when_status_changes() -> None:
    first = set_condition([], "Ready", "False", "Pending", "", CREATED, 1)
    later = CREATED + timedelta(minutes=5)
    same = set_condition(first, "Ready", "False", "Unschedulable", "no nodes", later, 2)
    assert same[0].last_transition_time == format_time(CREATED)
    assert same[0].reason == "Unschedulable"
    assert same[0].observed_generation == 2
    flipped = set_condition(same, "Ready", "True", "Running", "", later, 2)
    assert flipped[0].last_transition_time == format_time(later)
    assert len(flipped) == 1


def _pod(phase: str, started: datetime | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if started is not None:
        status["containerStatuses"] = [{"state": {"running": {"startedAt": format_time(started)}}}]
    return {"status": status}


def test_running_time_counts_from_start_or_last_accounting() -> None:
    now = CREATED + timedelta(hours=2)
    assert running_seconds(_pod("Running", CREATED), "", now) == 7200
    since = format_time(CREATED + timedelta(hours=1, minutes=30))
    assert running_seconds(_pod("Running", CREATED), since, now) == 1800
    assert running_seconds(_pod("Pending"), "", now) == 0
    assert running_seconds(None, "", now) == 0


def test_pod_scheduled_copies_the_schedulers_words() -> None:
    pod = {
        "status": {
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": "0/0 nodes are available"}
            ]
        }
    }  # fmt: skip
    assert pod_scheduled(pod) == ("False", "Unschedulable", "0/0 nodes are available")
    assert pod_scheduled(None)[1] == "NoPod"


def test_aggregate_counts_ready_and_sums_hours() -> None:
    def box(ready: str, scheduled: str, hours: float, reason: str = "Running") -> dict[str, Any]:
        return {
            "status": {
                "conditions": [
                    {"type": "Ready", "status": ready, "reason": reason},
                    {"type": "PodScheduled", "status": scheduled},
                ],
                "spend": {"agentHours": hours, "gpuHours": hours * 2},
            }
        }

    counts, spend = aggregate(
        4, [box("True", "True", 1.5), box("False", "False", 0.25, "Suspended"), {"metadata": {}}]
    )
    assert (counts.desired, counts.ready, counts.scheduled, counts.suspended) == (4, 1, 1, 1)
    assert (spend.agent_hours, spend.gpu_hours) == (1.75, 3.5)


def test_gateway_totals_become_status_spend_to_the_micro_dollar() -> None:
    spend = RunSpend.model_validate(
        {"run": {"usd": "12.3456784", "input_tokens": 10, "output_tokens": 5,
                 "cache_creation_input_tokens": 2, "cache_read_input_tokens": 3, "requests": 1},
         "agents": {"w2s-0": {"usd": 1.005}}}
    )  # fmt: skip
    assert spend.run.spend().usd == "12.345678"
    assert spend.run.spend().input_tokens == 15
    assert spend.agents["w2s-0"].usd == Decimal("1.005")
    assert Totals().spend(agent_hours=2.0).agent_hours == 2.0


def test_budget_request_gives_every_agent_its_share() -> None:
    run = spec(agents=4, budget={"usd": 1000})
    request = budget_request(run, ["a-0", "a-1", "a-2", "a-3"], agent_budget(run))
    assert request.model_dump() == {"usd": 1000.0, "agents": {f"a-{i}": 250.0 for i in range(4)}}
    unbounded = spec(agents=2, budget={"usdUnlimited": True})
    assert budget_request(unbounded, ["a-0", "a-1"], agent_budget(unbounded)).usd is None


def test_config_flags_win_over_environment_which_wins_over_defaults() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    env = {
        "AAR_OPERATOR_NAMESPACE": "ops",
        "AAR_GATEWAY_URL": "http://gw:1",
        "AAR_OPERATOR_SERVICES": "false",
    }
    config = from_arguments(parser.parse_args(["--gateway-url", "http://flag:2"]), env)
    assert (config.namespace, config.gateway_url, config.services) == (
        "ops",
        "http://flag:2",
        False,
    )
    assert from_arguments(parser.parse_args([]), {}) == OperatorConfig()
    with pytest.raises(ValueError, match="resync_seconds"):
        from_arguments(parser.parse_args(["--resync-seconds", "0"]), {})


def test_a_budget_the_gateway_refused_for_is_exhausted_below_its_cap() -> None:
    # The gateway holds each request's worst case, so spend stops short of the cap: its refusal
    # is what says the dollars are spent.
    refused = Totals.model_validate({"usd": "0.031", "exhausted": True}).spend()
    stop = budget_stop(0.04, None, refused, "agent")
    assert stop is not None
    assert stop.reason == "BudgetExhausted"
    assert "less than its next model request could cost" in stop.message
    assert budget_stop(0.04, None, Totals.model_validate({"usd": "0.031"}).spend(), "agent") is None
    # Without a dollar cap there is nothing to exhaust.
    assert budget_stop(None, None, refused, "agent") is None


def test_a_run_without_a_dollar_cap_is_refused_unless_it_says_so_or_the_operator_has_one() -> None:
    uncapped = spec(budget={"agentHours": 10})
    [problem] = validate_run("w2s", with_default_cap(uncapped, None), CREATED)
    assert problem.startswith("spec.budget.usd is not set")
    assert "budget: {usd: 50}" in problem
    assert "budget: {usdUnlimited: true}" in problem
    # Uncapped on purpose.
    assert validate_run("w2s", spec(budget={"usdUnlimited": True}), CREATED) == []
    # The operator's default cap, where the run gives none.
    defaulted = with_default_cap(uncapped, 25.0)
    assert (defaulted.budget.usd, defaulted.budget.agent_hours) == (25.0, 10)
    assert validate_run("w2s", defaulted, CREATED) == []
    assert with_default_cap(spec(budget={"usd": 5}), 25.0).budget.usd == 5
    assert with_default_cap(spec(budget={"usdUnlimited": True}), 25.0).budget.usd is None
    [both] = validate_run("w2s", spec(budget={"usd": 5, "usdUnlimited": True}), CREATED)
    assert "both usd (5) and usdUnlimited" in both


def test_dollars_read_the_same_everywhere() -> None:
    assert money(Decimal("1234.5")) == "$1,234.50"
    assert money(Decimal("0.031000")) == "$0.03"
    assert money(Decimal("0.004")) == "<$0.01"
    assert money(Decimal(0)) == "$0.00"
    assert money(18000.0) == "$18,000.00"
    assert money(None) == "unlimited"


def test_a_runs_series_go_with_it() -> None:
    def exported() -> str:
        return generate_latest(REGISTRY).decode()

    metrics.run_figures("lab", "gone", Spend(usd="1.50"), Best(score=0.42, agent="gone-1"))
    with metrics.reconciling("ResearchRun", "lab", "gone"):
        pass
    text = exported()
    assert 'aar_run_best_score{namespace="lab",run="gone"} 0.42' in text
    assert (
        'aar_operator_reconcile_duration_seconds_count{kind="ResearchRun",namespace="lab",run="gone"}'
        in text
    )
    assert "_created" not in text
    metrics.run_gone("lab", "gone")
    assert 'run="gone"' not in exported()
