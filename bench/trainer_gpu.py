"""Training throughput of aar's loop against a plain Hugging Face loop, on a GPU.

Both train the same randomly initialised sequence classifier (the shapes of Qwen1.5-0.5B-Chat
and Qwen3-4B-Base, built from their configurations: no weights are fetched), in bf16, with SDPA
attention and fused AdamW, on the same examples of realistic, variable length (log-normal,
median about 190 tokens, cut at 512). The plain loop pads batches of 16 to 512 tokens; aar's
loop (`aar_trainer.train.fit`) groups examples of similar length into batches of about the same
number of tokens (16 x 512), so it computes almost nothing on padding. Throughput counts real
tokens only; MFU is the model FLOPs of those tokens (6N + 12*L*H*S per token, 4N for LoRA's
frozen weights; recomputation under gradient checkpointing not counted) over the GPU's peak.

    .venv/bin/python bench/trainer_gpu.py            # on a GPU: 0.5B full, 4B full (GC), 4B LoRA
    .venv/bin/python bench/trainer_gpu.py --tiny     # the same runs, tiny shapes, on the CPU

Prints one line per run, then one JSON object with the figures as the last line.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
import transformers
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig

from aar_trainer import use_cuda_allocator_settings
from aar_trainer.models import ModelOptions, with_lora
from aar_trainer.train import TrainOptions, fit

TARGET_SPEEDUP = 1.5
PLAIN_BATCH, PLAIN_LENGTH = 16, 512
# Dense bf16 peak FLOP/s by GPU name (no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}

SHAPES: dict[str, dict[str, Any]] = {
    # Qwen/Qwen1.5-0.5B-Chat (Qwen2 architecture) and Qwen/Qwen3-4B-Base, from their configs.
    "qwen1.5-0.5b": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=1024, intermediate_size=2816,
        num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
        max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True,
    ),
    "qwen3-4b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True,
    ),
}  # fmt: skip
TINY_SHAPES: dict[str, dict[str, Any]] = {
    "qwen1.5-0.5b": dict(
        model_type="qwen2", vocab_size=1024, hidden_size=64, intermediate_size=176,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=1024, tie_word_embeddings=True,
    ),
    "qwen3-4b": dict(
        model_type="qwen3", vocab_size=1024, hidden_size=80, intermediate_size=304,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=20,
        max_position_embeddings=1024, tie_word_embeddings=True,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Run:
    shape: str
    lora_r: int
    gradient_checkpointing: bool

    @property
    def name(self) -> str:
        mode = f"lora-r{self.lora_r}" if self.lora_r else "full"
        return f"{self.shape}-{mode}" + ("-gc" if self.gradient_checkpointing else "")


RUNS = [Run("qwen1.5-0.5b", 0, False), Run("qwen3-4b", 0, True), Run("qwen3-4b", 8, False)]


def sample_lengths(count: int, seed: int) -> list[int]:
    """Chat-like lengths: log-normal around 190 tokens, at least 16, cut at 512."""
    rng = random.Random(seed)
    draws = (rng.lognormvariate(math.log(190), 0.6) for _ in range(count))
    return [min(PLAIN_LENGTH, max(16, round(draw))) for draw in draws]


def make_config(shape: dict[str, Any]) -> PretrainedConfig:
    fields = dict(shape)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config.num_labels = 2
    config.pad_token_id = 0
    return config


def build(
    config: PretrainedConfig, run: Run, device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    with device:
        model = AutoModelForSequenceClassification.from_config(
            config, dtype=dtype, attn_implementation="sdpa"
        )
    if run.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    module: torch.nn.Module = model
    if run.lora_r:
        module = with_lora(model, ModelOptions(lora_r=run.lora_r, lora_alpha=2 * run.lora_r))
    return module.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(
    model: torch.nn.Module,
    encoded: Sequence[Sequence[int]],
    labels: torch.Tensor,
    device: torch.device,
    seed: int,
    warmup_steps: int,
) -> tuple[int, int, float]:
    """The reference: shuffled batches of 16 padded to 512, one step each; (real, padded, s)."""
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=device.type == "cuda"
    )
    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    batches = [order[i : i + PLAIN_BATCH] for i in range(0, len(order), PLAIN_BATCH)]
    real = padded = 0
    started = 0.0
    model.train()
    for step, batch in enumerate(batches):
        if step == warmup_steps:
            _sync(device)
            started, real, padded = time.perf_counter(), 0, 0
        ids = torch.zeros((len(batch), PLAIN_LENGTH), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, index in enumerate(batch):
            ids[row, : len(encoded[index])] = torch.tensor(encoded[index])
            mask[row, : len(encoded[index])] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        loss = F.cross_entropy(logits, labels[batch].to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # Counted on the host, as aar's loop does, so neither waits on the GPU every step.
        real += sum(len(encoded[index]) for index in batch)
        padded += ids.numel()
    _sync(device)
    return real, padded, time.perf_counter() - started


def flops_per_example(
    config: PretrainedConfig, non_embedding: int, length: int, lora: bool
) -> float:
    dense = (4 if lora else 6) * non_embedding
    attention = 12 * config.num_hidden_layers * config.hidden_size * length
    return float(length * (dense + attention))


def non_embedding_parameters(module: torch.nn.Module) -> int:
    return sum(
        p.numel()
        for name, p in module.named_parameters()
        if "embed_tokens" not in name and "lora_" not in name
    )


def peak_flops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in PEAK_FLOPS.items() if key in name), None)


def bench_run(run: Run, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    shapes = TINY_SHAPES if args.tiny else SHAPES
    config = make_config(shapes[run.shape])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    lengths = sample_lengths(args.examples, args.seed)
    encoded = [[random.randrange(1, config.vocab_size) for _ in range(n)] for n in lengths]
    labels = torch.randint(0, 2, (len(encoded),))
    peak = peak_flops(device, args.peak_tflops)

    def mfu(indices: Sequence[int], seconds: float, lora: bool, non_embedding: int) -> float | None:
        if peak is None:
            return None
        work = sum(flops_per_example(config, non_embedding, lengths[i], lora) for i in indices)
        return work / seconds / peak

    model = build(config, run, device, dtype)
    non_embedding = non_embedding_parameters(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup = 2
    real, padded, seconds = plain_loop(model, encoded, labels, device, args.seed, warmup)
    timed = list(range(len(encoded)))[warmup * PLAIN_BATCH :]
    plain = {
        "tokens_per_s": real / seconds,
        "padding_fraction": 1 - real / padded,
        "mfu": mfu(timed, seconds, bool(run.lora_r), non_embedding),
    }
    plain_memory = (
        torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    )
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    # aar's loop: the same examples, a token budget equal to the plain batch (16 x 512).
    torch.manual_seed(args.seed)
    model = build(config, run, device, dtype)
    if args.compile:
        model = torch.compile(model, dynamic=True)  # type: ignore[assignment]
    options = TrainOptions(
        epochs=1,
        lr=1e-5,
        max_tokens=PLAIN_BATCH * PLAIN_LENGTH,
        max_batch=256,
        max_length=PLAIN_LENGTH,
        model=ModelOptions(precision="bf16" if device.type == "cuda" else "fp32"),
    )
    targets = F.one_hot(labels, 2).float()
    # A short untimed pass first: kernels chosen, memory pools grown (and compiled, with --compile).
    head = args.examples // 8
    common: dict[str, Any] = {"pad_token_id": 0, "device": device, "progress": False}
    fit(model, encoded[:head], targets[:head], options, seed=args.seed + 1, **common)
    stats = fit(model, encoded, targets, options, seed=args.seed, **common)
    ours = {
        "tokens_per_s": stats.tokens_per_second,
        "padding_fraction": stats.padding_fraction,
        "mfu": mfu(range(len(encoded)), stats.seconds, bool(run.lora_r), non_embedding),
    }
    ours_memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "plain": plain,
        "ours": ours,
        "speedup": ours["tokens_per_s"] / plain["tokens_per_s"],
        "plain_peak_memory_gib": plain_memory,
        "ours_peak_memory_gib": ours_memory,
        "mean_length": sum(lengths) / len(lengths),
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a smoke run)")
    parser.add_argument("--examples", type=int, default=None, help="default 1024 (GPU), 96 (tiny)")
    parser.add_argument("--runs", default=None, help=f"comma-separated of {[r.name for r in RUNS]}")
    parser.add_argument("--compile", action="store_true", help="torch.compile aar's loop")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 peak")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (with --tiny)")
    args = parser.parse_args()
    use_cuda_allocator_settings()  # as `aar-train` runs, for both loops; read when CUDA starts
    if args.tiny:
        device = torch.device("cpu")
        torch.set_num_threads(args.threads)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("bench/trainer_gpu.py: no GPU here; pass --tiny for the CPU smoke run")
    args.examples = args.examples or (96 if args.tiny else 1024)
    wanted = set(args.runs.split(",")) if args.runs else {run.name for run in RUNS}
    unknown = wanted - {run.name for run in RUNS}
    if unknown:
        raise SystemExit(f"unknown runs {sorted(unknown)}; choose from {[r.name for r in RUNS]}")
    label = "CPU (tiny shapes)" if args.tiny else torch.cuda.get_device_name(device)
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    print(f"device: {label}; {versions}; {args.examples} examples per loop", flush=True)
    figures: dict[str, Any] = {"device": label, "tiny": args.tiny, "target_speedup": TARGET_SPEEDUP}
    figures |= {"torch": torch.__version__, "transformers": transformers.__version__}
    for run in RUNS:
        if run.name not in wanted:
            continue
        started = time.perf_counter()
        try:
            result = bench_run(run, args, device)
        except torch.cuda.OutOfMemoryError as error:
            # One run that does not fit must not cost the figures of the others.
            print(f"{run.name}: out of GPU memory, left out ({str(error).splitlines()[0]})")
            figures[f"{run.name}_error"] = "out of GPU memory"
            result = None
        # Out of the except block, whose traceback holds the failed run's tensors.
        if result is None:
            gc.collect()
            torch.cuda.empty_cache()
            continue
        plain, ours = result["plain"], result["ours"]
        print(
            f"{run.name}: plain HF loop {plain['tokens_per_s']:,.0f} tok/s "
            f"(padding {_pct(plain['padding_fraction'])}, MFU {_pct(plain['mfu'])}); "
            f"aar {ours['tokens_per_s']:,.0f} tok/s (padding {_pct(ours['padding_fraction'])}, "
            f"MFU {_pct(ours['mfu'])}); {result['speedup']:.2f}x (target {TARGET_SPEEDUP}x); "
            f"mean length {result['mean_length']:.0f}; {time.perf_counter() - started:.0f} s"
        )
        key = run.name
        figures[f"{key}_plain_tokens_per_s"] = round(plain["tokens_per_s"], 1)
        figures[f"{key}_aar_tokens_per_s"] = round(ours["tokens_per_s"], 1)
        figures[f"{key}_speedup"] = round(result["speedup"], 3)
        figures[f"{key}_plain_mfu"] = plain["mfu"] and round(plain["mfu"], 4)
        figures[f"{key}_aar_mfu"] = ours["mfu"] and round(ours["mfu"], 4)
        figures[f"{key}_aar_padding_fraction"] = round(ours["padding_fraction"], 4)
        figures[f"{key}_plain_padding_fraction"] = round(plain["padding_fraction"], 4)
        if result["ours_peak_memory_gib"] is not None:
            figures[f"{key}_plain_peak_memory_gib"] = round(result["plain_peak_memory_gib"], 1)
            figures[f"{key}_aar_peak_memory_gib"] = round(result["ours_peak_memory_gib"], 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
