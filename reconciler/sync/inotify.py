"""Linux inotify through ctypes: which names in watched directories changed.

One instance per process serves every tracked tree (the kernel allows 128 instances per user,
and an apply may scan 64 sessions). A scan adds a watch on each directory before it lists it,
so a change after the listing is an event, and one before is in the listing. Events are read
without blocking, when a scan takes its feed. No inotify (another OS, no libc symbol, the
instance limit reached): `Inotify.open()` returns None and scans walk, as they always may.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import struct
import threading
from typing import Protocol

__all__ = ["Inotify", "Sink", "shared"]

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ISDIR = 0x40000000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000

MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_DONT_FOLLOW
    | IN_EXCL_UNLINK
)
_HEADER = struct.Struct("iIII")


class Sink(Protocol):
    """Where a watch's events go: the paths they name, or "anything may have changed"."""

    def note(self, rel: str) -> None: ...

    def note_all(self) -> None: ...

    def note_dir(self, rel: str) -> None: ...


class Inotify:
    """One inotify instance: watches by directory, events delivered to each watch's sink."""

    def __init__(self, fd: int, libc: ctypes.CDLL) -> None:
        self._fd = fd
        self._libc = libc
        # reentrant: a sink may add watches while events are delivered (a new directory)
        self._lock = threading.RLock()
        #: watch descriptor -> (the directory's path relative to its tree, sink) pairs
        self._sinks: dict[int, list[tuple[str, Sink]]] = {}

    @classmethod
    def open(cls) -> Inotify | None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            init = libc.inotify_init1
        except (OSError, AttributeError):
            return None
        fd = int(init(IN_NONBLOCK | IN_CLOEXEC))
        return cls(fd, libc) if fd >= 0 else None

    def watch(self, path: str, rel_dir: str, sink: Sink) -> bool:
        """Report changes of the names in directory `path` (`rel_dir` in its tree) to
        `sink`; False when the kernel refused (the watch limit, a vanished path): the caller
        must not rely on events."""
        wd = int(self._libc.inotify_add_watch(self._fd, os.fsencode(path), ctypes.c_uint32(MASK)))
        if wd < 0:
            return False
        with self._lock:
            sinks = self._sinks.setdefault(wd, [])
            if (rel_dir, sink) not in sinks:
                sinks.append((rel_dir, sink))
        return True

    def forget(self, sink: Sink) -> None:
        """Drop every watch reporting to `sink` (a feed that is going away)."""
        with self._lock:
            for wd in list(self._sinks):
                kept = [s for s in self._sinks[wd] if s[1] is not sink]
                if kept:
                    self._sinks[wd] = kept
                    continue
                del self._sinks[wd]
                self._libc.inotify_rm_watch(self._fd, wd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def pump(self) -> None:
        """Deliver every event queued so far (never blocks)."""
        with self._lock:
            while True:
                try:
                    data = os.read(self._fd, 1 << 16)
                except BlockingIOError:
                    return
                except OSError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    self._all()
                    return
                if not data:
                    return
                self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        pos = 0
        while pos + _HEADER.size <= len(data):
            wd, mask, _cookie, size = _HEADER.unpack_from(data, pos)
            raw = data[pos + _HEADER.size : pos + _HEADER.size + size].split(b"\0", 1)[0]
            pos += _HEADER.size + size
            if mask & IN_Q_OVERFLOW:
                self._all()
                continue
            sinks = self._sinks.get(wd, [])
            if mask & IN_IGNORED:
                # the directory is gone (or its watch removed): its parent's event names it
                self._sinks.pop(wd, None)
                continue
            name = os.fsdecode(raw)
            for rel_dir, sink in sinks:
                if mask & (IN_DELETE_SELF | IN_MOVE_SELF) or not name:
                    if rel_dir:
                        sink.note(rel_dir)
                    else:
                        sink.note_all()  # the root itself moved or went away
                elif mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                    sink.note_dir(f"{rel_dir}/{name}" if rel_dir else name)
                else:
                    sink.note(f"{rel_dir}/{name}" if rel_dir else name)

    def _all(self) -> None:
        for sinks in self._sinks.values():
            for _rel, sink in sinks:
                sink.note_all()


_SHARED: list[Inotify | None] = []
_SHARED_LOCK = threading.Lock()


def shared() -> Inotify | None:
    """This process's instance (opened on first use; None without inotify)."""
    with _SHARED_LOCK:
        if not _SHARED:
            _SHARED.append(Inotify.open())
        return _SHARED[0]
