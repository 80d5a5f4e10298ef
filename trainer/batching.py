"""Length-bucketed batches: examples of similar length share a batch, and a batch holds about
a fixed number of tokens, so almost no compute is spent on padding and short examples fill
large batches."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

# A batch is closed before padding would exceed this share of its tokens: where lengths are
# sparse (small datasets, long tails) batches get smaller instead of wasteful.
MAX_PADDING = 0.1


@dataclass(frozen=True)
class Batch:
    indices: list[int]  # positions in the encoded dataset
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    # Counted on the host: summing the mask on a GPU would make every step wait for the device.
    real_tokens: int

    @property
    def padded_tokens(self) -> int:
        return self.input_ids.numel()


def plan_batches(
    lengths: Sequence[int],
    max_tokens: int,
    max_batch: int,
    *,
    seed: int | None = None,
) -> list[list[int]]:
    """Group example indices into batches of `max_tokens` (padded) tokens at most, each with at
    most `MAX_PADDING` of its tokens padding.

    Sorted by length so each batch pads to a near-equal length; with a seed, equal lengths are
    shuffled and the batch order is shuffled (training); without one the plan is in length
    order (inference).
    """
    if max_tokens < max(lengths, default=0):
        raise ValueError(
            f"max_tokens ({max_tokens}) is smaller than the longest example ({max(lengths)} "
            "tokens): raise --max-tokens or lower --max-length"
        )
    rng = random.Random(seed)
    tiebreak = [rng.random() for _ in lengths] if seed is not None else [0.0] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], tiebreak[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for index in order:
        # Sorted ascending, so this example is the longest in the batch so far.
        padded = (len(current) + 1) * lengths[index]
        if current and (
            padded > max_tokens
            or len(current) >= max_batch
            or padded - real - lengths[index] > MAX_PADDING * padded
        ):
            batches.append(current)
            current, real = [], 0
        current.append(index)
        real += lengths[index]
    if current:
        batches.append(current)
    if seed is not None:
        rng.shuffle(batches)
    return batches


def collate(
    encoded: Sequence[Sequence[int]], indices: list[int], pad_token_id: int, device: torch.device
) -> Batch:
    """Right-padded tensors for one planned batch."""
    width = max(len(encoded[i]) for i in indices)
    ids = torch.full((len(indices), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, index in enumerate(indices):
        tokens = encoded[index]
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[row, : len(tokens)] = 1
    return Batch(
        indices=indices,
        input_ids=ids.to(device, non_blocking=True),
        attention_mask=mask.to(device, non_blocking=True),
        real_tokens=sum(len(encoded[i]) for i in indices),
    )


def iterate(
    encoded: Sequence[Sequence[int]],
    plan: list[list[int]],
    pad_token_id: int,
    device: torch.device,
) -> Iterator[Batch]:
    for indices in plan:
        yield collate(encoded, indices, pad_token_id, device)
