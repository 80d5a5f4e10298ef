"""Build every image of images/Dockerfile on this machine, without a Docker engine or a registry.

buildah runs images/Dockerfile itself, one target at a time (`--isolation chroot`, its layer
cache on), so what each image holds is defined in one place. The Dockerfile's base,
python:3.11-slim-bookworm, cannot be pulled here: a local stand-in is made once by mmdebstrap
from the Debian mirror apt uses on this machine. Each image is written as a `docker save`
archive under `cache_dir() / "images"`, which `ctr images import` loads into the node's
containerd; a stamp beside each archive skips the build when nothing it is made from changed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from aar_devcluster.paths import cache_dir

# The Dockerfile's targets, in build order: the three services share every layer up to their own.
TARGETS = ("operator", "forum", "scorer", "gateway", "agent")
SERVICES = ("forum", "scorer", "gateway")
# containerd's sandbox image, the one the node's containerd config names.
PAUSE_IMAGE = "k8s.gcr.io/pause:3.2"
# The uid:gid the upstream pause image runs as.
PAUSE_USER = "65535:65535"

# The local stand-in for python:3.11-slim-bookworm (Debian's Python 3.11, `python` and `pip`
# named as in the official image).
BASE_IMAGE = "localhost/aar-python:3.11-bookworm"
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates")
# What slim images leave out: manuals, docs (copyright notices kept), translations.
BASE_EXCLUDES = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Build-time only, never in a layer: the host's CA bundle (the registries are reached through an
# intercepting proxy) and pip configuration, bind-mounted over files the base already has, so
# not even an empty mount point is left behind in the images' layers.
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
PIP_CONFIG = Path("/etc/pip.conf")
# The local torch index is mounted on /mnt, a directory every Debian base has (same reason).
TORCH_INDEX_MOUNT = "/mnt"
# Where a CPU build of torch may lie on this machine, besides $PIP_FIND_LINKS.
WHEEL_DIRS = (Path("/opt/wheels"), Path("/opt/pypi/files"))

Progress = Callable[[str], None]


class ImageBuildError(RuntimeError):
    """An image could not be built, written or imported; the message says how to fix it."""


@dataclass(frozen=True)
class Built:
    """One image archive and whether this call built it (False: the stamp said it was current)."""

    image: str
    archive: Path
    built: bool
    seconds: float


def images_dir() -> Path:
    """Where the image archives, their stamps and the build logs live."""
    return cache_dir() / "images"


def repo_root() -> Path:
    """The checkout this package runs from: the build context."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "images" / "Dockerfile").is_file():
        raise ImageBuildError(
            f"{root} has no images/Dockerfile: images are built from a checkout of the "
            f"repository (pip install -e .)"
        )
    return root


def chart_version(root: Path) -> str:
    """The chart's appVersion: the tag its Deployments name when `image.tag` is left empty."""
    chart = yaml.safe_load((root / "charts" / "aar" / "Chart.yaml").read_text())
    return str(chart["appVersion"])


def image_name(target: str, version: str) -> str:
    """The name the chart's defaults expect, e.g. aar-scorer:0.1.0."""
    return f"aar-{target}:{version}"


def containerd_name(image: str) -> str:
    """The name an archive records and containerd keeps an image under: Docker's normalized
    reference, the one the kubelet's `aar-scorer:0.1.0` resolves to
    (docker.io/library/aar-scorer:0.1.0)."""
    domain, slash, _ = image.partition("/")
    if not slash:
        return f"docker.io/library/{image}"
    if "." in domain or ":" in domain or domain == "localhost":
        return image
    return f"docker.io/{image}"


def archive_path(image: str) -> Path:
    """The archive of an image: aar-scorer:0.1.0 -> aar-scorer-0.1.0.tar."""
    return images_dir() / (image.rsplit("/", 1)[-1].replace(":", "-") + ".tar")


def tool(name: str) -> str:
    """The path of a Debian tool the project installs, or an error naming the fix."""
    found = shutil.which(name)
    if found is None:
        raise ImageBuildError(f"{name} is not installed: run `make tools`")
    return found


def run(command: Sequence[str], log: Path | None = None) -> str:
    """Run a command and return its stdout; on failure raise with the end of its output."""
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            result = subprocess.run(
                command, stdout=out, stderr=subprocess.STDOUT, text=True, check=False
            )
        output = log.read_text()
    else:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        output = result.stdout + result.stderr
    if result.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-30:])
        where = f" (full log: {log})" if log is not None else ""
        raise ImageBuildError(
            f"{' '.join(command)} exited with {result.returncode}{where}:\n{tail}"
        )
    return result.stdout if log is None else output


# --- what the build is made from: the stamp ----------------------------------------------------


def dockerignore_patterns(root: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (excludes, regex) pairs, in order; the last match wins, as in Docker."""
    path = root / ".dockerignore"
    lines = path.read_text().splitlines() if path.exists() else []
    patterns = []
    for line in (raw.strip() for raw in lines):
        if not line or line.startswith("#"):
            continue
        excludes = not line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                part, re.escape(part)
            )
        patterns.append((excludes, re.compile(regex)))
    return patterns


def is_ignored(relative: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether .dockerignore leaves a path out: it, or a folder above it, matches."""
    parts = relative.split("/")
    ignored = False
    for excludes, regex in patterns:
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = excludes
    return ignored


def context_files(root: Path) -> list[Path]:
    """Every file of the build context, as buildah sends it, sorted."""
    patterns = dockerignore_patterns(root)
    files = []
    for directory, folders, names in os.walk(root):
        here = Path(directory)
        # Pruning ignored folders keeps .git and .venv (most of the tree) out of the walk.
        folders[:] = [
            f for f in folders if not is_ignored((here / f).relative_to(root).as_posix(), patterns)
        ]
        for name in names:
            if not is_ignored((here / name).relative_to(root).as_posix(), patterns):
                files.append(here / name)
    return sorted(files)


def context_digest(root: Path) -> str:
    """One hash of the build context: every file's path, mode and content (a link's target)."""
    digest = hashlib.sha256()
    for path in context_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        if path.is_symlink():
            digest.update(b"link:" + os.readlink(path).encode())
        else:
            digest.update(oct(path.stat().st_mode & 0o777).encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def stamp_of(**inputs: object) -> str:
    """The stamp written beside an archive: a hash of everything the image is made from."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def is_current(archive: Path, stamp: str) -> bool:
    stamp_file = archive.with_suffix(".stamp")
    return archive.is_file() and stamp_file.is_file() and stamp_file.read_text().strip() == stamp


def write_archive(image: str, archive: Path, stamp: str) -> None:
    """`docker save` the image from buildah's storage, then its stamp; both replaced whole.

    buildah records the image's name in storage as well as the archive's: the image is stored
    under its normalized name (containerd_name) so that both are one and the same.
    """
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    name = containerd_name(image)
    run([tool("buildah"), "push", "--quiet", name, f"docker-archive:{partial}:{name}"])
    partial.replace(archive)
    archive.with_suffix(".stamp").write_text(stamp + "\n")


# --- the base: python:3.11-slim-bookworm's stand-in ---------------------------------------------


def apt_sources(
    sources_list: Path = Path("/etc/apt/sources.list"),
    sources_dir: Path = Path("/etc/apt/sources.list.d"),
) -> list[str]:
    """What apt uses here, as one-line `deb URI SUITE COMPONENT...` entries (binary only)."""
    entries = []
    if sources_list.exists():
        entries += [
            line.strip()
            for line in sources_list.read_text().splitlines()
            if line.startswith("deb ")
        ]
    for path in sorted(sources_dir.glob("*.list")):
        entries += [
            line.strip() for line in path.read_text().splitlines() if line.startswith("deb ")
        ]
    for path in sorted(sources_dir.glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line:
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
                continue
            for uri in fields.get("uris", "").split():
                for suite in fields.get("suites", "").split():
                    entries.append(f"deb {uri} {suite} {fields.get('components', 'main')}")
    if not entries:
        raise ImageBuildError(
            f"no Debian mirror found in {sources_list} or {sources_dir}: the base image is "
            f"made from the mirror apt uses"
        )
    return entries


def image_id(image: str) -> str | None:
    """The id of an image in buildah's storage, or None when it is not there."""
    result = subprocess.run(
        [tool("buildah"), "images", "--quiet", "--no-trunc", image],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = result.stdout.split()
    return lines[0] if result.returncode == 0 and lines else None


def ensure_base(progress: Progress) -> str:
    """The base image's id, made with mmdebstrap the first time (about 2 minutes)."""
    existing = image_id(BASE_IMAGE)
    if existing:
        return existing
    progress(f"Building {BASE_IMAGE} (mmdebstrap {BASE_SUITE}: {', '.join(BASE_PACKAGES)})")
    started = time.monotonic()
    buildah = tool("buildah")
    with tempfile.TemporaryDirectory(prefix="aar-base-") as scratch:
        rootfs = Path(scratch) / "rootfs.tar"
        command = [
            tool("mmdebstrap"),
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            # Device nodes come from the container runtime, never from the image.
            "--skip=output/dev",
            # The mount point the builds bind the host's pip configuration onto.
            '--customize-hook=touch "$1"' + str(PIP_CONFIG),
            *(f"--dpkgopt={option}" for option in BASE_EXCLUDES),
            BASE_SUITE,
            str(rootfs),
            *apt_sources(),
        ]
        run(command, log=images_dir() / "logs" / "base.log")
        container = run([buildah, "from", "scratch"]).strip()
        try:
            run([buildah, "add", container, str(rootfs), "/"])
            run(
                [
                    buildah,
                    "config",
                    "--env",
                    f"PATH={BASE_PATH}",
                    "--env",
                    "LANG=C.UTF-8",
                    "--cmd",
                    "python3",
                    container,
                ]
            )
            run([buildah, "commit", "--quiet", container, BASE_IMAGE])
        finally:
            subprocess.run([buildah, "rm", container], capture_output=True, check=False)
    progress(f"Built {BASE_IMAGE} in {time.monotonic() - started:.0f} s")
    base = image_id(BASE_IMAGE)
    assert base is not None
    return base


# --- torch for the agent image: the CPU wheel on this machine -----------------------------------


def dockerfile_arg(dockerfile: Path, name: str) -> str:
    """The default value of an ARG in the Dockerfile (the torch version is pinned there)."""
    match = re.search(rf"^\s*ARG {re.escape(name)}=(\S+)\s*$", dockerfile.read_text(), re.M)
    if match is None:
        raise ImageBuildError(f"{dockerfile} has no `ARG {name}=...` default")
    return match.group(1)


def find_cpu_torch_wheel(version: str) -> Path:
    """A CPU build of torch `version` for CPython 3.11 lying on this machine."""
    directories = [Path(p) for p in os.environ.get("PIP_FIND_LINKS", "").split() if "://" not in p]
    directories += WHEEL_DIRS
    pattern = f"torch-{version}+cpu-cp311-cp311-*linux*_x86_64.whl"
    for directory in directories:
        found = sorted(directory.glob(pattern)) if directory.is_dir() else []
        if found:
            return found[-1]
    raise ImageBuildError(
        f"no CPU wheel of torch {version} for Python 3.11 ({pattern}) in "
        f"{', '.join(map(str, directories))}: put one there (pip download --no-deps "
        f"--index-url https://download.pytorch.org/whl/cpu torch=={version}) or pass "
        f"--torch-index-url"
    )


def canonical_project(wheel_name: str) -> str:
    """The PEP 503 name of a wheel's project: typing_extensions-4.1-... -> typing-extensions."""
    return re.sub(r"[-_.]+", "-", wheel_name.split("-", 1)[0]).lower()


def local_torch_index(version: str, progress: Progress) -> Path:
    """A PEP 503 index on disk holding the CPU torch wheel and its dependencies.

    The Dockerfile installs torch alone from TORCH_INDEX_URL, so that index must also serve what
    torch requires; those come from PyPI once, through the host's pip.
    """
    wheel = find_cpu_torch_wheel(version)
    index = images_dir() / "torch-index"
    complete = index / ".complete"
    if complete.is_file() and complete.read_text().strip() == wheel.name:
        return index
    progress(f"Preparing a local torch index from {wheel}")
    shutil.rmtree(index, ignore_errors=True)
    downloads = index / ".downloads"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--dest",
            str(downloads),
            "--only-binary=:all:",
            "--python-version",
            "3.11",
            str(wheel),
        ]
    )
    for file in sorted(downloads.glob("*.whl")):
        project = index / canonical_project(file.name)
        project.mkdir(parents=True, exist_ok=True)
        file.replace(project / file.name)
    for project in sorted(p for p in index.iterdir() if p.is_dir() and p != downloads):
        links = "".join(
            f'<a href="{urllib.parse.quote(f.name)}">{f.name}</a>\n'
            for f in sorted(project.glob("*.whl"))
        )
        (project / "index.html").write_text(
            f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n"
        )
    shutil.rmtree(downloads)
    complete.write_text(wheel.name + "\n")
    return index


def index_listing(index: Path) -> list[str]:
    """The wheels an index serves (their names carry their versions): part of the stamp."""
    return sorted(p.name for p in index.glob("*/*.whl"))


# --- building ------------------------------------------------------------------------------------


def mounts() -> list[str]:
    """The host files every RUN sees at build time only: the CA bundle and pip's configuration."""
    if not CA_BUNDLE.is_file():
        raise ImageBuildError(f"{CA_BUNDLE} is missing: install ca-certificates (run `make tools`)")
    volumes = [f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    if PIP_CONFIG.is_file():
        volumes.append(f"{PIP_CONFIG}:{PIP_CONFIG}:ro")
    return volumes


def build_target(
    root: Path,
    target: str,
    image: str,
    build_args: dict[str, str],
    volumes: Iterable[str],
    log: Path,
) -> None:
    """`buildah build` one target of images/Dockerfile into buildah's storage as `image`."""
    command = [
        tool("buildah"),
        "build",
        "--isolation",
        "chroot",
        "--network",
        "host",
        "--layers",
        # The base is local; nothing is ever pulled (Docker Hub cannot be reached).
        "--pull=never",
        "-f",
        str(root / "images" / "Dockerfile"),
        "--target",
        target,
        "-t",
        image,
    ]
    for key, value in sorted(build_args.items()):
        command += ["--build-arg", f"{key}={value}"]
    for volume in volumes:
        command += ["--volume", volume]
    run([*command, str(root)], log=log)


def build_images(
    targets: Sequence[str] = TARGETS,
    *,
    pause: bool = True,
    force: bool = False,
    torch_index_url: str | None = None,
    progress: Progress = lambda message: None,
) -> list[Built]:
    """Build the targets (and the pause image) into archives; skip those whose stamp is current.

    torch_index_url: where the agent image takes torch from; by default a local index of the CPU
    wheel on this machine (the PyTorch index cannot be reached here).
    """
    with build_lock(progress):
        return _build_images(targets, pause, force, torch_index_url, progress)


@contextmanager
def build_lock(progress: Progress) -> Iterator[None]:
    """One build at a time per cache: two at once would write the same archives."""
    images_dir().mkdir(parents=True, exist_ok=True)
    with (images_dir() / "build.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"Waiting for another image build to finish ({lock.name})")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _build_images(
    targets: Sequence[str],
    pause: bool,
    force: bool,
    torch_index_url: str | None,
    progress: Progress,
) -> list[Built]:
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ImageBuildError(f"no target {', '.join(unknown)} in images/Dockerfile: {TARGETS}")
    root = repo_root()
    version = chart_version(root)
    results = [_build_pause(force=force, progress=progress)] if pause else []
    if not targets:
        return results
    base = ensure_base(progress)
    context = context_digest(root)
    for target in [t for t in TARGETS if t in targets]:
        build_args = {"PYTHON_IMAGE": BASE_IMAGE}
        volumes = mounts()
        extra: list[str] = []
        if target == "agent":
            if torch_index_url:
                build_args["TORCH_INDEX_URL"] = torch_index_url
            else:
                torch_version = dockerfile_arg(root / "images" / "Dockerfile", "TORCH_VERSION")
                index = local_torch_index(torch_version, progress)
                build_args["TORCH_INDEX_URL"] = f"file://{TORCH_INDEX_MOUNT}"
                volumes.append(f"{index}:{TORCH_INDEX_MOUNT}:ro")
                extra = index_listing(index)
        image = image_name(target, version)
        archive = archive_path(image)
        stamp = stamp_of(
            name=containerd_name(image),
            target=target,
            base=base,
            context=context,
            args=build_args,
            extra=extra,
        )
        if not force and is_current(archive, stamp):
            progress(f"{image} is up to date ({archive})")
            results.append(Built(image, archive, built=False, seconds=0.0))
            continue
        progress(f"Building {image} (target {target})")
        started = time.monotonic()
        log = images_dir() / "logs" / f"{target}.log"
        build_target(root, target, containerd_name(image), build_args, volumes, log)
        write_archive(image, archive, stamp)
        seconds = time.monotonic() - started
        size = archive.stat().st_size / 1e6
        progress(f"Built {image} in {seconds:.1f} s: {archive} ({size:.0f} MB)")
        results.append(Built(image, archive, built=True, seconds=seconds))
    return results


def _build_pause(*, force: bool, progress: Progress) -> Built:
    """The node's sandbox image: devcluster/pause.c, static, alone in one layer."""
    source = Path(__file__).with_name("pause.c")
    archive = archive_path(PAUSE_IMAGE)
    stamp = stamp_of(image=PAUSE_IMAGE, source=hashlib.sha256(source.read_bytes()).hexdigest())
    if not force and is_current(archive, stamp):
        progress(f"{PAUSE_IMAGE} is up to date ({archive})")
        return Built(PAUSE_IMAGE, archive, built=False, seconds=0.0)
    progress(f"Building {PAUSE_IMAGE} from {source.name}")
    started = time.monotonic()
    buildah = tool("buildah")
    with tempfile.TemporaryDirectory(prefix="aar-pause-") as scratch:
        binary = Path(scratch) / "pause"
        run([tool("gcc"), "-Os", "-static", "-s", "-o", str(binary), str(source)])
        container = run([buildah, "from", "scratch"]).strip()
        try:
            run([buildah, "copy", "--quiet", container, str(binary), "/pause"])
            entrypoint = json.dumps(["/pause"])
            run([buildah, "config", "--entrypoint", entrypoint, "--user", PAUSE_USER, container])
            run([buildah, "commit", "--quiet", container, PAUSE_IMAGE])
        finally:
            subprocess.run([buildah, "rm", container], capture_output=True, check=False)
    write_archive(PAUSE_IMAGE, archive, stamp)
    seconds = time.monotonic() - started
    progress(f"Built {PAUSE_IMAGE} in {seconds:.1f} s: {archive}")
    return Built(PAUSE_IMAGE, archive, built=True, seconds=seconds)


def import_images(archives: Iterable[Path], containerd_socket: Path, ctr: str = "ctr") -> None:
    """Load `docker save` archives into containerd's k8s.io namespace, where the kubelet looks."""
    paths = [str(archive) for archive in archives]
    missing = [path for path in paths if not Path(path).is_file()]
    if missing:
        raise ImageBuildError(
            f"no image archive {', '.join(missing)}: run `aar-devcluster images` first"
        )
    if not paths:
        return
    # `ctr images import` reads one archive per call: the rest of a longer list is ignored.
    for path in paths:
        run([ctr, "--address", str(containerd_socket), "-n", "k8s.io", "images", "import", path])
