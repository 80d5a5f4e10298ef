"""The weak-to-strong pipeline: train the weak teacher on ground truth, label the unlabelled
split with its probabilities, train the strong student on them (naive, auxiliary confidence
loss, or confident-label filtering), train the ceiling (the student's model on ground truth),
and measure each on the validation split; test predictions in the scorer's format."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from aar_trainer.bundle import Bundle, Example, Label, SplitName
from aar_trainer.models import context_length, load_classifier, load_tokenizer, unwrap
from aar_trainer.train import (
    TrainOptions,
    TrainStats,
    encode,
    fit,
    predict_probs,
    seed_everything,
)

Method = Literal["naive", "aux-conf", "confident"]
METHODS: tuple[Method, ...] = ("naive", "aux-conf", "confident")


class StageResult(BaseModel):
    """One trained model: its validation accuracy, its test predictions and how it trained."""

    model: str
    accuracy: float
    predictions: list[Label]
    train: dict[str, float]


def accuracy(probs: torch.Tensor, labels: Sequence[int]) -> float:
    return float((probs.argmax(-1) == torch.tensor(list(labels))).float().mean())


def pgr(weak: float, w2s: float, ceiling: float) -> float | None:
    """Performance gap recovered; None when the ceiling does not beat the weak teacher."""
    gap = ceiling - weak
    return (w2s - weak) / gap if gap > 0 else None


def confident_subset(probs: torch.Tensor, keep_fraction: float) -> list[int]:
    """Indices of the examples the teacher is most sure of, the same share of each class it
    predicts (so filtering does not shift the class balance)."""
    predicted = probs.argmax(-1)
    confidence = probs.max(-1).values
    keep: list[int] = []
    for label in predicted.unique().tolist():  # type: ignore[no-untyped-call]
        members = (predicted == label).nonzero().flatten()
        count = max(1, round(keep_fraction * len(members)))
        order = confidence[members].argsort(descending=True)[:count]
        keep += members[order].tolist()
    return sorted(keep)


def _stats(stats: TrainStats) -> dict[str, float]:
    return {
        "steps": stats.steps,
        "seconds": round(stats.seconds, 3),
        "tokens": stats.real_tokens,
        "tokens_per_second": round(stats.tokens_per_second, 1),
        "padding_fraction": round(stats.padding_fraction, 4),
        "final_loss": stats.final_loss,
    }


@dataclass
class Trained:
    module: torch.nn.Module
    tokenizer: Any
    stats: TrainStats | None  # None: loaded for inference only
    max_length: int


class Stage:
    """Train one model on targets, then predict validation and test (and anything else)."""

    def __init__(self, bundle: Bundle, device: torch.device, *, progress: bool) -> None:
        self.bundle = bundle
        self.device = device
        self.progress = progress
        self.validation = bundle.split("validation")
        self.test = bundle.split("test")

    def train(
        self,
        model: str,
        examples: Sequence[Example],
        targets: torch.Tensor,
        options: TrainOptions,
        seed: int,
        description: str,
    ) -> Trained:
        seed_everything(seed)
        tokenizer = load_tokenizer(model)
        module = load_classifier(
            model,
            len(self.bundle.manifest.labels),
            options.model,
            self.device,
            tokenizer.pad_token_id,
        )
        max_length = min(options.max_length, context_length(module))
        stats = fit(
            module,
            encode(tokenizer, examples, max_length),
            targets,
            options,
            pad_token_id=tokenizer.pad_token_id,
            device=self.device,
            seed=seed,
            description=description,
            progress=self.progress,
        )
        return Trained(module, tokenizer, stats, max_length)

    def probs(
        self, trained: Trained, examples: Sequence[Example], options: TrainOptions, what: str
    ) -> torch.Tensor:
        return predict_probs(
            trained.module,
            encode(trained.tokenizer, examples, trained.max_length),
            options,
            pad_token_id=trained.tokenizer.pad_token_id,
            device=self.device,
            description=what,
            progress=self.progress,
        )

    def evaluate(self, model: str, trained: Trained, options: TrainOptions) -> StageResult:
        labels = self.bundle.manifest.labels
        validation = self.probs(trained, self.validation, options, "validation")
        test = self.probs(trained, self.test, options, "test")
        return StageResult(
            model=model,
            accuracy=accuracy(validation, self.bundle.labels(self.validation)),
            predictions=[labels[i] for i in test.argmax(-1).tolist()],
            train=_stats(trained.stats) if trained.stats else {},
        )


def one_hot(labels: Sequence[int], classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(list(labels)), classes).float()


class Experiment(BaseModel):
    """A weak-to-strong experiment on one task, for one seed."""

    model_config = ConfigDict(extra="forbid")

    task: Path
    weak_model: str = "Qwen/Qwen1.5-0.5B-Chat"
    strong_model: str = "Qwen/Qwen3-4B-Base"
    method: Method = "naive"
    seed: int = 0
    ceiling: bool = True
    keep_fraction: float = Field(default=0.5, gt=0, le=1, description="share kept by `confident`")
    weak: TrainOptions = Field(default_factory=TrainOptions)
    strong: TrainOptions = Field(default_factory=TrainOptions)


class WeakLabels(BaseModel):
    """The weak teacher's probabilities on the unlabelled split, by example id."""

    model: str
    labels: list[Label]
    ids: list[str]
    probs: list[list[float]]


def train_weak(
    experiment: Experiment, device: torch.device, *, progress: bool = True
) -> tuple[StageResult, WeakLabels]:
    bundle = Bundle(experiment.task)
    stage = Stage(bundle, device, progress=progress)
    examples = bundle.split("weak_train")
    targets = one_hot(bundle.labels(examples), len(bundle.manifest.labels))
    trained = stage.train(
        experiment.weak_model, examples, targets, experiment.weak, experiment.seed, "weak"
    )
    result = stage.evaluate(experiment.weak_model, trained, experiment.weak)
    unlabelled = bundle.split("unlabelled")
    probs = stage.probs(trained, unlabelled, experiment.weak, "weak labels")
    labels = WeakLabels(
        model=experiment.weak_model,
        labels=bundle.manifest.labels,
        ids=[example.id for example in unlabelled],
        probs=probs.tolist(),
    )
    return result, labels


def train_ceiling(
    experiment: Experiment,
    device: torch.device,
    *,
    progress: bool = True,
    save_to: Path | None = None,
) -> StageResult:
    """The strong model on ground truth: `ceiling_train` if the bundle has it, else `weak_train`."""
    bundle = Bundle(experiment.task)
    stage = Stage(bundle, device, progress=progress)
    split: SplitName = "ceiling_train" if bundle.has_ceiling_split else "weak_train"
    examples = bundle.split(split)
    targets = one_hot(bundle.labels(examples), len(bundle.manifest.labels))
    trained = stage.train(
        experiment.strong_model, examples, targets, experiment.strong, experiment.seed, "ceiling"
    )
    if save_to is not None:
        save_model(trained, save_to)
    return stage.evaluate(experiment.strong_model, trained, experiment.strong)


def train_student(
    experiment: Experiment,
    weak_labels: WeakLabels,
    device: torch.device,
    *,
    progress: bool = True,
    save_to: Path | None = None,
) -> StageResult:
    """The strong model on the weak teacher's labels, with the experiment's method."""
    bundle = Bundle(experiment.task)
    stage = Stage(bundle, device, progress=progress)
    by_id = {example.id: example for example in bundle.split("unlabelled")}
    missing = [i for i in weak_labels.ids if i not in by_id]
    if missing or weak_labels.labels != bundle.manifest.labels:
        raise ValueError(
            "these weak labels were made for another task (unknown ids "
            f"{missing[:3]} or labels {weak_labels.labels} != {bundle.manifest.labels}); "
            "run `aar-train weak` on this task"
        )
    examples = [by_id[i] for i in weak_labels.ids]
    targets = torch.tensor(weak_labels.probs)
    options = experiment.strong
    if experiment.method == "aux-conf":
        options = options.model_copy(update={"loss": "aux-conf"})
    elif experiment.method == "confident":
        keep = confident_subset(targets, experiment.keep_fraction)
        examples = [examples[i] for i in keep]
        targets = one_hot(targets[keep].argmax(-1).tolist(), targets.shape[-1])
    trained = stage.train(
        experiment.strong_model, examples, targets, options, experiment.seed, experiment.method
    )
    if save_to is not None:
        save_model(trained, save_to)
    return stage.evaluate(experiment.strong_model, trained, options)


def save_model(trained: Trained, root: Path) -> None:
    """Weights and tokenizer in Hugging Face's layout (LoRA merged), for `aar-train predict`."""
    model = unwrap(trained.module)
    model.save_pretrained(root)
    trained.tokenizer.save_pretrained(root)


def run_experiment(
    experiment: Experiment, device: torch.device, *, progress: bool = True
) -> dict[str, Any]:
    """Weak, ceiling and student for one seed; accuracies on validation and PGR."""
    weak, labels = train_weak(experiment, device, progress=progress)
    student = train_student(experiment, labels, device, progress=progress)
    result: dict[str, Any] = {
        "seed": experiment.seed,
        "method": experiment.method,
        "weak": weak.model_dump(),
        "w2s": student.model_dump(),
    }
    if experiment.ceiling:
        ceiling = train_ceiling(experiment, device, progress=progress)
        result["ceiling"] = ceiling.model_dump()
        result["pgr"] = pgr(weak.accuracy, student.accuracy, ceiling.accuracy)
    return result


def write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    temporary.replace(path)
