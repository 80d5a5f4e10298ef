"""Training and inference of a sequence classifier on soft targets: ground truth is one-hot,
a weak teacher's labels are its probabilities. Batches are length-bucketed by a token budget;
on a GPU the step runs in bf16 with SDPA attention and fused AdamW."""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from pydantic import BaseModel, ConfigDict, Field
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm  # type: ignore[import-untyped]
from transformers import PreTrainedTokenizerBase

from aar_trainer import GPUMemoryError
from aar_trainer.batching import Batch, iterate, plan_batches
from aar_trainer.bundle import Example
from aar_trainer.models import ModelOptions, resolve_precision
from aar_trainer.optim import StochasticRoundingAdamW

Loss = Literal["xent", "aux-conf"]


class TrainOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: float = Field(default=2.0, gt=0)
    lr: float = Field(default=1e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_fraction: float = Field(default=0.05, ge=0, lt=1)
    max_length: int = Field(default=512, ge=2, description="tokens kept per example")
    max_tokens: int = Field(default=16384, ge=2, description="padded tokens per batch")
    max_batch: int = Field(default=64, ge=1, description="examples per batch")
    loss: Loss = "xent"
    # Burns et al. (2023): the student's own hardened predictions get weight alpha, ramped
    # up from 0 over the first `aux_warmup_fraction` of training.
    aux_alpha: float = Field(default=0.75, ge=0, le=1)
    aux_warmup_fraction: float = Field(default=0.2, ge=0, le=1)
    model: ModelOptions = Field(default_factory=ModelOptions)


class TrainStats(BaseModel):
    steps: int
    examples: int
    real_tokens: int
    padded_tokens: int
    seconds: float
    final_loss: float

    @property
    def padding_fraction(self) -> float:
        return 1 - self.real_tokens / max(self.padded_tokens, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / max(self.seconds, 1e-9)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def encode(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int
) -> list[list[int]]:
    """Token ids per example, truncated to `max_length`, no padding (batches pad later)."""
    texts = [example.text for example in examples]
    pairs = [example.text_pair for example in examples]
    if all(pair is None for pair in pairs):
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
    else:
        encoded = tokenizer(
            texts, [pair or "" for pair in pairs], truncation="longest_first", max_length=max_length
        )
    return [list(ids) for ids in encoded["input_ids"]]


# PyTorch prefers cuDNN's attention on Hopper GPUs, but cuDNN builds an execution plan for
# every new input shape, and length-bucketed batches bring a new shape almost every step. On an
# H200 that doubled the time of a first epoch over 1,024 examples for the Qwen1.5-0.5B shape
# (6.8 s against 3.4 s), and with every shape already planned it gained 2 % at most (4B shape:
# 10.6k against 10.4-10.6k tokens/s). The backward pass runs the kernel its forward pass chose.
GPU_ATTENTION_KERNELS = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


@contextlib.contextmanager
def forward_context(device: torch.device, options: ModelOptions) -> Iterator[None]:
    """The precision and attention kernels of a forward pass on `device`."""
    with contextlib.ExitStack() as stack:
        if resolve_precision(options.precision, device) == "bf16-mixed":
            stack.enter_context(torch.autocast(device_type=device.type, dtype=torch.bfloat16))
        if device.type == "cuda":
            stack.enter_context(sdpa_kernel(GPU_ATTENTION_KERNELS))
        yield


@contextlib.contextmanager
def _explain_out_of_memory(
    batch: Batch, options: TrainOptions, *, training: bool
) -> Iterator[None]:
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        rows, width = batch.input_ids.shape
        if training:
            fixes = [f"a smaller --max-tokens (now {options.max_tokens})"]
            if not options.model.gradient_checkpointing:
                fixes.append("--gradient-checkpointing")
            if options.model.precision != "bf16":
                fixes.append("--precision bf16 (bf16 weights: 12 bytes per parameter, not 16)")
            if not options.model.lora_r:
                fixes.append("--lora-r 8 (trains adapters only)")
            doing = "training on"
        else:
            fixes = [f"a smaller --max-tokens (now {options.max_tokens}; prediction doubles it)"]
            doing = "predicting"
        # `from None`: the CUDA error's traceback would keep the batch's tensors alive.
        raise GPUMemoryError(
            f"out of GPU memory {doing} a batch of {rows} x {width} tokens; try "
            f"{', '.join(fixes)} (under `aar-train w2s`, with the --weak- or --strong- prefix)"
        ) from None


def _logits(model: torch.nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    output = model(input_ids=input_ids, attention_mask=mask)
    logits: torch.Tensor = output.logits
    return logits.float()


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * logits.log_softmax(-1)).sum(-1).mean()


def aux_confidence_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float) -> torch.Tensor:
    """Cross-entropy towards a mix of the weak targets and the student's own hard predictions.

    With two classes the student's predictions are thresholded at the quantile that gives
    them the weak labels' class balance in this batch (so the student cannot collapse onto
    one class); with more classes they are the argmax.
    """
    probs = logits.detach().softmax(-1)
    classes = logits.shape[-1]
    if classes == 2:
        positive_share = float(targets[:, 1].mean())
        threshold = torch.quantile(probs[:, 1], 1 - positive_share)
        hard = F.one_hot((probs[:, 1] >= threshold).long(), 2).float()
    else:
        hard = F.one_hot(probs.argmax(-1), classes).float()
    return soft_cross_entropy(logits, (1 - alpha) * targets + alpha * hard)


def _optimizer(
    model: torch.nn.Module, options: TrainOptions, device: torch.device, seed: int
) -> torch.optim.Optimizer:
    parameters = [p for p in model.parameters() if p.requires_grad]
    if any(p.dtype == torch.bfloat16 for p in parameters):
        # torch's AdamW would round most fine-tuning updates to bf16 weights away.
        return StochasticRoundingAdamW(
            parameters, lr=options.lr, weight_decay=options.weight_decay, seed=seed
        )
    # Fused AdamW runs one kernel for all parameters on a GPU; it exists only there.
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        parameters, lr=options.lr, weight_decay=options.weight_decay, fused=fused
    )


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _epoch_plans(lengths: list[int], options: TrainOptions, seed: int) -> Iterator[list[list[int]]]:
    epoch = 0
    while True:
        yield plan_batches(
            lengths, options.max_tokens, options.max_batch, seed=seed * 1_000_003 + epoch
        )
        epoch += 1


def fit(
    model: torch.nn.Module,
    encoded: Sequence[Sequence[int]],
    targets: torch.Tensor,
    options: TrainOptions,
    *,
    pad_token_id: int,
    device: torch.device,
    seed: int,
    description: str = "train",
    progress: bool = True,
) -> TrainStats:
    """Train on (encoded, targets) for `options.epochs` epochs; targets are class probabilities."""
    if len(encoded) != len(targets):
        raise ValueError(f"{len(encoded)} examples but {len(targets)} targets")
    lengths = [len(ids) for ids in encoded]
    batches_per_epoch = len(plan_batches(lengths, options.max_tokens, options.max_batch))
    total = max(1, round(options.epochs * batches_per_epoch))
    warmup = max(1, round(options.warmup_fraction * total))
    aux_warmup = max(1, round(options.aux_warmup_fraction * total))
    optimizer = _optimizer(model, options, device, seed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, total, warmup))
    targets = targets.to(device)
    model.train()
    real = padded = 0
    loss_value = float("nan")
    started = time.perf_counter()
    bar = tqdm(total=total, desc=description, unit="step", disable=not progress, leave=False)
    step = 0
    for plan in _epoch_plans(lengths, options, seed):
        for batch in iterate(encoded, plan, pad_token_id, device):
            if step >= total:
                break
            with _explain_out_of_memory(batch, options, training=True):
                with forward_context(device, options.model):
                    logits = _logits(model, batch.input_ids, batch.attention_mask)
                batch_targets = targets[batch.indices]
                if options.loss == "aux-conf":
                    alpha = options.aux_alpha * min(1.0, step / aux_warmup)
                    loss = aux_confidence_loss(logits, batch_targets, alpha)
                else:
                    loss = soft_cross_entropy(logits, batch_targets)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            real += batch.real_tokens
            padded += batch.padded_tokens
            step += 1
            if step % 10 == 0 or step == total:
                # .item() waits for the GPU; once every few steps keeps the queue full.
                loss_value = loss.item()
                bar.set_postfix(loss=f"{loss_value:.4f}")
            bar.update(1)
        if step >= total:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    bar.close()
    return TrainStats(
        steps=step,
        examples=len(encoded),
        real_tokens=real,
        padded_tokens=padded,
        seconds=time.perf_counter() - started,
        final_loss=loss_value,
    )


@torch.no_grad()
def predict_probs(
    model: torch.nn.Module,
    encoded: Sequence[Sequence[int]],
    options: TrainOptions,
    *,
    pad_token_id: int,
    device: torch.device,
    description: str = "predict",
    progress: bool = True,
) -> torch.Tensor:
    """Class probabilities per example, in the order given (float32, on CPU)."""
    model.eval()
    lengths = [len(ids) for ids in encoded]
    # No gradients or optimizer state at inference: twice the tokens fit in a batch.
    plan = plan_batches(lengths, 2 * options.max_tokens, 2 * options.max_batch)
    out: torch.Tensor | None = None
    for batch in tqdm(
        iterate(encoded, plan, pad_token_id, device),
        total=len(plan),
        desc=description,
        unit="batch",
        disable=not progress,
        leave=False,
    ):
        with _explain_out_of_memory(batch, options, training=False):
            with forward_context(device, options.model):
                logits = _logits(model, batch.input_ids, batch.attention_mask)
            probs = logits.softmax(-1).cpu()
        if out is None:
            out = torch.empty((len(encoded), probs.shape[-1]))
        out[batch.indices] = probs
    model.train()
    assert out is not None, "no examples to predict"
    return out
