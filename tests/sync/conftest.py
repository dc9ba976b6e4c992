"""The sync engine tests' fixture: one `Site` per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.transport.local_shell import LocalShell
from tests.support.synctree import Site


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    local = tmp_path / "local"
    remote = tmp_path / "sandbox" / "workspace"
    local.mkdir()
    remote.mkdir(parents=True)
    boot = tmp_path / "sandbox" / "boot_id"
    boot.write_text("boot-1\n")
    shell = LocalShell()
    yield Site(
        base=tmp_path,
        local=local,
        remote=remote,
        state=tmp_path / "state",
        remote_state=tmp_path / "sandbox" / "run" / "ukc-sync",
        boot=boot,
        shell=shell,
    )
    shell.close()
