"""The package's layers and seams, checked on the source.

The controller is layered `cli → reconcile → (status, sync, transport, cloud) → spec → _util →
errors`: a module imports its own stage and the layers below it. Across the middle layer, the
sync engine uses the transport's byte streams (`transport.base`), and a transport builds on the
cloud's instance fields and trust (`cloud.model`, `cloud.trust`). The emulator (`local`) is
started by `cloud.metros` and imported by nothing else of the controller. No import cycles.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "reconciler"

#: the controller's stages by layer (a module may import its own stage and lower layers)
LAYER = {
    "cli": 5,
    "reconcile": 4,
    "status": 3,
    "sync": 3,
    "transport": 3,
    "cloud": 3,
    "spec": 2,
    "_util": 1,
    "errors": 0,
}
#: the imports across the middle layer the design allows: (importing stage, imported module)
ACROSS = {
    ("sync", "reconciler.transport.base"),
    ("transport", "reconciler.cloud.model"),
    ("transport", "reconciler.cloud.trust"),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def imported(path: Path, *, top_level_only: bool = False) -> set[str]:
    """The absolute names `path` imports (`from a import b` gives `a` and `a.b`)."""
    tree = ast.parse(path.read_text())
    nodes: Iterator[ast.AST] = iter(tree.body) if top_level_only else ast.walk(tree)
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def ours(names: set[str]) -> set[str]:
    """The modules of this package among `names` (an imported attribute maps to its module;
    packages, which hold no code, are left out)."""
    found = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and MODULES[name].name != "__init__.py":
            found.add(name)
    return found


def stage(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def starts(names: set[str], prefix: str) -> bool:
    return any(n == prefix or n.startswith(prefix + ".") for n in names)


def test_every_stage_of_the_controller_has_a_layer() -> None:
    stages = {stage(m) for m in MODULES} - {"", "__main__", "local"}
    assert stages == set(LAYER)


def test_a_stage_imports_only_itself_and_the_layers_below_it() -> None:
    wrong = []
    for module, path in MODULES.items():
        here = stage(module)
        if here not in LAYER:
            continue
        for target in ours(imported(path)):
            there = stage(target)
            if there == here or there == "local":
                continue  # the emulator: tests/local/test_layout.py
            if LAYER[there] < LAYER[here] or (here, target) in ACROSS:
                continue
            wrong.append(f"{module} -> {target}")
    assert not wrong


def test_the_emulator_is_started_from_the_metro_registry_and_imported_nowhere_else() -> None:
    for module, path in MODULES.items():
        if stage(module) == "local" or module == "reconciler.cloud.metros":
            continue
        assert not starts(imported(path), "reconciler.local"), module


def test_nothing_imports_the_command_line_but_itself_and_the_entry_point() -> None:
    for module, path in MODULES.items():
        if stage(module) in ("cli", "__main__"):
            continue
        assert not starts(imported(path), "reconciler.cli"), module


def test_outside_transport_only_the_seam_is_imported_never_a_transport_by_name() -> None:
    seam = {
        "reconciler.transport.base",
        "reconciler.transport.select",
        "reconciler.transport.pool",
        "reconciler.transport.links",
    }
    for module, path in MODULES.items():
        if stage(module) == "transport":
            continue
        used = {t for t in ours(imported(path)) if stage(t) == "transport"}
        assert used <= seam, (module, used - seam)


def test_there_are_no_import_cycles() -> None:
    # why top-level imports: an import inside a function runs after every module has loaded
    graph = {m: ours(imported(p, top_level_only=True)) - {m} for m, p in MODULES.items()}
    order: list[str] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2
        order.append(node)

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert len(order) == len(graph)


def test_only_cloud_transport_and_the_emulator_import_httpx_or_paramiko() -> None:
    for module, path in MODULES.items():
        if stage(module) in ("cloud", "transport", "local"):
            continue
        names = imported(path)
        assert not starts(names, "httpx") and not starts(names, "paramiko"), module


def test_only_the_watch_module_imports_watchdog() -> None:
    for module, path in MODULES.items():
        if module != "reconciler.reconcile.watch":
            assert not starts(imported(path), "watchdog"), module


def test_the_planner_does_no_io() -> None:
    forbidden = ("os", "time", "random", "socket", "subprocess", "pathlib", "httpx", "paramiko")
    names = imported(PKG / "reconcile" / "plan.py")
    assert not any(starts(names, f) for f in forbidden), names


def test_no_test_imports_from_a_conftest_or_another_test_module() -> None:
    tests = PKG.parent / "tests"
    for path in [*tests.rglob("*.py"), *(PKG.parent / "bench").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                name = "." * node.level + (node.module or "")
            elif isinstance(node, ast.Import):
                name = ",".join(a.name for a in node.names)
            else:
                continue
            last = name.rpartition(".")[2]
            relative = getattr(node, "level", 0)
            assert not (relative and path.parent != tests / "support"), (path, name)
            assert last != "conftest" and not last.startswith("test_"), (path, name)
