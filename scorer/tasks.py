"""Tasks the scorer knows: their public facts, their hidden labels and the fixed public/private
split, loaded once at start from a YAML file and the label files a Secret mounts."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from collections.abc import Sequence
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
    """The Ladder's step: a public score is released only when it beats the run's best by this
    much, and is released rounded down to a multiple of it."""

    model_config = ConfigDict(extra="forbid")

    step: float = Field(default=0.01, gt=0, le=0.5)
    public_fraction: float = Field(default=0.5, gt=0, lt=1)


class ProbeAction(StrEnum):
    REFUSE = "refuse"
    FLAG = "flag"


class Probing(BaseModel):
    """When a submission looks like it probes single labels (see aar_scorer.probing)."""

    model_config = ConfigDict(extra="forbid")

    min_distance: int = Field(default=10, ge=1)
    walk_distance: int = Field(default=40, ge=1)
    walk_length: int = Field(default=4, ge=2)
    action: ProbeAction = ProbeAction.REFUSE

    @model_validator(mode="after")
    def _walk_wider_than_duplicate(self) -> Self:
        if self.walk_distance < self.min_distance:
            raise ValueError(
                f"probing.walk_distance ({self.walk_distance}) must be at least "
                f"probing.min_distance ({self.min_distance})"
            )
        return self


class TaskSpec(BaseModel):
    """One task as the configuration file describes it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    metric: Metric = Metric.ACCURACY
    labels: list[StrictInt | StrictStr] = Field(min_length=2, description="the allowed answers")
    baselines: Baselines
    labels_file: Path = Field(description="JSON {labels: [...], split_seed: str}, from a Secret")
    quota: Quota = Quota()
    feedback: Feedback = Feedback()
    probing: Probing = Probing()

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

    @property
    def name(self) -> str:
        return self.spec.name

    def accuracies(self, packed: int) -> tuple[float, float]:
        """(public, private) accuracy of packed predictions: one AND and popcount each."""
        public = (packed & self._public_truth).bit_count() / self.public_size
        private = (packed & self._private_truth).bit_count() / self.private_size
        return public, private

    def pgr(self, accuracy: float) -> float:
        """Performance Gap Recovered: 0 at the weak baseline, 1 at the ceiling."""
        weak, ceiling = self.spec.baselines.weak, self.spec.baselines.ceiling
        return (accuracy - weak) / (ceiling - weak)


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
    return tasks


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
