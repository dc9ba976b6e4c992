"""Where a sandbox's host-side files and sockets live in the daemon's state dir.

`workspaces/<uuid>/` is the sandbox's `/workspace` (kept across stop/start, removed by destroy);
`volumes/<volume uuid>/` a volume's files, mounted into the sandbox of the instance it is
attached to (a volume at `/workspace` takes the workspace's place);
`sandboxes/<uuid>/` holds its ssh host key, shadow file and host id range, `accounts/` the
`passwd` and `group` every sandbox of the daemon is given. The
listening sockets live in a host-only control dir, `/dev/shm/ukc-*/<uuid>/` (else `run/<uuid>/`,
or a short `/tmp/ukc-*` dir when the state dir is too deep for a unix socket path), which the
sandbox never sees.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from reconciler.errors import LocalMetroError

__all__ = ["UUID_RE", "WORKSPACE", "Mount", "SandboxLayout"]

UUID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# why: unix socket paths are limited to 108 bytes; leave room for the file name
_SOCK_PATH_MAX = 100
#: where the control dirs go first. why a memory file system: each boot binds two sockets
#: there, and on a disk file system each is an inode allocated (and freed at the stop), ~20
#: times the kernel work of one in memory (bench/PROFILE.md); the sockets are gone with the
#: daemon anyway
MEMORY_DIR = Path("/dev/shm")
WORKSPACE = "/workspace"


@dataclass(frozen=True)
class Mount:
    """A volume's host directory and where the sandbox sees it."""

    source: Path
    at: str
    readonly: bool = False
    #: the volume's size: where the daemon can, its files live on a filesystem this big
    size_mb: int | None = None


class SandboxLayout:
    """The paths of every sandbox of one state dir; a uuid that is not one is refused."""

    def __init__(self, state_dir: Path, memory_dir: Path = MEMORY_DIR) -> None:
        self.state_dir = state_dir
        self._memory_dir = memory_dir
        self._run_base: Path | None = None

    def check_uuid(self, uuid: str) -> None:
        if not UUID_RE.match(uuid):
            raise LocalMetroError(f"sandbox id {uuid[:80]!r} is not a valid instance uuid")

    def workspace(self, uuid: str) -> Path:
        """`state_dir/workspaces/<uuid>`: the host side of the sandbox's `/workspace`."""
        self.check_uuid(uuid)
        return self.state_dir / "workspaces" / uuid

    def volume(self, uuid: str) -> Path:
        """`state_dir/volumes/<uuid>`: the host directory holding a volume's files."""
        self.check_uuid(uuid)
        return self.state_dir / "volumes" / uuid

    def volume_image(self, uuid: str) -> Path:
        """`state_dir/volume-images/<uuid>.ext4`: the filesystem image of a size-bounded
        volume (root daemon), mounted at its directory."""
        self.check_uuid(uuid)
        return self.state_dir / "volume-images" / f"{uuid}.ext4"

    def instance_dir(self, uuid: str) -> Path:
        self.check_uuid(uuid)
        return self.state_dir / "sandboxes" / uuid

    def accounts_dir(self) -> Path:
        """`state_dir/accounts`: the `passwd` and `group` every sandbox is given."""
        return self.state_dir / "accounts"

    def known_uuids(self) -> set[str]:
        """Every uuid that has a workspace or an instance dir on disk."""
        found: set[str] = set()
        for sub in (self.state_dir / "workspaces", self.state_dir / "sandboxes"):
            with contextlib.suppress(FileNotFoundError):
                found |= {p.name for p in sub.iterdir() if UUID_RE.match(p.name)}
        return found

    def _control_base(self) -> Path:
        if self._run_base is not None:
            return self._run_base
        digest = hashlib.sha256(str(self.state_dir.absolute()).encode()).hexdigest()[:10]
        if self._memory_dir.is_dir():
            # why not an error when it is not ours: anyone may make that name in a shared dir
            with contextlib.suppress(OSError, LocalMetroError):
                self._run_base = _own_dir(self._memory_dir / f"ukc-{os.getuid()}-{digest}")
                return self._run_base
        base = self.state_dir / "run"
        if len(str(base.absolute())) + 1 + 36 + len("/plugin.sock") > _SOCK_PATH_MAX:
            base = Path(tempfile.gettempdir()) / f"ukc-{os.getuid()}-{digest}"
        self._run_base = _own_dir(base)
        return self._run_base

    def control_dir(self, uuid: str) -> Path:
        self.check_uuid(uuid)
        return self._control_base() / uuid

    def plugin_socket(self, uuid: str) -> Path:
        """The unix socket on which the sandbox's plugin HTTP API answers."""
        return self.control_dir(uuid) / "plugin.sock"

    def relay_socket(self, uuid: str) -> Path:
        """The unix socket through which the agent relays connections to ports inside."""
        return self.control_dir(uuid) / "relay.sock"

    def remove_control_dirs(self) -> None:
        """Remove the empty control dirs stopped sandboxes left (and a /tmp fallback base)."""
        base = self._run_base
        if base is not None and base.is_dir():
            for child in base.iterdir():
                with contextlib.suppress(OSError):
                    child.rmdir()
            with contextlib.suppress(OSError):
                base.rmdir()
            self._run_base = None


def _own_dir(base: Path) -> Path:
    """`base`, made if missing: a directory (not a symlink) of this uid, mode 0700."""
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise LocalMetroError(f"control dir {base} is not a directory owned by uid {os.getuid()}")
    os.chmod(base, 0o700)
    return base.absolute()
