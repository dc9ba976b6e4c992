"""The processes of a sandbox, found by its pid namespace."""

from __future__ import annotations

import os

__all__ = ["ns_members", "pid_ns_of", "proc_state"]


def pid_ns_of(pid: int) -> str:
    """The pid namespace of `pid` as its `ns/pid` link reads (`pid:[N]`), '' when gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return ""


def ns_members(pid_ns: str) -> list[int]:
    """Host pids of every process in the pid namespace `pid_ns` (a /proc walk, no cgroups)."""
    if not pid_ns:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and pid_ns_of(int(entry)) == pid_ns:
            found.append(int(entry))
    return found


def proc_state(pid: int) -> str:
    """The state letter of `pid` (`R`, `S`, `T`, `Z`...), '' when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return ""
    # why: the command name may contain spaces and parentheses; the state follows the last ')'
    return data[data.rfind(b")") + 2 :][:1].decode("ascii", "replace")
