"""The images' targets in images/Dockerfile, checked against what runs them without building them
(no Docker engine here): the chart's Deployments, the operator's sandbox Pod and pyproject's
console scripts.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_template import render

from aar_operator import builders
from aar_operator.config import OperatorConfig
from aar_operator.models import AgentSandboxSpec

IMAGES = ["operator", "agent", "forum", "scorer", "gateway"]
# The chart's Deployments, by the component label they carry.
CHART_COMPONENTS = ["operator", "forum", "scorer", "gateway"]


@dataclass
class Stage:
    """One FROM ... stage of a Dockerfile: its instructions, continuation lines joined."""

    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arguments for name, arguments in self.instructions if name == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for arguments in self.all("ENV"):
            for item in shlex.split(arguments):
                key, _, value = item.partition("=")
                values[key] = value
        return values

    def args(self) -> dict[str, str]:
        return dict(item.partition("=")[::2] for item in self.all("ARG"))


def parse_dockerfile(text: str) -> list[Stage]:
    """The stages of a Dockerfile, as Docker reads it: comments dropped, `\\` lines joined."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation line"
    stages: list[Stage] = []
    for line in logical:
        keyword, _, arguments = line.partition(" ")
        keyword, arguments = keyword.upper(), " ".join(arguments.split())
        if keyword == "FROM":
            words = arguments.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append((keyword, arguments))
    return stages


@dataclass
class Image:
    """One build target: its own stage and those it builds on, merged oldest first."""

    name: str
    dockerfile: Path
    stages: list[Stage]  # every stage of the file
    final: Stage
    global_args: dict[str, str]

    def exec_form(self, keyword: str) -> list[str] | None:
        """ENTRYPOINT or CMD of the target; shell form is refused (signals miss the app)."""
        arguments = self.final.last(keyword)
        if arguments is None:
            return None
        value = json.loads(arguments)
        assert isinstance(value, list), f"target {self.name}: {keyword} must be in exec form"
        return [str(v) for v in value]


def load_image(dockerfile: Path, name: str) -> Image:
    text = dockerfile.read_text()
    before_from = text[: text.index("\nFROM ")]
    global_args = dict(
        line.removeprefix("ARG ").partition("=")[::2]
        for line in before_from.splitlines()
        if line.startswith("ARG ")
    )
    stages = parse_dockerfile(text)
    by_name = {stage.name: stage for stage in stages if stage.name}
    assert name in by_name, f"{dockerfile} has no target {name!r}"
    chain = [by_name[name]]
    while chain[-1].base in by_name:
        chain.append(by_name[chain[-1].base])
    final = Stage(chain[-1].base, name)
    for stage in reversed(chain):
        final.instructions += stage.instructions
    return Image(name, dockerfile, stages, final, global_args)


@pytest.fixture(scope="module")
def images(repo_root: Path) -> dict[str, Image]:
    return {name: load_image(repo_root / "images" / "Dockerfile", name) for name in IMAGES}


@pytest.fixture(scope="module")
def pyproject(repo_root: Path) -> dict[str, Any]:
    return tomllib.loads((repo_root / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def chart_values(repo_root: Path) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((repo_root / "charts" / "aar" / "values.yaml").open())
    return values


@pytest.fixture(scope="module")
def deployments(repo_root: Path) -> dict[str, dict[str, Any]]:
    """The chart's Deployments, rendered with its default values, by component."""
    return {
        o["metadata"]["labels"]["app.kubernetes.io/component"]: o
        for o in render(repo_root)
        if o["kind"] == "Deployment"
    }


@pytest.fixture(scope="module")
def sandbox_pod() -> dict[str, Any]:
    """The operator's agent Pod, as its builder makes it."""
    spec = AgentSandboxSpec.model_validate(
        {"run": "w2s-chat", "task": {"name": "w2s-chat"}, "sandbox": {"image": "aar-agent:0.1.0"}}
    )
    sandbox = builders.Sandbox("research", "w2s-chat-0", "sandbox-uid", spec)
    config = OperatorConfig()
    return builders.pod(sandbox, config)


def container_of(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def run_as_user(pod_spec: dict[str, Any], container: dict[str, Any]) -> int:
    """The uid a container runs as: its own securityContext first, then the Pod's."""
    for context in (container.get("securityContext", {}), pod_spec.get("securityContext", {})):
        if "runAsUser" in context:
            return int(context["runAsUser"])
    raise AssertionError(f"container {container['name']} sets no runAsUser")


def test_every_component_the_chart_deploys_has_an_image(
    deployments: dict[str, dict[str, Any]], repo_root: Path
) -> None:
    assert set(deployments) == set(CHART_COMPONENTS)
    targets = {s.name for s in parse_dockerfile((repo_root / "images" / "Dockerfile").read_text())}
    for component, deployment in deployments.items():
        repository = container_of(deployment)["image"].rsplit(":", 1)[0]
        target = repository.removeprefix("aar-")
        assert target in targets, (
            f"the chart deploys {repository} for {component} but images/Dockerfile has no "
            f"target {target!r}"
        )


@pytest.mark.parametrize("name", CHART_COMPONENTS)
def test_the_image_name_is_the_charts_default_repository(
    name: str, chart_values: dict[str, Any]
) -> None:
    assert chart_values[name]["image"]["repository"] == f"aar-{name}"


def test_the_example_run_names_the_agent_image(repo_root: Path) -> None:
    run = yaml.safe_load((repo_root / "examples" / "run.yaml").read_text())
    repository = run["spec"]["sandbox"]["image"].rsplit(":", 1)[0]
    assert repository.rsplit("/", 1)[-1] == "aar-agent"


@pytest.mark.parametrize("name", IMAGES)
def test_the_entrypoint_is_a_console_script(
    name: str, images: dict[str, Image], pyproject: dict[str, Any]
) -> None:
    entrypoint = images[name].exec_form("ENTRYPOINT")
    assert entrypoint, f"target {name} has no ENTRYPOINT"
    if name == "agent":
        # Background jobs the agent's shell leaves behind are reaped by tini, never by Python.
        assert entrypoint[:2] == ["/usr/bin/tini", "--"]
        entrypoint = entrypoint[2:]
        installs = " ".join(images[name].final.all("RUN"))
        assert re.search(r"apt-get install [^&]*\btini\b", installs)
    assert entrypoint == [f"aar-{name}"]
    assert entrypoint[0] in pyproject["project"]["scripts"]


@pytest.mark.parametrize("name", CHART_COMPONENTS)
def test_the_chart_command_runs_with_the_image_entrypoint(
    name: str, images: dict[str, Image], deployments: dict[str, dict[str, Any]]
) -> None:
    # Kubernetes: `command` replaces ENTRYPOINT (and drops CMD), `args` replaces CMD.
    image, container = images[name], container_of(deployments[name])
    command = container.get("command") or image.exec_form("ENTRYPOINT") or []
    args = container.get("args")
    if args is None:
        args = [] if "command" in container else (image.exec_form("CMD") or [])
    assert command == [f"aar-{name}"]
    # The console script, installed next to this interpreter, accepts what the Pod passes it.
    script = Path(sys.executable).with_name(command[0])
    result = subprocess.run(
        [str(script), *args, "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", IMAGES)
def test_every_copy_source_is_in_the_build_context(
    name: str, images: dict[str, Image], repo_root: Path
) -> None:
    ignored = [
        line.strip().rstrip("/")
        for line in (repo_root / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    image = images[name]
    # The target's own stages, and the stages it copies from.
    sources_of = {f"--from={stage.name}": stage for stage in image.stages if stage.name}
    own = image.final.all("COPY") + image.final.all("ADD")
    copied_from = [sources_of[w] for a in own for w in a.split() if w in sources_of]
    assert copied_from, f"target {name} installs no wheel (no COPY --from=wheel)"
    copies = own + [a for stage in copied_from for a in stage.all("COPY") + stage.all("ADD")]
    for arguments in copies:
        words = arguments.split()
        if any(word.startswith("--from=") for word in words):
            continue
        sources = [w for w in words if not w.startswith("--")][:-1]
        for source in sources:
            path = source.rstrip("/")
            assert (repo_root / path).exists(), f"{name}: COPY {source}: no such path"
            assert not any(fnmatch.fnmatch(path, pattern) for pattern in ignored), (
                f"{name}: COPY {source}, but .dockerignore leaves it out of the context"
            )


def test_the_wheel_stage_copies_every_package_folder(
    images: dict[str, Image], pyproject: dict[str, Any]
) -> None:
    # setuptools refuses to build when a package's folder is missing, so the wheel needs them all.
    (wheel,) = [s for s in images["operator"].stages if s.name == "wheel"]
    copied = {a.split()[0].rstrip("/") for a in wheel.all("COPY")}
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert folders <= copied
    assert {"pyproject.toml", "README.md"} <= {w for a in wheel.all("COPY") for w in a.split()}
    assert any("pip wheel" in run for run in wheel.all("RUN"))


def test_the_wheel_the_images_install_holds_every_subpackage(
    pyproject: dict[str, Any], repo_root: Path
) -> None:
    # setuptools packs only the packages pyproject lists: a missing subpackage works in an
    # editable install and breaks the image at its first import.
    setuptools = pyproject["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    for package, folder in setuptools["package-dir"].items():
        for marker in (repo_root / folder).rglob("__init__.py"):
            parts = marker.parent.relative_to(repo_root / folder).parts
            assert ".".join((package, *parts)) in listed, f"pyproject does not list {marker}"


@pytest.mark.parametrize(
    ("name", "extras"),
    [
        ("operator", {"operator"}),
        ("agent", {"agent", "trainer"}),
        ("forum", {"services"}),
        ("scorer", {"services"}),
        ("gateway", {"services"}),
    ],
)
def test_the_image_installs_its_extras_into_slim_python_311(
    name: str, extras: set[str], images: dict[str, Image], pyproject: dict[str, Any]
) -> None:
    image = images[name]
    assert image.final.base == "${PYTHON_IMAGE}"
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", image.global_args["PYTHON_IMAGE"])
    installs = " ".join(image.final.all("RUN"))
    match = re.search(r"/wheels/aar-\*\.whl\)\[([a-z,]+)\]", installs)
    assert match, f"target {name} does not install the wheel with an extra"
    assert set(match.group(1).split(",")) == extras
    assert extras <= set(pyproject["project"]["optional-dependencies"])


@pytest.mark.parametrize("name", IMAGES)
def test_the_image_runs_as_the_uid_its_pod_runs_as(
    name: str,
    images: dict[str, Image],
    deployments: dict[str, dict[str, Any]],
    sandbox_pod: dict[str, Any],
) -> None:
    user = images[name].final.last("USER")
    assert user is not None, f"target {name} never sets USER: it would run as root"
    # Numeric, so the kubelet can check runAsNonRoot without reading /etc/passwd.
    assert re.fullmatch(r"\d+:\d+", user), f"USER {user} must be numeric uid:gid"
    uid = int(user.split(":")[0])
    assert uid != 0
    if name == "agent":
        pod_spec = sandbox_pod["spec"]
        assert uid == builders.AGENT_UID
    else:
        pod_spec = deployments[name]["spec"]["template"]["spec"]
    assert uid == run_as_user(pod_spec, pod_spec["containers"][0])
    created = " ".join(images[name].final.all("RUN"))
    assert f"--uid {uid} " in created, f"target {name} runs as {uid} but creates no such user"


@pytest.mark.parametrize("name", CHART_COMPONENTS)
def test_the_image_serves_the_ports_and_paths_the_chart_uses(
    name: str, images: dict[str, Image], deployments: dict[str, dict[str, Any]]
) -> None:
    image, container = images[name], container_of(deployments[name])
    exposed = {int(port) for arguments in image.final.all("EXPOSE") for port in arguments.split()}
    assert {p["containerPort"] for p in container["ports"]} <= exposed
    chart_env = {e["name"]: e.get("value") for e in container.get("env", [])}
    for key, value in image.final.env().items():
        if key in chart_env:
            assert chart_env[key] == value, f"{name}: {key} is {value} in the image"
    data_dir = chart_env.get("AAR_DATA_DIR")
    if data_dir:
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert data_dir in mounts
        assert not mounts[data_dir].get("readOnly")


def test_the_agent_image_writes_only_where_the_sandbox_pod_mounts_volumes(
    images: dict[str, Image], sandbox_pod: dict[str, Any]
) -> None:
    env = images["agent"].final.env()
    (container,) = sandbox_pod["spec"]["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    for key in ("HOME", "TMPDIR", "AAR_WORKSPACE"):
        assert env[key] in writable, f"agent image: {key}={env[key]} is not a writable mount"
    assert images["agent"].final.last("WORKDIR") in writable
    read_only = {m["mountPath"] for m in container["volumeMounts"] if m.get("readOnly")}
    assert env["AAR_TASK_DIR"] in read_only


def test_the_agent_image_installs_the_cuda_build_of_the_pinned_torch(
    images: dict[str, Image], pyproject: dict[str, Any]
) -> None:
    arguments = images["agent"].final.args()
    pins = [d for d in pyproject["project"]["optional-dependencies"]["trainer"] if "torch" in d]
    assert pins == [f"torch=={arguments['TORCH_VERSION']}"]
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", arguments["TORCH_INDEX_URL"])
    installs = " ".join(images["agent"].final.all("RUN"))
    # torch comes first, from the PyTorch index, so the extra's pin finds it already there.
    assert installs.index('--index-url "$TORCH_INDEX_URL"') < installs.index("[agent,trainer]")


def test_the_dockerfile_parser_joins_continuations_and_splits_stages() -> None:
    stages = parse_dockerfile(
        "ARG X=1\nFROM a AS build\n# note\nRUN one \\\n    && two\nFROM b\nUSER 5:5\n"
    )
    assert [(s.base, s.name) for s in stages] == [("a", "build"), ("b", "")]
    assert stages[0].instructions == [("RUN", "one && two")]
    assert stages[1].last("USER") == "5:5"
