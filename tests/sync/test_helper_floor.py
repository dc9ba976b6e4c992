"""The helper runs alone under the sandbox's python3: stdlib only, ASCII, Python >= 3.7.

Each interpreter found here (pyenv's, the system's) runs a real push, a delta push and a pull
through `LocalShell`, so the floor is checked by running the helper, not by reading it.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.errors import RemoteError
from reconciler.sync import helper
from reconciler.sync.engine import pull, push
from reconciler.sync.remote import _BOOT, _PROGRAM
from tests.support.synctree import Site, write

#: the oldest python3 a sandbox image may have
FLOOR = (3, 7)
PYENV = Path(os.environ.get("PYENV_ROOT", "/root/.pyenv")) / "versions"


def _version(python: Path) -> tuple[int, int] | None:
    m = re.fullmatch(r"(\d+)\.(\d+)\.\d+", python.parent.parent.name)
    return (int(m[1]), int(m[2])) if m else None


def _pythons() -> dict[tuple[int, int], str]:
    """The newest installed interpreter of each minor version (pyenv's), by version."""
    found: dict[tuple[int, int], str] = {}
    for python in sorted(PYENV.glob("*/bin/python3")):
        version = _version(python)
        if version is not None:
            found[version] = str(python)
    return found


PYTHONS = _pythons()
SUPPORTED = sorted(v for v in PYTHONS if v >= FLOOR)


def test_the_helper_imports_only_the_standard_library_and_nothing_of_ours() -> None:
    tree = ast.parse(_PROGRAM.decode("ascii"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "a relative import cannot work in the sandbox"
            names.add((node.module or "").split(".")[0])
    assert names, "no imports found: the test reads the wrong text"
    assert names - {"__future__"} <= sys.stdlib_module_names
    assert "reconciler" not in names


def test_the_helper_has_no_assert_for_the_bootstrap_to_strip() -> None:
    # the bootstrap compiles it with optimize=2, which drops asserts (and docstrings)
    tree = ast.parse(_PROGRAM.decode("ascii"))
    assert not [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert)]
    assert "optimize=2" in _BOOT


def test_the_program_sent_is_the_modules_file_in_ascii() -> None:
    assert Path(helper.__file__).read_bytes() == _PROGRAM
    _PROGRAM.decode("ascii")


def test_the_oldest_supported_python_is_installed_here() -> None:
    # why: without it the floor below would be checked on newer interpreters only
    if not PYTHONS:
        pytest.skip(f"no pyenv interpreters under {PYENV}")
    assert SUPPORTED and SUPPORTED[0] == FLOOR, f"interpreters found: {sorted(PYTHONS)}"


def _id(version: tuple[int, int]) -> str:
    return ".".join(map(str, version))


@pytest.mark.parametrize("version", SUPPORTED, ids=_id)
def test_a_push_a_delta_push_and_a_pull_work_under_each_supported_python(
    site: Site, version: tuple[int, int]
) -> None:
    python = PYTHONS[version]
    opts = site.opts(remote_python=python, back=("out/",))
    big = os.urandom(3 << 20)
    write(site.local / "src/a.txt", "a")
    write(site.local / "big.bin", big)
    os.symlink("src/a.txt", site.local / "link")
    first = push(site.shell, opts, instance_uuid="u1")
    assert first.files_sent == 2
    assert (site.remote / "big.bin").read_bytes() == big
    assert os.readlink(site.remote / "link") == "src/a.txt"
    # the remote record is lost: the next push scans, and sends the big file as changed blocks
    site.reboot("boot-2")
    changed = big[:100] + bytes([big[100] ^ 0xFF]) + big[101:]  # a byte that surely differs
    write(site.local / "big.bin", changed)
    second = push(site.shell, opts, instance_uuid="u1")
    assert second.remote_scanned
    assert 0 < second.bytes_sent < len(big) // 4
    assert (site.remote / "big.bin").read_bytes() == changed
    write(site.remote / "out/r.txt", "made in the sandbox")
    back = pull(site.shell, opts)
    assert back.files_written == 1
    assert (site.local / "out/r.txt").read_text() == "made in the sandbox"


@pytest.mark.parametrize("version", [v for v in PYTHONS if v < FLOOR], ids=_id)
def test_a_python_older_than_the_floor_is_named_in_the_error(
    site: Site, version: tuple[int, int]
) -> None:
    write(site.local / "a.txt", "a")
    old = re.escape(_id(version))
    with pytest.raises(RemoteError, match=rf"needs python3 >= 3\.7, not {old}\b"):
        push(site.shell, site.opts(remote_python=PYTHONS[version]), instance_uuid="u1")
    assert not (site.remote / "a.txt").exists()


def test_the_bootstrap_itself_parses_under_the_oldest_python_here() -> None:
    oldest = PYTHONS[min(PYTHONS)] if PYTHONS else sys.executable
    out = subprocess.run(
        [oldest, "-c", "import sys; compile(sys.stdin.read(), 'boot', 'exec')"],
        input=_BOOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
