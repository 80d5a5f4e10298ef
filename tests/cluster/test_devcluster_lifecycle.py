"""The development cluster's life cycle as a human and a test session see it: up, down, up again
with the data kept; and no process left behind when its owner is interrupted or killed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aar_devcluster.controlplane import PROCESS_ORDER, ControlPlane
from aar_devcluster.tools import Tool


def process_gone(pid: int) -> bool:
    """Exited: no such pid, or a zombie left for a parent (here, PID 1) to reap."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_gone(pids: list[int], timeout: float = 15) -> list[int]:
    """The pids still running after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(process_gone(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if not process_gone(p)]


def devcluster(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aar_devcluster", "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def recorded_pids(state_dir: Path) -> list[int]:
    return list(json.loads((state_dir / "state.json").read_text())["pids"].values())


def test_up_down_up_keeps_data_and_down_leaves_no_process(tmp_path: Path) -> None:
    state_dir = tmp_path / "cluster"
    try:
        up = devcluster(state_dir, "up")
        assert up.returncode == 0, up.stderr
        assert f"export KUBECONFIG={state_dir / 'kubeconfig'}" in up.stdout
        assert devcluster(state_dir, "status").returncode == 0
        for secret in ["kubeconfig", "state.json", "pki/tokens.csv", "pki/sa.key", "pki/ca.key"]:
            assert (state_dir / secret).stat().st_mode & 0o777 == 0o600, secret
        pids = recorded_pids(state_dir)
        assert len(pids) == len(PROCESS_ORDER)
        kubectl = Tool("kubectl", state_dir / "kubeconfig", "default")
        kubectl.run("create", "configmap", "kept", "--from-literal=answer=42")

        down = devcluster(state_dir, "down")

        assert down.returncode == 0, down.stderr
        assert wait_gone(pids, timeout=0) == []
        status = devcluster(state_dir, "status")
        assert status.returncode == 1
        assert "Not running" in status.stdout

        assert devcluster(state_dir, "up").returncode == 0
        kept = kubectl.json("get", "configmap", "kept")
        assert kept["data"] == {"answer": "42"}
        pids = recorded_pids(state_dir)

        destroy = devcluster(state_dir, "destroy")

        assert destroy.returncode == 0, destroy.stderr
        assert not state_dir.exists()
        assert wait_gone(pids, timeout=0) == []
    finally:
        ControlPlane(state_dir).destroy()  # in-process: what the CLI left, when this test fails


def test_up_without_binaries_says_how_to_install(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aar_devcluster", "--state-dir", str(tmp_path / "c"), "up"],
        capture_output=True,
        text=True,
        env={"AAR_CACHE": str(tmp_path / "empty-cache"), "PATH": "/usr/bin:/bin"},
        timeout=60,
        check=False,
    )

    assert result.returncode == 1
    assert "etcd is not installed" in result.stderr
    assert "run `make tools`" in result.stderr


OWNER_SCRIPT = """
import signal, sys, time
from pathlib import Path
from aar_devcluster.controlplane import ControlPlane

# Ctrl-C raises KeyboardInterrupt even where this test runs with SIGINT ignored (a background job).
signal.signal(signal.SIGINT, signal.default_int_handler)
plane = ControlPlane(Path(sys.argv[1]), die_with_parent=True)
plane.start()
print("ready", flush=True)
try:
    time.sleep(600)
finally:
    plane.stop()
"""


@pytest.mark.parametrize("interruption", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_interrupted_owner_leaves_no_process(tmp_path: Path, interruption: signal.Signals) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER_SCRIPT, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        assert owner.stdout.readline().strip() == "ready", owner.stderr
        pids = recorded_pids(tmp_path)
        assert len(pids) == len(PROCESS_ORDER)
        assert not any(process_gone(p) for p in pids)

        owner.send_signal(interruption)
        owner.wait(timeout=30)

        assert wait_gone(pids) == []
    finally:
        owner.kill()
        owner.wait()
        ControlPlane(tmp_path).stop()  # what the owner failed to stop, when this test fails


def test_tools_ignore_a_kubectl_on_path(
    tmp_path: Path, control_plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    impostor = tmp_path / "kubectl"
    impostor.write_text("#!/bin/sh\necho impostor\nexit 99\n")
    impostor.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")

    kubectl = Tool("kubectl", control_plane.kubeconfig_path)

    assert "v1.33" in kubectl.run("version", "--client")
    assert "default" in kubectl.run("get", "namespaces", "-o", "name")
