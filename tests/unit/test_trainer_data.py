"""The trainer's data side: task bundles, dataset readers and the converter, length-bucketed
batches, and the loss functions (no model is trained here)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from aar_trainer.batching import collate, plan_batches
from aar_trainer.bundle import Bundle, BundleError, Example, Manifest, write_bundle
from aar_trainer.formats import convert, to_examples
from aar_trainer.models import ModelOptions
from aar_trainer.pipeline import accuracy, confident_subset, pgr
from aar_trainer.train import aux_confidence_loss, forward_context, soft_cross_entropy


def _examples(count: int, prefix: str) -> list[Example]:
    return [Example(id=f"{prefix}-{i}", text=f"text {i}", label=i % 2) for i in range(count)]


def test_bundle_round_trip_drops_labels_from_unlabelled_and_test(tmp_path: Path) -> None:
    splits = {
        name: _examples(4, name) for name in ("weak_train", "unlabelled", "validation", "test")
    }
    bundle = write_bundle(tmp_path, Manifest(name="t", labels=[0, 1]), splits)  # type: ignore[arg-type]
    assert [e.label for e in bundle.split("weak_train")] == [0, 1, 0, 1]
    assert all(e.label is None for e in bundle.split("test"))
    assert all(e.label is None for e in bundle.split("unlabelled"))
    assert not bundle.has_ceiling_split
    with pytest.raises(BundleError, match="has no ceiling_train split"):
        bundle.split("ceiling_train")


def test_bundle_errors_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"has no task\.json"):
        Bundle(tmp_path)
    splits = {
        name: _examples(2, name) for name in ("weak_train", "unlabelled", "validation", "test")
    }
    write_bundle(tmp_path, Manifest(name="t", labels=["yes", "no"]), splits)  # type: ignore[arg-type]
    with pytest.raises(
        BundleError, match=r"label 0 is not one of the task's labels \['yes', 'no'\]"
    ):
        Bundle(tmp_path).split("weak_train")
    (tmp_path / "validation.jsonl").write_text('{"id": "a", "text": "x", "colour": 1}\n')
    with pytest.raises(BundleError, match=r"validation.jsonl:1: not an example"):
        Bundle(tmp_path).split("validation")


def test_plan_batches_covers_every_example_once_within_the_token_budget() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(500)]
    plan = plan_batches(lengths, max_tokens=2048, max_batch=32, seed=3)
    assert sorted(i for batch in plan for i in batch) == list(range(500))
    for batch in plan:
        assert len(batch) <= 32
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded <= 2048
        assert sum(lengths[i] for i in batch) >= 0.9 * padded
    # The same seed plans the same epoch; another seed shuffles it.
    assert plan == plan_batches(lengths, max_tokens=2048, max_batch=32, seed=3)
    assert plan != plan_batches(lengths, max_tokens=2048, max_batch=32, seed=4)


def test_bucketing_pads_far_less_than_fixed_batches() -> None:
    rng = random.Random(1)
    lengths = [min(512, max(16, round(rng.lognormvariate(5.2, 0.6)))) for _ in range(2000)]
    encoded = [[1] * n for n in lengths]

    def padding(plan: list[list[int]]) -> float:
        batches = [collate(encoded, b, 0, torch.device("cpu")) for b in plan]
        real = sum(b.real_tokens for b in batches)
        return 1 - real / sum(b.padded_tokens for b in batches)

    shuffled = list(range(2000))
    rng.shuffle(shuffled)
    fixed = [shuffled[i : i + 16] for i in range(0, 2000, 16)]
    bucketed = padding(plan_batches(lengths, max_tokens=16 * 512, max_batch=256, seed=0))
    assert padding(fixed) > 0.3
    assert bucketed < 0.05


def test_plan_batches_refuses_a_budget_below_the_longest_example() -> None:
    with pytest.raises(ValueError, match="raise --max-tokens or lower --max-length"):
        plan_batches([10, 600], max_tokens=512, max_batch=8)


def test_collate_right_pads_and_masks() -> None:
    batch = collate([[5, 6, 7], [8]], [0, 1], pad_token_id=0, device=torch.device("cpu"))
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert (batch.real_tokens, batch.padded_tokens) == (4, 6)


def test_forward_context_keeps_cudnn_attention_off_on_a_gpu_only() -> None:
    # cuDNN plans every new batch shape; bucketed batches bring one almost every step.
    cuda = torch.backends.cuda
    assert cuda.cudnn_sdp_enabled()
    with forward_context(torch.device("cuda"), ModelOptions(precision="bf16")):
        assert not cuda.cudnn_sdp_enabled()
        assert cuda.flash_sdp_enabled()
        assert cuda.mem_efficient_sdp_enabled()
    assert cuda.cudnn_sdp_enabled()
    with forward_context(torch.device("cpu"), ModelOptions(precision="bf16-mixed")):
        assert cuda.cudnn_sdp_enabled()
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize(
    ("fmt", "record", "expected"),
    [
        ("boolq", {"question": "is it", "passage": "P.", "answer": True}, [("P.", "is it?", 1)]),
        ("amazon_polarity", {"title": "Bad", "content": "X.", "label": 0}, [("Bad\nX.", None, 0)]),
        ("correctness", {"problem": "1+1", "solution": "2", "correct": True}, [("1+1", "2", 1)]),
        (
            "sciq",
            {"question": "Q", "support": "", "correct_answer": "a"}
            | {f"distractor{i}": "b" for i in (1, 2, 3)},
            [("Q", "Answer: a", 1), ("Q", "Answer: b", 0)],
        ),
        (
            "cosmos_qa",
            {"context": "C", "question": "Q", "label": 1}
            | {f"answer{i}": "r" if i == 1 else "w" for i in range(4)},
            [("C\nQ", "Answer: r", 1), ("C\nQ", "Answer: w", 0)],
        ),
    ],
)
def test_readers_turn_records_into_binary_examples(
    fmt: str, record: dict[str, object], expected: list[tuple[str, str | None, int]]
) -> None:
    examples = to_examples([record], fmt, "s", seed=0)
    assert [(e.text, e.text_pair, e.label) for e in examples] == expected


def test_preference_pairs_put_the_better_response_first_or_second_at_random() -> None:
    records = [{"prompt": f"p{i}", "chosen": "good", "rejected": "bad"} for i in range(200)]
    examples = to_examples(records, "preference", "s", seed=0)
    for example in examples:
        assert example.text_pair is not None
        first = example.text_pair.split("\n")[1]
        assert example.label == (0 if first == "good" else 1)
    share = sum(e.label == 1 for e in examples) / len(examples)
    assert 0.4 < share < 0.6


def test_anthropic_hh_splits_off_the_shared_conversation() -> None:
    record = {
        "chosen": "\n\nHuman: hi\n\nAssistant: hello, how can I help?",
        "rejected": "\n\nHuman: hi\n\nAssistant: go away",
    }
    (example,) = to_examples([record], "anthropic_hh", "s", seed=0)
    assert example.text == "\n\nHuman: hi"
    assert example.text_pair is not None
    assert "Assistant: hello, how can I help?" in example.text_pair
    assert "Assistant: go away" in example.text_pair


def test_convert_keeps_both_examples_of_a_record_in_one_split(tmp_path: Path) -> None:
    records = [
        {"question": f"q{i}", "support": "", "correct_answer": "a", "distractor1": "b"}
        for i in range(50)
    ]
    test_labels = convert(records, "sciq", tmp_path / "sciq", name="sciq", seed=1)
    bundle = Bundle(tmp_path / "sciq")
    seen: dict[str, str] = {}
    for split in ("weak_train", "unlabelled", "validation", "test"):
        for example in bundle.split(split):  # type: ignore[arg-type]
            assert seen.setdefault(example.text, split) == split
    assert len(test_labels) == len(bundle.split("test")) == 20
    ceiling = bundle.split("ceiling_train")
    assert [e.id for e in ceiling] == [e.id for e in bundle.split("unlabelled")]
    assert json.loads((tmp_path / "sciq" / "task.json").read_text())["labels"] == [0, 1]


def test_convert_refuses_too_few_records(tmp_path: Path) -> None:
    records = [{"text": "x", "label": 1}] * 3
    with pytest.raises(BundleError, match=r"leave the \w+ split empty; give more records"):
        convert(records, "text", tmp_path / "t", name="t")


def test_aux_confidence_loss_is_cross_entropy_at_alpha_zero_and_keeps_class_balance() -> None:
    torch.manual_seed(0)
    logits = torch.randn(64, 2)
    weak = torch.softmax(torch.randn(64, 2), -1)
    assert torch.allclose(aux_confidence_loss(logits, weak, 0.0), soft_cross_entropy(logits, weak))
    # At alpha 1 the target is the student's own thresholded guess, with the weak labels'
    # share of class 1 (not the argmax, which could put every example in one class).
    skewed = logits + torch.tensor([0.0, 5.0])
    weak_share = float(weak[:, 1].mean())
    probs = skewed.softmax(-1)[:, 1]
    threshold = torch.quantile(probs, 1 - weak_share)
    hard = torch.nn.functional.one_hot((probs >= threshold).long(), 2).float()
    assert torch.allclose(aux_confidence_loss(skewed, weak, 1.0), soft_cross_entropy(skewed, hard))
    assert abs(float(hard[:, 1].mean()) - weak_share) < 0.05


def test_confident_subset_keeps_the_surest_share_of_each_predicted_class() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55], [0.99, 0.01]])
    # Class 0: 0.99 and 0.9 kept of three (round(1.5) == 2); class 1: 0.8 kept of two.
    assert confident_subset(probs, 0.5) == [0, 2, 4]
    assert confident_subset(probs, 1.0) == [0, 1, 2, 3, 4]


def test_accuracy_and_pgr() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert accuracy(probs, [0, 1, 1]) == pytest.approx(2 / 3)
    assert pgr(weak=0.6, w2s=0.7, ceiling=0.8) == pytest.approx(0.5)
    assert pgr(weak=0.6, w2s=0.7, ceiling=0.6) is None
