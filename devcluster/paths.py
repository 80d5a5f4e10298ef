"""Where the local control plane keeps its binaries and its state."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$AAR_CACHE`, or `~/.cache/aar`: built binaries and the development cluster live here."""
    return Path(os.environ.get("AAR_CACHE") or Path.home() / ".cache" / "aar")


def bin_dir() -> Path:
    return cache_dir() / "bin"


def cluster_dir() -> Path:
    """State of the long-lived development cluster that `aar-devcluster up` starts."""
    return cache_dir() / "cluster"


def install_script() -> Path:
    return Path(__file__).with_name("install.sh")


class BinariesMissingError(RuntimeError):
    """A control-plane binary has not been installed yet."""


def binary(name: str, directory: Path | None = None) -> Path:
    """The path of one of the project's own binaries; never one found on PATH."""
    path = (directory or bin_dir()) / name
    if not os.access(path, os.X_OK):
        raise BinariesMissingError(
            f"{name} is not installed in {path.parent}: run `make tools` "
            f"(or `aar-devcluster install`) to install the control plane's binaries"
        )
    return path
