"""AdamW for bf16 weights that still learns at fine-tuning learning rates.

bf16 keeps 8 significant bits, so an update smaller than about 1/256 of a weight rounds back to
the same weight. With round-to-nearest (what torch's AdamW does on bf16 weights), AdamW at lr
1e-5 left 85 % of a layer of 0.02-sized weights unchanged after 10 steps, and moved the layer
15 % as far as fp32 weights moved. Here the moments are fp32 and each new weight is rounded up
or down at random, with the probability of its distance to either neighbour: on average a weight
moves as far as in fp32. Weights in bf16 (2 bytes), gradients in bf16 (2) and fp32 moments (8)
are 12 bytes per parameter, against 16 for fp32 weights under bf16 autocast.

Parameters are updated in flat chunks of at most `CHUNK_ELEMENTS`, a few kernels per chunk
rather than several per parameter, with temporaries bounded by the chunk (a parameter larger
than that is a chunk of its own). A chunk shares one step count, and a parameter without a
gradient in a step, next to others with one, counts as a zero gradient (its moments decay),
where torch's AdamW would skip it; in `fit` every trained parameter has a gradient every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
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
    return ((bits + noise) & -_LOW_HALF).view(torch.float32).to(torch.bfloat16)


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
                if any(p.grad is not None for p in chunk):
                    self._update(chunk, group)
        return loss

    def _update(self, chunk: list[torch.Tensor], group: dict[str, Any]) -> None:
        lr, weight_decay, eps = float(group["lr"]), float(group["weight_decay"]), group["eps"]
        beta1, beta2 = (float(beta) for beta in group["betas"])
        # A chunk's moments live, flat, in the state of its first parameter.
        state = self.state[chunk[0]]
        sizes = [p.numel() for p in chunk]
        if not state:
            total = sum(sizes)
            state["step"] = 0
            state["exp_avg"] = torch.zeros(total, dtype=torch.float32, device=chunk[0].device)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        state["step"] += 1
        step = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]

        grads = torch.cat(
            [p.new_zeros(p.numel()) if p.grad is None else p.grad.reshape(-1) for p in chunk]
        ).float()
        exp_avg.lerp_(grads, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grads, grads, value=1 - beta2)
        del grads
        denominator = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(eps)
        weights = torch.cat([p.reshape(-1) for p in chunk]).float()
        if weight_decay:
            weights.mul_(1 - lr * weight_decay)
        weights.addcdiv_(exp_avg, denominator, value=-lr / (1 - beta1**step))
        del denominator
        if chunk[0].dtype == torch.bfloat16:
            updated = round_stochastically(weights, self._generator(weights.device))
        else:
            updated = weights
        parts = [
            part.view_as(p) for part, p in zip(torch.split(updated, sizes), chunk, strict=True)
        ]
        torch._foreach_copy_(chunk, parts)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[device]


def _chunks(params: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Runs of parameters of one dtype and device, each under CHUNK_ELEMENTS in all (or one
    parameter, if it alone is larger)."""
    chunk: list[torch.Tensor] = []
    size = 0
    for parameter in params:
        same = chunk and (parameter.dtype, parameter.device) == (chunk[0].dtype, chunk[0].device)
        if chunk and (not same or size + parameter.numel() > CHUNK_ELEMENTS):
            yield chunk
            chunk, size = [], 0
        chunk.append(parameter)
        size += parameter.numel()
    if chunk:
        yield chunk
