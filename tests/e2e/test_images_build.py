"""The images, built here by `aar-devcluster images` (buildah running images/Dockerfile, no
Docker engine, no registry) into the `docker save` archives the node imports: their names,
entrypoints and users are the ones the chart and the operator expect, and they really run.

Needs root (buildah and chroot); skipped with that reason without it. A missing tool that
`make tools` installs is a failure that says so. The first run builds every image (minutes);
later runs reuse the archives whose stamp is current.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from aar_devcluster import images
from aar_operator import builders

# Cold builds of all six images take several minutes on two cores.
pytestmark = pytest.mark.timeout(3600)

# The chart's Deployment template for each image it deploys.
CHART_TEMPLATES = {
    "operator": "operator-deployment.yaml",
    "forum": "forum-deployment.yaml",
    "scorer": "scorer-deployment.yaml",
    "gateway": "gateway-deployment.yaml",
}


@pytest.fixture(scope="module")
def archives() -> dict[str, Path]:
    """`aar-devcluster images`, run as a user runs it: image name -> archive."""
    if os.geteuid() != 0:
        pytest.skip("building and running images needs root (buildah, chroot)")
    for tool in ("buildah", "mmdebstrap", "gcc"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run `make tools`")
    result = subprocess.run(
        [sys.executable, "-m", "aar_devcluster", "images"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    paths = [Path(line) for line in result.stdout.split()]
    # Keyed by the name as the chart writes it (aar-scorer:0.1.0, not docker.io/library/...).
    return {familiar(read_manifest(path)["RepoTags"][0]): path for path in paths}


@pytest.fixture(scope="module")
def version(repo_root: Path) -> str:
    return str(
        yaml.safe_load((repo_root / "charts" / "aar" / "Chart.yaml").read_text())["appVersion"]
    )


@pytest.fixture
def rootfs(tmp_path: Path) -> Iterator[Path]:
    """Where a test unpacks an image; removed after it (an agent image is over a gigabyte)."""
    yield tmp_path / "rootfs"
    shutil.rmtree(tmp_path / "rootfs", ignore_errors=True)


def familiar(name: str) -> str:
    return name.removeprefix("docker.io/library/")


def read_manifest(archive: Path) -> dict[str, Any]:
    """The one image entry of a `docker save` archive's manifest.json."""
    with tarfile.open(archive) as tar:
        (entry,) = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    return dict(entry)


def read_config(archive: Path) -> dict[str, Any]:
    """The image's run configuration (Entrypoint, Cmd, User, Env, ...)."""
    with tarfile.open(archive) as tar:
        config = json.load(tar.extractfile(read_manifest(archive)["Config"]))  # type: ignore[arg-type]
    return dict(config["config"])


def unpack(archive: Path, rootfs: Path) -> dict[str, Any]:
    """Unpack an image's layers in order, as containerd's snapshotter would, whiteouts applied.

    Returns the image's run configuration.
    """
    manifest = read_manifest(archive)
    rootfs.mkdir(parents=True)
    with tarfile.open(archive) as outer:
        for layer_name in manifest["Layers"]:
            with tarfile.open(fileobj=outer.extractfile(layer_name)) as layer:
                members = layer.getmembers()
                for member in members:
                    path = PurePosixPath(member.name)
                    if path.name == ".wh..wh..opq":
                        for child in (rootfs / path.parent).iterdir():
                            remove(child)
                    elif path.name.startswith(".wh."):
                        remove(rootfs / path.parent / path.name.removeprefix(".wh."))
                layer.extractall(
                    rootfs,
                    members=[
                        m for m in members if not PurePosixPath(m.name).name.startswith(".wh.")
                    ],
                    # Modes as the image has them (/tmp's 1777 too): the archive is our own.
                    filter="fully_trusted",
                )
    return read_config(archive)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def run_in_image(
    rootfs: Path, config: dict[str, Any], *command: str
) -> subprocess.CompletedProcess[str]:
    """Run a command inside an unpacked image as its user, with only the image's environment,
    in a mount and PID namespace of its own that has /proc and /dev, as a container runtime
    gives them."""
    user = config["User"]
    workdir = config.get("WorkingDir") or "/"
    # The agent's Pod mounts a volume at its working directory (absent from the image); here it
    # is a folder the user owns.
    volume = rootfs / workdir.lstrip("/")
    if not volume.exists():
        volume.mkdir(parents=True)
        uid, gid = (int(n) for n in user.split(":"))
        os.chown(volume, uid, gid)
    script = (
        'mount -t proc proc "$ROOTFS/proc" && mount --rbind /dev "$ROOTFS/dev" && '
        'exec chroot --userspec="$USERSPEC" "$ROOTFS" /bin/sh -c \'cd "$0" && exec "$@"\' "$@"'
    )
    return subprocess.run(
        [
            "unshare",
            "--mount",
            "--pid",
            "--fork",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            workdir,
            "/usr/bin/env",
            "-i",
            *config.get("Env", []),
            *command,
        ],
        env={"ROOTFS": str(rootfs), "USERSPEC": user, "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def chart_run_as_user(repo_root: Path, name: str) -> int:
    """The runAsUser the chart's Deployment template sets for a component."""
    template = (repo_root / "charts" / "aar" / "templates" / CHART_TEMPLATES[name]).read_text()
    match = re.search(r"runAsUser: (\d+)", template)
    assert match, f"{CHART_TEMPLATES[name]} sets no runAsUser"
    return int(match.group(1))


def test_every_target_and_the_pause_image_is_archived_under_the_charts_name(
    archives: dict[str, Path], version: str
) -> None:
    expected = {f"aar-{target}:{version}" for target in images.TARGETS} | {images.PAUSE_IMAGE}
    assert set(archives) == expected
    for name, archive in archives.items():
        assert archive.parent == images.images_dir()
        # The normalized form of the chart's name: what containerd and the kubelet look up.
        assert read_manifest(archive)["RepoTags"] == [images.containerd_name(name)]
        assert archive.with_suffix(".stamp").is_file()


@pytest.mark.parametrize(
    ("target", "entrypoint", "cmd"),
    [
        ("operator", ["aar-operator"], ["run"]),
        ("forum", ["aar-forum"], None),
        ("scorer", ["aar-scorer"], None),
        ("gateway", ["aar-gateway"], None),
        ("agent", ["/usr/bin/tini", "--", "aar-agent"], None),
    ],
)
def test_the_image_runs_its_entrypoint_as_the_uid_its_pod_runs_as(
    target: str,
    entrypoint: list[str],
    cmd: list[str] | None,
    archives: dict[str, Path],
    version: str,
    repo_root: Path,
) -> None:
    config = read_config(archives[f"aar-{target}:{version}"])
    assert config["Entrypoint"] == entrypoint
    assert config.get("Cmd") == cmd
    uid = builders.AGENT_UID if target == "agent" else chart_run_as_user(repo_root, target)
    assert config["User"] == f"{uid}:{uid}"
    assert "PATH=/opt/aar/bin:" + images.BASE_PATH in config["Env"]


@pytest.mark.parametrize("target", ["scorer", "agent"])
def test_no_build_time_mount_is_left_in_a_layer(
    target: str, archives: dict[str, Path], version: str
) -> None:
    # The host's CA bundle, pip configuration and torch index are seen by RUN steps only: the
    # files they are mounted over come from the base (the first layer) and no later layer
    # holds them, not even as an empty mount point.
    mounted = {
        str(images.CA_BUNDLE).lstrip("/"),
        str(images.PIP_CONFIG).lstrip("/"),
        images.TORCH_INDEX_MOUNT.lstrip("/"),
    }
    archive = archives[f"aar-{target}:{version}"]
    with tarfile.open(archive) as outer:
        for layer_name in read_manifest(archive)["Layers"][1:]:
            with tarfile.open(fileobj=outer.extractfile(layer_name)) as layer:
                names = {PurePosixPath(m.name).as_posix().removeprefix("./") for m in layer}
            assert not (names & mounted), f"layer {layer_name} of {archive.name} holds a mount"
            assert not [
                n for n in names if n.startswith(images.TORCH_INDEX_MOUNT.lstrip("/") + "/")
            ]


def test_the_scorer_image_runs_its_console_script_as_its_user(
    archives: dict[str, Path], version: str, rootfs: Path
) -> None:
    config = unpack(archives[f"aar-scorer:{version}"], rootfs)
    helped = run_in_image(rootfs, config, "aar-scorer", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "usage" in helped.stdout.lower()
    imported = run_in_image(
        rootfs, config, "python", "-c", "import os, aar_scorer; print(os.getuid(), os.getgid())"
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.split() == ["10001", "10001"]


def test_the_agent_image_trains_with_cpu_torch_as_the_agent_user(
    archives: dict[str, Path], version: str, rootfs: Path, repo_root: Path
) -> None:
    config = unpack(archives[f"aar-agent:{version}"], rootfs)
    pinned = images.dockerfile_arg(repo_root / "images" / "Dockerfile", "TORCH_VERSION")
    probe = (
        "import os, torch; print(torch.__version__, torch.cuda.is_available(), os.getuid(), "
        "float(torch.ones(3).sum()))"
    )
    imported = run_in_image(rootfs, config, "python", "-c", probe)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.split() == [f"{pinned}+cpu", "False", str(builders.AGENT_UID), "3.0"]
    helped = run_in_image(rootfs, config, "aar-train", "--help")
    assert helped.returncode == 0, helped.stderr
    tini = run_in_image(rootfs, config, "/usr/bin/tini", "--version")
    assert tini.returncode == 0, tini.stderr


def test_the_pause_image_sleeps_until_sigterm_and_exits_zero(
    archives: dict[str, Path], rootfs: Path
) -> None:
    config = unpack(archives[images.PAUSE_IMAGE], rootfs)
    assert config["Entrypoint"] == ["/pause"]
    assert sorted(p.name for p in rootfs.iterdir()) == ["pause"]
    process = subprocess.Popen(["chroot", "--userspec", config["User"], str(rootfs), "/pause"])
    time.sleep(0.5)
    assert process.poll() is None, "pause exited on its own"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0


def test_a_second_run_reuses_every_archive(archives: dict[str, Path]) -> None:
    # The first call catches up with any edit made since the fixture ran; the second, right
    # after it, finds every stamp current and writes nothing.
    images.build_images(progress=lambda message: None)
    before = {path: path.stat().st_mtime_ns for path in archives.values()}
    again = images.build_images(progress=lambda message: None)
    assert {result.archive for result in again} == set(archives.values())
    assert not [result.image for result in again if result.built]
    assert {path: path.stat().st_mtime_ns for path in archives.values()} == before


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Path]:
    """A containerd of the test's own (its own root, state and socket; no CRI), as the node
    runs one: yields its socket."""
    for tool in ("containerd", "ctr"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run `make tools`")
    socket = tmp_path / "containerd.sock"
    config = tmp_path / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{tmp_path / "root"}"\n'
        f'state = "{tmp_path / "state"}"\n'
        # The CRI plugin would want the node's network; importing needs only the content store.
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{socket}"\n'
        f'[ttrpc]\n  address = "{socket}.ttrpc"\n'
    )
    with (tmp_path / "containerd.log").open("w") as log:
        process = subprocess.Popen(["containerd", "--config", str(config)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            assert process.poll() is None, (tmp_path / "containerd.log").read_text()
            assert time.monotonic() < deadline, "containerd did not open its socket in 30 s"
            time.sleep(0.1)
        yield socket
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_import_images_loads_the_archives_under_the_names_the_kubelet_asks_for(
    archives: dict[str, Path], version: str, containerd: Path
) -> None:
    wanted = [images.PAUSE_IMAGE, f"aar-scorer:{version}"]
    images.import_images([archives[name] for name in wanted], containerd)
    listed = subprocess.run(
        ["ctr", "--address", str(containerd), "-n", "k8s.io", "images", "ls", "--quiet"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert sorted(listed) == sorted(images.containerd_name(name) for name in wanted)


def test_without_buildah_the_command_says_to_run_make_tools(archives: dict[str, Path]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "aar_devcluster", "images", "scorer"],
        env={**os.environ, "PATH": "/nonexistent"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "buildah is not installed: run `make tools`" in result.stderr
