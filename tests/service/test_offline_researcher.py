"""The offline researcher (`aar_devcluster.offline_researcher`), the stand-in's model without an
Anthropic key: its decisions on hand-made conversations, and the real `aar-agent` driven by it
on the demo task `aar-train demo` makes, training for real, behind the real gateway, against the
real forum and scorer; two directions take two methods; a stopped agent resumes where it was."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_env import (
    ADMIN,
    AGENT,
    ISSUER,
    NAMESPACE,
    RUN,
    Service,
    finish,
    start_agent,
    wait_for,
)

from aar_agent.config import settings_from_env
from aar_agent.context import conversation_chars, trim
from aar_agent.loop import ASK_IF_FINISHED, INTERRUPTED
from aar_agent.prompt import system_prompt
from aar_agent.state import StateStore
from aar_devcluster.anthropic_stub import AnthropicStub, researcher_reply
from aar_devcluster.offline_researcher import (
    DROPPED_PREFIX,
    INTERRUPTED_PREFIX,
    MARK,
    TINY_STRONG_FLAGS,
    TINY_WEAK_FLAGS,
    Research,
    accuracies_in,
    profile_of,
    script_text,
    setup_of,
)
from aar_operator.reproductions import (
    ARTIFACT_DIR,
    OUTPUT_DIR,
    WRAPPER,
    artifact_files,
    predictions_from_log,
)

BIN = Path(sys.executable).parent
RUN_KEY = f"{NAMESPACE}/{RUN}"
# What aar-train prints after each training run.
PRINTED = re.compile(r"(?:weak|ceiling|w2s) \S+: validation accuracy (\d\.\d{4}); wrote (\S+)")


# --- decisions on hand-made conversations ---------------------------------------------------------


def system_for(agent: str, direction: str, task_dir: str = "/task") -> str:
    """The system prompt the real agent sends (aar_agent.prompt), for this agent."""
    environ = {"AAR_AGENT": agent, "AAR_DIRECTION": direction, "ANTHROPIC_API_KEY": "x"}
    settings = settings_from_env({**environ, "AAR_RUN": RUN, "AAR_TASK_DIR": task_dir})
    return system_prompt(settings, ["bash"])


EXPLORED = """\
== task bundle /task
== task.json
{"name": "cues", "labels": [0, 1], "metric": "accuracy"}
== end task.json
== examples per file
600 weak_train.jsonl
1500 unlabelled.jsonl
== models
model /demo/models/weak: model_type:qwen2 hidden_size:16 max_position_embeddings:4
model /demo/models/strong: model_type:qwen3 hidden_size:64 max_position_embeddings:512
== machine
cpus 2
gpus none
[exit code 0]"""


def trained(*runs: tuple[str, str, str]) -> str:
    """bash output of training runs: (stage, accuracy as printed, run folder)."""
    lines = [
        f"{stage} /demo/models/x: validation accuracy {acc}; wrote {out}"
        for stage, acc, out in runs
    ]
    return "\n".join([*lines, "[exit code 0]"])


BASELINES = trained(("weak", "0.6180", "runs/weak"), ("ceiling", "0.9660", "runs/ceiling"))


def students(slug: str, *accuracies: str) -> str:
    return trained(*(("w2s", a, f"runs/{slug}/seed-{s}") for s, a in enumerate(accuracies)))


class Conversation:
    """A conversation as the agent loop builds it, with tool results written by hand."""

    def __init__(self, agent: str = "w2s-chat-0", direction: str = "data reweighting") -> None:
        self.system = system_for(agent, direction)
        self.messages: list[dict[str, Any]] = [{"role": "user", "content": "Begin."}]
        self.ids = itertools.count()

    def ask(self) -> list[dict[str, Any]]:
        blocks = Research({"system": self.system, "messages": self.messages}).reply()
        blocks = [
            {"id": f"toolu_{next(self.ids)}", **b} if b["type"] == "tool_use" else b for b in blocks
        ]
        self.messages.append({"role": "assistant", "content": blocks})
        return blocks

    def answer(self, text: str, is_error: bool = False) -> None:
        calls = [b for b in self.messages[-1]["content"] if b["type"] == "tool_use"]
        results = [
            {"type": "tool_result", "tool_use_id": c["id"], "content": text, "is_error": is_error}
            for c in calls
        ]
        self.messages.append({"role": "user", "content": results})

    def run(self, outputs: dict[str, str], until: str = "") -> list[str]:
        """Ask and answer (each step with its output here, else "ok") until the researcher
        names step `until` or ends its turn; returns the steps it took."""
        steps = []
        for _ in range(40):
            blocks = self.ask()
            step = step_of(blocks)
            steps.append(step)
            if step == until or not tool_uses(blocks):
                return steps
            self.answer(outputs.get(step, "ok"))
        raise AssertionError(f"no end after 40 turns: {steps}")


def step_of(blocks: list[dict[str, Any]]) -> str:
    found = re.search(r"\[offline researcher\] step ([a-z-]+):", blocks[0]["text"])
    return found.group(1) if found else ""


def tool_uses(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [b for b in blocks if b["type"] == "tool_use"]


FIRST_SLUG = "confident-keep50"  # data reweighting's method; the keep fraction is hashed
OUTPUTS = {
    "explore": EXPLORED,
    "baselines": BASELINES,
    "publish": "published experiments.tar.gz as sha256:" + "a" * 64 + " (900 bytes)",
    "second-publish": "published experiments.tar.gz as sha256:" + "b" * 64 + " (990 bytes)",
    "submit": json.dumps({"id": 7, "status": "accepted", "feedback": {"score": 0.3}}),
    "post": "posted #3: the title",
}


def outputs_for(conversation: Conversation) -> dict[str, str]:
    profile = profile_of(conversation.system)
    return {
        **OUTPUTS,
        "first-method": students(profile.first.slug, "0.7040", "0.6880", "0.6960"),
        "second-method": students(profile.second.slug, "0.6500", "0.6840", "0.6600"),
    }


def test_the_researcher_takes_its_steps_in_order_and_finishes() -> None:
    conversation = Conversation()
    steps = conversation.run(outputs_for(conversation))
    assert steps == [
        "explore", "catch-up", "plan", "code", "baselines", "baselines-noted", "first-method",
        "notes", "publish",
        "submit", "post", "look-around", "second-method", "second-notes", "second-publish",
        "compare", "conclude", "finish",
    ]  # fmt: skip
    # Asked whether it is finished, it says so without a tool call, and the loop ends the run.
    conversation.messages.append({"role": "user", "content": ASK_IF_FINISHED})
    last = conversation.ask()
    assert not tool_uses(last)
    assert last[0]["text"].startswith(f"{MARK} Yes, finished")
    # Every turn says it is the offline researcher.
    for message in conversation.messages:
        if message["role"] == "assistant":
            assert message["content"][0]["text"].startswith(MARK)


def test_every_figure_it_posts_is_one_a_tool_printed_or_computed_from_those() -> None:
    conversation = Conversation()
    outputs = outputs_for(conversation)
    conversation.run(outputs, until="post")
    post = tool_uses(conversation.messages[-1]["content"])[0]["input"]
    assert post["title"].startswith(MARK)
    assert MARK in post["body"]
    printed = {"0.6180", "0.9660", "0.7040", "0.6880", "0.6960"}
    # PGR per seed and their mean and spread, from the printed accuracies.
    pgrs = [(float(a) - 0.618) / (0.966 - 0.618) for a in ("0.7040", "0.6880", "0.6960")]
    mean = sum(pgrs) / 3
    spread = (sum((p - mean) ** 2 for p in pgrs) / 3) ** 0.5
    computed = {f"{p:.3f}" for p in pgrs} | {f"{mean:.3f}", f"{spread:.3f}"}
    computed |= {"0.6960", "0.0065"}  # the students' mean and spread
    numbers = set(re.findall(r"\d\.\d{3,4}", post["body"] + post["title"]))
    assert printed <= numbers
    assert numbers <= printed | computed
    assert f"PGR {mean:.3f} ± {spread:.3f}" in post["title"]
    assert post["submissions"] == [7]
    assert post["artifacts"] == ["sha256:" + "a" * 64]

    # Other printed figures, other posted ones: nothing is a constant.
    again = Conversation()
    changed = {**outputs, "baselines": BASELINES.replace("0.9660", "0.9100")}
    again.run(changed, until="post")
    body = tool_uses(again.messages[-1]["content"])[0]["input"]["body"]
    assert "0.9100" in body
    assert "0.9660" not in body


def test_a_step_a_restart_cut_off_is_asked_again_and_a_finished_one_never() -> None:
    conversation = Conversation()
    outputs = outputs_for(conversation)
    conversation.run(outputs, until="baselines")
    command = tool_uses(conversation.messages[-1]["content"])[0]["input"]["command"]
    conversation.answer(INTERRUPTED, is_error=True)
    again = conversation.ask()
    assert step_of(again) == "baselines"
    assert tool_uses(again)[0]["input"]["command"] == command
    conversation.answer(BASELINES)
    # Resumed from the saved conversation: the next step, with the figures already in it.
    noted = conversation.ask()
    assert step_of(noted) == "baselines-noted"
    assert "weak teacher 0.6180, ceiling 0.9660" in tool_uses(noted)[0]["input"]["entry"]
    assert INTERRUPTED.startswith(INTERRUPTED_PREFIX)


def trimmed(output: str) -> str:
    """What the agent's context trimming (aar_agent.context) leaves of an old tool output."""
    call = {"type": "tool_use", "id": "t", "name": "bash", "input": {}}
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [call]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "t", "content": output}],
        },
    ]
    shrunk, _ = trim(messages, conversation_chars(messages) - 100, keep_recent=0)
    note = shrunk[2]["content"][0]["content"]
    assert isinstance(note, str)
    assert note.startswith(DROPPED_PREFIX)
    return note


def test_a_training_output_the_context_trimming_dropped_is_asked_for_again() -> None:
    conversation = Conversation()
    outputs = outputs_for(conversation)
    conversation.run(outputs, until="first-method")
    conversation.messages.pop()  # about to ask for the first method
    baselines = next(
        index
        for index, m in enumerate(conversation.messages)
        if m["role"] == "assistant" and step_of(m["content"]) == "baselines"
    )
    long_output = "UserWarning: a warning torch printed\n" * 20 + BASELINES
    conversation.messages[baselines + 1]["content"][0]["content"] = trimmed(long_output)
    # The script keeps finished stages: asking again costs nothing and brings the figures back.
    assert conversation.run(outputs, until="first-method") == ["baselines", "first-method"]


def test_a_failed_training_step_is_reported_with_its_output_and_no_figures() -> None:
    conversation = Conversation()
    conversation.run(outputs_for(conversation), until="baselines")
    conversation.answer("OSError: /demo/models/weak is not a model folder\n[exit code 2]")
    report = conversation.ask()
    assert step_of(report) == "report-failure"
    post = tool_uses(report)[0]["input"]
    assert post["kind"] == "error"
    assert post["title"].startswith(MARK)
    assert "OSError: /demo/models/weak is not a model folder" in post["body"]
    assert not re.search(r"\d\.\d{4}", post["body"])
    conversation.answer("posted #1: failed")
    assert step_of(conversation.ask()) == "finish"


def test_the_second_method_is_submitted_only_when_it_beats_the_first_on_validation() -> None:
    conversation = Conversation()
    outputs = outputs_for(conversation)
    second = profile_of(conversation.system).second.slug
    outputs["second-method"] = students(second, "0.7500", "0.7400", "0.7600")
    steps = conversation.run(outputs)
    assert "second-submit" in steps
    submitted = [
        tool_uses(m["content"])[0]["input"]
        for m in conversation.messages
        if m["role"] == "assistant" and step_of(m["content"]) == "second-submit"
    ]
    assert submitted[0]["predictions_path"] == f"runs/{second}/seed-0/predictions.json"
    assert submitted[0]["artifact"] == "sha256:" + "b" * 64


def test_directions_choose_the_first_method_and_names_vary_the_rest() -> None:
    first = {
        direction: profile_of(system_for("w2s-chat-0", direction)).first.name
        for direction in (
            "unsupervised elicitation",
            "data reweighting",
            "confident-label filtering",
            "auxiliary confidence loss",
            "ensembling weak labels",
        )
    }
    assert first == {
        "unsupervised elicitation": "aux-conf",
        "data reweighting": "confident",
        "confident-label filtering": "confident",
        "auxiliary confidence loss": "aux-conf",
        "ensembling weak labels": "naive",
    }
    profiles = [profile_of(system_for(f"w2s-chat-{i}", "data reweighting")) for i in range(12)]
    assert {p.first.name for p in profiles} == {"confident"}
    assert len({(p.first.slug, p.second.slug) for p in profiles}) > 1
    # The same request, the same answer: a retried or resumed request changes nothing.
    conversation = Conversation()
    assert Research({"system": conversation.system, "messages": conversation.messages}).reply() == (
        Research({"system": conversation.system, "messages": conversation.messages}).reply()
    )


def test_its_tiny_model_settings_are_the_ones_aar_train_demo_prints() -> None:
    from aar_trainer.demo import DEMO_STRONG_OPTIONS, DEMO_WEAK_OPTIONS

    for flags, options in (
        (TINY_WEAK_FLAGS, DEMO_WEAK_OPTIONS),
        (TINY_STRONG_FLAGS, DEMO_STRONG_OPTIONS),
    ):
        pairs = dict(zip(flags[::2], flags[1::2], strict=True))
        for flag, value in pairs.items():
            assert float(value) == getattr(options, flag[2:].replace("-", "_"))


def test_its_script_keeps_finished_stages_and_prints_their_accuracy(tmp_path: Path) -> None:
    setup = setup_of(EXPLORED)
    script = tmp_path / "experiments" / "w2s.sh"
    script.parent.mkdir()
    script.write_text(script_text(setup, "cues"))
    for out, accuracy in (("runs/weak", 0.61799999), ("runs/ceiling", 0.966)):
        (tmp_path / out).mkdir(parents=True)
        (tmp_path / out / "results.json").write_text(
            json.dumps({"stage": "x", "accuracy": accuracy}, indent=2)
        )
    # No aar-train on PATH: a stage that is kept never runs it.
    done = subprocess.run(
        ["bash", str(script), "baselines"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert accuracies_in(done.stdout) == {"runs/weak": "0.6180", "runs/ceiling": "0.9660"}


# --- the real agent, driven by it -----------------------------------------------------------------


# The demo's cues task at half its size (CuesTask's defaults: 600/1500/500/500), so that the
# agents' real training fits the test tier's time on two cores.
MAKE_DEMO = """
import sys
from pathlib import Path
from aar_trainer.demo import CuesTask, make_demo
make_demo(Path(sys.argv[1]), CuesTask(weak_train=300, unlabelled=750, validation=250, test=250))
"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's demo (aar_trainer.demo, as `aar-train demo` makes it): the cues task bundle
    (DIR/task), its tiny models (DIR/models) and the scorer's labels file (DIR/test-labels.json).
    Made in a process of its own, so this one never imports torch."""
    root = tmp_path_factory.mktemp("demo")
    subprocess.run([sys.executable, "-c", MAKE_DEMO, str(root)], check=True, capture_output=True)
    return root


@pytest.fixture
def task_dir(demo: Path) -> Path:
    return demo / "task"


@pytest.fixture
def scorer_task(demo: Path) -> tuple[dict[str, Any], list[Any], str]:
    hidden = json.loads((demo / "test-labels.json").read_text())
    task = {"name": "cues", "labels": [0, 1], "baselines": {"weak": 0.62, "ceiling": 0.97}}
    return task, hidden["labels"], hidden["split_seed"]


def researcher_env(sandbox_env: dict[str, str], **overrides: str) -> dict[str, str]:
    """A sandbox's environment for the cues task, with aar-train on PATH as in the image."""
    return {
        **sandbox_env,
        "AAR_TASK": "cues",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **overrides,
    }


def transcript(workspace: Path) -> list[dict[str, Any]]:
    lines = (workspace / ".aar" / "transcript.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def printed_accuracies(messages: list[dict[str, Any]]) -> dict[str, str]:
    """What aar-train printed in the bash results of a transcript: run folder -> accuracy."""
    found = {}
    for message in messages:
        for block in message["content"] if isinstance(message["content"], list) else []:
            if block.get("type") == "tool_result":
                found.update({out: acc for acc, out in PRINTED.findall(str(block["content"]))})
    return found


def students_trained(workspace: Path) -> list[str]:
    """The method of each student aar-train trained in a workspace, as its results.json says."""
    results = sorted(workspace.glob("runs/*/seed-*/results.json"))
    return [json.loads(r.read_text())["method"].split(":")[0] for r in results]


def steps_taken(messages: list[dict[str, Any]]) -> list[str]:
    return [
        step_of(m["content"])
        for m in messages
        if m["role"] == "assistant" and m["content"] and m["content"][0].get("type") == "text"
    ]


def reproduce(
    forum: Service, digest: str, command: str, task_dir: Path, scratch: Path
) -> dict[int, list[Any]]:
    """A submission's code run as a reproduction Job runs it (its container's script, with its
    folders moved here): the artifact unpacked read-only, seed 0, the task bundle; the
    predictions it printed."""
    request = urllib.request.Request(f"{forum.url}/api/v1/artifacts/{digest}", headers=ADMIN)
    with urllib.request.urlopen(request, timeout=30) as response:
        files = artifact_files("artifact.tar.gz", response.read())
    artifact, output = scratch / "artifact", scratch / "output"
    for name, (content, mode) in files.items():
        (artifact / name).parent.mkdir(parents=True, exist_ok=True)
        (artifact / name).write_bytes(content)
        (artifact / name).chmod(mode)
    for folder in sorted(artifact.rglob("*"), reverse=True):
        if folder.is_dir():
            folder.chmod(0o555)
    wrapper = WRAPPER.replace(ARTIFACT_DIR, str(artifact)).replace(OUTPUT_DIR, str(output))
    environ = {
        "AAR_COMMAND": command,
        "AAR_SEEDS": "0",
        "AAR_TASK_DIR": str(task_dir),
        "HOME": str(scratch),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    done = subprocess.run(["/bin/sh", "-c", wrapper], env=environ, capture_output=True,
                          text=True, timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return predictions_from_log(done.stdout)[0]


async def test_the_real_agent_trains_posts_publishes_submits_and_ends(
    upstream_stub: tuple[AnthropicStub, str],
    gateway: Service,
    services: tuple[Service, Service],
    sandbox_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    upstream, _ = upstream_stub
    upstream.responder = researcher_reply
    forum, scorer = services
    gateway.call("PUT", f"/api/v1/budgets/{RUN_KEY}", {"usd": None, "agents": {}})
    env = researcher_env(
        sandbox_env,
        ANTHROPIC_BASE_URL=gateway.url,
        AAR_FORUM_URL=forum.url,
        AAR_SCORER_URL=scorer.url,
    )
    code, logs = await finish(await start_agent(env))

    assert code == 0, logs
    assert logs[-1]["outcome"] == "done"
    messages = transcript(Path(env["AAR_WORKSPACE"]))
    printed = printed_accuracies(messages)
    profile = profile_of(upstream.requests[0]["body"]["system"])
    first = [f"runs/{profile.first.slug}/seed-{s}" for s in (0, 1, 2)]
    assert set(printed) >= {"runs/weak", "runs/ceiling", *first}
    # The posted result carries the figures aar-train printed, labelled offline.
    posts = forum.call("GET", f"/api/v1/posts?run={RUN_KEY}&author={AGENT}&kind=result")["posts"]
    assert len(posts) == 2
    assert all(MARK in p["title"] and MARK in p["body"] for p in posts)
    result = next(p for p in posts if p["parent"] is None)
    for out in ("runs/weak", "runs/ceiling", *first):
        assert printed[out] in result["body"], out
    # Its code is in the artifact store, and its submission was scored.
    (digest,) = result["artifacts"]
    artifacts = forum.call("GET", f"/api/v1/artifacts?run={RUN_KEY}")["artifacts"]
    assert digest in {a["digest"] for a in artifacts}
    assert all(MARK in a["description"] for a in artifacts)
    (submission,) = result["submissions"]
    scored = scorer.call("GET", f"/api/v1/submissions/{submission}")
    assert scored["agent"] == AGENT
    assert scored["status"] == "accepted"
    # Its code makes the same predictions again, run as a reproduction Job runs it: from a
    # read-only copy of the artifact, with nothing of the workspace.
    command = scored["reproduction"]["command"]
    assert command
    reproduced = reproduce(forum, scored["artifact"], command, Path(env["AAR_TASK_DIR"]),
                           tmp_path_factory.mktemp("reproduction"))  # fmt: skip
    submitted = Path(env["AAR_WORKSPACE"]) / f"runs/{profile.first.slug}/seed-0/predictions.json"
    assert reproduced == {0: json.loads(submitted.read_text())}
    # It read the leaderboard and the forum, and finished after its second method.
    steps = steps_taken(messages)
    assert {"look-around", "second-method", "compare", "finish"} <= set(steps)
    # Spend was metered on the usage it reported, as for the real API.
    spend = gateway.call("GET", f"/api/v1/spend/{RUN_KEY}")["agents"][AGENT]
    assert spend["requests"] == upstream.messages_answered == len(steps)
    assert spend["input_tokens"] == upstream.usage_reported["input_tokens"] > 0
    assert spend["output_tokens"] == upstream.usage_reported["output_tokens"] > 0


@pytest.fixture
def researcher_stub(unused_tcp_port: int) -> Iterator[str]:
    """The stand-in as its own process, as the demo starts it: `--researcher`."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aar_devcluster.anthropic_stub",
            "--researcher",
            "--port",
            str(unused_tcp_port),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    url = process.stdout.readline().strip()
    assert url == f"http://127.0.0.1:{unused_tcp_port}"
    yield url
    process.terminate()
    process.wait(timeout=30)


async def test_agents_with_different_directions_take_different_methods(
    researcher_stub: str, sandbox_env: dict[str, str], tmp_path: Path
) -> None:
    agents = {"w2s-chat-1": "unsupervised elicitation", "w2s-chat-2": "data reweighting"}
    envs = {}
    for agent, direction in agents.items():
        workspace = tmp_path / agent
        workspace.mkdir()
        credential = ISSUER.mint_agent(NAMESPACE, RUN, agent)
        envs[agent] = researcher_env(
            sandbox_env,
            AAR_AGENT=agent,
            AAR_DIRECTION=direction,
            AAR_WORKSPACE=str(workspace),
            ANTHROPIC_API_KEY=credential,
            AAR_CREDENTIAL=credential,
            ANTHROPIC_BASE_URL=researcher_stub,
            # Up to its first method's students: explore, catch-up, plan, code, baselines,
            # baselines-noted, those.
            AAR_MAX_STEPS="7",
        )
    started = [await start_agent(env) for env in envs.values()]
    ran = await asyncio.gather(*(finish(process) for process in started))

    assert [code for code, _ in ran] == [0, 0]
    methods = {agent: students_trained(Path(env["AAR_WORKSPACE"])) for agent, env in envs.items()}
    assert methods == {"w2s-chat-1": ["w2s aux-conf"] * 3, "w2s-chat-2": ["w2s confident"] * 3}


async def test_a_stopped_researcher_resumes_without_redoing_finished_steps(
    stub: AnthropicStub, sandbox_env: dict[str, str]
) -> None:
    stub.responder = researcher_reply
    env = researcher_env(sandbox_env)
    workspace = Path(env["AAR_WORKSPACE"])
    first = await start_agent(env)
    # SIGTERM while the baselines train: that step finishes and is saved, then the agent exits.
    await wait_for(workspace / "runs", first)
    first.send_signal(signal.SIGTERM)
    code, logs = await finish(first)
    assert code == 0
    assert logs[-1]["outcome"] == "stopped"
    saved = StateStore(workspace / ".aar").load()
    assert saved is not None
    assert steps_taken(saved.messages)[-1] == "baselines"
    weak = (workspace / "runs" / "weak" / "results.json").stat().st_mtime_ns

    code, logs = await finish(await start_agent({**env, "AAR_MAX_STEPS": "1"}))

    assert code == 0
    assert any(line["message"] == "Resumed" for line in logs)
    steps = steps_taken(transcript(workspace))
    assert steps == ["explore", "catch-up", "plan", "code", "baselines", "baselines-noted"]
    assert (workspace / "runs" / "weak" / "results.json").stat().st_mtime_ns == weak
    # The step after the restart wrote down the baselines the first process trained.
    printed = printed_accuracies(transcript(workspace))
    notebook = (workspace / "notebook.md").read_text()
    assert f"weak teacher {printed['runs/weak']}, ceiling {printed['runs/ceiling']}" in notebook
