"""Finding the host processes of a local-metro sandbox from outside, the way an admin would.

Nothing host-visible names an instance (no name or path in any command line), so a sandbox is
found by what it is: the processes whose `/workspace` is the instance's workspace directory
(same inode), plus the bubblewrap monitor that is the parent of the sandbox's pid 1.
Needs root (`/proc/<pid>/root` of other users' processes).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cmdline", "proc_ids", "sandbox_pids"]


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def proc_ids(pid: int) -> dict[str, list[int]]:
    """The `Uid`, `Gid` and `PPid` lines of `/proc/<pid>/status` (empty once it is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    found = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "PPid"):
            found[key] = [int(v) for v in value.split()]
    return found


def sandbox_pids(workspace: Path) -> list[int]:
    """Host pids of every process of the sandbox that has `workspace` as `/workspace`."""
    want = os.stat(workspace)
    inside = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/root/workspace")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
            inside.add(int(entry))
    monitors = set()
    for pid in inside:
        parent = proc_ids(pid).get("PPid", [0])[0]
        argv = cmdline(parent)
        if parent not in inside and argv and argv[0].endswith("bwrap"):
            monitors.add(parent)
    return sorted(inside | monitors)
