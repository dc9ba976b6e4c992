"""Import layering, checked on the source: the I/O seams stay narrow."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "reconciler"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def modules(pred: object = None) -> dict[str, set[str]]:
    return {str(p.relative_to(PKG)): imports_of(p) for p in PKG.rglob("*.py")}


def starts(names: set[str], prefix: str) -> bool:
    return any(n == prefix or n.startswith(prefix + ".") for n in names)


def test_only_cloud_transport_and_the_local_metro_import_httpx_or_paramiko() -> None:
    for mod, names in modules().items():
        if mod.startswith(("cloud/", "transport/", "local/")):
            continue
        assert not starts(names, "httpx") and not starts(names, "paramiko"), mod


def test_only_the_watch_module_imports_watchdog() -> None:
    for mod, names in modules().items():
        if mod != "reconcile/watch.py":
            assert not starts(names, "watchdog"), mod


def test_the_controller_imports_nothing_of_the_emulator_but_its_daemon_handle() -> None:
    for mod, names in modules().items():
        if mod.startswith("local/"):
            continue
        local = {n for n in names if n.startswith("reconciler.local")}
        assert local <= {"reconciler.local", "reconciler.local.daemon"}, (mod, local)


def test_the_emulator_does_not_depend_on_the_controller() -> None:
    allowed = {"reconciler.errors", "reconciler.local"}
    allowed |= {
        n for names in modules().values() for n in names if n.startswith("reconciler._util")
    }
    for mod, names in modules().items():
        if not mod.startswith("local/"):
            continue
        ours = {
            n for n in names if n.startswith("reconciler") and not n.startswith("reconciler.local")
        }
        assert ours <= allowed, (mod, ours)


def test_the_planner_does_no_io() -> None:
    forbidden = ("os", "time", "random", "socket", "subprocess", "pathlib", "httpx", "paramiko")
    names = imports_of(PKG / "reconcile" / "plan.py")
    assert not any(starts(names, f) for f in forbidden), names
