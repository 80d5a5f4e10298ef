"""charts/aar rendered by `helm template` with the project's own helm, for tests of what the
chart makes (the unit tier's, and the service tier's gateway served as the chart configures it).
A module of its own, not conftest, beside the root conftest so that test modules of every tier
import it by name (pytest puts each conftest's folder on sys.path).

helm is one of the tools `make tools` installs, so a missing helm fails these tests with the fix
instead of skipping them: a skipped chart test reads as a passing one.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from aar_devcluster.paths import BinariesMissingError, binary


def helm() -> Path:
    """The project's helm; a failed test saying how to install it when it is missing."""
    try:
        return binary("helm")
    except BinariesMissingError as missing:
        problem = str(missing)
    # Outside the except block, so the report says it once, without the chained error.
    pytest.fail(problem, pytrace=False)


def helm_template(repo_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`helm template aar charts/aar ARGS`, whether it succeeds or not."""
    return subprocess.run(
        [str(helm()), "template", "aar", str(repo_root / "charts" / "aar"), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def render(repo_root: Path, *args: str) -> list[dict[str, Any]]:
    """The objects the chart makes with `args`; the test fails with helm's message if it cannot."""
    result = helm_template(repo_root, *args)
    assert result.returncode == 0, result.stderr
    return [o for o in yaml.safe_load_all(result.stdout) if o]
