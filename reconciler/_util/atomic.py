"""Small files written whole or not at all, and the temp files of killed writers swept away.

A writer writes `.NAME.PID.tmp` beside the target, then renames it into place; a writer killed
in between leaves its temp file behind, which the next writer removes once that pid is gone.
(The status file has its own sweep: only the lock holder writes it, so it removes every temp
file it finds.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

from reconciler._util.pids import pid_alive

__all__ = [
    "create_atomic",
    "fsync_dir",
    "install_staged",
    "sweep_dead_temps",
    "temp_files",
    "temp_path",
    "write_atomic",
    "writer_alive",
]


def temp_path(path: Path) -> Path:
    """This process's temp name for `path`: `.NAME.PID.tmp` beside it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def temp_files(path: Path) -> list[Path]:
    """The temp files of `path`'s writers, live or dead (`.NAME.*.tmp`)."""
    head = f".{path.name}."
    # why not Path.glob: its pattern machinery cost ~10x the directory read (the status
    # file's directory is read on every lock and save: several times per watch pass)
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        return [
            path.parent / name
            for name in os.listdir(path.parent)
            if name.startswith(head) and name.endswith(".tmp") and len(name) >= len(head) + 4
        ]
    return []


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (a rename into it) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def writer_alive(pid: str) -> bool:
    """Whether the writer a temp name's pid part names may still be writing (this process, or
    another live one); False for a name that carries no pid."""
    return pid.isdigit() and (int(pid) == os.getpid() or pid_alive(int(pid)))


def sweep_dead_temps(path: Path) -> None:
    """Remove `path`'s temp files whose writer process no longer exists."""
    for stale in temp_files(path):
        pid = stale.name[len(path.name) + 2 : -len(".tmp")]
        if pid.isdigit() and not writer_alive(pid):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()


def _write_temp(tmp: Path, data: bytes | Iterable[bytes], mode: int, *, durable: bool) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        if isinstance(data, bytes):
            fh.write(data)
        else:
            for part in data:
                fh.write(part)
        fh.flush()
        if durable:
            os.fsync(fh.fileno())


def _keep_generation(path: Path, backup: Path) -> None:
    """Make `backup` a second name of `path`'s current file. Why a link and not a rename:
    renaming `path` away would leave readers a moment with no file at all."""
    staged = temp_path(backup)
    with contextlib.suppress(FileNotFoundError):
        staged.unlink()
    try:
        os.link(path, staged)
    except FileNotFoundError:
        return
    os.replace(staged, backup)


def write_atomic(
    path: Path,
    data: bytes | Iterable[bytes],
    *,
    mode: int = 0o600,
    durable: bool = True,
    backup: Path | None = None,
) -> None:
    """Write `data` (bytes, or parts written one after the other: a big file need not be
    whole in memory at once) to `path` through a temp file and a rename (fsync'd unless not
    durable).

    With `backup`, the file being replaced is kept there (once the new data is on disk): a
    reader finds the previous generation if this one is ever damaged, and never finds `path`
    missing.
    """
    tmp = write_staged(path, data, mode=mode, durable=durable)
    if backup is not None:
        try:
            _keep_generation(path, backup)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
    install_staged(tmp, path)
    if backup is not None:
        sweep_dead_temps(backup)


def write_staged(
    path: Path, data: bytes | Iterable[bytes], *, mode: int = 0o600, durable: bool = False
) -> Path:
    """`write_atomic`'s first half: `data` in this process's temp file for `path`, which the
    caller later installs (`install_staged`) or removes. Why: the bytes of a record that may
    only replace `path` once something is confirmed are written while waiting."""
    tmp = temp_path(path)
    try:
        _write_temp(tmp, data, mode, durable=durable)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return tmp


def install_staged(tmp: Path, path: Path) -> None:
    """`write_atomic`'s second half: the temp file `write_staged` made becomes `path`."""
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    sweep_dead_temps(path)


def create_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> bool:
    """Like `write_atomic`, but only if `path` does not exist yet: the first writer wins and
    a later one changes nothing. True when this call created it."""
    tmp = temp_path(path)
    try:
        _write_temp(tmp, data, mode, durable=True)
        try:
            os.link(tmp, path)  # why link, not rename: it fails instead of replacing
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    sweep_dead_temps(path)
    return True
