"""An offline stand-in for Claude that does a small, real piece of weak-to-strong research.

Without an Anthropic key the gateway's upstream is the local Messages-API stand-in
(`aar_devcluster.anthropic_stub`); with `--researcher` it answers with this module, so a demo
with no key shows the real agent loop at work: it reads the task bundle, trains the weak teacher
and the ceiling with `aar-train`, trains students with a method suited to the agent's direction,
posts its figures to the forum, publishes its script and notes as an artifact, submits predictions,
reads the leaderboard and the others' posts, tries a second method and finishes.

It is honest and stateless. Every figure it writes is parsed from a tool result in the
conversation it is sent (accuracies as `aar-train` printed them; means, spreads and PGR computed
from those), and its next step is derived from that conversation alone: which steps it asked for
(each turn names its step in a text block) and what they returned. A restarted agent that resumes
from its saved conversation therefore continues where it was, and the training script it writes
keeps finished stages, so a step cut off by a crash is asked again without training twice.

It never passes for Claude: every text block, post, note and artifact description it writes
carries `[offline researcher]`. Different agents differ in a deterministic way: the direction in
the system prompt chooses the first method, and a hash of the agent's name and direction
chooses the second and the confident method's kept fraction.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

MARK = "[offline researcher]"
_STEP = re.compile(r"\[offline researcher\] step ([a-z0-9-]+):")
# How the agent loop answers a tool call that a crash or restart cut off (aar_agent.loop's
# INTERRUPTED), and what its context trimming leaves of an old output (aar_agent.context);
# matched on their start, since this module must not import the agent.
INTERRUPTED_PREFIX = "The sandbox restarted"
DROPPED_PREFIX = "[dropped from context"
SEEDS = (0, 1, 2)
MAX_ATTEMPTS = 3  # of a step whose calls a restart keeps cutting off
SCRIPT = "experiments/w2s.sh"
NOTES = "experiments/README.md"
WORKDIR = 'cd "${AAR_WORKSPACE:-$HOME}"'
# The hub models aar-train uses when the sandbox holds none of its own.
HUB_WEAK = "Qwen/Qwen1.5-0.5B-Chat"
HUB_STRONG = "Qwen/Qwen3-4B-Base"
# Models narrower than this are tiny, randomly initialised ones like `aar-train demo`'s.
TINY_HIDDEN_SIZE = 512
# The training settings `aar-train demo` prints for its tiny models (aar_trainer.demo's
# DEMO_WEAK_OPTIONS and DEMO_STRONG_OPTIONS; a test keeps the two equal). Copied, not imported:
# the trainer needs torch, and the stand-in runs where torch is not installed.
TINY_WEAK_FLAGS = ("--epochs", "5", "--lr", "0.001", "--max-batch", "16", "--max-tokens", "2048")
TINY_STRONG_FLAGS = (
    *("--epochs", "5", "--lr", "0.003", "--max-batch", "32", "--max-tokens", "2048"),
    *("--aux-alpha", "0.3"),
)


# --- who the agent is ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One of the weak-to-strong methods `aar-train strong --method` offers."""

    name: str  # naive, aux-conf or confident
    keep_fraction: float | None = None

    @property
    def slug(self) -> str:
        if self.keep_fraction is None:
            return self.name
        return f"{self.name}-keep{round(self.keep_fraction * 100)}"

    @property
    def label(self) -> str:
        if self.keep_fraction is None:
            return self.name
        return f"{self.name} (keep {round(self.keep_fraction * 100)} %)"

    @property
    def flags(self) -> list[str]:
        if self.keep_fraction is None:
            return []
        return ["--keep-fraction", f"{self.keep_fraction:g}"]


METHOD_NAMES = ("naive", "aux-conf", "confident")
KEEP_FRACTIONS = (0.3, 0.5, 0.7)
WHAT_IT_DOES = {
    "naive": "cross-entropy against the teacher's probabilities",
    "aux-conf": "Burns et al.'s auxiliary confidence loss: the student's own hardened "
    "predictions are mixed into the teacher's targets, so it can overrule the teacher",
    "confident": "training only on the examples the teacher is surest of, with hard labels "
    "(a 0/1 reweighting of the data)",
}
# The first method for a direction: first match wins, on the lower-cased direction.
DIRECTION_METHODS = (
    (("auxiliary", "aux-conf", "elicitation", "self-train", "bootstrap"), "aux-conf"),
    (("filter", "confident", "reweight", "weighting", "selection", "clean"), "confident"),
    (("naive", "baseline", "ensembl", "soft label", "distill"), "naive"),
)


@dataclass(frozen=True)
class Profile:
    """The agent as its system prompt describes it, and the methods it will try, in order."""

    agent: str
    direction: str
    first: Method
    second: Method
    matched: bool  # whether the direction named a method; else the hash chose the first


def _system_text(system: Any) -> str:
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        return "\n".join(str(b.get("text", "")) for b in system if isinstance(b, dict))
    return ""


def profile_of(system: Any) -> Profile:
    """The agent's name and direction from the system prompt (aar_agent.prompt writes both),
    and the two methods they lead to."""
    text = _system_text(system)
    agent_match = re.search(r"You are (\S+?)(?: in run \S+)?, ", text)
    direction_match = re.search(r"# Your research direction\n\n(.+?)\n\n", text, re.S)
    agent = agent_match.group(1) if agent_match else "agent"
    direction = " ".join(direction_match.group(1).split()) if direction_match else ""
    digest = hashlib.sha256(f"{agent}\n{direction}".encode()).digest()
    chosen = next(
        (name for words, name in DIRECTION_METHODS if any(w in direction.lower() for w in words)),
        None,
    )
    first_name = chosen or METHOD_NAMES[digest[0] % len(METHOD_NAMES)]
    others = [name for name in METHOD_NAMES if name != first_name]
    second_name = others[digest[1] % len(others)]
    keep = KEEP_FRACTIONS[digest[2] % len(KEEP_FRACTIONS)]

    def method(name: str) -> Method:
        return Method(name, keep if name == "confident" else None)

    return Profile(agent, direction, method(first_name), method(second_name), chosen is not None)


# --- what the conversation holds -----------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One tool call the researcher made, the step it belonged to and what came back."""

    step: str
    turn: int  # index of the assistant message that made it
    tool: str
    input: dict[str, Any]
    result: str | None  # None: not answered (yet)
    is_error: bool

    @property
    def lost(self) -> bool:
        """Whether what the call did is unknown here: a restart cut it off, or trimming dropped
        its output from the context (the script's stages are kept, so asking again is cheap)."""
        result = self.result or ""
        interrupted = self.is_error and result.startswith(INTERRUPTED_PREFIX)
        return interrupted or result.startswith(DROPPED_PREFIX)


def _blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [b for b in content or [] if isinstance(b, dict)]


def _result_text(block: dict[str, Any]) -> str:
    content = block.get("content")
    if isinstance(content, list):
        return "\n".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
    return str(content or "")


def _step_named(blocks: list[dict[str, Any]]) -> str | None:
    for block in blocks:
        if block.get("type") == "text" and (found := _STEP.search(str(block.get("text", "")))):
            return found.group(1)
    return None


def calls_of(messages: list[dict[str, Any]]) -> tuple[list[Call], set[str]]:
    """Every tool call of the researcher's turns, paired with its result; and the steps that
    were text only (no tool call), such as finishing."""
    calls: list[Call] = []
    spoken: set[str] = set()
    for index, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        blocks = _blocks(message)
        step = _step_named(blocks)
        if step is None:
            continue
        uses = [b for b in blocks if b.get("type") == "tool_use"]
        if not uses:
            spoken.add(step)
        answers = {}
        if index + 1 < len(messages):
            for block in _blocks(messages[index + 1]):
                if block.get("type") == "tool_result":
                    answers[block.get("tool_use_id")] = block
        for use in uses:
            answer = answers.get(use.get("id"))
            calls.append(
                Call(
                    step=step,
                    turn=index,
                    tool=str(use.get("name")),
                    input=dict(use.get("input") or {}),
                    result=None if answer is None else _result_text(answer),
                    is_error=bool(answer and answer.get("is_error")),
                )
            )
    return calls, spoken


_ACCURACY = re.compile(
    r"(?:^|\n)(?:(?:weak|ceiling|w2s) \S+: validation accuracy ([0-9.]+); wrote (\S+)"
    r"|kept (\S+): validation accuracy ([0-9.]+))"
)
_EXIT = re.compile(r"\[exit code (-?\d+)\]\s*$")


def accuracies_in(text: str) -> dict[str, str]:
    """Validation accuracy per run folder, exactly as `aar-train` (or the script, for a stage it
    kept) printed it."""
    found = {}
    for match in _ACCURACY.finditer(text):
        if match.group(1) is not None:
            found[match.group(2)] = match.group(1)
        else:
            found[match.group(3)] = match.group(4)
    return found


def exit_code(text: str) -> int | None:
    """The bash tool's exit status line; None when the command was killed at its timeout."""
    found = _EXIT.search(text)
    return int(found.group(1)) if found else None


# --- what the bundle and the machine hold --------------------------------------------------------


@dataclass(frozen=True)
class Model:
    path: str
    config: dict[str, str] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int | None:
        value = self.config.get("hidden_size", "")
        return int(value) if value.isdigit() else None


@dataclass(frozen=True)
class Setup:
    """What the exploring step's output said."""

    task_dir: str
    task: dict[str, Any]
    sizes: dict[str, int]
    models: list[Model]
    cpus: int
    gpus: int

    @property
    def weak(self) -> Model | None:
        return self._pick("weak", 0)

    @property
    def strong(self) -> Model | None:
        return self._pick("strong", -1)

    def _pick(self, word: str, end: int) -> Model | None:
        named = [m for m in self.models if word in m.path.rsplit("/", 1)[-1].lower()]
        if named:
            return named[0]
        sized = sorted((m for m in self.models if m.hidden_size), key=lambda m: m.hidden_size or 0)
        return sized[end] if len(sized) >= 2 else None

    @property
    def tiny(self) -> bool:
        sizes = [m.hidden_size for m in (self.weak, self.strong) if m and m.hidden_size]
        return len(sizes) == 2 and max(sizes) < TINY_HIDDEN_SIZE


def setup_of(text: str) -> Setup:
    """Parse the exploring command's output (see `explore_command`)."""
    task_dir = _line_after(text, "== task bundle ") or "/task"
    task_text = text.split("== task.json\n", 1)[-1].split("== end task.json", 1)[0]
    try:
        task = json.loads(task_text)
    except ValueError:
        task = {}
    sizes = {m.group(2): int(m.group(1)) for m in re.finditer(r"^(\d+) (\S+)\.jsonl$", text, re.M)}
    models = []
    for match in re.finditer(r"^model (.+?): ((?:[a-z_]+:\S+ ?)*)$", text, re.M):
        config = dict(pair.split(":", 1) for pair in match.group(2).split())
        models.append(Model(match.group(1), config))
    cpus = re.search(r"^cpus (\d+)$", text, re.M)
    gpus = len(re.findall(r"^GPU \d+:", text, re.M))
    return Setup(
        task_dir=task_dir,
        task=task if isinstance(task, dict) else {},
        sizes=sizes,
        models=models,
        cpus=int(cpus.group(1)) if cpus else 1,
        gpus=gpus,
    )


def _line_after(text: str, prefix: str) -> str | None:
    for line in text.splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    return None


def explore_command() -> str:
    """The first look around: the bundle, any local models, the machine, the trainer."""
    return f"""\
# {MARK} step explore: the task bundle, the models here and the machine
task="${{AAR_TASK_DIR:-/task}}"
echo "== task bundle $task"
ls -la "$task"
echo "== task.json"
cat "$task/task.json"
echo
echo "== end task.json"
echo "== examples per file"
for file in "$task"/*.jsonl; do echo "$(wc -l < "$file") $(basename "$file")"; done
echo "== a training example"
head -n 1 "$task"/weak_train*.jsonl | cut -c 1-300
echo "== models"
# aar-train demo DIR writes DIR/task and DIR/models; a bundle may also carry its own.
for dir in "$task"/models/* "$task"/../models/* "${{AAR_WORKSPACE:-$HOME}}"/models/*; do
  if [ -f "$dir/config.json" ]; then
    keys='"(model_type|hidden_size|num_hidden_layers|max_position_embeddings)": *[^,}}]*'
    config=$(grep -oE "$keys" "$dir/config.json" | tr -d '" ' | tr '\\n' ' ')
    echo "model $(cd "$dir" && pwd -P): $config"
  fi
done
echo "== machine"
echo "cpus $(nproc)"
if command -v nvidia-smi > /dev/null; then nvidia-smi -L; else echo "gpus none"; fi
echo "== trainer"
command -v aar-train || echo "aar-train is not on PATH"
"""


# --- the experiments' script ---------------------------------------------------------------------


def script_text(setup: Setup, task_name: str) -> str:
    """experiments/w2s.sh: the stages as commands; a stage whose folder holds results.json is
    kept, so asking again after a restart trains nothing twice."""
    weak, strong = setup.weak, setup.strong
    tiny = setup.tiny
    device = ["--device", "cpu", "--threads", "1"] if tiny else ["--device", "auto"]
    jobs = max(1, setup.cpus) if tiny else 1

    def words(values: tuple[str, ...] | list[str]) -> str:
        return " ".join(shlex.quote(v) for v in values)

    return f"""\
#!/usr/bin/env bash
# {MARK} weak-to-strong experiments on {task_name} with aar-train.
#   w2s.sh baselines                        the weak teacher and the ceiling, side by side
#   w2s.sh student METHOD OUT SEEDS [FLAGS]  one student per seed on the teacher's labels
# A stage whose folder holds results.json is kept, not trained again.
set -uo pipefail
cd "$(dirname "$0")/.."
# A reproduction runs this from a read-only copy, with its outputs under AAR_OUTPUT_DIR and the
# bundle (a fresh split, or a transfer task) at AAR_TASK_DIR.
if [ -n "${{AAR_OUTPUT_DIR:-}}" ]; then cd "$AAR_OUTPUT_DIR"; fi
TASK="${{AAR_TASK_DIR:-{shlex.quote(setup.task_dir)}}}"
WEAK={shlex.quote(weak.path if weak else HUB_WEAK)}
STRONG={shlex.quote(strong.path if strong else HUB_STRONG)}
JOBS={jobs}  # stages at once{" (tiny models: one CPU thread each)" if tiny else ""}
DEVICE=({words(device)})
WEAK_FLAGS=({words(TINY_WEAK_FLAGS if tiny else ())})
STRONG_FLAGS=({words(TINY_STRONG_FLAGS if tiny else ())})

stage() {{  # stage OUT COMMAND ARGS...: aar-train COMMAND unless OUT has finished
  local out=$1
  shift
  if [ -f "$out/results.json" ]; then
    grep -oE '"accuracy": *[0-9.eE+-]+' "$out/results.json" | head -n 1 |
      awk -v out="$out" '{{printf "kept %s: validation accuracy %.4f\\n", out, $2}}'
  else
    aar-train "$@" --task "$TASK" --out "$out" --quiet "${{DEVICE[@]}}"
  fi
}}

pids=()
status=0
later() {{  # run in the background, at most JOBS at once
  "$@" &
  pids+=($!)
  if [ "${{#pids[@]}}" -ge "$JOBS" ]; then
    wait "${{pids[0]}}" || status=1
    pids=("${{pids[@]:1}}")
  fi
}}

case "${{1:-}}" in
  baselines)
    later stage runs/weak weak --model "$WEAK" "${{WEAK_FLAGS[@]}}"
    later stage runs/ceiling strong --model "$STRONG" "${{STRONG_FLAGS[@]}}"
    ;;
  student)
    method=$2 out=$3 seeds=$4
    shift 4
    for seed in ${{seeds//,/ }}; do
      later stage "$out/seed-$seed" strong --model "$STRONG" \\
        --weak-labels runs/weak/weak-labels.json --method "$method" --seed "$seed" \\
        "$@" "${{STRONG_FLAGS[@]}}"
    done
    ;;
  *)
    echo "usage: $0 baselines | student METHOD OUT SEEDS [FLAGS]" >&2
    exit 2
    ;;
esac
for pid in "${{pids[@]}}"; do wait "$pid" || status=1; done
exit "$status"
"""


def reproduce_command(method: Method) -> str:
    """What makes the submitted predictions again from the published `experiments` folder:
    the baselines, then the student of the submitted seed (or of the reproduction's
    `AAR_SEED`), its predictions where the reproduction reads them."""
    # The seed the predictions were made with, unless a reproduction asks for another.
    seed = f'"${{AAR_SEED:-{SEEDS[0]}}}"'
    student = ["bash", SCRIPT, "student", method.name, f"runs/{method.slug}", seed]
    made = f"$AAR_OUTPUT_DIR/runs/{method.slug}/seed-${{AAR_SEED:-{SEEDS[0]}}}/predictions.json"
    return (
        f"bash {SCRIPT} baselines && {' '.join([*student, *method.flags])} && "
        f'cp "{made}" "$AAR_OUTPUT_DIR/predictions.json"'
    )


# --- figures -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """A method's students against the baselines, from printed accuracies only."""

    method: Method
    weak: str
    ceiling: str
    students: dict[int, str]  # seed -> accuracy as printed

    def pgr(self, accuracy: str) -> float | None:
        gap = float(self.ceiling) - float(self.weak)
        return (float(accuracy) - float(self.weak)) / gap if gap > 0 else None

    @property
    def mean(self) -> float:
        return statistics.fmean(float(a) for a in self.students.values())

    @property
    def spread(self) -> float:
        return statistics.pstdev(float(a) for a in self.students.values())

    @property
    def pgrs(self) -> list[float]:
        return [p for a in self.students.values() if (p := self.pgr(a)) is not None]

    def pgr_summary(self) -> str:
        pgrs = self.pgrs
        if not pgrs:
            return "PGR undefined (the ceiling did not beat the teacher)"
        return f"PGR {statistics.fmean(pgrs):.3f} ± {statistics.pstdev(pgrs):.3f}"

    def table(self) -> str:
        rows = [
            "| run | seed | validation accuracy | PGR |",
            "|---|---|---|---|",
            f"| weak teacher | 0 | {self.weak} | 0 by definition |",
            f"| ceiling (strong on ground truth) | 0 | {self.ceiling} | 1 by definition |",
        ]
        for seed, accuracy in sorted(self.students.items()):
            pgr = self.pgr(accuracy)
            shown = "undefined" if pgr is None else f"{pgr:.3f}"
            rows.append(f"| student, {self.method.label} | {seed} | {accuracy} | {shown} |")
        rows.append(
            f"| student mean ± sd over {len(self.students)} seeds | | "
            f"{self.mean:.4f} ± {self.spread:.4f} | {self.pgr_summary().removeprefix('PGR ')} |"
        )
        return "\n".join(rows)


# --- the steps -----------------------------------------------------------------------------------


class Status(Enum):
    TODO = "todo"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Step:
    name: str
    act: Callable[[], list[dict[str, Any]]]
    # Run folders a training step must report an accuracy for; empty for other steps.
    outs: Callable[[], list[str]] = lambda: []
    retry: bool = False  # ask again when a restart cut its calls off (safe to repeat)
    when: Callable[[], bool] = lambda: True


def _turn(step: str, text: str, *calls: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = [{"type": "text", "text": f"{MARK} step {step}: {text}"}]
    blocks += [{"type": "tool_use", "name": name, "input": value} for name, value in calls]
    return blocks


def _quote(text: str, limit: int = 1500) -> str:
    text = text if len(text) <= limit else "[...]\n" + text[-limit:]
    return "\n".join("    " + line for line in text.splitlines())


class Research:
    """The next turn of the research, from the request the agent sent."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.profile = profile_of(body.get("system"))
        self.messages: list[dict[str, Any]] = list(body.get("messages") or [])
        self.calls, self.spoken = calls_of(self.messages)
        self.steps = [
            Step("explore", self._explore, retry=True),
            Step("catch-up", self._catch_up, retry=True),
            Step("plan", self._plan),
            Step("code", self._code, retry=True),
            Step("baselines", self._baselines, outs=lambda: ["runs/weak", "runs/ceiling"],
                 retry=True),
            Step("baselines-noted", self._baselines_noted),
            Step("first-method", lambda: self._student("first-method", self.profile.first),
                 outs=lambda: self._student_outs(self.profile.first), retry=True),
            Step("notes", lambda: self._notes("notes"), retry=True),
            Step("publish", self._publish, retry=True),
            Step("submit", self._submit),
            Step("post", self._post),
            Step("look-around", self._look_around, retry=True),
            Step("second-method", lambda: self._student("second-method", self.profile.second),
                 outs=lambda: self._student_outs(self.profile.second), retry=True),
            Step("second-notes", lambda: self._notes("second-notes"), retry=True),
            Step("second-publish", self._second_publish, retry=True),
            Step("second-submit", self._second_submit, when=self._second_is_better),
            Step("compare", self._compare),
            Step("conclude", self._conclude),
        ]  # fmt: skip

    # -- the engine

    def reply(self) -> list[dict[str, Any]]:
        """The content blocks of the researcher's next turn."""
        if "finish" in self.spoken:
            return [{"type": "text", "text": f"{MARK} Yes, finished: {self._summary()}"}]
        if self._latest("report-failure") is not None:
            return self._finish()
        for step in self.steps:
            status = self.status(step)
            if status is Status.TODO:
                return step.act()
            if status is Status.FAILED:
                return self._report_failure(step)
        return self._finish()

    def status(self, step: Step) -> Status:
        if not step.when():
            return Status.SKIPPED
        turns = sorted({c.turn for c in self.calls if c.step == step.name})
        if not turns:
            return Status.TODO
        last = [c for c in self.calls if c.turn == turns[-1]]
        if any(c.lost for c in last) and step.retry and len(turns) < MAX_ATTEMPTS:
            return Status.TODO
        outs = step.outs()
        if not outs:
            return Status.DONE
        found = self._accuracies()
        ok = all(exit_code(c.result or "") == 0 for c in last)
        return Status.DONE if ok and all(out in found for out in outs) else Status.FAILED

    def _latest(self, step: str, tool: str | None = None) -> Call | None:
        """The newest answered call of a step (of one tool, when named)."""
        for call in reversed(self.calls):
            if call.step == step and (tool is None or call.tool == tool) and call.result:
                return call
        return None

    def _accuracies(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for call in self.calls:
            if call.tool == "bash" and call.result and not call.is_error:
                found.update(accuracies_in(call.result))
        return found

    def _setup(self) -> Setup:
        call = self._latest("explore")
        return setup_of(call.result if call and call.result else "")

    def _task_name(self) -> str:
        return str(self._setup().task.get("name") or "the task")

    def _figures(self, method: Method) -> Figures | None:
        found = self._accuracies()
        students = {s: found[out] for s, out in zip(SEEDS, self._student_outs(method), strict=True)
                    if out in found}  # fmt: skip
        if "runs/weak" not in found or "runs/ceiling" not in found or not students:
            return None
        return Figures(method, found["runs/weak"], found["runs/ceiling"], students)

    def _student_outs(self, method: Method) -> list[str]:
        return [f"runs/{method.slug}/seed-{seed}" for seed in SEEDS]

    # -- the steps, in order

    def _explore(self) -> list[dict[str, Any]]:
        return _turn(
            "explore",
            "I am the offline researcher, a scripted stand-in for Claude that runs when no "
            "Anthropic key is set. I do real experiments through the same tools, and every "
            "figure I write comes from a tool result in this conversation. First, what the "
            "task bundle, this sandbox and the trainer hold.",
            ("bash", {"command": explore_command()}),
        )

    def _catch_up(self) -> list[dict[str, Any]]:
        return _turn(
            "catch-up",
            "Before planning, what the other agents have posted so far.",
            ("forum_new", {}),
        )

    def _plan(self) -> list[dict[str, Any]]:
        setup, profile = self._setup(), self.profile
        weak, strong = setup.weak, setup.strong
        first, second = profile.first, profile.second
        why = (
            f"My direction is {profile.direction!r}; the nearest method aar-train offers is "
            f"`{first.name}`: {WHAT_IT_DOES[first.name]}."
            if profile.matched
            else f"My direction ({profile.direction or 'none given'!r}) names no method "
            f"aar-train offers, so a hash of my name and direction picked `{first.name}` "
            f"first: {WHAT_IT_DOES[first.name]}."
        )
        models = (
            f"weak teacher {weak.path} ({_config(weak)}), strong student {strong.path} "
            f"({_config(strong)})"
            if weak and strong
            else f"no local models found, so aar-train's hub defaults {HUB_WEAK} and "
            f"{HUB_STRONG} (they need the hub or a cache)"
        )
        sizes = ", ".join(f"{name} {count}" for name, count in setup.sizes.items()) or "unknown"
        settings = (
            "The models are tiny and randomly initialised, like `aar-train demo`'s, so I use "
            "the demo's training settings and one CPU thread per run, "
            f"{max(1, setup.cpus)} runs at once."
            if setup.tiny
            else "I use aar-train's default training settings."
        )
        entry = "\n".join(
            [
                f"{MARK} Plan for {profile.agent} on {self._task_name()} (examples per file: "
                f"{sizes}).",
                f"- Models: {models}. {settings}",
                "- Baselines: the weak teacher on ground truth (seed 0) and the ceiling, the "
                "strong model on ground truth (seed 0).",
                f"- First method: {first.label}. {why}",
                f"- Students over seeds {', '.join(map(str, SEEDS))} on the seed-0 teacher's "
                "labels; validation accuracy and PGR = (student - weak) / (ceiling - weak), "
                "mean and spread.",
                f"- Then: publish the script, submit the first seed's predictions (chosen "
                f"before any score), post, read the forum and leaderboard, and compare with "
                f"{second.label}: {WHAT_IT_DOES[second.name]}.",
            ]
        )
        return _turn(
            "plan",
            f"I found {models}. Writing down the plan before running anything.",
            ("notebook_write", {"title": f"{MARK} plan", "entry": entry}),
        )

    def _code(self) -> list[dict[str, Any]]:
        return _turn(
            "code",
            f"The experiments as one script, {SCRIPT}, so the commands are published with the "
            "results and a restart keeps finished stages.",
            ("write_file", {"path": SCRIPT, "content": script_text(self._setup(),
                                                                  self._task_name())}),
        )  # fmt: skip

    def _baselines(self) -> list[dict[str, Any]]:
        return _turn(
            "baselines",
            "The baselines PGR is measured against: the weak teacher and the ceiling, side by "
            "side.",
            ("bash", {"command": f"{WORKDIR}\nbash {SCRIPT} baselines", **self._timeout()}),
        )

    def _baselines_noted(self) -> list[dict[str, Any]]:
        found = self._accuracies()
        weak, ceiling = found["runs/weak"], found["runs/ceiling"]
        gap = float(ceiling) - float(weak)
        entry = (
            f"{MARK} Validation accuracy, seed 0: weak teacher {weak}, ceiling {ceiling}; the "
            f"gap a student can recover is {gap:.4f}."
            + ("" if gap > 0 else " The ceiling did not beat the teacher: PGR is undefined.")
        )
        return _turn(
            "baselines-noted",
            f"Baselines in: weak {weak}, ceiling {ceiling}. Noting them before the students.",
            ("notebook_write", {"title": f"{MARK} baselines", "entry": entry}),
        )

    def _student(self, step: str, method: Method) -> list[dict[str, Any]]:
        seeds = ",".join(map(str, SEEDS))
        command = f"bash {SCRIPT} student {method.name} runs/{method.slug} {seeds}"
        command = " ".join([command, *method.flags])
        return _turn(
            step,
            f"Students with {method.label}, {WHAT_IT_DOES[method.name]}; seeds {seeds}.",
            ("bash", {"command": f"{WORKDIR}\n{command}", **self._timeout()}),
        )

    def _timeout(self) -> dict[str, Any]:
        # Tiny models finish in seconds; real ones may take hours on a GPU.
        return {} if self._setup().tiny else {"timeout": 6 * 3600}

    def _notes(self, step: str) -> list[dict[str, Any]]:
        sections = [f"# {MARK} {self.profile.agent}: weak-to-strong on {self._task_name()}", ""]
        sections += [
            f"Written by the offline researcher, a scripted stand-in for Claude; every figure "
            f"below is an accuracy `aar-train` printed, or computed from those. Direction: "
            f"{self.profile.direction or '(none)'}.",
            "",
            f"Reproduce: `bash {SCRIPT} baselines`, then the student commands below.",
        ]
        for method in (self.profile.first, self.profile.second):
            figures = self._figures(method)
            if figures is None:
                continue
            seeds = ",".join(map(str, SEEDS))
            sections += [
                "",
                f"## {method.label}: {WHAT_IT_DOES[method.name]}",
                "",
                "`"
                + " ".join(
                    [
                        "bash",
                        SCRIPT,
                        "student",
                        method.name,
                        f"runs/{method.slug}",
                        seeds,
                        *method.flags,
                    ]
                )
                + "`",
                "",
                figures.table(),
            ]
        return _turn(
            step,
            "Notes and figures beside the script, for the artifact.",
            ("write_file", {"path": NOTES, "content": "\n".join(sections) + "\n"}),
        )

    def _publish(self, parent: str | None = None, step: str = "publish") -> list[dict[str, Any]]:
        arguments: dict[str, Any] = {
            "path": "experiments",
            "description": f"{MARK} {self.profile.agent}: w2s script and notes on "
            f"{self._task_name()}",
        }
        if parent:
            arguments["parent"] = parent
        return _turn(step, "Publishing the script and notes.", ("artifact_publish", arguments))

    def _digest(self, step: str) -> str | None:
        call = self._latest(step, "artifact_publish")
        found = re.search(r"sha256:[0-9a-f]{64}", call.result or "") if call else None
        return found.group(0) if found else None

    def _submit(self, step: str = "submit", method: Method | None = None) -> list[dict[str, Any]]:
        method = method or self.profile.first
        figures = self._figures(method)
        setup = self._setup()
        described = (
            f"{MARK} w2s {method.label}: student {setup.strong.path if setup.strong else ''} "
            f"on the labels of weak teacher {setup.weak.path if setup.weak else ''} (seed 0); "
            f"student seed {SEEDS[0]}, chosen before any score"
        )
        if figures:
            described += f"; validation {figures.pgr_summary()} over {len(figures.students)} seeds"
        digest = self._digest("second-publish" if step == "second-submit" else "publish")
        return _turn(
            step,
            f"Submitting the predictions of {method.label}, seed {SEEDS[0]}: the seed I chose "
            "before seeing any score, not the best one.",
            (
                "scorer_submit",
                {
                    "predictions_path": f"runs/{method.slug}/seed-{SEEDS[0]}/predictions.json",
                    "method": described,
                    "artifact": digest or self._digest("publish"),
                    "command": reproduce_command(method),
                },
            ),
        )

    def _submission(self, step: str) -> tuple[Any, str]:
        """The submission's id (or None) and a sentence on how the scorer answered."""
        call = self._latest(step, "scorer_submit")
        if call is None:
            return None, "not submitted"
        if call.is_error:
            return None, f"the scorer refused it: {call.result}"
        try:
            answer = json.loads(call.result or "")
        except ValueError:
            return None, f"the scorer answered: {call.result}"
        feedback = answer.get("feedback") or {}
        score = feedback.get("score")
        released = f"released score {score}" if score is not None else "no score released"
        message = feedback.get("message") or ""
        return answer.get("id"), f"submission {answer.get('id')}: {answer.get('status')}, " + (
            f"{released}" + (f" ({message})" if message else "")
        )

    def _post(self) -> list[dict[str, Any]]:
        method = self.profile.first
        figures = self._figures(method)
        submission, outcome = self._submission("submit")
        digest = self._digest("publish")
        summary = figures.pgr_summary() if figures else "no figures"
        body = "\n".join(
            [
                f"{MARK} Posted by the offline researcher, a scripted stand-in for Claude (no "
                "Anthropic key in this deployment). Every figure is an accuracy `aar-train` "
                "printed, or computed from those.",
                "",
                f"Direction: {self.profile.direction or '(none)'}. Method: {method.label}, "
                f"{WHAT_IT_DOES[method.name]}. Validation accuracy; one weak teacher (seed 0), "
                f"students over seeds {', '.join(map(str, SEEDS))}.",
                "",
                figures.table() if figures else "",
                "",
                f"Scorer: {outcome}.",
                f"Code and notes: artifact {digest or '(publishing failed)'} "
                f"(`bash {SCRIPT} baselines` reproduces the baselines).",
            ]
        )
        return _turn(
            "post",
            f"Posting the result: {summary}.",
            (
                "forum_post",
                {
                    "kind": "result",
                    "title": f"{MARK} {method.label} on {self._task_name()}: {summary} "
                    f"(validation, {len(figures.students) if figures else 0} seeds)",
                    "body": body,
                    "tags": ["offline-researcher", method.name],
                    "submissions": [submission] if submission is not None else [],
                    "artifacts": [digest] if digest else [],
                },
            ),
        )

    def _look_around(self) -> list[dict[str, Any]]:
        return _turn(
            "look-around",
            "What the leaderboard and the others say now.",
            ("scorer_leaderboard", {}),
            ("forum_new", {}),
        )

    def _second_is_better(self) -> bool:
        """Submit the second method only when it beat the first on validation: the scorer's
        feedback is rate-limited, and validation is for choosing."""
        first, second = self._figures(self.profile.first), self._figures(self.profile.second)
        return bool(first and second and second.mean > first.mean)

    def _second_submit(self) -> list[dict[str, Any]]:
        return self._submit("second-submit", self.profile.second)

    def _second_publish(self) -> list[dict[str, Any]]:
        return self._publish(parent=self._digest("publish"), step="second-publish")

    def _others(self) -> list[str]:
        """Headers of the other agents' posts this researcher read (as the tool showed them)."""
        lines = []
        for call in self.calls:
            if call.tool == "forum_new" and call.result and not call.is_error:
                lines += [
                    line for line in call.result.splitlines()
                    if line.startswith("#") and " by " in line
                ]  # fmt: skip
        return lines

    def _best_public(self) -> str:
        call = self._latest("look-around", "scorer_leaderboard")
        try:
            board = json.loads(call.result or "") if call and not call.is_error else {}
        except ValueError:
            board = {}
        best = board.get("best_public_score") if isinstance(board, dict) else None
        released = len(board.get("released") or []) if isinstance(board, dict) else 0
        if best is None:
            return "the leaderboard has no released score yet"
        return f"the leaderboard's best released score is {best} ({released} released)"

    def _compare(self) -> list[dict[str, Any]]:
        first, second = self.profile.first, self.profile.second
        a, b = self._figures(first), self._figures(second)
        verdict = "no comparison: a method has no figures"
        if a and b:
            better = second if b.mean > a.mean else first
            verdict = (
                f"{better.label} did better on validation: mean student accuracy "
                f"{a.mean:.4f} ± {a.spread:.4f} with {first.label}, {b.mean:.4f} ± "
                f"{b.spread:.4f} with {second.label}"
            )
            if abs(b.mean - a.mean) <= a.spread + b.spread:
                verdict += "; the gap is within the seeds' spread, so not a clear win"
        _, outcome = self._submission("second-submit")
        others = self._others()
        body = "\n".join(
            [
                f"{MARK} Posted by the offline researcher, a scripted stand-in for Claude. "
                "Figures are accuracies `aar-train` printed, or computed from those.",
                "",
                f"{verdict}.",
                "",
                b.table() if b else "",
                "",
                f"Second method's submission: {outcome if self._second_is_better() else 'none'}"
                f" (submitted only when it beats the first on validation). Also, "
                f"{self._best_public()}.",
                "",
                "Other agents' posts I read:" if others else "No posts from other agents yet.",
                *(f"- {line}" for line in others[:10]),
                "",
                f"Code: artifact {self._digest('second-publish') or self._digest('publish')}.",
            ]
        )
        parent = self._post_id("post")
        return _turn(
            "compare",
            f"Second method in. {verdict}.",
            (
                "forum_post",
                {
                    "kind": "result",
                    "title": f"{MARK} {second.label} vs {first.label} on {self._task_name()}",
                    "body": body,
                    "tags": ["offline-researcher", first.name, second.name],
                    "parent": parent,
                    "artifacts": [d] if (d := self._digest("second-publish")) else [],
                },
            ),
        )

    def _post_id(self, step: str) -> int | None:
        call = self._latest(step, "forum_post")
        found = re.match(r"posted #(\d+)", call.result or "") if call else None
        return int(found.group(1)) if found else None

    def _conclude(self) -> list[dict[str, Any]]:
        return _turn(
            "conclude",
            "Recording the conclusion.",
            (
                "notebook_write",
                {"title": f"{MARK} conclusion", "entry": f"{MARK} {self._summary()}"},
            ),
        )

    def _summary(self) -> str:
        parts = []
        for method in (self.profile.first, self.profile.second):
            figures = self._figures(method)
            if figures:
                parts.append(
                    f"{method.label}: student accuracy {figures.mean:.4f} ± {figures.spread:.4f}"
                    f", {figures.pgr_summary()} over {len(figures.students)} seeds"
                )
        if not parts:
            return "no experiment finished; see the forum post on what failed."
        return (
            "; ".join(parts)
            + f" (weak {self._accuracies().get('runs/weak')}, ceiling "
            + (f"{self._accuracies().get('runs/ceiling')}, validation accuracy).")
        )

    def _finish(self) -> list[dict[str, Any]]:
        return [
            {
                "type": "text",
                "text": f"{MARK} step finish: done with this bounded piece of research. "
                f"{self._summary()}",
            }
        ]

    def _report_failure(self, step: Step) -> list[dict[str, Any]]:
        call = self._latest(step.name)
        output = call.result if call and call.result else "(no output)"
        body = "\n".join(
            [
                f"{MARK} Posted by the offline researcher, a scripted stand-in for Claude.",
                "",
                f"The step `{step.name}` failed, so this researcher stops here. The end of its "
                "output:",
                "",
                _quote(output),
            ]
        )
        return _turn(
            "report-failure",
            f"The step {step.name} failed; reporting it instead of guessing figures.",
            (
                "forum_post",
                {
                    "kind": "error",
                    "title": f"{MARK} {self.profile.agent}: {step.name} failed",
                    "body": body,
                    "tags": ["offline-researcher"],
                },
            ),
        )


def _config(model: Model) -> str:
    return ", ".join(f"{k} {v}" for k, v in model.config.items()) or "no config shown"


def reply(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The researcher's next turn, as Messages-API content blocks, for a request body."""
    return Research(body).reply()
