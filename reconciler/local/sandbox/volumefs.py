"""A volume's files on a filesystem of the volume's own size, as on UKC (an ext4 of `size_mb`).

A root daemon keeps each volume in a sparse ext4 image (`SandboxLayout.volume_image`) that it
loop-mounts at the volume's directory before a sandbox binds it: writes past `size_mb` fail
with ENOSPC inside the sandbox, and the files stay in the image across cold boots, daemon
restarts and reattachments. The image is made on the volume's first use and removed with it;
the daemon's shutdown unmounts every volume (a killed daemon's mounts are found and reused).

A non-root daemon cannot: mounting a block filesystem (loop devices) needs host root, a
quota needs root to set, and the alternatives bounded by the kernel (a tmpfs of `size_mb`
copied back at stop) would lose the files whenever the daemon dies, which is what a volume
exists to prevent. Its volumes stay plain directories, bounded only by the host's disk
(docs/local-metro.md). So does a volume whose directory already held files before images
existed (it is never reformatted under them), and one on a host without `mkfs.ext4`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path

from reconciler.errors import LocalMetroError
from reconciler.local.sandbox.files import unmount

__all__ = ["MKFS", "bounded", "mount_volume", "remove_image", "unmount_volume"]

log = logging.getLogger(__name__)

MKFS = "/usr/sbin/mkfs.ext4"
MOUNT = "/usr/bin/mount"
_MIB = 1 << 20
_TIMEOUT_S = 120.0


def bounded() -> bool:
    """Whether this daemon can give volumes a filesystem of their size."""
    return os.geteuid() == 0 and os.access(MKFS, os.X_OK) and os.access(MOUNT, os.X_OK)


def _run(argv: list[str], what: str) -> None:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LocalMetroError(f"{what}: {exc}") from None
    if done.returncode != 0:
        line = (done.stderr or done.stdout).strip().splitlines()
        raise LocalMetroError(f"{what}: {line[-1] if line else f'exit {done.returncode}'}")


def _make_image(image: Path, size_mb: int) -> None:
    image.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = image.with_name(image.name + ".new")
    with open(partial, "wb") as f:
        f.truncate(size_mb * _MIB)  # sparse: the host's disk holds only what is written
    # why -m 0: the sandbox's root is no root of the host's filesystem, so blocks reserved
    # for root would only shrink the volume; why lazy: a fresh sparse file reads as zeros
    # already, so zeroing the journal and inode tables (516 MiB of host disk for a 64 GiB
    # volume) buys nothing; no root_owner: the runtime hands the volume over
    _run(
        [MKFS, "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1", str(partial)],
        f"mkfs.ext4 for volume image {image.name}",
    )
    os.replace(partial, image)


def mount_volume(source: Path, image: Path, size_mb: int) -> bool:
    """Mount the volume's image (made on first use) at `source`; False where this daemon
    cannot bound it (the volume is then the plain directory `source`)."""
    if os.path.ismount(source):
        return True  # a killed daemon left it mounted: the same files
    if not bounded():
        return False
    source.mkdir(mode=0o755, parents=True, exist_ok=True)
    fresh = not image.exists()
    if fresh:
        if any(source.iterdir()):
            log.warning("volume %s holds files from before size bounds: not bounded", source.name)
            return False
        _make_image(image, size_mb)
    _run(
        # why noinit_itable: no background zeroing of inode tables that read as zeros
        [MOUNT, "-t", "ext4", "-o", "loop,nosuid,nodev,noinit_itable", str(image), str(source)],
        f"mount volume image {image.name}",
    )
    if fresh:
        # why: a fresh volume is empty, as UKC's is to the sandbox (mkfs makes lost+found)
        with contextlib.suppress(OSError):
            (source / "lost+found").rmdir()
    return True


def unmount_volume(source: Path) -> None:
    """Unmount the volume's filesystem at `source`, if mounted (its files stay in the image)."""
    if os.path.ismount(source):
        unmount(source)


def remove_image(image: Path) -> None:
    for path in (image, image.with_name(image.name + ".new")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
