"""Another local user plants the local metro's control dir in /dev/shm before the daemon
starts, to get the sandboxes' plugin and relay sockets bound in a directory it owns (where it
could replace them with its own listeners, or read who connects).

The name is predictable (the uid and a hash of the state dir's path), and /dev/shm is
writable by everyone. The attacker is `nobody` (`tests.support.users`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.local.sandbox.layout import MEMORY_DIR, SandboxLayout
from tests.support.users import need_other_user, run_as_other_user

UUID = "planted-uuid"


@pytest.fixture
def state() -> Iterator[Path]:
    """A state dir short enough for its own `run/` (pytest's tmp paths are too deep)."""
    need_other_user()
    if not MEMORY_DIR.is_dir():
        pytest.skip(f"no {MEMORY_DIR} here")
    path = Path(tempfile.mkdtemp(prefix="ukc-pl-"))
    yield path / "state"
    shutil.rmtree(path)


def _the_name(state: Path) -> Path:
    """Where the daemon of `state` would put its control dir (made and removed again)."""
    layout = SandboxLayout(state)
    base = layout.control_dir(UUID).parent
    layout.remove_control_dirs()
    assert not base.exists()
    return base


@pytest.mark.parametrize("kind", ["directory", "symlink"])
def test_a_control_dir_another_user_planted_in_dev_shm_is_never_used(
    state: Path, kind: str
) -> None:
    planted = _the_name(state)
    theirs = Path(tempfile.mkdtemp(prefix="ukc-theirs-"))
    theirs.chmod(0o777)
    try:
        make = (
            ["mkdir", "-m", "0777", str(planted)]
            if kind == "directory"
            else ["ln", "-s", str(theirs), str(planted)]
        )
        done = run_as_other_user(make)
        assert done.returncode == 0, done.stderr
        layout = SandboxLayout(state)
        control = layout.control_dir(UUID)
        assert control == state / "run" / UUID
        assert (os.lstat(control.parent).st_mode & 0o777) == 0o700
        assert os.listdir(theirs) == []
        if kind == "directory":
            assert os.listdir(planted) == []
    finally:
        if planted.is_symlink():
            planted.unlink()
        elif planted.exists():
            shutil.rmtree(planted)
        shutil.rmtree(theirs)
