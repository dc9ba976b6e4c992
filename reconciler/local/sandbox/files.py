"""The host files a sandbox is given, and removing what it wrote.

Each sandbox gets a persistent ssh host key, its own `/etc/shadow` and the daemon's
`/etc/passwd` and `group` (one copy for every sandbox of a daemon: they are the same for all
of them; all three bound read-only in place of the host's), and a workspace it owns. A root
daemon's sandbox owns its workspace through its host id range, so a workspace written under
another range (or by an older daemon as host root) is handed over first. What a sandbox wrote
is removed without following any symlink it planted.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from reconciler._util.atomic import create_atomic, write_atomic
from reconciler.local.sandbox.hostids import IdRange

__all__ = [
    "HOST_KEY",
    "drop_memory_workspace",
    "prepare_accounts",
    "prepare_instance_dir",
    "prepare_workspace",
    "remove_tree",
    "reset_memory_workspace",
    "unmount",
]

HOST_KEY = "ssh_host_ed25519_key"
_DEFAULT_SSHD_LINE = "sshd:x:65534:65534::/run/sshd:/usr/sbin/nologin"


def _host_sshd_line() -> str:
    """The host's `sshd` account line (the privilege separation user sshd looks up)."""
    with contextlib.suppress(OSError), open("/etc/passwd") as f:
        for line in f:
            if line.startswith("sshd:"):
                return line.strip()
    return _DEFAULT_SSHD_LINE


def prepare_accounts(directory: Path, *, own_ids: bool) -> None:
    """Write the `passwd` and `group` every sandbox of the daemon shares into `directory`.

    Why one copy: they are the same for every sandbox of a daemon, and a file created per
    sandbox boot is kernel work (an inode allocated, a rename, a directory listing) in the
    daemon's threads. A sandbox cannot change them: they are bound read-only, and a root
    daemon's (owned by host root) are not even its own files. Rewritten (atomically) once per
    daemon: a running sandbox keeps the copy it was given.
    """
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    if own_ids:
        # why: root of a sandbox is plain root in its own namespace
        uid = gid = 0
    else:
        # why: an unprivileged sshd only authenticates its own uid, so `root` must be that
        # uid; the login shell is sh, home /root
        uid, gid = os.getuid(), os.getgid()
    passwd = (
        f"root:x:{uid}:{gid}:root:/root:/bin/sh\n{_host_sshd_line()}\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    )
    group = f"root:x:{gid}:\nnogroup:x:65534:\n"
    for fname, text in (("passwd", passwd), ("group", group)):
        write_atomic(directory / fname, text.encode(), mode=0o644, durable=False)


def prepare_instance_dir(inst: Path, ids: IdRange | None) -> None:
    """Create `inst` with the sandbox's host key (kept across boots) and shadow file."""
    inst.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = inst / HOST_KEY
    if not key.exists():
        pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        create_atomic(key, pem, mode=0o600)
    shadow = b"root:*:19000:0:99999:7:::\nsshd:*:19000:0:99999:7:::\n"
    write_atomic(inst / "shadow", shadow, mode=0o600, durable=False)
    if ids is not None:
        # why: sshd (root inside) must read these; host root's files are not its own
        for fname in (HOST_KEY, "shadow"):
            os.chown(inst / fname, ids.base, ids.base)


def prepare_workspace(ws: Path, ids: IdRange | None) -> None:
    """Create the workspace; under a host id range, make every entry in it the sandbox's."""
    ws.mkdir(mode=0o755, parents=True, exist_ok=True)
    if ids is not None and os.lstat(ws).st_uid != ids.base:
        _shift_owner(ws, ids)


def _shift_owner(root: Path, ids: IdRange) -> None:
    """Give every entry under `root` (and `root` last) to `ids`, keeping the inner id.

    `root` goes last so an interrupted walk is redone at the next start.
    """
    for _top, dirs, files, dfd in os.fwalk(root, follow_symlinks=False):
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                os.chown(
                    name,
                    ids.host_id(st.st_uid),
                    ids.host_id(st.st_gid),
                    dir_fd=dfd,
                    follow_symlinks=False,
                )
    st = os.lstat(root)
    os.chown(root, ids.host_id(st.st_uid), ids.host_id(st.st_gid), follow_symlinks=False)


def _make_searchable(path: str) -> None:
    """chmod 0700 the directory at `path` itself: never a symlink, never what one points to."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            # why: chmod through the fd's /proc link acts on exactly the inode opened above
            os.chmod(f"/proc/self/fd/{fd}", 0o700)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Remove a tree a sandbox wrote; symlinks in it are removed, never followed."""

    def _fix(func: Callable[..., object], p: str, _exc: object) -> None:
        # why: a sandbox may leave directories without write or search permission, which a
        # non-root owner must chmod; a symlink planted there must not redirect that chmod
        _make_searchable(os.path.dirname(p))
        _make_searchable(p)
        with contextlib.suppress(FileNotFoundError):
            func(p)

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, onerror=_fix)


_MS_NOSUID = 2
_MS_NODEV = 4
_MNT_DETACH = 2


@functools.cache
def _libc() -> ctypes.CDLL:
    # why kept: a new handle looks each function up again (dlsym through every library the
    # daemon loaded, with the GIL held: 41 us a call here, idle; 0.3 us kept)
    return ctypes.CDLL(None, use_errno=True)


def unmount(path: Path) -> None:
    """Detach what is mounted at `path` (lazily: a dying sandbox may still hold it)."""
    if _libc().umount2(str(path).encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {path}: {os.strerror(err)}")


def drop_memory_workspace(ws: Path) -> None:
    """What a stop does to a workspace held in memory: its files are gone (a tmpfs is
    detached; without one, the directory is emptied)."""
    if os.path.ismount(ws):
        unmount(ws)
    elif ws.is_dir():
        remove_tree(ws)


def reset_memory_workspace(ws: Path, size_bytes: int) -> None:
    """An empty workspace for a cold boot, as UKC's /workspace lives in the instance's RAM.

    A root daemon mounts a tmpfs of `size_bytes` there (writes beyond it fail with ENOSPC, and
    its pages count against the sandbox's memory cgroup); another daemon only empties it, and
    bwrap mounts the sandbox's tmpfs of that size inside (`bwrap_options(workspace_tmpfs=)`).
    """
    drop_memory_workspace(ws)
    ws.mkdir(mode=0o755, parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return
    data = f"size={size_bytes},mode=0755".encode()
    if _libc().mount(b"tmpfs", str(ws).encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount tmpfs on {ws}: {os.strerror(err)}")
