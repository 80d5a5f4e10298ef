"""Tasks the scorer knows: their public facts, their hidden labels and the fixed public/private
split, loaded once at start from a YAML file and the label files a Secret mounts."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from aar_common.validation import describe
from aar_scorer.ladder import open_submissions, recovery_bound, transcript_bits
from aar_scorer.packing import Packer


class TaskConfigError(Exception):
    """The task configuration or a label file is wrong; the message says where and how to fix it."""


class Metric(StrEnum):
    ACCURACY = "accuracy"


class Baselines(BaseModel):
    """Accuracies that anchor PGR: the weak teacher's, and the strong model's trained on truth."""

    model_config = ConfigDict(extra="forbid")

    weak: float = Field(ge=0, le=1, description="accuracy of the weak supervisor")
    ceiling: float = Field(ge=0, le=1, description="accuracy of the strong model on true labels")

    @model_validator(mode="after")
    def _ceiling_above_weak(self) -> Self:
        if self.ceiling <= self.weak:
            raise ValueError(
                f"baselines.ceiling ({self.ceiling}) must be greater than baselines.weak "
                f"({self.weak}): PGR divides by ceiling - weak"
            )
        return self


class Quota(BaseModel):
    """How many submissions an agent and a whole run may make per window."""

    model_config = ConfigDict(extra="forbid")

    per_agent: int = Field(default=20, ge=1)
    per_run: int = Field(default=100, ge=1)
    window_seconds: int = Field(default=86400, ge=1)


class Feedback(BaseModel):
    """The task's Ladder and leakage budget (docs/scorer.md, Feedback): a public score is
    released only when it beats the task's best by `step`, rounded down to a multiple of it,
    and only while the bound on what the task's feedback leaks stays within the budget."""

    model_config = ConfigDict(extra="forbid")

    step: float = Field(default=0.05, gt=0, le=0.5)
    public_fraction: float = Field(default=0.5, gt=0, lt=1)
    leakage_budget: float | None = Field(
        default=0.125,
        gt=0,
        le=1,
        description="the most public labels beyond chance the stated bound may admit over the "
        "task's life, as a fraction of the public labels; null for no budget",
    )
    allow_vacuous_bound: bool = Field(
        default=False, description="serve the task even when its bound says nothing (n/4 or more)"
    )


class ProbeAction(StrEnum):
    REFUSE = "refuse"
    FLAG = "flag"


class Probing(BaseModel):
    """When a submission looks like it probes single labels (see aar_scorer.probing)."""

    model_config = ConfigDict(extra="forbid")

    min_distance: int = Field(default=10, ge=1)
    walk_distance: int = Field(default=40, ge=1)
    walk_length: int = Field(default=4, ge=2)
    fan_distance: int | None = Field(default=None, ge=1, description="default walk_distance")
    fan_size: int = Field(default=8, ge=2)
    action: ProbeAction = ProbeAction.REFUSE

    @model_validator(mode="after")
    def _wider_than_duplicate(self) -> Self:
        for name in ("walk_distance", "fan_distance"):
            distance = getattr(self, name)
            if distance is not None and distance < self.min_distance:
                raise ValueError(
                    f"probing.{name} ({distance}) must be at least "
                    f"probing.min_distance ({self.min_distance})"
                )
        return self

    @property
    def fan_radius(self) -> int:
        """How close a later submission must be to join a fan around an earlier one."""
        return self.walk_distance if self.fan_distance is None else self.fan_distance


TASK_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class Reproduction(BaseModel):
    """Where a task's leading submissions are run again from their code (docs/scorer.md,
    Reproduction): `fresh`, the same task on a re-drawn split its agents never saw (same
    models), and `transfer`, other tasks (another dataset or model pair). Each is a task of this
    file with `verification_only: true`, whose bundle the operator mounts in the Job."""

    model_config = ConfigDict(extra="forbid")

    fresh: str = Field(pattern=TASK_NAME, description="the re-drawn split, a verification task")
    transfer: list[str] = Field(
        default_factory=list, description="transfer tasks, verification tasks of this file"
    )


class TaskSpec(BaseModel):
    """One task as the configuration file describes it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=TASK_NAME)
    metric: Metric = Metric.ACCURACY
    labels: list[StrictInt | StrictStr] = Field(min_length=2, description="the allowed answers")
    baselines: Baselines
    labels_file: Path = Field(description="JSON {labels: [...], split_seed: str}, from a Secret")
    quota: Quota = Quota()
    feedback: Feedback = Feedback()
    probing: Probing = Probing()
    reproduction: Reproduction | None = None
    verification_only: bool = Field(
        default=False,
        description="only reproductions are scored on it: no run may register for it, and "
        "nothing about its labels is ever released",
    )

    @model_validator(mode="after")
    def _distinct_labels(self) -> Self:
        if len({json.dumps(label) for label in self.labels}) != len(self.labels):
            raise ValueError(f"labels must be distinct (got {self.labels})")
        return self


class TasksFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[TaskSpec] = Field(default_factory=list)


class HiddenLabels(BaseModel):
    """What a labels file holds; the seed fixes the public/private split and never leaves."""

    model_config = ConfigDict(extra="forbid")

    labels: list[StrictInt | StrictStr] = Field(min_length=2)
    split_seed: str = Field(min_length=16)


class Task:
    """A loaded task: the spec, the hidden labels packed for scoring, and the split."""

    def __init__(self, spec: TaskSpec, hidden: HiddenLabels) -> None:
        self.spec = spec
        self.packer = Packer(spec.labels)
        self.size = len(hidden.labels)
        try:
            self._truth = self.packer.pack(hidden.labels)
        except ValueError as error:
            raise TaskConfigError(f"task {spec.name}: {spec.labels_file}: {error}") from error
        self.public_positions = split_positions(
            hidden.split_seed, spec.name, self.size, spec.feedback.public_fraction
        )
        public_mask = self.packer.mask(self.public_positions, self.size)
        self._public_truth = self._truth & public_mask
        self._private_truth = self._truth & ~public_mask
        self.public_size = len(self.public_positions)
        self.private_size = self.size - self.public_size
        # How many scored submissions of the task's life get answers that depend on labels
        # (None: no budget, no limit); counts only, never labels, decide it.
        budget = self.budget_labels
        self.open_limit = (
            None
            if budget is None
            else open_submissions(self.public_size, spec.feedback.step, budget)
        )

    @property
    def name(self) -> str:
        return self.spec.name

    def accuracy(self, packed: int) -> float:
        """Accuracy over every label: how a reproduction on a verification task is scored."""
        return (packed & self._truth).bit_count() / self.size

    def accuracies(self, packed: int) -> tuple[float, float]:
        """(public, private) accuracy of packed predictions: one AND and popcount each."""
        public = (packed & self._public_truth).bit_count() / self.public_size
        private = (packed & self._private_truth).bit_count() / self.private_size
        return public, private

    def pgr(self, accuracy: float) -> float:
        """Performance Gap Recovered: 0 at the weak baseline, 1 at the ceiling."""
        weak, ceiling = self.spec.baselines.weak, self.spec.baselines.ceiling
        return (accuracy - weak) / (ceiling - weak)

    @property
    def budget_labels(self) -> float | None:
        """The leakage budget in public labels beyond chance, or None for no budget."""
        fraction = self.spec.feedback.leakage_budget
        return None if fraction is None else fraction * self.public_size


@dataclass(frozen=True)
class BoundReport:
    """What a task's configuration implies for the stated bound, said at start."""

    text: str
    vacuous: bool  # the bound can say nothing: n/4 or more labels beyond chance


def bound_report(task: Task) -> BoundReport:
    """The bound a task's feedback settings imply: bits per full run quota, and labels beyond
    chance at the leakage budget; vacuous when the budget is n/4 or more, or, without a budget,
    when one full run quota's bound is."""
    feedback, n = task.spec.feedback, task.public_size
    run_quota = task.spec.quota.per_run
    quarter = n / 4
    bits = transcript_bits(run_quota, feedback.step)
    per_run = recovery_bound(n, run_quota, feedback.step)
    text = (
        f"Task {task.name}: {n} public labels, step {feedback.step}: {bits:.1f} bits per full run "
        f"quota ({run_quota} submissions; {per_run:.1f} labels beyond chance); "
    )
    budget, limit = task.budget_labels, task.open_limit
    if budget is None or limit is None:
        vacuous = per_run >= quarter
        text += (
            "no leakage budget: the bound grows with every scored submission of every run "
            f"(n/4 = {quarter:.1f})"
        )
    else:
        vacuous = budget >= quarter
        at_budget = recovery_bound(n, limit, feedback.step)
        text += (
            f"leakage budget {feedback.leakage_budget} ({budget:.1f} labels): feedback open for "
            f"{limit} scored submissions of the task, then closed; the bound at the budget is "
            f"{at_budget:.1f} labels beyond chance (n/4 = {quarter:.1f})"
        )
    return BoundReport(text, vacuous)


def refuse_vacuous(tasks: dict[str, Task]) -> list[str]:
    """Each task's bound report; TaskConfigError, saying how to fix it, for a task whose bound
    is vacuous unless its configuration allows that explicitly."""
    lines = []
    for task in tasks.values():
        if task.spec.verification_only:
            lines.append(f"Task {task.name}: verification only, nothing released")
            continue
        report = bound_report(task)
        if report.vacuous and not task.spec.feedback.allow_vacuous_bound:
            raise TaskConfigError(
                f"task {task.name}: its leakage bound says nothing ({report.text}); set "
                "feedback.leakage_budget below 0.25 (a fraction of the public labels), or a "
                "coarser feedback.step or smaller quota.per_run without a budget, or "
                "feedback.allow_vacuous_bound: true to serve it anyway"
            )
        lines.append(report.text + ("; vacuous, allowed" if report.vacuous else ""))
    return lines


def split_positions(seed: str, task: str, size: int, public_fraction: float) -> frozenset[int]:
    """The public positions: a fixed pseudo-random subset derived from the secret seed, so the
    split survives restarts and cannot be guessed without the seed."""
    digest = hmac.new(seed.encode(), f"aar-scorer-split:{task}".encode(), hashlib.sha256).digest()
    count = min(size - 1, max(1, round(size * public_fraction)))
    return frozenset(random.Random(int.from_bytes(digest, "big")).sample(range(size), count))


def _parse(model: type[BaseModel], data: object, where: str) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise TaskConfigError(f"{where}: {describe(error, whole='top level')}") from None


def load_tasks(config_path: Path) -> dict[str, Task]:
    """Read the tasks file and every task's labels; refuse anything inconsistent, saying what."""
    try:
        raw = yaml.safe_load(config_path.read_text())
    except OSError as error:
        raise TaskConfigError(f"cannot read the tasks file {config_path}: {error}") from error
    except yaml.YAMLError as error:
        raise TaskConfigError(f"{config_path} is not valid YAML: {error}") from error
    parsed = _parse(TasksFile, raw, str(config_path))
    assert isinstance(parsed, TasksFile)
    tasks: dict[str, Task] = {}
    for spec in parsed.tasks:
        if spec.name in tasks:
            raise TaskConfigError(f"{config_path}: task {spec.name} is defined twice")
        labels_path = config_path.parent / spec.labels_file
        try:
            hidden_raw = json.loads(labels_path.read_text())
        except OSError as error:
            raise TaskConfigError(
                f"task {spec.name}: cannot read its labels file {labels_path}: {error}"
            ) from error
        except ValueError as error:
            raise TaskConfigError(
                f"task {spec.name}: labels file {labels_path} is not JSON: {error}"
            ) from error
        hidden = _parse(HiddenLabels, hidden_raw, f"task {spec.name}: {labels_path}")
        assert isinstance(hidden, HiddenLabels)
        tasks[spec.name] = Task(spec.model_copy(update={"labels_file": labels_path}), hidden)
    _check_reproduction_targets(config_path, tasks)
    return tasks


def _check_reproduction_targets(config_path: Path, tasks: dict[str, Task]) -> None:
    """Every reproduction target is a verification task of the file, with the same answers
    as the task it reproduces for `fresh` (the same task, re-drawn)."""
    for task in tasks.values():
        reproduction = task.spec.reproduction
        if reproduction is None:
            continue
        if task.spec.verification_only:
            raise TaskConfigError(
                f"{config_path}: task {task.name} is verification_only and has a reproduction "
                "section; only tasks agents work on are reproduced"
            )
        for kind, name in [("fresh", reproduction.fresh)] + [
            ("transfer", name) for name in reproduction.transfer
        ]:
            target = tasks.get(name)
            if target is None or not target.spec.verification_only:
                raise TaskConfigError(
                    f"{config_path}: task {task.name}: reproduction.{kind} names {name!r}, "
                    "which must be a task of this file with verification_only: true (its labels "
                    "must never be fed back to agents)"
                )
            if kind == "fresh" and target.spec.labels != task.spec.labels:
                raise TaskConfigError(
                    f"{config_path}: task {task.name}: its fresh split {name} has labels "
                    f"{target.spec.labels}, not the task's {task.spec.labels}"
                )


def write_task_files(
    directory: Path, tasks: Sequence[tuple[dict[str, Any], Sequence[int | str], str]]
) -> Path:
    """Write a tasks file and one labels file per task (spec, hidden labels, split seed), as a
    chart's ConfigMap and Secret would mount them; returns the tasks file. For demos, tests and
    benchmarks with tasks made up on the spot."""
    directory.mkdir(parents=True, exist_ok=True)
    specs = []
    for spec, labels, seed in tasks:
        labels_file = f"{spec['name']}-labels.json"
        (directory / labels_file).write_text(
            json.dumps({"labels": list(labels), "split_seed": seed})
        )
        specs.append({**spec, "labels_file": labels_file})
    path = directory / "tasks.yaml"
    path.write_text(yaml.safe_dump({"tasks": specs}, sort_keys=False))
    return path
