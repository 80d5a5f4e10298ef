"""AdamW for bf16 weights: stochastic rounding is unbiased, fine-tuning updates that torch's
AdamW rounds away on bf16 weights move them as far as fp32 weights move, fp32 parameters get
exactly AdamW's updates, and `fit` uses it for a model in bf16. Real torch, on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from transformers import AutoConfig, AutoModelForSequenceClassification

from aar_trainer import optim
from aar_trainer.models import ModelOptions
from aar_trainer.optim import StochasticRoundingAdamW, round_stochastically
from aar_trainer.train import TrainOptions, fit


def _slope(change: torch.Tensor, reference: torch.Tensor) -> float:
    """How far `change` goes along `reference` (1: as far, on average)."""
    return float((change * reference).sum() / (reference * reference).sum())


def test_stochastic_rounding_lands_on_a_neighbour_and_is_right_on_average() -> None:
    generator = torch.Generator().manual_seed(0)
    # bf16's neighbours around 1 are 2**-7 apart; these values sit 1/8 and 3/4 of the way up.
    for value in (1 + 2**-10, -(1 + 3 * 2**-9)):
        rounded = round_stochastically(torch.full((100_000,), value), generator).float()
        neighbours = {round(x, 7) for x in rounded.unique().tolist()}
        low = 1.0 if value > 0 else -1.0
        assert neighbours == {low, round(low * (1 + 2**-7), 7)}
        assert rounded.mean().item() == pytest.approx(value, abs=2e-5)
    exact = torch.tensor([0.5, -2.0, 3.0])  # already bf16 values: unchanged
    assert torch.equal(round_stochastically(exact.clone(), generator).float(), exact)


def _adamw_changes(make: str, dtype: torch.dtype, start: torch.Tensor) -> torch.Tensor:
    weight = torch.nn.Parameter(start.to(dtype, copy=True))
    optimizer: torch.optim.Optimizer = (
        torch.optim.AdamW([weight], lr=1e-5)
        if make == "torch"
        else StochasticRoundingAdamW([weight], lr=1e-5)
    )
    for step in range(10):
        noise = torch.randn(start.shape, generator=torch.Generator().manual_seed(step))
        weight.grad = noise.to(dtype)
        optimizer.step()
    return (weight.detach().float() - start.to(dtype).float()).flatten()


def test_fine_tuning_updates_move_bf16_weights_as_far_as_fp32_ones() -> None:
    start = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    reference = _adamw_changes("torch", torch.float32, start)
    # torch's AdamW on bf16 weights: most of lr 1e-5's updates round back to the same weight.
    assert _slope(_adamw_changes("torch", torch.bfloat16, start), reference) < 0.3
    assert _slope(_adamw_changes("ours", torch.bfloat16, start), reference) == pytest.approx(
        1, abs=0.1
    )


def test_fp32_parameters_get_adamws_updates_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Small chunks: parameters are grouped, and the 40 x 40 one is cut across three chunks.
    monkeypatch.setattr(optim, "CHUNK_ELEMENTS", 1000)
    generator = torch.Generator().manual_seed(0)
    shapes = [(10, 10), (30, 20), (5,), (40, 40), (7, 3)]
    starts = [torch.randn(shape, generator=generator) for shape in shapes]
    ours = [torch.nn.Parameter(s.clone()) for s in starts]
    theirs = [torch.nn.Parameter(s.clone()) for s in starts]
    mine = StochasticRoundingAdamW(ours, lr=1e-2, weight_decay=0.1)
    reference = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        for a, b in zip(ours, theirs, strict=True):
            b.grad = torch.randn(a.shape, generator=generator)
            a.grad = b.grad.clone()
        mine.step()
        reference.step()
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fit_trains_a_bf16_model_as_far_as_its_fp32_copy() -> None:
    config = AutoConfig.for_model(
        "qwen3", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_labels=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(config)  # type: ignore[no-untyped-call]
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(8, 32, (64,), generator=generator).tolist()
    encoded = [torch.randint(1, 256, (n,), generator=generator).tolist() for n in lengths]
    targets = F.one_hot(torch.randint(0, 2, (64,), generator=generator), 2).float()
    cpu = torch.device("cpu")
    changes = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = copy.deepcopy(base).to(dtype)
        before = {name: p.detach().float().clone() for name, p in model.named_parameters()}
        options = TrainOptions(
            epochs=3, lr=1e-5, warmup_fraction=0, max_tokens=512, max_batch=16,
            model=ModelOptions(precision=precision),
        )  # fmt: skip
        fit(model, encoded, targets, options, pad_token_id=0, device=cpu, seed=0, progress=False)
        changes[precision] = torch.cat(
            [
                (p.detach().float() - before[name]).flatten()
                for name, p in model.named_parameters()
                if "layers" in name and p.dim() == 2
            ]
        )
    assert _slope(changes["bf16"], changes["fp32"]) == pytest.approx(1, abs=0.15)
