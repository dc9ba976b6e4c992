"""Where the host-only control sockets of the sandboxes live."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.local.sandbox.layout import MEMORY_DIR, SandboxLayout

UUID = "ctl-uuid"


@pytest.fixture
def short() -> Iterator[Path]:
    """A state dir short enough for its own `run/` (pytest's tmp paths are too deep)."""
    path = Path(tempfile.mkdtemp(prefix="ukc-ctl-"))
    yield path
    shutil.rmtree(path)


def test_the_control_sockets_live_in_memory_not_in_the_state_dir(tmp_path: Path) -> None:
    if not MEMORY_DIR.is_dir():
        pytest.skip(f"no {MEMORY_DIR} here")
    layout = SandboxLayout(tmp_path / "state")
    try:
        control = layout.control_dir(UUID)
        assert control.parent.parent == MEMORY_DIR
        assert layout.relay_socket(UUID).parent == control
        assert not (tmp_path / "state" / "run").exists()
        st = os.lstat(control.parent)
        assert (st.st_mode & 0o777, st.st_uid) == (0o700, os.getuid())
        control.mkdir(mode=0o700)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(layout.plugin_socket(UUID)))
        os.unlink(layout.plugin_socket(UUID))
        control.rmdir()
    finally:
        layout.remove_control_dirs()
    assert not control.parent.exists()


def test_two_state_dirs_get_two_control_dirs(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    one, two = SandboxLayout(tmp_path / "one", shm), SandboxLayout(tmp_path / "two", shm)
    assert one.control_dir(UUID) != two.control_dir(UUID)


def test_a_name_planted_in_the_memory_dir_leaves_the_control_dir_in_the_state_dir(
    tmp_path: Path, short: Path
) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    layout = SandboxLayout(short / "state", shm)
    planted = shm / SandboxLayout(short / "state", shm).control_dir(UUID).parent.name
    planted.rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    planted.symlink_to(elsewhere)
    assert layout.control_dir(UUID) == short / "state" / "run" / UUID
    assert os.listdir(elsewhere) == []


def test_without_a_memory_dir_the_control_dir_is_in_the_state_dir(
    tmp_path: Path, short: Path
) -> None:
    layout = SandboxLayout(short / "state", tmp_path / "no-such-dir")
    assert layout.control_dir(UUID) == short / "state" / "run" / UUID
