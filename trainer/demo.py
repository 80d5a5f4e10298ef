"""The project's own small task and tiny models, made offline and deterministically from a seed.

The task ("cues"): each text is a shuffle of filler words and a few cue words of its class
(now and then a stray cue of the other class, so the ceiling stays below 100 %). The tiny weak
teacher has a short context window (its config's `max_position_embeddings`), so it reads only
the start of each text: right when a cue falls there, guessing otherwise. The strong student
reads whole texts; learning from the teacher's labels on texts whose start holds a cue, it picks
up every cue of that class wherever it stands, and so beats its teacher. That is the gap a
weak-to-strong method has to recover, from real training, in seconds on a CPU.

The models are Qwen2 (the weak teacher's family, Qwen1.5) and Qwen3 (the strong student's)
configurations shrunk to a few thousand parameters, with a byte-level BPE tokenizer trained on
the task's words, saved with `save_pretrained` so they load through the same `from_pretrained`
path as a hub id.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from aar_trainer.bundle import Bundle, Example, Manifest, write_bundle, write_scorer_labels
from aar_trainer.train import TrainOptions

# Qwen's end-of-text token, which Qwen checkpoints also use for padding.
END_OF_TEXT = "<|endoftext|>"


class CuesTask(BaseModel):
    """How the cues task is generated; the defaults are the shipped demo."""

    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    # Another draw of the same task (same words, same models): a fresh split no agent has seen,
    # for reproductions (docs/scorer.md, Reproduction). None: the shipped demo's own draw.
    split_seed: int | None = None
    cues_per_class: int = Field(default=20, ge=1)
    fillers: int = Field(default=400, ge=1)
    cues_per_text: tuple[int, int] = (2, 3)
    fillers_per_text: tuple[int, int] = (6, 16)
    stray_cue_probability: float = Field(default=0.15, ge=0, le=1)
    weak_train: int = 600
    unlabelled: int = 1500
    validation: int = 500
    test: int = 500

    def vocabulary(self) -> list[str]:
        """Made-up words (so nothing in a word gives its class away): class 0's cues, class
        1's cues, then the fillers."""
        rng = random.Random(self.seed)
        syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
        words: set[str] = set()
        size = 2 * self.cues_per_class + self.fillers
        while len(words) < size:
            words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 3))))
        ordered = sorted(words)
        rng.shuffle(ordered)
        return ordered


def _text(task: CuesTask, label: int, rng: random.Random, words: list[str]) -> str:
    count = task.cues_per_class
    cues = [
        words[label * count : (label + 1) * count],
        words[(1 - label) * count : (2 - label) * count],
    ]
    fillers = words[2 * count :]
    chosen = rng.choices(cues[0], k=rng.randint(*task.cues_per_text))
    if rng.random() < task.stray_cue_probability:
        chosen.append(rng.choice(cues[1]))
    chosen += [rng.choice(fillers) for _ in range(rng.randint(*task.fillers_per_text))]
    rng.shuffle(chosen)
    return " ".join(chosen)


def make_cues_task(root: Path, task: CuesTask | None = None) -> tuple[Bundle, list[int]]:
    """Write the bundle; returns it and the test labels (kept out of it, as a scorer would)."""
    task = task or CuesTask()
    rng = random.Random(task.seed if task.split_seed is None else f"{task.seed}/{task.split_seed}")
    words = task.vocabulary()

    def examples(split: str, count: int) -> list[Example]:
        out = []
        for index in range(count):
            label = rng.randrange(2)
            text = _text(task, label, rng, words)
            out.append(Example(id=f"{split}-{index}", text=text, label=label))
        return out

    weak_train = examples("weak", task.weak_train)
    unlabelled = examples("train", task.unlabelled)
    validation = examples("validation", task.validation)
    test = examples("test", task.test)
    manifest = Manifest(
        name="cues",
        description="Which class's cue words does the text hold? (aar's generated demo task)",
        labels=[0, 1],
    )
    bundle = write_bundle(
        root,
        manifest,
        {
            "weak_train": weak_train,
            "unlabelled": unlabelled,
            # The same texts as `unlabelled`, with their labels: the ceiling is the student
            # trained on ground truth instead of the teacher's labels (Burns et al.).
            "ceiling_train": unlabelled,
            "validation": validation,
            "test": test,
        },
    )
    return bundle, [int(example.label or 0) for example in test]


class TinyModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    family: Literal["qwen2", "qwen3"]
    hidden_size: int = 32
    layers: int = 1
    heads: int = 2
    intermediate_size: int = 64
    context: int = Field(default=512, description="max_position_embeddings: tokens it can read")


# Stand-ins for Qwen/Qwen1.5-0.5B-Chat (Qwen2 architecture) and Qwen/Qwen3-4B-Base.
TINY_WEAK = TinyModel(
    family="qwen2", hidden_size=16, layers=1, heads=2, intermediate_size=32, context=4
)
TINY_STRONG = TinyModel(family="qwen3", hidden_size=64, layers=2, heads=4, intermediate_size=128)


# Training settings for the tiny models: randomly initialised, they need far larger learning
# rates than a pretrained checkpoint, and a from-scratch student trusts its own early guesses
# less (a smaller auxiliary-loss weight than Burns et al.'s 0.75).
DEMO_WEAK_OPTIONS = TrainOptions(epochs=5, lr=1e-3, max_batch=16, max_tokens=2048)
DEMO_STRONG_OPTIONS = TrainOptions(epochs=5, lr=3e-3, max_batch=32, max_tokens=2048, aux_alpha=0.3)


def demo_w2s_flags() -> list[str]:
    """The `aar-train w2s` flags that train the tiny models with the settings above."""
    flags = []
    for prefix, options in (("weak", DEMO_WEAK_OPTIONS), ("strong", DEMO_STRONG_OPTIONS)):
        for name in ("epochs", "lr", "max_batch", "max_tokens"):
            flags += [f"--{prefix}-{name.replace('_', '-')}", str(getattr(options, name))]
    return [*flags, "--strong-aux-alpha", str(DEMO_STRONG_OPTIONS.aux_alpha)]


def save_tokenizer(words: list[str], root: Path) -> int:
    """A byte-level BPE tokenizer, like Qwen's, trained until each of `words` is one token;
    saved so that `AutoTokenizer` loads it as Qwen's own tokenizer class. Returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8 * len(words) + 256,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([" " + " ".join(words)] * 2, trainer)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend, pad_token=END_OF_TEXT, eos_token=END_OF_TEXT
    )
    tokenizer.save_pretrained(root)
    return int(backend.get_vocab_size())


def save_tiny_model(root: Path, spec: TinyModel, words: list[str], *, seed: int = 0) -> None:
    """A randomly initialised classifier and its tokenizer, written with `save_pretrained`."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    vocab_size = save_tokenizer(words, root)
    config = AutoConfig.for_model(
        spec.family,
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        head_dim=spec.hidden_size // spec.heads,
        max_position_embeddings=spec.context,
        pad_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
        num_labels=2,
    )
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)  # type: ignore[no-untyped-call]
    model.save_pretrained(root)


def make_demo(root: Path, task: CuesTask | None = None) -> dict[str, Path]:
    """The cues task, its test labels and the tiny weak and strong models under `root`."""
    task = task or CuesTask()
    _, test_labels = make_cues_task(root / "task", task)
    write_scorer_labels(root / "test-labels.json", test_labels)
    words = task.vocabulary()
    save_tiny_model(root / "models" / "weak", TINY_WEAK, words, seed=task.seed)
    save_tiny_model(root / "models" / "strong", TINY_STRONG, words, seed=task.seed)
    return {
        "task": root / "task",
        "test_labels": root / "test-labels.json",
        "weak": root / "models" / "weak",
        "strong": root / "models" / "strong",
    }
