"""`SyncOptions`: everything the sync engine needs to know about one session's sync.

Who feeds it: the controller's executor, from the spec (`directory`, `sync.exclude`,
`sync.back`, `sync.back_delete`) and its own per-session state dir. Who uses it: every module
of `reconciler.sync`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["SyncOptions"]


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
