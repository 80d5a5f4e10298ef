"""Which package may import which: `common` imports no component, and each service imports only
`common` and itself, so a service's image and its tests never drag another component in."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from aar_common.cli import main as aar

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = {"operator", "agent", "trainer", "forum", "scorer", "gateway", "devcluster"}


def aar_imports(folder: str) -> dict[str, set[str]]:
    """Each module of a component folder and the `aar_*` packages it imports."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        packages = {name.split(".")[0] for name in names if name.startswith("aar_")}
        found[str(path.relative_to(ROOT))] = packages
    return found


def test_common_imports_no_component() -> None:
    offenders = {
        module: packages - {"aar_common"}
        for module, packages in aar_imports("common").items()
        if packages - {"aar_common"}
    }
    assert not offenders, f"common/ must not import a component: {offenders}"


@pytest.mark.parametrize("service", ["forum", "gateway", "scorer"])
def test_service_imports_only_common_and_itself(service: str) -> None:
    allowed = {"aar_common", f"aar_{service}"}
    offenders = {
        module: packages - allowed
        for module, packages in aar_imports(service).items()
        if packages - allowed
    }
    assert not offenders, f"{service}/ may import only aar_common and itself: {offenders}"


def test_component_subcommands_come_from_entry_points(capsys: pytest.CaptureFixture[str]) -> None:
    # `aar review` is the scorer's, found through the `aar.commands` group, not an import.
    with pytest.raises(SystemExit) as exited:
        aar(["--help"])
    assert exited.value.code == 0
    usage = capsys.readouterr().out
    missing = [name for name in ("keys", "credential", "review") if name not in usage]
    assert not missing, usage


def test_the_checker_sees_imports() -> None:
    # The scan itself must see a real cross-package import, or the tests above pass vacuously.
    assert (
        "aar_common"
        in aar_imports("gateway")["gateway/meter.py"] | aar_imports("gateway")["gateway/app.py"]
    )
