"""The e2e tier's footing: a kind cluster comes up on Docker and answers kubectl.

The chart, the images and NetworkPolicy enforcement are checked here as those components land.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from aar_devcluster.paths import binary


@pytest.fixture(scope="module")
def kind_kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    kind = shutil.which("kind")
    if kind is None:
        pytest.skip("e2e tests need the `kind` command on PATH (Docker answers, kind is missing)")
    name = f"aar-e2e-{secrets.token_hex(3)}"
    kubeconfig = tmp_path_factory.mktemp("kind") / "kubeconfig"
    subprocess.run(
        [
            kind,
            "create",
            "cluster",
            "--name",
            name,
            "--kubeconfig",
            str(kubeconfig),
            "--wait",
            "120s",
        ],
        check=True,
        timeout=300,
    )
    yield kubeconfig
    subprocess.run([kind, "delete", "cluster", "--name", name], check=False, timeout=120)


def test_kind_nodes_are_ready(kind_kubeconfig: Path) -> None:
    result = subprocess.run(
        [
            str(binary("kubectl")),
            "--kubeconfig",
            str(kind_kubeconfig),
            "get",
            "nodes",
            "-o",
            "jsonpath={.items[*].status.conditions[?(@.type=='Ready')].status}",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    statuses = result.stdout.split()
    assert statuses, "kind reported no nodes"
    assert set(statuses) == {"True"}
