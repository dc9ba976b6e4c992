"""A sync test world: a local tree and a "sandbox" tree on this machine (a `LocalShell`), and
snapshots of trees to compare."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.sync.options import SyncOptions
from reconciler.transport.local_shell import LocalShell

#: the system interpreter starts much faster than a pyenv shim; any python3 >= 3.7 works
REMOTE_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
#: an interpreter no sandbox has: a sandbox "without python3"
NO_PYTHON = "ukc-no-such-python3"
#: run a sync test over both paths: the python helper and shell+tar (a sandbox without python3)
BOTH_PATHS = pytest.mark.parametrize("site", ["python", "shell"], indirect=True)


@dataclass
class Site:
    """One test world: a local root, a "sandbox" root and state dirs, all under `base`."""

    base: Path
    local: Path
    remote: Path
    state: Path
    remote_state: Path
    boot: Path
    shell: LocalShell
    #: the sandbox's interpreter: one that does not exist gives a sandbox without python3
    remote_python: str = REMOTE_PYTHON

    def opts(self, **kw: object) -> SyncOptions:
        args: dict[str, object] = {
            "local_root": self.local,
            "state_dir": self.state,
            "remote_root": str(self.remote),
            "remote_state_dir": str(self.remote_state),
            "boot_id_paths": (str(self.boot),),
            "remote_python": self.remote_python,
        }
        args.update(kw)
        return SyncOptions(**args)  # type: ignore[arg-type]

    def reboot(self, boot_id: str) -> None:
        """A new boot: fresh boot id, and /run (the remote record) is gone as on a real one."""
        self.boot.write_text(boot_id + "\n")
        shutil.rmtree(self.remote_state, ignore_errors=True)


def snapshot(root: Path, *, skip: tuple[Path, ...] = ()) -> dict[str, tuple[object, ...]]:
    """Everything under `root` (not following links): path -> (kind, mode, content hash/target)."""
    out: dict[str, tuple[object, ...]] = {}
    skip_s = {str(p) for p in skip}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skip_s]
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if p in skip_s:
                continue
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", mode)
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    out[rel] = ("f", mode, hashlib.sha256(f.read()).hexdigest(), st.st_mtime_ns)
            else:
                out[rel] = ("o", stat.S_IFMT(st.st_mode))
    return out


def write(path: Path, data: bytes | str, mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        path.chmod(mode)
    return path


def edit_at_random(
    root: Path,
    rng: random.Random,
    step: int,
    on_new_dir: Callable[[Path], None] | None = None,
) -> None:
    """One to four random edits of the tree under `root`: change, delete, move or remove a
    directory, or create files in a new deep one (then `on_new_dir(that directory)`)."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    dirs = sorted(p for p in root.rglob("*") if p.is_dir())
    for _ in range(rng.randint(1, 4)):
        what = rng.random()
        if what < 0.3 and files:
            write(rng.choice(files), f"edit {step} {rng.random()}")
        elif what < 0.45 and files:
            rng.choice(files).unlink(missing_ok=True)
        elif what < 0.6 and dirs:
            d = rng.choice(dirs)
            if d.exists():
                d.rename(root / f"moved{step}{rng.randint(0, 999)}")
        elif what < 0.7 and dirs:
            shutil.rmtree(rng.choice(dirs), ignore_errors=True)
        else:
            d = root / f"new{step}" / "deep"
            write(d / f"n{rng.randint(0, 9)}", "n")
            if on_new_dir is not None:
                on_new_dir(d)
