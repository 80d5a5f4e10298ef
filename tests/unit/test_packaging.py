"""One distribution; every component folder is the import package `aar_<folder>`, none shadows
the standard library, and torch stays out of the services' installs."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

COMPONENTS = ["common", "operator", "agent", "trainer", "forum", "scorer", "gateway", "devcluster"]


@pytest.fixture(scope="module")
def pyproject(repo_root: Path) -> dict[str, Any]:
    return tomllib.loads((repo_root / "pyproject.toml").read_text())


def test_stdlib_operator_is_not_shadowed_from_the_repo_root(repo_root: Path) -> None:
    # Run from the repository root, where a folder named `operator/` sits on sys.path[0].
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import operator, aar_operator; operator.add; "
            "print(operator.__file__); print(aar_operator.__file__)",
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        check=True,
    )
    stdlib_file, package_file = result.stdout.split()
    assert Path(stdlib_file).name == "operator.py"
    assert Path(stdlib_file).parent != repo_root
    assert Path(package_file) == repo_root / "operator" / "__init__.py"


@pytest.mark.parametrize("component", COMPONENTS)
def test_component_folder_is_its_aar_package(
    component: str, pyproject: dict[str, Any], repo_root: Path
) -> None:
    package = f"aar_{component}"
    setuptools = pyproject["tool"]["setuptools"]
    assert setuptools["package-dir"][package] == component
    assert package in setuptools["packages"]
    assert package in pyproject["tool"]["mypy"]["packages"]
    # mypy reaches each package through its symlink, never through the bare folder name.
    assert (repo_root / ".typecheck" / package).resolve() == repo_root / component
    module = __import__(package)
    assert Path(module.__file__).parent == repo_root / component


def test_torch_is_pinned_and_only_in_the_trainer_extra(pyproject: dict[str, Any]) -> None:
    project = pyproject["project"]
    extras: dict[str, list[str]] = project["optional-dependencies"]
    assert "torch==2.13.0" in extras["trainer"]
    for name, requirements in [("base", project["dependencies"])] + [
        (extra, reqs) for extra, reqs in extras.items() if extra not in ("trainer", "all")
    ]:
        assert not any(r.startswith("torch") for r in requirements), name
    assert "trainer" in extras["all"][0]
