"""The sync engine tests' fixture: one `Site` per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.transport.local_shell import LocalShell
from tests.support.synctree import NO_PYTHON, Site


@pytest.fixture
def site(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Site]:
    """A test world; parametrized "shell" (`synctree.BOTH_PATHS`), its sandbox has no
    python3, so sync takes the shell+tar path."""
    local = tmp_path / "local"
    remote = tmp_path / "sandbox" / "workspace"
    local.mkdir()
    remote.mkdir(parents=True)
    boot = tmp_path / "sandbox" / "boot_id"
    boot.write_text("boot-1\n")
    shell = LocalShell()
    extra = {"remote_python": NO_PYTHON} if getattr(request, "param", "python") == "shell" else {}
    yield Site(
        base=tmp_path,
        local=local,
        remote=remote,
        state=tmp_path / "state",
        remote_state=tmp_path / "sandbox" / "run" / "ukc-sync",
        boot=boot,
        shell=shell,
        **extra,  # type: ignore[arg-type]
    )
    shell.close()
