"""`aar-train`: the weak-to-strong experiment kit on the command line.

    aar-train demo DIR                       the generated task and tiny models, offline
    aar-train convert --format boolq ...     a task bundle from jsonl records or the hub
    aar-train weak --task T --model M ...    the weak teacher, its labels on the unlabelled split
    aar-train strong --task T --model M ...  the ceiling, or a student with --weak-labels
    aar-train w2s --task T ...               the whole pipeline over several seeds, with PGR
    aar-train predict --model DIR --task T   test predictions of a saved model

Each training command writes `results.json` and `predictions.json` under `--out`; the latter is
what the scorer takes: a JSON list, one label per test input, in the bundle's order.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from aar_trainer import GPUMemoryError, use_cuda_allocator_settings
from aar_trainer.bundle import Bundle, BundleError, write_scorer_labels

DEFAULT_WEAK = "Qwen/Qwen1.5-0.5B-Chat"
DEFAULT_STRONG = "Qwen/Qwen3-4B-Base"
TRAIN_FLAGS = (
    "epochs", "lr", "weight_decay", "max_length", "max_tokens", "max_batch", "aux_alpha",
)  # fmt: skip
MODEL_FLAGS = ("precision", "lora_r", "lora_alpha", "gradient_checkpointing", "compile")


def _add_train_flags(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """Training options; `prefix` ("weak-", "strong-") tells apart the two models of `w2s`."""
    from aar_trainer.train import TrainOptions

    defaults = TrainOptions()
    group = parser.add_argument_group(f"{prefix or 'training '}options")
    for name in TRAIN_FLAGS:
        kind = int if isinstance(getattr(defaults, name), int) else float
        group.add_argument(
            f"--{prefix}{name.replace('_', '-')}",
            type=kind,
            default=None,
            help=f"default {getattr(defaults, name)}",
        )
    group.add_argument(
        f"--{prefix}precision",
        choices=["auto", "bf16", "bf16-mixed", "fp32"],
        default=None,
        help="auto: bf16 autocast over fp32 weights on a GPU; bf16: bf16 weights with fp32 "
        "AdamW moments and stochastic rounding, 12 bytes per parameter instead of 16",
    )
    group.add_argument(f"--{prefix}lora-r", type=int, default=None, help="LoRA rank (0: full)")
    group.add_argument(f"--{prefix}lora-alpha", type=int, default=None)
    group.add_argument(f"--{prefix}gradient-checkpointing", action="store_true", default=None)
    group.add_argument(
        f"--{prefix}compile", action="store_true", default=None, help="torch.compile"
    )


def _train_options(args: argparse.Namespace, prefix: str = "", base: Any = None) -> Any:
    from aar_trainer.train import TrainOptions

    options = base or TrainOptions()
    key = prefix.replace("-", "_")
    train = {n: v for n in TRAIN_FLAGS if (v := getattr(args, key + n)) is not None}
    model = {n: v for n in MODEL_FLAGS if (v := getattr(args, key + n)) is not None}
    return options.model_copy(update={**train, "model": options.model.model_copy(update=model)})


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _setup(args: argparse.Namespace) -> None:
    import torch
    from transformers.utils import logging

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quiet:
        logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def _write(out: Path, name: str, value: Any) -> Path:
    from aar_trainer.pipeline import write_json

    write_json(out / name, value)
    return out / name


def _experiment(args: argparse.Namespace, **fields: Any) -> Any:
    from aar_trainer.pipeline import Experiment

    return Experiment(task=Path(args.task), seed=args.seed, **fields)


def _cmd_weak(args: argparse.Namespace) -> int:
    from aar_trainer.pipeline import train_weak

    _setup(args)
    experiment = _experiment(args, weak_model=args.model, weak=_train_options(args))
    result, labels = train_weak(experiment, _device(args.device), progress=not args.quiet)
    out = Path(args.out)
    _write(out, "weak-labels.json", labels.model_dump())
    _write(out, "predictions.json", result.predictions)
    summary = {
        "stage": "weak",
        "method": f"weak {args.model} on ground truth",
        "seed": args.seed,
        **result.model_dump(exclude={"predictions"}),
    }
    _write(out, "results.json", summary)
    print(f"weak {args.model}: validation accuracy {result.accuracy:.4f}; wrote {out}")
    return 0


def _cmd_strong(args: argparse.Namespace) -> int:
    from aar_trainer.pipeline import WeakLabels, train_ceiling, train_student

    _setup(args)
    experiment = _experiment(
        args,
        strong_model=args.model,
        strong=_train_options(args),
        method=args.method,
        keep_fraction=args.keep_fraction,
    )
    out = Path(args.out)
    device = _device(args.device)
    save_to = out / "model" if args.save_model else None
    if args.weak_labels:
        labels = WeakLabels.model_validate_json(Path(args.weak_labels).read_text())
        result = train_student(experiment, labels, device, progress=not args.quiet, save_to=save_to)
        stage, method = "w2s", f"w2s {args.method}: weak {labels.model}, strong {args.model}"
    else:
        result = train_ceiling(experiment, device, progress=not args.quiet, save_to=save_to)
        stage, method = "ceiling", f"ceiling {args.model} on ground truth"
    _write(out, "predictions.json", result.predictions)
    summary = {
        "stage": stage,
        "method": method,
        "seed": args.seed,
        **result.model_dump(exclude={"predictions"}),
    }
    _write(out, "results.json", summary)
    print(f"{stage} {args.model}: validation accuracy {result.accuracy:.4f}; wrote {out}")
    return 0


def _run_seed(experiment_json: str, device: str, threads: int | None) -> dict[str, Any]:
    """One seed of `w2s`, in its own process (spawned: CUDA cannot be forked)."""
    import torch
    from transformers.utils import logging

    from aar_trainer.pipeline import Experiment, run_experiment

    logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    if threads:
        torch.set_num_threads(threads)
    experiment = Experiment.model_validate_json(experiment_json)
    return run_experiment(experiment, torch.device(device), progress=False)


def _devices(device: Any, jobs: int) -> list[str]:
    """One device per concurrent seed: the GPUs in turn, or the CPU."""
    import torch

    if device.type == "cuda" and device.index is None:
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(jobs)]
    return [str(device)] * jobs


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for key in ("weak", "w2s", "ceiling"):
        values = [run[key]["accuracy"] for run in runs if key in run]
        if values:
            summary[f"{key}_accuracy"] = statistics.fmean(values)
    pgrs = [run["pgr"] for run in runs if run.get("pgr") is not None]
    if pgrs:
        summary["pgr"] = statistics.fmean(pgrs)
        summary["pgr_std"] = statistics.pstdev(pgrs)
    return summary


def w2s_experiment(args: argparse.Namespace) -> Any:
    """The experiment `aar-train w2s` runs (for its first seed)."""
    return _experiment(
        args,
        weak_model=args.weak_model,
        strong_model=args.strong_model,
        method=args.method,
        ceiling=not args.no_ceiling,
        keep_fraction=args.keep_fraction,
        weak=_train_options(args, "weak-"),
        strong=_train_options(args, "strong-"),
    )


def finished_seed(out: Path, experiment: Any) -> dict[str, Any] | None:
    """A seed's saved run, if one was made with exactly this experiment."""
    path = out / f"seed-{experiment.seed}" / "results.json"
    if not path.is_file() or not (path.parent / "predictions.json").is_file():
        return None
    run: dict[str, Any] = json.loads(path.read_text())
    return run if run.get("experiment") == experiment.model_dump(mode="json") else None


def _cmd_w2s(args: argparse.Namespace) -> int:
    from aar_trainer.pipeline import run_experiment

    _setup(args)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    base = w2s_experiment(args)
    device = _device(args.device)
    out = Path(args.out)
    bundle = Bundle(base.task)
    method = f"w2s {args.method}: weak {args.weak_model}, strong {args.strong_model}"
    finished: dict[int, dict[str, Any]] = {}
    todo = []
    for seed in seeds:
        experiment = base.model_copy(update={"seed": seed})
        done = finished_seed(out, experiment)
        if done is not None:
            print(f"seed {seed}: kept the finished run in {out / f'seed-{seed}'}")
            finished[seed] = done
        else:
            todo.append(experiment)

    def save(run: dict[str, Any], experiment: Any) -> None:
        # Written as each seed finishes: an interrupted `w2s` reruns only the missing seeds.
        seed_dir = out / f"seed-{run['seed']}"
        _write(seed_dir, "predictions.json", run["w2s"]["predictions"])
        for stage in ("weak", "w2s", "ceiling"):
            if stage in run:
                run[stage].pop("predictions")
        run["experiment"] = experiment.model_dump(mode="json")
        _write(seed_dir, "results.json", run)
        finished[run["seed"]] = run

    jobs = min(args.jobs or _default_jobs(device), max(len(todo), 1))
    if jobs <= 1:
        for experiment in todo:
            save(run_experiment(experiment, device, progress=not args.quiet), experiment)
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs) if device.type == "cpu" else None
        devices = _devices(device, jobs)
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = {
                pool.submit(_run_seed, e.model_dump_json(), devices[i % jobs], threads): e
                for i, e in enumerate(todo)
            }
            for future in as_completed(futures):
                save(future.result(), futures[future])
    runs = [finished[seed] for seed in seeds]
    summary = _summary(runs)
    # The first seed's predictions are the ones to submit (any seed would do; one is chosen
    # up front so that the choice is not a peek at the scorer).
    first = out / f"seed-{seeds[0]}" / "predictions.json"
    (out / "predictions.json").write_text(first.read_text())
    results = {
        "task": bundle.manifest.name,
        "method": args.method,
        "description": method,
        "weak_model": args.weak_model,
        "strong_model": args.strong_model,
        "seeds": seeds,
        **summary,
        "runs": runs,
    }
    _write(out, "results.json", results)
    line = ", ".join(f"{k} {v:.4f}" for k, v in summary.items())
    print(f"w2s {args.method} over seeds {seeds}: {line}; wrote {out}")
    return 0


def _default_jobs(device: Any) -> int:
    import torch

    return torch.cuda.device_count() if device.type == "cuda" and device.index is None else 1


def _cmd_predict(args: argparse.Namespace) -> int:
    from aar_trainer.models import ModelOptions, context_length, load_classifier, load_tokenizer
    from aar_trainer.pipeline import Stage, Trained, write_json
    from aar_trainer.train import TrainOptions

    _setup(args)
    bundle = Bundle(args.task)
    device = _device(args.device)
    tokenizer = load_tokenizer(args.model)
    module = load_classifier(
        args.model, len(bundle.manifest.labels), ModelOptions(), device, tokenizer.pad_token_id
    )
    options = TrainOptions(max_length=args.max_length)
    trained = Trained(module, tokenizer, None, min(args.max_length, context_length(module)))
    probs = Stage(bundle, device, progress=not args.quiet).probs(
        trained, bundle.split("test"), options, "test"
    )
    predictions = [bundle.manifest.labels[i] for i in probs.argmax(-1).tolist()]
    out = Path(args.out)
    write_json(out, predictions)
    print(f"wrote {len(predictions)} predictions to {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from aar_trainer.demo import CuesTask, demo_w2s_flags, make_demo

    paths = make_demo(Path(args.directory), CuesTask(seed=args.seed, split_seed=args.split_seed))
    flags = demo_w2s_flags()
    print(f"Wrote the cues task to {paths['task']} and tiny models under {args.directory}/models")
    print(
        "Try:\n  aar-train w2s "
        f"--task {paths['task']} --weak-model {paths['weak']} --strong-model {paths['strong']} "
        f"--method confident --seeds 0,1 --out {args.directory}/runs/confident \\\n    "
        + " ".join(flags)
    )
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from aar_trainer.formats import HUB_NAMES, convert, load_hub, read_jsonl

    if args.input:
        records = read_jsonl(Path(args.input))
    else:
        dataset = args.hf or HUB_NAMES.get(args.format)
        if not dataset:
            raise BundleError(f"--hf needs a dataset name for format {args.format}")
        records = load_hub(dataset, args.hf_split, args.hf_config, args.limit)
    if args.limit is not None:
        records = records[: args.limit]
    out = Path(args.out)
    fractions = tuple(float(x) for x in args.fractions.split(","))
    if len(fractions) != 4:
        raise BundleError(f"--fractions needs 4 numbers (got {args.fractions})")
    labels = convert(
        records, args.format, out, name=args.name or out.name, fractions=fractions, seed=args.seed
    )
    labels_path = Path(args.test_labels or f"{out}.test-labels.json")
    write_scorer_labels(labels_path, labels)
    print(f"Wrote the bundle {out} and its test labels {labels_path} (keep those from agents)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aar-train", description="aar's weak-to-strong experiment kit"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, description=help_text)

    def common(sub: argparse.ArgumentParser, *, out: bool = True) -> None:
        sub.add_argument("--task", default=os.environ.get("AAR_TASK_DIR"), required=False,
                         help="task bundle folder (default: $AAR_TASK_DIR)")  # fmt: skip
        sub.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
        sub.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        sub.add_argument("--quiet", action="store_true", help="no progress bars")
        if out:
            sub.add_argument("--out", required=True, help="folder for the results")
        sub.add_argument("--seed", type=int, default=0)

    weak = command("weak", "train the weak teacher; label the unlabelled split")
    common(weak)
    weak.add_argument("--model", default=DEFAULT_WEAK, help="hub id or local folder")
    _add_train_flags(weak)
    weak.set_defaults(handler=_cmd_weak)

    strong = command("strong", "train the strong model on ground truth, or on --weak-labels")
    common(strong)
    strong.add_argument("--model", default=DEFAULT_STRONG, help="hub id or local folder")
    strong.add_argument("--weak-labels", help="weak-labels.json from `aar-train weak`")
    _add_method_flags(strong)
    strong.add_argument("--save-model", action="store_true", help="keep the model in OUT/model")
    _add_train_flags(strong)
    strong.set_defaults(handler=_cmd_strong)

    w2s = command("w2s", "weak teacher, strong student and ceiling over seeds; PGR")
    common(w2s)
    w2s.add_argument("--weak-model", default=DEFAULT_WEAK)
    w2s.add_argument("--strong-model", default=DEFAULT_STRONG)
    _add_method_flags(w2s)
    w2s.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
    w2s.add_argument("--jobs", type=int, default=None, help="seeds at once (default: GPUs or 1)")
    w2s.add_argument("--no-ceiling", action="store_true", help="skip the ceiling (no PGR)")
    _add_train_flags(w2s, "weak-")
    _add_train_flags(w2s, "strong-")
    w2s.set_defaults(handler=_cmd_w2s)

    predict = command("predict", "test predictions of a saved model, in the scorer's format")
    common(predict, out=False)
    predict.add_argument("--model", required=True, help="a folder from --save-model")
    predict.add_argument("--out", required=True, help="predictions file to write")
    predict.add_argument("--max-length", type=int, default=512)
    predict.set_defaults(handler=_cmd_predict)

    demo = command("demo", "write the generated cues task and tiny weak and strong models")
    demo.add_argument("directory")
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help="another task of the same kind: other words, other tiny models (default: 0, the "
        "shipped demo)",
    )
    demo.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="a fresh draw of the same task's examples, with the same words and models",
    )
    demo.set_defaults(handler=_cmd_demo)

    convert = command("convert", "a task bundle from dataset records")
    convert.add_argument("--format", required=True, help="text, preference, correctness, "
                         "sciq, boolq, cosmos_qa, amazon_polarity or anthropic_hh")  # fmt: skip
    source = convert.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="a jsonl file of records")
    source.add_argument("--hf", nargs="?", const="", help="a Hugging Face dataset (internet)")
    convert.add_argument("--hf-split", default="train")
    convert.add_argument("--hf-config", default=None)
    convert.add_argument("--limit", type=int, default=None, help="use the first N records")
    convert.add_argument("--out", required=True, help="the bundle folder")
    convert.add_argument("--name", default=None, help="task name (default: the folder's)")
    convert.add_argument("--fractions", default="0.2,0.5,0.1,0.2",
                         help="weak_train,unlabelled,validation,test shares")  # fmt: skip
    convert.add_argument("--test-labels", default=None, help="default: OUT.test-labels.json")
    convert.add_argument("--seed", type=int, default=0)
    convert.set_defaults(handler=_cmd_convert)
    return parser


def _add_method_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=["naive", "aux-conf", "confident"], default="naive")
    parser.add_argument("--keep-fraction", type=float, default=0.5,
                        help="share of weak labels kept by --method confident")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    use_cuda_allocator_settings()  # before torch starts CUDA, here and in the seeds' processes
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "task", "unused") is None:
        parser.error("--task is required (or set AAR_TASK_DIR)")
    try:
        result: int = args.handler(args)
    except (BundleError, GPUMemoryError) as error:
        print(f"aar-train: {error}", file=sys.stderr)
        return 2
    return result


if __name__ == "__main__":
    sys.exit(main())
