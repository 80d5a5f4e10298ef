"""Tasks: loading refuses bad configuration with a message that says how to fix it; labels pack
so that scoring and Hamming distances by bit operations agree with plain counting."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from aar_common.credentials import generate_signing_key, public_key_pem
from aar_scorer.ladder import recovery_bound
from aar_scorer.main import main as scorer_main
from aar_scorer.packing import Packer
from aar_scorer.probing import ProbeIndex
from aar_scorer.tasks import (
    Probing,
    Task,
    TaskConfigError,
    bound_report,
    load_tasks,
    refuse_vacuous,
    split_positions,
    write_task_files,
)

SEED = "an-unguessable-split-seed"


def spec(**overrides: Any) -> dict[str, Any]:
    return {"name": "toy", "labels": [0, 1], "baselines": {"weak": 0.6, "ceiling": 0.9}} | overrides


def test_a_task_loads_with_its_split_and_pgr(tmp_path: Path) -> None:
    labels = random.Random(1).choices([0, 1], k=101)
    tasks = load_tasks(write_task_files(tmp_path, [(spec(), labels, SEED)]))

    task = tasks["toy"]
    assert task.size == 101
    assert task.public_size == 50  # round(101 * 0.5), the default public fraction
    assert task.public_size + task.private_size == 101
    assert task.pgr(0.6) == 0
    assert task.pgr(0.9) == pytest.approx(1)
    assert task.pgr(0.75) == pytest.approx(0.5)
    # Defaults that work: quotas, a Ladder step and probe refusal are there without settings.
    assert task.spec.quota.per_agent == 20
    assert task.spec.feedback.step == 0.05
    assert task.spec.feedback.leakage_budget == 0.125
    assert task.spec.probing.action == "refuse"


def test_accuracies_count_the_public_and_private_answers(tmp_path: Path) -> None:
    rng = random.Random(2)
    truth = [rng.choice(["a", "b", "c"]) for _ in range(300)]
    task = load_tasks(write_task_files(tmp_path, [(spec(labels=["a", "b", "c"]), truth, SEED)]))[
        "toy"
    ]
    guess = [rng.choice(["a", "b", "c"]) for _ in range(300)]

    public, private = task.accuracies(task.packer.pack(guess))

    hits = [g == t for g, t in zip(guess, truth, strict=True)]
    expected_public = sum(hits[i] for i in task.public_positions) / task.public_size
    expected_private = (sum(hits) - expected_public * task.public_size) / task.private_size
    assert public == pytest.approx(expected_public)
    assert private == pytest.approx(expected_private)


def test_ceiling_not_above_weak_is_refused_at_load(tmp_path: Path) -> None:
    bad = spec(baselines={"weak": 0.8, "ceiling": 0.8})
    with pytest.raises(TaskConfigError) as refused:
        load_tasks(write_task_files(tmp_path, [(bad, [0, 1, 1], SEED)]))
    message = str(refused.value)
    assert "baselines" in message
    assert "ceiling (0.8) must be greater than baselines.weak (0.8)" in message


@pytest.mark.parametrize(
    ("change", "labels", "message"),
    [
        ({"labels": [0, 1]}, [0, 2, 1], "answer 1 is 2, which is not one of the allowed answers"),
        ({"labels": [0, 0]}, [0, 0], "labels must be distinct"),
        ({"metric": "f1"}, [0, 1], "metric: Input should be 'accuracy'"),
        ({"quota": {"per_agent": 0}}, [0, 1], "quota.per_agent: Input should be greater"),
        ({"surprise": 1}, [0, 1], "surprise: Extra inputs are not permitted"),
        (
            {"probing": {"min_distance": 50, "walk_distance": 10}},
            [0, 1],
            "walk_distance (10) must be at least probing.min_distance (50)",
        ),
    ],
)
def test_bad_task_settings_are_refused_saying_what(
    tmp_path: Path, change: dict[str, Any], labels: list[int], message: str
) -> None:
    with pytest.raises(TaskConfigError) as refused:
        load_tasks(write_task_files(tmp_path, [(spec(**change), labels, SEED)]))
    assert message in str(refused.value)


def test_a_missing_labels_file_is_named(tmp_path: Path) -> None:
    path = write_task_files(tmp_path, [(spec(), [0, 1], SEED)])
    (tmp_path / "toy-labels.json").unlink()
    with pytest.raises(TaskConfigError) as refused:
        load_tasks(path)
    assert "task toy: cannot read its labels file" in str(refused.value)
    assert "toy-labels.json" in str(refused.value)


def test_the_split_is_fixed_by_the_seed_and_the_task() -> None:
    first = split_positions(SEED, "toy", 1000, 0.5)
    assert first == split_positions(SEED, "toy", 1000, 0.5)  # a restart sees the same split
    assert len(first) == 500
    assert first != split_positions("another-secret-seed", "toy", 1000, 0.5)
    assert first != split_positions(SEED, "other-task", 1000, 0.5)
    # Not a prefix, not every other item: about half of the first 100 items are public.
    assert 30 < len(first & set(range(100))) < 70


def test_hamming_on_packed_answers_counts_differing_answers() -> None:
    rng = random.Random(3)
    packer = Packer(["x", "y", "z", 7])
    for _ in range(50):
        a = [rng.choice(packer.labels) for _ in range(257)]
        b = [rng.choice(packer.labels) if rng.random() < 0.1 else x for x in a]
        expected = sum(x != y for x, y in zip(a, b, strict=True))
        index = ProbeIndex(Probing(), 257, len(packer.labels))
        index.add(1, packer.pack(a), 1)
        assert index.check(packer.pack(b)).distance == expected


def test_json_types_are_kept_apart() -> None:
    packer = Packer([1, "2"])
    assert packer.pack([1, "2"]) != packer.pack(["2", 1])
    with pytest.raises(ValueError, match='answer 0 is "1", which is not one of'):
        packer.pack(["1", "2"])


@pytest.mark.parametrize("bad", [2, -1, 300, "1"])
def test_an_answer_that_is_no_label_is_named_by_position(bad: int | str) -> None:
    packer = Packer([3, 0, 1])
    assert packer.indices([0, 1, 3]) == bytes([1, 2, 0])
    with pytest.raises(ValueError, match=f"answer 2 is {json.dumps(bad)}, which is not one of"):
        packer.pack([0, 1, bad, 3])


def reference_task(tmp_path: Path, **overrides: Any) -> Task:
    """The reference chat test set's size, 2,567 items, with default settings but `overrides`."""
    labels = random.Random(4).choices([0, 1], k=2567)
    return load_tasks(write_task_files(tmp_path, [(spec(**overrides), labels, SEED)]))["toy"]


def test_the_defaults_state_a_bound_well_below_a_quarter_of_the_public_labels(
    tmp_path: Path,
) -> None:
    task = reference_task(tmp_path)
    n = task.public_size
    assert n == 1284
    # A full default quota of a nine-agent run: 9 x 20 per agent, capped at 100 per run.
    run_quota = min(9 * task.spec.quota.per_agent, task.spec.quota.per_run)
    assert run_quota == 100
    limit = task.open_limit
    assert limit is not None
    stated = recovery_bound(n, min(run_quota, limit), task.spec.feedback.step)
    assert stated <= n / 8  # half of n/4: 160.5 of 1,284 public labels
    # However many runs follow, the budget holds the task's bound there.
    assert recovery_bound(n, limit, task.spec.feedback.step) <= n / 8
    # The old defaults (step 0.01, no budget) stated about n/4 for that one run alone.
    assert recovery_bound(n, run_quota, 0.01) > 0.96 * n / 4
    report = bound_report(task)
    assert not report.vacuous
    assert "74.6 bits per full run quota (100 submissions" in report.text
    assert f"feedback open for {limit} scored submissions" in report.text


@pytest.mark.parametrize(
    "overrides",
    [
        {"feedback": {"leakage_budget": 0.25}},
        # No budget, and one full run quota alone passes n/4 (359.9 of 1,284 labels).
        {"feedback": {"leakage_budget": None, "step": 0.01}, "quota": {"per_run": 200}},
    ],
)
def test_a_vacuous_bound_is_refused_unless_allowed(
    tmp_path: Path, overrides: dict[str, Any]
) -> None:
    task = reference_task(tmp_path, **overrides)
    assert bound_report(task).vacuous
    with pytest.raises(TaskConfigError) as refused:
        refuse_vacuous({"toy": task})
    message = str(refused.value)
    assert "task toy: its leakage bound says nothing" in message
    assert "feedback.allow_vacuous_bound: true" in message
    overrides["feedback"]["allow_vacuous_bound"] = True
    allowed = reference_task(tmp_path, **overrides)
    assert refuse_vacuous({"toy": allowed})[0].endswith("; vacuous, allowed")


def test_no_budget_with_a_coarse_step_is_not_vacuous_for_one_run(tmp_path: Path) -> None:
    report = bound_report(reference_task(tmp_path, feedback={"leakage_budget": None}))
    assert not report.vacuous
    assert "no leakage budget: the bound grows with every scored submission" in report.text


def test_aar_scorer_refuses_a_vacuous_config_saying_how_to_fix_it(tmp_path: Path) -> None:
    key = tmp_path / "public-key.pem"
    key.write_bytes(public_key_pem(generate_signing_key()))
    labels = random.Random(4).choices([0, 1], k=2567)
    tasks = write_task_files(tmp_path, [(spec(feedback={"leakage_budget": 0.3}), labels, SEED)])
    arguments = ["--tasks", str(tasks), "--data-dir", str(tmp_path), "--public-key", str(key)]
    with pytest.raises(SystemExit) as refused:
        scorer_main(arguments)
    assert str(refused.value).startswith("aar-scorer: task toy: its leakage bound says nothing")
    assert "set feedback.leakage_budget below 0.25" in str(refused.value)
