"""AdamW for bf16 weights that still learns at fine-tuning learning rates.

bf16 keeps 8 significant bits, so an update smaller than about 1/256 of a weight rounds back to
the same weight. With round-to-nearest (what torch's AdamW does on bf16 weights), AdamW at lr
1e-5 left 85 % of a layer of 0.02-sized weights unchanged after 10 steps, and moved the layer
15 % as far as fp32 weights moved. Here the moments are fp32 and each new weight is rounded up
or down at random, with the probability of its distance to either neighbour: on average a weight
moves as far as in fp32. Weights in bf16 (2 bytes), gradients in bf16 (2) and fp32 moments (8)
are 12 bytes per parameter, against 16 for fp32 weights under bf16 autocast.

Parameters are updated in flat chunks of at most `CHUNK_ELEMENTS`, a few kernels per chunk
rather than several per parameter, with temporaries bounded by the chunk: a parameter larger
than that (a 4B model's embedding has 389M elements) is cut into pieces. A chunk shares one step
count, and a parameter without a gradient in a step, next to others with one, counts as a zero
gradient (its moments decay), where torch's AdamW would skip it; in `fit` every trained
parameter has a gradient every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

CHUNK_ELEMENTS = 1 << 26  # 256 MiB per fp32 temporary
_LOW_HALF = 1 << 16  # the fp32 bits a bf16 drops


def round_stochastically(values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 -> bf16, rounding each value's magnitude up with the probability of the part of it
    below bf16's resolution, so that the result equals the value in expectation."""
    bits = values.view(torch.int32)
    # fp32 is sign and magnitude: adding to the low bits grows the magnitude for either sign,
    # and clearing them truncates it.
    noise = torch.randint(
        0, _LOW_HALF, bits.shape, dtype=torch.int32, device=bits.device, generator=generator
    )
    # In the noise's buffer: one temporary the size of the values, not three.
    rounded = noise.add_(bits).bitwise_and_(-_LOW_HALF)
    return rounded.view(torch.float32).to(torch.bfloat16)


class StochasticRoundingAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) with fp32 moments; bf16 parameters get
    their new values by stochastic rounding, fp32 ones exactly."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        *,
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        seed: int = 0,
    ) -> None:
        defaults = {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps}
        super().__init__(params, defaults)
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            # Chunks over every parameter, with or without a gradient this step, so that each
            # chunk keeps its parameters and its moments from step to step.
            for chunk in _chunks(group["params"]):
                if any(piece.param.grad is not None for piece in chunk):
                    self._update(chunk, group)
        return loss

    def _update(self, chunk: list[_Piece], group: dict[str, Any]) -> None:
        lr, weight_decay, eps = float(group["lr"]), float(group["weight_decay"]), group["eps"]
        beta1, beta2 = (float(beta) for beta in group["betas"])
        # A chunk's moments live, flat, in the state of its first piece's parameter.
        first = chunk[0]
        state = self.state[first.param].setdefault(f"chunk@{first.start}", {})
        if not state:
            total = sum(piece.stop - piece.start for piece in chunk)
            state["step"] = 0
            state["exp_avg"] = torch.zeros(total, dtype=torch.float32, device=first.param.device)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        state["step"] += 1
        step = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]

        scratch = torch.cat([piece.grad() for piece in chunk]).float()
        exp_avg.lerp_(scratch, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(scratch, scratch, value=1 - beta2)
        # The gradients are spent: their buffer takes the denominator.
        denominator = torch.div(exp_avg_sq, 1 - beta2**step, out=scratch).sqrt_().add_(eps)
        weights = torch.cat([piece.values() for piece in chunk]).float()
        if weight_decay:
            weights.mul_(1 - lr * weight_decay)
        weights.addcdiv_(exp_avg, denominator, value=-lr / (1 - beta1**step))
        del scratch, denominator
        if first.param.dtype == torch.bfloat16:
            weights = round_stochastically(weights, self._generator(weights.device))
        sizes = [piece.stop - piece.start for piece in chunk]
        torch._foreach_copy_([piece.values() for piece in chunk], list(torch.split(weights, sizes)))

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[device]


@dataclass(frozen=True)
class _Piece:
    """Elements start:stop of a parameter, flattened."""

    param: torch.Tensor
    start: int
    stop: int

    def values(self) -> torch.Tensor:
        return self.param.view(-1)[self.start : self.stop]

    def grad(self) -> torch.Tensor:
        if self.param.grad is None:
            return self.param.new_zeros(self.stop - self.start)
        return self.param.grad.reshape(-1)[self.start : self.stop]


def _chunks(params: list[torch.Tensor]) -> Iterator[list[_Piece]]:
    """Runs of parameters of one dtype and device, CHUNK_ELEMENTS elements at most, cutting a
    parameter into pieces where a chunk fills up."""
    chunk: list[_Piece] = []
    size = 0
    for parameter in params:
        start = 0
        while start < parameter.numel():
            kind = (parameter.dtype, parameter.device)
            if chunk and (
                size == CHUNK_ELEMENTS or kind != (chunk[0].param.dtype, chunk[0].param.device)
            ):
                yield chunk
                chunk, size = [], 0
            stop = min(parameter.numel(), start + CHUNK_ELEMENTS - size)
            chunk.append(_Piece(parameter, start, stop))
            size += stop - start
            start = stop
    if chunk:
        yield chunk
