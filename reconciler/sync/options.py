"""`SyncOptions`: everything the sync engine needs to know about one session's sync.

Who feeds it: the controller's executor, from the spec (`directory`, `sync.exclude`,
`sync.back`, `sync.back_delete`, the `sync` limits) and its own per-session state dir. Who uses
it: every module of `reconciler.sync`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_BACK_MAX_BYTES",
    "DEFAULT_BACK_MAX_FILES",
    "DEFAULT_BACK_MAX_REFUSED",
    "DEFAULT_IDLE_TIMEOUT_S",
    "DEFAULT_TIMEOUT_S",
    "SyncOptions",
]

#: what one sync-back may bring at most (`sync.back_max_bytes`, `sync.back_max_files`,
#: `sync.back_max_refused`): far above what a session's outputs are by accident, low enough
#: that a hostile sandbox cannot fill the disk, the inode table or our memory
DEFAULT_BACK_MAX_BYTES = 16 << 30
DEFAULT_BACK_MAX_FILES = 1_000_000
DEFAULT_BACK_MAX_REFUSED = 10_000
#: the longest one push or one sync-back may take (`sync.timeout`), and the longest the sync
#: helper may stay silent, or not read, while we wait on it (`sync.idle_timeout`)
DEFAULT_TIMEOUT_S = 3600.0
DEFAULT_IDLE_TIMEOUT_S = 120.0


@dataclass(frozen=True, kw_only=True)
class SyncOptions:
    """One session's sync settings.

    `back` entries are paths relative to the root; a trailing "/" marks a directory.
    `state_dir` is controller-owned (hash cache, push and pull records). `remote_state_dir`
    lives outside `remote_root` on purpose: it sits on the sandbox's tmpfs `/run`, so it is lost
    exactly when the sandbox loses its memory (reboot, scale-to-zero without state).
    """

    local_root: Path
    state_dir: Path
    exclude: tuple[str, ...] = ()
    back: tuple[str, ...] = ()
    #: mirror remote deletions of files a pull brought back (`sync.back_delete`; see
    #: `backdelete` for the guards)
    back_delete: bool = False
    remote_root: str = "/workspace"
    remote_state_dir: str = "/run/ukc-sync"
    boot_id_paths: tuple[str, ...] = ("/run/ukc/boot_id", "/proc/sys/kernel/random/boot_id")
    #: interpreter the remote helper runs with (must be Python >= 3.7, stdlib only)
    remote_python: str = "python3"
    #: threads that create small files (remote on push, local on pull); 0 = inline. Off by
    #: default: on the TLS-SSH path they lost to inline writes (GIL contention with paramiko)
    write_threads: int = 0
    #: the session's name, for messages
    session: str = ""
    #: per-pull caps: file data bytes the sandbox may send (announced sizes, checked before
    #: any byte is written), entries it may list (files, directories and anything else), and
    #: entries refused or failed before the pull stops
    back_max_bytes: int = DEFAULT_BACK_MAX_BYTES
    back_max_files: int = DEFAULT_BACK_MAX_FILES
    back_max_refused: int = DEFAULT_BACK_MAX_REFUSED
    #: seconds: the deadline of one push or pull, and the longest wait on a silent helper
    timeout_s: float = DEFAULT_TIMEOUT_S
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S

    def back_paths(self) -> tuple[str, ...]:
        """The `back` entries normalised to relative paths without trailing slashes."""
        out: list[str] = []
        for raw in self.back:
            norm = raw.strip().strip("/")
            while norm.startswith("./"):
                norm = norm[2:]
            if norm and norm not in out:
                out.append(norm)
        return tuple(out)
