"""The weak-to-strong pipeline end to end on the generated cues task and tiny Qwen2/Qwen3
models saved locally and loaded through `from_pretrained`: real training on the CPU, PGR from
real predictions, the scorer's submission format, the CLI's commands, seeds and LoRA."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from aar_trainer import GPUMemoryError
from aar_trainer.bundle import Bundle
from aar_trainer.cli import build_parser, finished_seed, main, w2s_experiment
from aar_trainer.demo import DEMO_STRONG_OPTIONS, DEMO_WEAK_OPTIONS, make_demo
from aar_trainer.models import ModelOptions, load_classifier
from aar_trainer.pipeline import Experiment, train_weak
from aar_trainer.train import TrainOptions, predict_probs


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # CI machines have 2 cores shared with other tests: one thread each runs fastest there.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_demo(tmp_path_factory.mktemp("demo"))


def _flags(prefix: str, epochs: float | None = None) -> list[str]:
    options = DEMO_WEAK_OPTIONS if prefix == "weak-" else DEMO_STRONG_OPTIONS
    flags = []
    for name in ("epochs", "lr", "max_batch", "max_tokens", "aux_alpha"):
        value = epochs if name == "epochs" and epochs is not None else getattr(options, name)
        flags += [f"--{prefix}{name.replace('_', '-')}", str(value)]
    return flags


def _read(path: Path) -> Any:
    return json.loads(path.read_text())


def test_tiny_models_load_by_path_like_hub_checkpoints(demo: dict[str, Path]) -> None:
    weak = AutoTokenizer.from_pretrained(demo["weak"])
    strong = AutoTokenizer.from_pretrained(demo["strong"])
    # Qwen2 checkpoints get Qwen's own tokenizer class: the byte-level BPE must survive that.
    assert type(weak).__name__ == "Qwen2Tokenizer"
    text = Bundle(demo["task"]).split("weak_train")[0].text
    assert weak(text)["input_ids"] == strong(text)["input_ids"]
    assert len(weak(" " + text)["input_ids"]) == len(text.split())
    model = AutoModelForSequenceClassification.from_pretrained(demo["strong"])
    assert type(model).__name__ == "Qwen3ForSequenceClassification"
    assert model.config.pad_token_id == weak.pad_token_id == 0
    weak_model = load_classifier(str(demo["weak"]), 2, ModelOptions(), torch.device("cpu"), 0)
    assert type(weak_model).__name__ == "Qwen2ForSequenceClassification"
    # The weak teacher's short context window is what makes it weak on this task.
    assert weak_model.config.max_position_embeddings == 4


def test_w2s_student_lands_between_weak_and_ceiling(demo: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["w2s", "--task", str(demo["task"]), "--weak-model", str(demo["weak"])]
    argv += ["--strong-model", str(demo["strong"]), "--method", "naive", "--seeds", "0"]
    argv += ["--out", str(out), "--quiet", "--threads", "1", *_flags("weak-"), *_flags("strong-")]
    assert main(argv) == 0

    results = _read(out / "results.json")
    (run,) = results["runs"]
    weak, w2s, ceiling = run["weak"]["accuracy"], run["w2s"]["accuracy"], run["ceiling"]["accuracy"]
    assert 0.55 < weak < w2s < ceiling
    assert ceiling > 0.9
    assert run["pgr"] == pytest.approx((w2s - weak) / (ceiling - weak))
    assert results["pgr"] == pytest.approx(run["pgr"])
    # Length bucketing: almost nothing is computed on padding.
    assert run["w2s"]["train"]["padding_fraction"] < 0.1

    # What the scorer takes: a JSON list, one label per test input, in order.
    predictions = _read(out / "predictions.json")
    assert results["description"].startswith("w2s naive")
    # The test labels are written as the scorer's labels file.
    scorer_labels = _read(demo["test_labels"])
    assert len(scorer_labels["split_seed"]) >= 16
    test_labels = scorer_labels["labels"]
    assert len(predictions) == len(test_labels) == len(Bundle(demo["task"]).split("test"))
    assert set(predictions) <= {0, 1}
    test_accuracy = sum(p == t for p, t in zip(predictions, test_labels, strict=True)) / len(
        test_labels
    )
    # Predictions in the wrong order would score about 0.5.
    assert abs(test_accuracy - w2s) < 0.06
    assert predictions == _read(out / "seed-0" / "predictions.json")


def test_weak_then_strong_then_predict(demo: dict[str, Path], tmp_path: Path) -> None:
    common = ["--task", str(demo["task"]), "--quiet", "--threads", "1"]
    weak_flags = [f.replace("--weak-", "--") for f in _flags("weak-", epochs=2)]
    strong_flags = [f.replace("--strong-", "--") for f in _flags("strong-", epochs=1)]
    weak = ["weak", "--model", str(demo["weak"]), "--out", str(tmp_path / "weak")]
    assert main([*weak, *common, *weak_flags]) == 0
    labels = _read(tmp_path / "weak" / "weak-labels.json")
    unlabelled = Bundle(demo["task"]).split("unlabelled")
    assert labels["ids"] == [e.id for e in unlabelled]
    assert all(abs(sum(p) - 1) < 1e-4 for p in labels["probs"])
    assert _read(tmp_path / "weak" / "results.json")["stage"] == "weak"

    student = tmp_path / "student"
    argv = ["strong", "--model", str(demo["strong"])]
    argv += ["--weak-labels", str(tmp_path / "weak" / "weak-labels.json")]
    argv += ["--method", "confident", "--save-model", "--out", str(student), *common, *strong_flags]
    assert main(argv) == 0
    assert _read(student / "results.json")["stage"] == "w2s"

    predicted = tmp_path / "predicted.json"
    predict = ["predict", "--model", str(student / "model"), "--out", str(predicted)]
    assert main([*predict, *common]) == 0
    # The saved model, loaded back through from_pretrained, predicts what it did in training.
    assert _read(predicted) == _read(student / "predictions.json")


def test_a_seed_reproduces_its_run(demo: dict[str, Path]) -> None:
    options = DEMO_WEAK_OPTIONS.model_copy(update={"epochs": 1.0})
    experiment = Experiment(task=demo["task"], weak_model=str(demo["weak"]), weak=options)
    cpu = torch.device("cpu")
    first = train_weak(experiment, cpu, progress=False)[1].probs
    again = train_weak(experiment, cpu, progress=False)[1].probs
    other = train_weak(experiment.model_copy(update={"seed": 1}), cpu, progress=False)[1].probs
    assert first == again
    assert first != other


def test_lora_trains_adapters_and_the_head_only(demo: dict[str, Path], tmp_path: Path) -> None:
    module = load_classifier(
        str(demo["strong"]), 2, ModelOptions(lora_r=4), torch.device("cpu"), pad_token_id=0
    )
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable
    assert all("lora_" in n or "score" in n for n in trainable)
    assert any("score" in n for n in trainable)

    out = tmp_path / "lora"
    argv = ["strong", "--model", str(demo["strong"]), "--task", str(demo["task"]), "--quiet"]
    argv += ["--lora-r", "4", "--epochs", "0.5", "--lr", "3e-3", "--save-model", "--out", str(out)]
    assert main(argv) == 0
    # Saved merged: an ordinary checkpoint, no peft needed to load it.
    merged = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    assert _read(out / "results.json")["stage"] == "ceiling"


def test_seeds_run_in_parallel_processes_and_finished_seeds_are_kept(
    demo: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "seeds"
    argv = ["w2s", "--task", str(demo["task"]), "--weak-model", str(demo["weak"])]
    argv += ["--strong-model", str(demo["strong"]), "--seeds", "0,1", "--jobs", "2"]
    argv += ["--no-ceiling", "--out", str(out), "--quiet"]
    argv += [*_flags("weak-", epochs=1), *_flags("strong-", epochs=0.5)]
    assert main(argv) == 0
    results = _read(out / "results.json")
    assert [run["seed"] for run in results["runs"]] == [0, 1]
    assert "pgr" not in results
    assert results["runs"][0]["weak"] != results["runs"][1]["weak"]
    assert (out / "seed-1" / "predictions.json").is_file()

    # Run again (as after a crash): the finished seeds are read back, not trained again.
    capsys.readouterr()
    assert main(argv) == 0
    assert "seed 0: kept the finished run" in capsys.readouterr().out
    assert _read(out / "results.json")["runs"] == results["runs"]
    # Other settings are another experiment: nothing is reused.
    (out / "seed-0" / "results.json").write_text(
        (out / "seed-0" / "results.json").read_text().replace('"lr": 0.001', '"lr": 0.002')
    )
    assert _finished_seed_count(out, argv) == 1


def test_cli_says_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AAR_TASK_DIR", raising=False)
    assert main(["weak", "--task", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "has no task.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["weak", "--out", str(tmp_path / "o")])
    assert "--task is required (or set AAR_TASK_DIR)" in capsys.readouterr().err


def _finished_seed_count(out: Path, argv: list[str]) -> int:
    base = w2s_experiment(build_parser().parse_args(argv))
    seeds = (base.model_copy(update={"seed": seed}) for seed in (0, 1))
    return sum(finished_seed(out, experiment) is not None for experiment in seeds)


def test_out_of_gpu_memory_names_the_settings_that_fit(
    demo: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No GPU here: the CUDA allocator's error is raised where a forward pass raises it there.
    def out_of_memory(*_: Any) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("aar_trainer.train._logits", out_of_memory)
    argv = ["weak", "--task", str(demo["task"]), "--model", str(demo["weak"]), "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "weak"), "--max-tokens", "2048"]) == 2
    error = capsys.readouterr().err
    assert "aar-train: out of GPU memory training on a batch of " in error
    for fix in ("a smaller --max-tokens (now 2048)", "--gradient-checkpointing", "--lora-r 8"):
        assert fix in error
    # Settings already in use are not suggested again.
    assert main([*argv, "--out", str(tmp_path / "lora"), "--lora-r", "4"]) == 2
    assert "--lora-r 8" not in capsys.readouterr().err
    with pytest.raises(GPUMemoryError, match=r"predicting a batch of 1 x 3 tokens; try a smaller"):
        predict_probs(
            torch.nn.Identity(),
            [[1, 2, 3]],
            TrainOptions(),
            pad_token_id=0,
            device=torch.device("cpu"),
            progress=False,
        )


def test_aar_train_sets_the_cuda_allocator_unless_the_user_has(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["weak", "--task", str(tmp_path), "--out", str(tmp_path / "o"), "--quiet"]
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert main(argv) == 2  # no task there: the command stops early, the setting is made first
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert main(argv) == 2
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
