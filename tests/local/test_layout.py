"""What each part of the emulator may import, checked on the source."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LOCAL = Path(__file__).resolve().parents[2] / "reconciler" / "local"
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


def imports_of(path: Path) -> tuple[set[str], int]:
    """Absolute module names imported by `path`, and how many imports are relative."""
    names: set[str] = set()
    relative = 0
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                relative += 1
            elif node.module:
                names.add(node.module)
    return names, relative


def modules(under: Path = LOCAL) -> dict[str, set[str]]:
    return {str(p.relative_to(LOCAL)): imports_of(p)[0] for p in under.rglob("*.py")}


def top(name: str) -> str:
    return name.split(".")[0]


ALLOWED = ("reconciler.errors", "reconciler._util.", "reconciler.local.")


def test_the_emulator_uses_only_the_error_tree_and_the_shared_utilities_of_the_controller() -> None:
    for mod, names in modules().items():
        outside = {n for n in names if top(n) == "reconciler" and not n.startswith(ALLOWED)}
        assert not outside, (mod, outside)


def test_the_agent_is_standard_library_only_and_imports_itself_relatively() -> None:
    agent = LOCAL / "sandbox" / "agent"
    for path in agent.glob("*.py"):
        names, _ = imports_of(path)
        assert {top(n) for n in names} <= STDLIB, (path.name, names - STDLIB)


def test_the_launcher_is_a_standalone_standard_library_program() -> None:
    names, relative = imports_of(LOCAL / "sandbox" / "launch.py")
    assert {top(n) for n in names} <= STDLIB
    assert relative == 0


def test_the_daemon_handle_every_ukc_run_loads_stays_light() -> None:
    names, _ = imports_of(LOCAL / "daemon.py")
    heavy = {n for n in names if top(n) not in STDLIB and top(n) != "reconciler"}
    assert not heavy
    assert {n for n in names if top(n) == "reconciler"} <= {
        "reconciler.errors",
        "reconciler._util.pids",
        "reconciler._util.retry",
    }


def test_only_the_api_and_the_daemon_process_import_aiohttp() -> None:
    for mod, names in modules().items():
        if mod.startswith("api/") or mod == "serve.py":
            continue
        assert "aiohttp" not in {top(n) for n in names}, mod
