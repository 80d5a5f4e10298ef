"""The CRDs are generated from the models, structural, and checked in as generated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from aar_operator import crds
from aar_operator.cli import CRD_DIRECTORIES, main
from aar_operator.models import ResearchRunSpec, parse_duration


def test_checked_in_crds_match_the_models() -> None:
    stale = crds.stale(CRD_DIRECTORIES)
    assert not stale, f"out of date: {stale}; run `aar-operator crds`"


def test_check_flag_fails_on_an_edited_crd(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    crds.write([tmp_path])
    assert main(["crds", "--check", str(tmp_path)]) == 0
    edited = tmp_path / "researchruns.yaml"
    edited.write_text(edited.read_text().replace("maximum: 1000", "maximum: 5"))
    assert main(["crds", "--check", str(tmp_path)]) == 1
    assert "researchruns.yaml is out of date" in capsys.readouterr().err


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, child in node.get("properties", {}).items():
        found += _walk(child, f"{path}.{name}")
    if "items" in node:
        found += _walk(node["items"], f"{path}[]")
    return found


@pytest.mark.parametrize("name", ["researchruns.yaml", "agentsandboxes.yaml"])
def test_schema_is_structural(name: str) -> None:
    version = crds.definitions()[name]["spec"]["versions"][0]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for path, node in _walk(spec):
        assert not {"$ref", "title"} & set(node), path
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
        else:
            assert node.get("type") in {
                "object",
                "string",
                "integer",
                "number",
                "boolean",
                "array",
            }, path
        assert node.get("default", "x") not in (None, ""), f"{path}: 1.20 refuses null defaults"
    assert version["subresources"] == {"status": {}}


def test_run_schema_bounds_agents_and_names_the_short_name() -> None:
    crd = crds.definitions()["researchruns.yaml"]
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert (spec["properties"]["agents"]["minimum"], spec["properties"]["agents"]["maximum"]) == (
        1,
        1000,
    )
    assert set(spec["required"]) == {"agents", "task", "sandbox"}
    assert crd["spec"]["names"]["shortNames"] == ["rr"]
    columns = [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns == [
        "Ready", "Status", "Model", "Task", "Spent", "Budget", "PGR", "Reproduced", "Ends", "Age",
        "Message",
    ]  # fmt: skip
    assert crds.definitions()["agentsandboxes.yaml"]["spec"]["names"]["shortNames"] == ["asb"]


def test_models_refuse_what_the_schema_refuses() -> None:
    good = {"agents": 3, "task": {"name": "w2s-chat"}, "sandbox": {"image": "agent:1"}}
    assert ResearchRunSpec.model_validate(good).sandbox.resources.gpu == 1
    for bad in ({"agents": 0}, {"agents": 1001}, {"surprise": 1}, {"task": {"name": "Not_DNS"}}):
        with pytest.raises(ValidationError):
            ResearchRunSpec.model_validate({**good, **bad})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("120h", 432000), ("90m", 5400), ("1h30m", 5400), ("45s", 45), ("1.5h", 5400)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


def test_a_bad_duration_says_what_is_expected() -> None:
    with pytest.raises(ValueError, match="120h"):
        parse_duration("five days")
