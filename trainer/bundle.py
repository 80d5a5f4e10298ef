"""The task bundle: a folder with `task.json` (the manifest) and one jsonl file per split.

Splits, each a file of examples `{"id", "text", "text_pair"?, "label"?}`:

- `weak_train`: labelled ground truth the weak teacher is trained on;
- `unlabelled`: inputs the weak teacher labels and the strong student learns from;
- `validation`: a labelled local split to measure accuracy and PGR before submitting;
- `test`: inputs without labels, predicted in this order for the scorer;
- `ceiling_train` (optional): labelled ground truth for the strong ceiling; without it the
  ceiling is trained on `weak_train`.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MANIFEST = "task.json"
Label = int | str
SplitName = Literal["weak_train", "unlabelled", "validation", "test", "ceiling_train"]
LABELLED_SPLITS: tuple[SplitName, ...] = ("weak_train", "validation", "ceiling_train")
DEFAULT_SPLITS: dict[SplitName, str] = {
    "weak_train": "weak_train.jsonl",
    "unlabelled": "unlabelled.jsonl",
    "validation": "validation.jsonl",
    "test": "test.jsonl",
}


class BundleError(ValueError):
    """A bundle that cannot be read; the message says what is wrong and how to fix it."""


class Example(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    text: str = Field(min_length=1)
    # The second segment of a pair task (question and answer, prompt and response).
    text_pair: str | None = None
    label: Label | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    # Allowed label values, in class-index order: the model's class i predicts labels[i].
    labels: list[Label] = Field(min_length=2)
    metric: Literal["accuracy"] = "accuracy"
    splits: dict[SplitName, str] = Field(default_factory=lambda: dict(DEFAULT_SPLITS))

    @model_validator(mode="after")
    def _check(self) -> Manifest:
        missing = {"weak_train", "unlabelled", "validation", "test"} - set(self.splits)
        if missing:
            raise ValueError(f"splits must name a file for {sorted(missing)}")
        if len(set(map(str, self.labels))) != len(self.labels):
            raise ValueError(f"labels must be distinct (got {self.labels})")
        return self

    def label_index(self, label: Label) -> int:
        """The class index of a label value; the error names the allowed values."""
        for index, allowed in enumerate(self.labels):
            if allowed == label:
                return index
        raise BundleError(f"label {label!r} is not one of the task's labels {self.labels}")


class Bundle:
    """A task bundle on disk, read-only (it is mounted read-only at /task in a sandbox)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise BundleError(
                f"{self.root} is not a task bundle: it has no {MANIFEST} "
                "(make one with `aar-train convert` or `aar-train demo`)"
            )
        try:
            self.manifest = Manifest.model_validate_json(path.read_text())
        except ValidationError as error:
            raise BundleError(f"{path} is not a valid manifest: {error}") from error

    @property
    def has_ceiling_split(self) -> bool:
        return "ceiling_train" in self.manifest.splits

    def split(self, name: SplitName) -> list[Example]:
        """The examples of a split; labelled splits must carry a known label on every line."""
        file = self.manifest.splits.get(name)
        if file is None:
            raise BundleError(f"task {self.manifest.name} has no {name} split")
        examples = read_examples(self.root / file)
        if name in LABELLED_SPLITS:
            for example in examples:
                if example.label is None:
                    raise BundleError(f"{self.root / file}: example {example.id} has no label")
                self.manifest.label_index(example.label)
        return examples

    def labels(self, examples: Sequence[Example]) -> list[int]:
        """Class indices of labelled examples."""
        return [self.manifest.label_index(_labelled(example)) for example in examples]


def _labelled(example: Example) -> Label:
    if example.label is None:
        raise BundleError(f"example {example.id} has no label")
    return example.label


def read_examples(path: Path) -> list[Example]:
    if not path.is_file():
        raise BundleError(f"{path} does not exist (the manifest names it)")
    examples = []
    with path.open() as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                examples.append(Example.model_validate_json(line))
            except ValidationError as error:
                raise BundleError(f"{path}:{number}: not an example: {error}") from error
    if not examples:
        raise BundleError(f"{path} has no examples")
    return examples


def write_examples(path: Path, examples: Iterable[Example], *, with_labels: bool = True) -> None:
    with path.open("w") as file:
        for example in examples:
            record = example.model_dump(exclude_none=True)
            if not with_labels:
                record.pop("label", None)
            file.write(json.dumps(record) + "\n")


def write_scorer_labels(path: Path, labels: Sequence[Label]) -> None:
    """Test labels as the scorer's labels file: `{"labels": [...], "split_seed": secret}`, one
    label per test input in bundle order; the split seed picks the scorer's public part."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump({"labels": list(labels), "split_seed": secrets.token_hex(16)}, file)
        file.write("\n")


def write_bundle(
    root: Path,
    manifest: Manifest,
    splits: Mapping[SplitName, Sequence[Example]],
) -> Bundle:
    """Write a bundle; `unlabelled` and `test` lose their labels on the way to disk."""
    root.mkdir(parents=True, exist_ok=True)
    manifest.splits = {name: f"{name}.jsonl" for name in splits}
    for name, examples in splits.items():
        keep = name in LABELLED_SPLITS
        write_examples(root / manifest.splits[name], examples, with_labels=keep)
    (root / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
    return Bundle(root)
