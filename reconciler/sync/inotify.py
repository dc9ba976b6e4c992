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
import select
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

__all__ = ["Inotify", "Sink", "Trees", "shared"]

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
        opened = _open()
        return cls(*opened) if opened is not None else None

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
        for wd, mask, name in _events(data):
            if mask & IN_Q_OVERFLOW:
                self._all()
                continue
            sinks = self._sinks.get(wd, [])
            if mask & IN_IGNORED:
                # the directory is gone (or its watch removed): its parent's event names it
                self._sinks.pop(wd, None)
                continue
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


def _open() -> tuple[int, ctypes.CDLL] | None:
    """A new inotify instance's fd (non-blocking) and the libc that serves it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        init = libc.inotify_init1
    except (OSError, AttributeError):
        return None
    fd = int(init(IN_NONBLOCK | IN_CLOEXEC))
    return (fd, libc) if fd >= 0 else None


def _events(data: bytes) -> Iterator[tuple[int, int, str]]:
    """(watch descriptor, mask, name) of each event in `data`, what one read returned."""
    pos = 0
    while pos + _HEADER.size <= len(data):
        wd, mask, _cookie, size = _HEADER.unpack_from(data, pos)
        raw = data[pos + _HEADER.size : pos + _HEADER.size + size].split(b"\0", 1)[0]
        pos += _HEADER.size + size
        yield wd, mask, os.fsdecode(raw)


class Trees:
    """Whole directory trees watched by a thread of their own (`ukc watch`): each event is
    handed to `deliver` as (absolute path, whether it says the file is being written: created,
    modified or its metadata changed, not closed after writing) as soon as the kernel has it,
    and `overflow()` when events were lost. A directory that appears in a recursive tree is
    watched with everything under it.

    why not the `watchdog` package: its inotify events pass through three threads (reader,
    emitter, dispatcher) before a handler sees them; on a loaded machine each hand-off is a
    scheduling delay on an edit's way to its sandbox, and the rest of a write's events
    (its bytes, its close) reached the watch only after the pass had started, which then
    ran a second pass for them."""

    def __init__(
        self,
        fd: int,
        libc: ctypes.CDLL,
        deliver: Callable[[str, bool], None],
        overflow: Callable[[], None],
    ) -> None:
        self._fd = fd
        self._libc = libc
        self._deliver = deliver
        self._overflow = overflow
        self._lock = threading.Lock()
        #: watch descriptor -> (directory path, whether what appears in it is watched too)
        self._dirs: dict[int, tuple[str, bool]] = {}
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._closed = False

    @classmethod
    def open(
        cls, deliver: Callable[[str, bool], None], overflow: Callable[[], None]
    ) -> Trees | None:
        """None without inotify (the caller watches another way)."""
        opened = _open()
        return cls(*opened, deliver, overflow) if opened is not None else None

    def add(self, root: str, recursive: bool) -> bool:
        """Watch `root` (and, `recursive`, every directory under it); False when a watch was
        refused (the watch limit, say), or once stopped: events from there will not come."""
        if self._stopped:
            return False
        ok = self._watch(root, recursive)
        if recursive:
            ok = self._watch_below(root) and ok
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ukc-inotify", daemon=True)
            self._thread.start()
        return ok

    def _watch(self, path: str, recursive: bool) -> bool:
        wd = int(self._libc.inotify_add_watch(self._fd, os.fsencode(path), ctypes.c_uint32(MASK)))
        if wd < 0:
            return False
        with self._lock:
            self._dirs[wd] = (path, recursive)
        return True

    def _watch_below(self, top: str) -> bool:
        """Watch every directory under `top` (not following links)."""
        ok = True
        stack = [top]
        while stack:
            current = stack.pop()
            try:
                with os.scandir(current) as entries:
                    subdirs = [e.path for e in entries if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue  # gone meanwhile: its parent's event names it
            for sub in subdirs:
                ok = self._watch(sub, True) and ok
                stack.append(sub)
        return ok

    def _forget_below(self, top: str) -> None:
        """A directory moved away: the watches under it would name paths that are no more."""
        prefix = os.path.join(top, "")
        with self._lock:
            gone = [wd for wd, (p, _r) in self._dirs.items() if p == top or p.startswith(prefix)]
            for wd in gone:
                del self._dirs[wd]
        for wd in gone:
            self._libc.inotify_rm_watch(self._fd, wd)

    def stop(self) -> None:
        """Nothing is delivered once this returns, except by a delivery already under way;
        the reader thread closes the descriptors on its way out. why: closed here while the
        reader is still inside a delivery (a slow callback, a new directory's walk), their
        numbers go to the next file opened, which the reader would then read from, or whose
        inotify watches it would remove."""
        with self._lock:
            self._stopped = True
            if not self._closed:
                with contextlib.suppress(OSError):
                    os.write(self._wake_w, b"x")
        thread = self._thread
        if thread is None:
            self._close()
        elif thread is not threading.current_thread():
            thread.join(2)

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self._fd, self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _run(self) -> None:
        try:
            self._read()
        finally:
            self._close()

    def _read(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopped:
            try:
                poller.poll()
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                if not self._stopped:
                    self._overflow()  # no more events: what changed from now on is unknown
                return
            self._handle(data)

    def _handle(self, data: bytes) -> None:
        for wd, mask, name in _events(data):
            if self._stopped:
                return
            if mask & IN_Q_OVERFLOW:
                self._overflow()
                continue
            with self._lock:
                where = self._dirs.get(wd)
                if mask & IN_IGNORED:
                    self._dirs.pop(wd, None)
            if where is None or mask & IN_IGNORED:
                continue
            directory, recursive = where
            if not name:
                # the directory itself: moved, deleted or its metadata changed
                self._deliver(directory, False)
                continue
            path = os.path.join(directory, name)
            if mask & IN_ISDIR and mask & IN_MOVED_FROM:
                self._forget_below(path)
            elif mask & IN_ISDIR and recursive and mask & (IN_CREATE | IN_MOVED_TO):
                # watched before it is named: what is made in it later is an event, and the
                # scan the name wakes lists what was made before
                watched = self._watch(path, True) and self._watch_below(path)
                if not watched:
                    self._overflow()
            writing = not mask & IN_ISDIR and bool(mask & (IN_CREATE | IN_MODIFY | IN_ATTRIB))
            self._deliver(path, writing)


_SHARED: list[Inotify | None] = []
_SHARED_LOCK = threading.Lock()


def shared() -> Inotify | None:
    """This process's instance (opened on first use; None without inotify)."""
    with _SHARED_LOCK:
        if not _SHARED:
            _SHARED.append(Inotify.open())
        return _SHARED[0]
