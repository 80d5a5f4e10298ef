"""Hugging Face sequence classifiers named by id or path: loading with SDPA attention, the
precision for the device, optional LoRA, gradient checkpointing and torch.compile."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

Precision = Literal["auto", "bf16", "bf16-mixed", "fp32"]


class ModelOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # `bf16`: weights in bf16 (halves memory; what a 4B full fine-tune needs on one GPU);
    # `bf16-mixed`: fp32 weights and optimizer, bf16 autocast; `auto`: bf16-mixed on a GPU,
    # fp32 on CPU (CPUs gain little from bf16).
    precision: Precision = "auto"
    lora_r: int = Field(default=0, ge=0, description="LoRA rank; 0 is a full fine-tune")
    lora_alpha: int = Field(default=16, ge=1)
    gradient_checkpointing: bool = False
    compile: bool = False


def resolve_precision(precision: Precision, device: torch.device) -> Precision:
    if device.type != "cuda":
        if precision in ("bf16", "bf16-mixed"):
            return precision
        return "fp32"
    return "bf16-mixed" if precision == "auto" else precision


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        # Decoder-only checkpoints often ship without a pad token; the classifier finds each
        # sequence's last real token by looking for the pad token, so it must exist.
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(
    name_or_path: str,
    num_labels: int,
    options: ModelOptions,
    device: torch.device,
    pad_token_id: int,
) -> torch.nn.Module:
    """A sequence classifier with a fresh `num_labels` head, on `device`, ready to train."""
    precision = resolve_precision(options.precision, device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(
        name_or_path,
        num_labels=num_labels,
        dtype=dtype,
        attn_implementation="sdpa",
        # The checkpoint's own head (if any) has another number of classes.
        ignore_mismatched_sizes=True,
    )
    model.config.pad_token_id = pad_token_id
    if options.gradient_checkpointing:
        model.gradient_checkpointing_enable(  # type: ignore[no-untyped-call]
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        model.config.use_cache = False
    module: torch.nn.Module = model
    if options.lora_r:
        module = with_lora(model, options)
    module.to(device)
    if options.compile:
        # Batch shapes vary with length bucketing: dynamic shapes avoid one compile per shape.
        module = torch.compile(module, dynamic=True)  # type: ignore[assignment]
    return module


def with_lora(model: PreTrainedModel, options: ModelOptions) -> torch.nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
    )
    wrapped: torch.nn.Module = get_peft_model(model, config)
    return wrapped


def context_length(module: torch.nn.Module) -> int:
    """The most tokens the model reads (its position table); longer inputs are truncated."""
    config = getattr(getattr(module, "_orig_mod", module), "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if limit else 1 << 30


def unwrap(module: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside torch.compile and peft wrappers (for save_pretrained)."""
    inner: object = getattr(module, "_orig_mod", module)
    if hasattr(inner, "merge_and_unload"):
        inner = inner.merge_and_unload()
    assert isinstance(inner, PreTrainedModel)
    return inner
