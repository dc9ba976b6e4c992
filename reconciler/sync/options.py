"""`SyncOptions`: everything the sync engine needs to know about one session's sync."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reconciler.spec.defaults import (
    DEFAULT_BACK_MAX_BYTES,
    DEFAULT_BACK_MAX_FILES,
    DEFAULT_BACK_MAX_REFUSED,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
)

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
    #: deflate what goes over the wire, both ways (`remote.ZLEVEL`), where a sample of it
    #: shrinks (`sync.compress`). Off by default: it pays on a slow link (bench/link_bench.py:
    #: 0.81x at 20-50 Mbit), and on the local metro's loopback it only costs CPU (a push
    #: deflates on its own critical path; a sync-back gained ~8% before TlsStream, nothing since)
    compress: bool = False
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
