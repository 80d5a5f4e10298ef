"""Readers that turn records of known datasets into binary examples, and the converter that
splits them into a task bundle (from a jsonl file, or from the Hugging Face hub with internet).

Every format is a yes/no question: is this answer correct, is the first response the better
one, is this review positive. Records are split before they are converted, so the two
examples made from one record (a correct and a wrong answer) never straddle two splits.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from aar_trainer.bundle import BundleError, Example, Manifest, SplitName, write_bundle

Record = dict[str, Any]
Format = Literal[
    "text", "preference", "correctness", "sciq", "boolq", "cosmos_qa", "amazon_polarity",
    "anthropic_hh",
]  # fmt: skip

# Where each Burns et al. dataset lives on the Hugging Face hub (for `--hf` without a name).
HUB_NAMES: dict[str, str] = {
    "sciq": "allenai/sciq",
    "boolq": "google/boolq",
    "cosmos_qa": "allenai/cosmos_qa",
    "amazon_polarity": "fancyzhx/amazon_polarity",
    "anthropic_hh": "Anthropic/hh-rlhf",
}


def _field(record: Record, *names: str) -> Any:
    for name in names:
        if name in record and record[name] is not None:
            return record[name]
    raise BundleError(f"record has none of the fields {list(names)}: {sorted(record)}")


def _text(record: Record, rng: random.Random) -> Iterator[tuple[str, str | None, int]]:
    yield str(_field(record, "text")), record.get("text_pair"), int(_field(record, "label"))


def _preference(record: Record, rng: random.Random) -> Iterator[tuple[str, str | None, int]]:
    # Which of two responses is better; the better one is first or second at random, so
    # position carries no signal. Label 0: the first, 1: the second.
    chosen, rejected = str(_field(record, "chosen")), str(_field(record, "rejected"))
    second_is_better = rng.random() < 0.5
    first, second = (rejected, chosen) if second_is_better else (chosen, rejected)
    pair = f"First response:\n{first}\n\nSecond response:\n{second}"
    yield str(record.get("prompt") or ""), pair, int(second_is_better)


def _correctness(record: Record, rng: random.Random) -> Iterator[tuple[str, str | None, int]]:
    problem = str(_field(record, "problem", "question", "prompt"))
    solution = str(_field(record, "solution", "response", "answer", "code"))
    yield problem, solution, int(bool(_field(record, "correct", "is_correct", "label")))


def _answer_pairs(
    question: str, correct: str, wrong: list[str], rng: random.Random
) -> Iterator[tuple[str, str | None, int]]:
    # One correct and one wrong answer per question: balanced classes, as in Burns et al.
    yield question, f"Answer: {correct}", 1
    yield question, f"Answer: {rng.choice(wrong)}", 0


def _sciq(record: Record, rng: random.Random) -> Iterator[tuple[str, str | None, int]]:
    question = f"{record.get('support') or ''}\n{_field(record, 'question')}".strip()
    wrong = [str(record[f"distractor{i}"]) for i in (1, 2, 3) if record.get(f"distractor{i}")]
    yield from _answer_pairs(question, str(_field(record, "correct_answer")), wrong, rng)


def _cosmos_qa(record: Record, rng: random.Random) -> Iterator[tuple[str, str | None, int]]:
    question = f"{_field(record, 'context')}\n{_field(record, 'question')}"
    answers = [str(record[f"answer{i}"]) for i in range(4) if f"answer{i}" in record]
    right = int(_field(record, "label"))
    wrong = [answer for i, answer in enumerate(answers) if i != right]
    yield from _answer_pairs(question, answers[right], wrong, rng)


def _boolq(record: Record, rng: random.Random) -> Iterator[tuple[str, str | None, int]]:
    question = str(_field(record, "question")).rstrip("?") + "?"
    yield str(_field(record, "passage")), question, int(bool(_field(record, "answer", "label")))


def _amazon_polarity(record: Record, rng: random.Random) -> Iterator[tuple[str, str | None, int]]:
    text = f"{record.get('title') or ''}\n{_field(record, 'content', 'text')}".strip()
    yield text, None, int(_field(record, "label"))


def _anthropic_hh(record: Record, rng: random.Random) -> Iterator[tuple[str, str | None, int]]:
    # Both transcripts share the conversation up to the final reply: that is the prompt.
    chosen, rejected = str(_field(record, "chosen")), str(_field(record, "rejected"))
    cut = len(_common_prefix(chosen, rejected).rpartition("\n\nAssistant:")[0])
    yield from _preference(
        {"prompt": chosen[:cut], "chosen": chosen[cut:], "rejected": rejected[cut:]}, rng
    )


def _common_prefix(a: str, b: str) -> str:
    size = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        size += 1
    return a[:size]


READERS: dict[str, Callable[[Record, random.Random], Iterator[tuple[str, str | None, int]]]] = {
    "text": _text,
    "preference": _preference,
    "correctness": _correctness,
    "sciq": _sciq,
    "boolq": _boolq,
    "cosmos_qa": _cosmos_qa,
    "amazon_polarity": _amazon_polarity,
    "anthropic_hh": _anthropic_hh,
}


def to_examples(records: Iterable[Record], fmt: str, prefix: str, seed: int) -> list[Example]:
    """Examples of one split; ids are `<prefix>-<record>-<n>`."""
    reader = READERS.get(fmt)
    if reader is None:
        raise BundleError(f"unknown format {fmt!r}; one of {sorted(READERS)}")
    rng = random.Random(seed)
    examples = []
    for number, record in enumerate(records):
        key = f"{prefix}-{number}"
        for part, (text, pair, label) in enumerate(reader(record, rng)):
            if label not in (0, 1):
                raise BundleError(f"record {number}: label must be 0 or 1 (got {label!r})")
            examples.append(
                Example(id=f"{key}-{part}", text=text or " ", text_pair=pair, label=label)
            )
    return examples


SPLIT_ORDER: tuple[SplitName, ...] = ("weak_train", "unlabelled", "validation", "test")


def convert(
    records: list[Record],
    fmt: str,
    root: Path,
    *,
    name: str,
    fractions: tuple[float, float, float, float] = (0.2, 0.5, 0.1, 0.2),
    seed: int = 0,
) -> list[int]:
    """Write a bundle from records; returns the test labels (keep them away from agents).

    `fractions` share the shuffled records between weak_train, unlabelled, validation and test;
    the unlabelled split's labels become `ceiling_train`.
    """
    if len(fractions) != 4 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise BundleError(f"fractions must be 4 non-negative shares summing to 1 (got {fractions})")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    splits: dict[SplitName, list[Example]] = {}
    start = 0
    for index, (split, fraction) in enumerate(zip(SPLIT_ORDER, fractions, strict=True)):
        end = len(order) if index == 3 else start + round(fraction * len(order))
        chosen = [records[i] for i in order[start:end]]
        splits[split] = to_examples(chosen, fmt, split, seed + index)
        if not splits[split]:
            raise BundleError(
                f"{len(records)} records leave the {split} split empty; give more records"
            )
        start = end
    splits["ceiling_train"] = splits["unlabelled"]
    manifest = Manifest(name=name, description=f"converted from {fmt} records", labels=[0, 1])
    write_bundle(root, manifest, splits)
    return [int(example.label or 0) for example in splits["test"]]


def read_jsonl(path: Path) -> list[Record]:
    records = []
    with path.open() as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise BundleError(f"{path}:{number}: not JSON: {error}") from error
    return records


def load_hub(dataset: str, split: str, config: str | None, limit: int | None) -> list[Record]:
    """Records of a Hugging Face dataset (needs internet and `pip install datasets`)."""
    try:
        from datasets import load_dataset  # type: ignore[import-not-found]
    except ImportError as error:
        raise BundleError(
            "converting from the Hugging Face hub needs the `datasets` package: "
            "pip install datasets (or download the records as jsonl and pass --input)"
        ) from error
    data = load_dataset(dataset, config, split=split)
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    return [dict(row) for row in data]
