"""Sync-back (pull): bring the declared `sync.back` paths from the sandbox into the local tree.

The other end is the helper's `pull` operation (`sync.helper`). The result says what was
written, refused, kept as a conflict and why it stopped; `pulled_paths` are files ukc wrote,
not user edits.

Everything the sandbox sends is untrusted: it can replace the helper, so every byte of the
stream is adversarial. Each entry is validated before anything is written (`check_path`): no
absolute paths, no `..`, nothing outside the declared back paths, no `.ukc` component, no
symlinks, fifos, devices or sockets, no control characters, no backslashes, no path over 4096
characters (refused before it is stored anywhere), sizes bounded by what was announced. Writes
go through directory fds opened component by component with O_NOFOLLOW (a local symlink
swapped in cannot redirect a write), at most `_MAX_DIR_FDS` of them open at once, into an
unnamed file (O_TMPFILE) in the target directory, linked under its name only when nothing
is there (linkat never replaces nor follows); else (something in the way, or a filesystem
without O_TMPFILE) into a temp file created with O_EXCL|O_NOFOLLOW, then `os.replace`. A local file
changed since our last pull is never overwritten: the incoming copy lands beside it as
`<name>.ukc-remote`. A local write that fails (name too long, no space, no permission...) is
reported like a refusal and the pull goes on (a full disk stops it).

Bounds (`SyncOptions.back_max_*`): the file data the sandbox may send (an announced size is
checked against what is left *before* a byte is read), the entries it may list (with 256
characters of path per allowed entry), and the entries refused or failed. A pull that reaches
one stops there: what was written stays and is recorded, `PullResult.stopped` says which cap
with the numbers, and no remote deletion is mirrored. A helper that stalls is ended by the
session's watchdog (`SyncStalledError`); what was written is recorded all the same.

Modes: a pulled file gets `local_mode(sandbox mode)`, created through the umask: the owner may
always read and write it; group and others may read it when the sandbox lets them; it is
executable (by whoever may read it) when the sandbox's owner execute bit is set. Write bits for
group and others, set-id and sticky bits are never taken from the sandbox. New directories are
`0o700 | (sandbox mode & 0o055)`, through the umask.

Remote deletions are not propagated, unless `sync.back_delete` is on: then a file this pull
record says we brought back from this same instance and boot, unchanged here since, is removed
when the sandbox no longer has it, only after a whole pull without errors (see `backdelete`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import re
import secrets
import stat
import threading
from collections import OrderedDict
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Never

from reconciler._util.atomic import writer_alive
from reconciler._util.text import one_line
from reconciler.errors import HostileEntryError, MissingToolError, RemoteError, SyncHaltedError
from reconciler.sync import journal
from reconciler.sync.backdelete import REFUSED, Seen, mirror_deletes, source_id
from reconciler.sync.capability import is_missing_interpreter, record_tools, recorded_tools
from reconciler.sync.ignore import is_under
from reconciler.sync.manifest import CHUNK, hash_file
from reconciler.sync.options import SyncOptions
from reconciler.sync.pullrecord import PULL_JOURNAL, PullRecord, load_pull_record, save_pull_record
from reconciler.sync.remote import HelperSession
from reconciler.transport.base import RemoteShell

__all__ = [
    "CONFLICT_SUFFIX",
    "PullResult",
    "check_path",
    "local_mode",
    "pull",
    "pull_record",
    "pulled_paths",
]

CONFLICT_SUFFIX = ".ukc-remote"
_TMP = ".ukc-pull."
#: a header names one path (at most 4096 characters, each up to 12 once JSON-escaped); a
#: `files` frame up to `_BATCH_FILES` names (the helper sends ~16K characters of them)
_HEADER_LIMIT = 1 << 18
#: a `files` frame's bounds (the helper sends at most 512 files, ~1 MiB)
_BATCH_FILES = 1024
_BATCH_BYTES = 2 << 20
_PATH_MAX = 4096
#: C0 controls (NUL, newline, escape...), DEL and C1 controls: never in a name we write
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SMALL = 1 << 20
_DFLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
#: a file with no name yet: a pull killed before it is linked leaves nothing behind
_UNNAMED = os.O_WRONLY | getattr(os, "O_TMPFILE", 0)
#: what open(O_TMPFILE) fails with where the filesystem or system cannot make one
_NO_UNNAMED = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL)
#: directory fds kept open by one pull (least recently used closed first): a sandbox listing
#: thousands of directories must not run us out of descriptors
_MAX_DIR_FDS = 64
#: characters of path allowed per entry of `back_max_files`, over the whole pull: what we keep
#: per entry (record, report) must not grow with the length of paths the sandbox makes up
_NAME_CHARS_PER_FILE = 256
#: refusals listed in the result (and the status); the rest are counted
_LISTED = 100
#: errors that will fail every later write as well: the pull stops at the first one
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class PullResult:
    """What one pull did. `rejected`: "path: reason" for the first hostile or failed entries
    (`refused` counts them all)."""

    files_written: int = 0
    bytes_written: int = 0
    conflicts: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    #: the first files written (`files_written` counts them all)
    written: list[str] = field(default_factory=list)
    unchanged: int = 0
    #: why the stream was abandoned part-way (a hostile or broken sandbox), else None
    aborted: str | None = None
    #: local files removed because the sandbox deleted them (`sync.back_delete`)
    deleted: list[str] = field(default_factory=list)
    #: "deleted in the sandbox but changed here: path" for each file left in place
    kept: list[str] = field(default_factory=list)
    #: why remote deletions were not mirrored (all of them, or under one back path)
    deletes_skipped: list[str] = field(default_factory=list)
    #: entries refused or not written here, all of them (`rejected` lists the first ones)
    refused: int = 0
    #: the cap this pull stopped at, with the numbers (or a full local disk), else None
    stopped: str | None = None


def local_mode(remote: int) -> int:
    """The permission bits a pulled file is created with (the umask then applies): read bits
    as the sandbox has them, the owner's always; execute for each reader when the sandbox's
    owner execute bit is set; write for the owner only. Nothing else comes from the sandbox."""
    read = (remote & 0o444) | 0o400
    execute = read >> 2 if remote & 0o100 else 0
    return 0o200 | read | execute


def check_path(path: object, back: Collection[str]) -> str | None:
    """Why a remote path is refused, or None when it may be written under the local root."""
    if not isinstance(path, str):
        return "path is not a string"
    if not path:
        return "empty path"
    if len(path) > _PATH_MAX:
        return f"path of {len(path)} characters (the limit is {_PATH_MAX})"
    if path.startswith("/"):
        return "absolute path"
    if "\\" in path:
        return "backslash in name"
    if _CONTROL.search(path):
        return "control character in name"
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "'..', '.' or empty component"
    try:
        sizes = [len(p.encode("utf-8", "surrogateescape")) for p in parts]
    except UnicodeEncodeError:
        # a lone surrogate outside the \udc80-\udcff escapes names no file on any disk
        return "name is not a valid file name"
    if any(n > 255 for n in sizes):
        return "name longer than 255 bytes"
    if ".ukc" in parts:
        return "inside .ukc/ (ukc's state)"
    if parts[-1].startswith(_TMP):
        return "reserved temp name"
    if not is_under(path, back):
        return "outside the declared sync-back paths"
    return None


def _plain_name(name: str) -> bool:
    """True for a last component `check_path` accepts whatever accepted parent it is under
    (no "/", no "." or "..", no control character or backslash, at most 255 bytes, not
    `.ukc`, not a temp name); False says nothing (the whole path is then checked)."""
    if not name or name in (".", "..", ".ukc") or name.startswith(_TMP):
        return False
    if "\\" in name or "/" in name or _CONTROL.search(name):
        return False
    if name.isascii():
        return len(name) <= 255
    try:
        return len(name.encode("utf-8", "surrogateescape")) <= 255
    except UnicodeEncodeError:
        return False


def _uint(v: object) -> bool:
    """An int of a header (not a bool), 0 <= v < 2**63."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 63


def _safe_label(path: object) -> str:
    """A printable, bounded form of an untrusted path for reports."""
    return one_line(path if isinstance(path, str) else repr(path), 300)


def _why(exc: OSError) -> str:
    """A short reason for a local failure: the system's words, never the (untrusted) path."""
    return (exc.strerror or f"error {exc.errno}").lower()


def pull_record(opts: SyncOptions) -> PullRecord:
    """Our last pull record: path -> [size, mtime_ns, sha256, source] of each file pull
    wrote; source ("instance-uuid/boot-id") is absent in an older ukc's entries."""
    return load_pull_record(opts.state_dir)


def pulled_paths(opts: SyncOptions) -> set[Path]:
    """Absolute local paths of the files pull wrote (the watcher ignores their events)."""
    root = Path(opts.local_root)
    return {root / p for p in pull_record(opts)}


class _Tree:
    """Directory fds under the local root, opened with O_NOFOLLOW one component at a time.

    At most `_MAX_DIR_FDS` stay open (least recently used closed first). An fd it returns is
    valid until the next call; a pooled write takes its own duplicate.
    """

    def __init__(self, root: Path) -> None:
        try:
            self.rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            raise SyncHaltedError(f"local root {root} is missing; nothing was pulled") from None
        self._fds: OrderedDict[str, int] = OrderedDict()
        #: directories whose dead temp files were swept in this pull (once each)
        self._swept: set[str] = set()
        _sweep_dead_temps(self.rootfd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        os.close(self.rootfd)

    def dir(self, rel: str, mode: int = 0o755) -> int:
        """fd of directory `rel`, creating missing ones; raises HostileEntryError on a link or
        a file in the way, OSError when the system refuses (no space, too many files...)."""
        fd = self._open(rel, mode)
        assert fd is not None  # creating never finds nothing
        return fd

    def find(self, rel: str) -> int | None:
        """fd of the existing directory `rel`, None when it or a parent is missing; never
        creates one (deletions must not). Raises HostileEntryError on a link or a file."""
        return self._open(rel, None)

    def _open(self, rel: str, create: int | None) -> int | None:
        """The walk behind `dir` (`create` = the mode of a new `rel`) and `find` (None): from
        the deepest open ancestor down, one component at a time (no recursion: a path may
        have 2,000 components)."""
        if rel == "":
            return self.rootfd
        fds = self._fds
        fd = fds.get(rel)
        if fd is not None:
            fds.move_to_end(rel)
            return fd
        fd, start = self.rootfd, 0
        cut = rel.rfind("/")
        while cut != -1:
            hit = fds.get(rel[:cut])
            if hit is not None:
                fds.move_to_end(rel[:cut])
                fd, start = hit, cut + 1
                break
            cut = rel.rfind("/", 0, cut)
        while True:
            cut = rel.find("/", start)
            prefix = rel if cut == -1 else rel[:cut]
            name = prefix[start:]
            mode = create if create is None or cut == -1 else 0o755
            child = self._step(fd, name, prefix, mode)
            if child is None:
                return None
            fds[prefix] = child
            if len(fds) > _MAX_DIR_FDS:
                os.close(fds.popitem(last=False)[1])  # never `child`: it is the newest
            if cut == -1:
                return child
            fd, start = child, cut + 1

    def _step(self, pfd: int, name: str, rel: str, create: int | None) -> int | None:
        try:
            fd = os.open(name, _DFLAGS, dir_fd=pfd)
        except FileNotFoundError:
            if create is None:
                return None
            with contextlib.suppress(FileExistsError):  # made meanwhile: opened below
                os.mkdir(name, create, dir_fd=pfd)
            fd = self._reopen(pfd, name, rel)
            self._swept.add(rel)  # new: nothing to sweep
            return fd
        except OSError as exc:
            self._refuse(exc, rel)
        if create is not None and rel not in self._swept:
            self._swept.add(rel)
            _sweep_dead_temps(fd)
        return fd

    def _reopen(self, pfd: int, name: str, rel: str) -> int:
        try:
            return os.open(name, _DFLAGS, dir_fd=pfd)
        except OSError as exc:
            self._refuse(exc, rel)

    @staticmethod
    def _refuse(exc: OSError, rel: str) -> Never:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            # a symlink or a file where a directory should be: we never go through it
            raise HostileEntryError(
                f"local parent {_safe_label(rel)} is not a plain directory"
            ) from exc
        raise exc

    def forget(self, rel: str) -> None:
        """Close the cached fds of `rel` and below (the directory was removed)."""
        for key in [k for k in self._fds if k == rel or k.startswith(rel + "/")]:
            os.close(self._fds.pop(key))


class _Puller:
    """One pull's judge and writer. `entry` takes the helper's headers; the file data comes
    through `next_chunk` (the helper's framing here; `tarpull` reads a tar stream instead)."""

    def __init__(
        self, s: HelperSession | None, opts: SyncOptions, tree: _Tree, source: str
    ) -> None:
        self.s = s
        self.opts = opts
        self.tree = tree
        self.back = opts.back_paths()
        self.back_set = frozenset(self.back)  # checked for every entry (see is_under)
        self.record = pull_record(opts)
        self.new_record = self.record.copy()
        self.result = PullResult()
        #: every path the sandbox announced (refused ones too: they exist over there), and
        #: local write failures: what deletions are judged by (paths kept only when they are)
        self.seen = Seen(source=source, paths={})
        self.keep_seen = opts.back_delete
        # the caps, and what this pull used of them so far
        self.max_bytes = opts.back_max_bytes
        self.max_files = opts.back_max_files
        self.max_refused = opts.back_max_refused
        self.max_chars = self.max_files * _NAME_CHARS_PER_FILE
        self.announced_bytes = 0
        self.entries = 0
        self.chars = 0
        #: the last parent directory seen that is itself under a back path and whose entry
        #: passed `check_path`: a sibling then needs only its name checked (`judge`)
        self.passed_parent: str | None = None
        # why: creating files is kernel-bound and slow on some disks; small files are written
        # by a few threads (bounded: at most 32 files of <= 1 MiB held in memory). Reentrant:
        # `place` runs under it and may `reject` (a plain Lock hung the pull right there)
        self.lock = threading.RLock()
        self.threads = opts.write_threads
        self.pool = ThreadPoolExecutor(max_workers=max(1, self.threads))
        self.slots = threading.BoundedSemaphore(32)
        # why: temp + stat + rename cost ~1.1 s more CPU per 100k new files than an unnamed
        # file linked in place (the temp's directory entry, the lookups, the rename); the
        # link goes through /proc/self/fd (linkat's AT_EMPTY_PATH needs a capability)
        self.unnamed = _UNNAMED != os.O_WRONLY and os.path.isdir("/proc/self/fd")

    def stop(self, why: str) -> None:
        """Record the first reason to stop (pooled writes may find one too)."""
        with self.lock:
            if self.result.stopped is None:
                self.result.stopped = why

    def reject(self, path: object, reason: str) -> None:
        with self.lock:
            self.result.refused += 1
            if len(self.result.rejected) < _LISTED:
                self.result.rejected.append(f"{_safe_label(path)}: {reason}")
            if self.result.refused > self.max_refused:
                self.stop(
                    f"stopped at sync.back_max_refused = {self.max_refused}: "
                    f"{self.result.refused} entries refused or not written"
                )

    def local_failed(self, path: object, reason: str) -> None:
        """A write here failed: reported like a refusal, and no deletions in this pull."""
        self.reject(path, reason)
        with self.lock:
            self.seen.local_errors += 1

    def write_failed(self, path: str, exc: OSError) -> None:
        """A local write failed: reported; a full disk also stops the pull."""
        self.local_failed(path, f"not written here: {_why(exc)}")
        if exc.errno in _DISK_FULL:
            label = _safe_label(path)
            self.stop(f"stopped: the local disk is full ({_why(exc)}) while writing {label}")

    def keep(self, path: str, size: int, mtime: int, sha: str) -> None:
        """Record a file this sandbox has, tagged with its source when known."""
        self.new_record.put(path, size, mtime, sha, self.seen.source)

    def finish(self) -> None:
        """Wait for every pooled write."""
        self.pool.shutdown(wait=True)

    def next_chunk(self, total: int, size: int) -> bytes | None:
        """The next piece of the current file's data (`total` of `size` came so far): b""
        after the last, None when the sandbox sends more than `size`."""
        assert self.s is not None
        n = self.s.reader.u32()
        if n == 0:
            return b""
        if n > CHUNK or total + n > size:
            return None
        return self.s.reader.exact(n)

    def drain(self, limit: int) -> int:
        """Read and discard one file's chunks; returns the byte count (-1 when over `limit`)."""
        total = 0
        while True:
            chunk = self.next_chunk(total, limit)
            if chunk is None:
                return -1
            if not chunk:
                return total
            total += len(chunk)

    def skip(self, path: object, size: int) -> bool:
        """Skip a file's data after a refusal; False when it sends more than announced."""
        if self.drain(size) < 0:
            self.result.aborted = f"{_safe_label(path)}: more data than announced"
            return False
        return True

    def over_budget(self, path: object, has_data: bool, size: int) -> str | None:
        """Count one entry against the caps before anything of it is stored or written; the
        first cap it would pass, with the numbers, or None."""
        self.entries += 1
        if self.entries > self.max_files:
            return (
                f"stopped at sync.back_max_files = {self.max_files}: the sandbox listed more "
                "entries (files and directories)"
            )
        if isinstance(path, str):
            self.chars += min(len(path), _PATH_MAX + 1)
            if self.chars > self.max_chars:
                return (
                    f"stopped at sync.back_max_files = {self.max_files}: the paths listed "
                    f"reach {self.chars} characters, over the {_NAME_CHARS_PER_FILE} per "
                    "allowed entry"
                )
        if has_data:
            if self.announced_bytes + size > self.max_bytes:
                return (
                    f"stopped at sync.back_max_bytes = {self.max_bytes}: "
                    f"{_safe_label(path)} announces {size} bytes, only "
                    f"{self.max_bytes - self.announced_bytes} are left"
                )
            self.announced_bytes += size
        return None

    def judge(self, path: object) -> str | None:
        """`check_path(path, back)`, with only the name checked under the parent of the last
        path accepted: that parent's components passed, it is under a back path (so is every
        name in it), and a plain name adds nothing `check_path` refuses but the length."""
        if isinstance(path, str) and len(path) <= _PATH_MAX:
            parent, _, name = path.rpartition("/")
            if parent == self.passed_parent and _plain_name(name):
                return None
            reason = check_path(path, self.back_set)
            if reason is None and parent and is_under(parent, self.back_set):
                self.passed_parent = parent
            return reason
        return check_path(path, self.back_set)

    def entry(self, hdr: Any) -> bool:
        """Handle one header (and its data); False when the stream must be abandoned."""
        if not isinstance(hdr, dict):
            self.result.aborted = "sandbox sent a non-object header"
            return False
        path, kind = hdr.get("path"), hdr.get("type")
        size, mode, mtime = hdr.get("size"), hdr.get("mode"), hdr.get("mtime_ns")
        ints_ok = _uint(size) and _uint(mode) and _uint(mtime)
        if kind not in ("f", "d", "l", "o") or not ints_ok:
            self.result.aborted = f"sandbox sent a malformed header for {_safe_label(path)}"
            return False
        assert isinstance(size, int) and isinstance(mode, int) and isinstance(mtime, int)
        has_data = kind == "f" and not hdr.get("unchanged")
        over = self.over_budget(path, has_data, size)
        if over is not None:
            self.stop(over)
            return False
        if not self.admit(path, kind):
            return (not has_data or self.skip(path, size)) and self.result.stopped is None
        assert isinstance(path, str)
        if kind == "d":
            self.directory(path, mode)
            return self.result.stopped is None
        if not has_data:
            self.result.unchanged += 1
            was = self.record.entries.get(path)
            if was is not None:
                # seen unchanged in this sandbox: from now on it is this sandbox's file
                self.keep(path, was.size, was.mtime_ns, was.ref)
            return self.result.stopped is None
        return self.file(path, size, local_mode(mode), mtime) and self.result.stopped is None

    def admit(self, path: object, kind: str) -> bool:
        """Whether an entry may be written here (else it is refused with its reason); every
        entry is seen (what deletions are judged by)."""
        reason = self.judge(path)
        if reason is None and kind == "l":
            reason = "symlink (never followed or written)"
        if reason is None and kind == "o":
            reason = "not a regular file or directory (fifo, socket or device)"
        if self.keep_seen and isinstance(path, str) and len(path) <= _PATH_MAX:
            self.seen.paths[path] = kind if reason is None else REFUSED
        if reason is not None:
            self.reject(path, reason)
            return False
        return True

    def files(self, hdr: dict[str, Any]) -> bool:
        """A `files` frame: small files of one directory, their bytes after it one after the
        other; False when the stream must be abandoned. The frame is checked whole before a
        byte is read (at most `_BATCH_FILES` files, `_BATCH_BYTES` bytes), and each file is
        counted against the caps as its own header would be: only the bytes of the files
        within them are read."""
        assert self.s is not None
        rel, items = hdr.get("dir"), hdr.get("files")
        if not (
            isinstance(rel, str) and isinstance(items, list) and 0 < len(items) <= _BATCH_FILES
        ):
            self.result.aborted = f"sandbox sent a malformed files frame for {_safe_label(rel)}"
            return False
        total = 0
        for it in items:
            if not (isinstance(it, list) and len(it) == 4 and all(_uint(v) for v in it[1:])):
                self.result.aborted = f"sandbox sent a malformed files frame for {_safe_label(rel)}"
                return False
            total += it[1]
        if total > _BATCH_BYTES:
            self.result.aborted = (
                f"sandbox sent a files frame of {total} bytes (the limit is {_BATCH_BYTES})"
            )
            return False
        paths: list[object] = []
        take = 0
        for name, size, _, _ in items:
            path = rel + "/" + name if isinstance(name, str) else name
            over = self.over_budget(path, True, size)
            if over is not None:
                self.stop(over)
                break
            paths.append(path)
            take += size
        data = self.s.reader.exact(take)
        capped = self.result.stopped  # the files before a cap still come, as one by one
        at = 0
        for path, (_, size, mode, mtime) in zip(paths, items, strict=False):
            at += size
            if not self.admit(path, "f"):
                continue
            assert isinstance(path, str)
            got = self.parent_fd(path)
            if got is not None:
                self.put_data(path, got[0], got[1], data[at - size : at], local_mode(mode), mtime)
            if self.result.stopped is not capped:
                return False
        return len(paths) == len(items)

    def directory(self, path: str, mode: int) -> None:
        """Make the directory `path` (its sandbox `mode` filtered), or say why not."""
        try:
            self.tree.dir(path, 0o700 | (mode & 0o055))
        except HostileEntryError as exc:
            self.reject(path, str(exc))
        except OSError as exc:
            self.write_failed(path, exc)

    def parent_fd(self, path: str) -> tuple[int, str] | None:
        """The fd of `path`'s directory (made when missing) and its name, or None when it
        cannot be had (the file is then refused or failed)."""
        parent, _, name = path.rpartition("/")
        try:
            return self.tree.dir(parent), name
        except HostileEntryError as exc:
            self.reject(path, str(exc))
        except OSError as exc:
            self.write_failed(path, exc)
        return None

    def file(self, path: str, size: int, mode: int, mtime: int) -> bool:
        got = self.parent_fd(path)
        if got is None:
            return self.skip(path, size)
        pfd, name = got
        if size <= _SMALL:
            return self._small(path, pfd, name, size, mode, mtime)
        try:
            tmp, fd = self.create_temp(pfd, mode)
        except OSError as exc:
            self.write_failed(path, exc)
            return self.skip(path, size)
        h = hashlib.sha256()
        total = 0
        keep = False
        failed: OSError | None = None
        try:
            while True:
                chunk = self.next_chunk(total, size)
                if chunk is None:
                    self.reject(path, f"more than the announced {size} bytes")
                    self.result.aborted = f"{_safe_label(path)}: more data than announced"
                    return False
                if not chunk:
                    break
                total += len(chunk)
                if failed is not None:
                    continue  # keep the stream in step; the file is lost already
                h.update(chunk)
                try:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                except OSError as exc:
                    failed = exc
            if failed is not None:
                self.write_failed(path, failed)
                return True
            if total != size:
                self.reject(path, f"sent {total} of the announced {size} bytes")
                return True
            try:
                os.utime(fd, ns=(mtime, mtime))
            except OSError as exc:
                self.write_failed(path, exc)
                return True
            keep = True
            with self.lock:
                self.place(path, pfd, name, tmp, fd, size, mtime, h.hexdigest())
        finally:
            os.close(fd)
            if not keep and tmp:
                _unlink_quiet(tmp, pfd)
        return True

    def _small(self, path: str, pfd: int, name: str, size: int, mode: int, mtime: int) -> bool:
        """Receive a small file whole (bounded by its announced size), then write it (on the
        pool when there is one)."""
        chunk = self.next_chunk(0, size)
        data = b"" if chunk is None else chunk
        if chunk and len(chunk) < size:
            more = bytearray(chunk)
            while chunk:
                chunk = self.next_chunk(len(more), size)
                if chunk:
                    more += chunk
            data = bytes(more)
        elif chunk:
            chunk = self.next_chunk(size, size)  # the end of the file's data
        if chunk is None:
            self.reject(path, f"more than the announced {size} bytes")
            self.result.aborted = f"{_safe_label(path)}: more data than announced"
            return False
        if len(data) != size:
            self.reject(path, f"sent {len(data)} of the announced {size} bytes")
            return True
        self.put_data(path, pfd, name, data, mode, mtime)
        return True

    def put_data(self, path: str, pfd: int, name: str, data: bytes, mode: int, mtime: int) -> None:
        """Write a received small file, here or on the pool when there is one."""
        if self.threads == 0:
            self.write_data(path, pfd, name, data, mode, mtime)
            return
        try:
            own = os.dup(pfd)  # the tree may close its fd before the pool gets to it
        except OSError as exc:
            self.write_failed(path, exc)
            return
        self.slots.acquire()
        self.pool.submit(self._write_small, path, own, name, data, mode, mtime)

    def _write_small(
        self, path: str, pfd: int, name: str, data: bytes, mode: int, mtime: int
    ) -> None:
        try:
            self.write_data(path, pfd, name, data, mode, mtime)
        finally:
            os.close(pfd)
            self.slots.release()

    def write_data(
        self, path: str, pfd: int, name: str, data: bytes, mode: int, mtime: int
    ) -> None:
        """Write a received file's whole content into a temp file, then put it in place."""
        tmp = ""
        try:
            tmp, fd = self.create_temp(pfd, mode)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.utime(fd, ns=(mtime, mtime))
                sha = hashlib.sha256(data).hexdigest()
                with self.lock:
                    self.place(path, pfd, name, tmp, fd, len(data), mtime, sha)
                tmp = ""  # placed, or removed by `place`
            finally:
                os.close(fd)
        except OSError as exc:
            if tmp:
                _unlink_quiet(tmp, pfd)
            self.write_failed(path, exc)

    def create_temp(self, pfd: int, mode: int) -> tuple[str, int]:
        """A new file in `pfd` for a received file, created with `mode` through the umask
        (its final bits): unnamed ("", fd) where the filesystem allows, else a temp name."""
        if self.unnamed:
            try:
                return "", os.open(".", _UNNAMED, mode, dir_fd=pfd)
            except OSError as exc:
                if exc.errno not in _NO_UNNAMED:
                    raise
                self.unnamed = False  # not here: named temps for the rest of this pull
        return _create_temp(pfd, mode)

    def place(
        self, path: str, pfd: int, name: str, tmp: str, fd: int, size: int, mtime: int, sha: str
    ) -> None:
        """Put the received file (`fd`, unnamed when `tmp` is "") in place, or beside a
        locally changed file."""
        try:
            if not tmp:
                try:
                    # never replaces, never follows a link planted at `name`
                    os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=pfd)
                except FileExistsError:
                    # something is there: judged below, the file under a temp name meanwhile
                    tmp = _temp_name()
                    os.link(f"/proc/self/fd/{fd}", tmp, dst_dir_fd=pfd)
                else:
                    self.written(path, size, mtime, sha)
                    return
            self._place(path, pfd, name, tmp, size, mtime, sha)
        except OSError as exc:
            if tmp:
                _unlink_quiet(tmp, pfd)
            self.write_failed(path, exc)

    def _place(
        self, path: str, pfd: int, name: str, tmp: str, size: int, mtime: int, sha: str
    ) -> None:
        try:
            st: os.stat_result | None = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            _unlink_quiet(tmp, pfd)
            self.reject(path, "a local directory has that name")
            return
        if st is not None:
            local_sha = self._local_sha(pfd, name, st)
            was = self.record.entries.get(path)
            if local_sha == sha:
                _unlink_quiet(tmp, pfd)  # same content already here
                self.keep(path, size, mtime, sha)
                self.result.unchanged += 1
                return
            ours = was is not None and local_sha == was.ref
            if not ours:
                beside = name + CONFLICT_SUFFIX
                if len(beside.encode("utf-8", "surrogateescape")) > 255:
                    _unlink_quiet(tmp, pfd)
                    self.local_failed(
                        path,
                        "changed here, and the sandbox's copy cannot be kept beside it (the "
                        f"name with {CONFLICT_SUFFIX} is over 255 bytes); local file kept",
                    )
                    return
                os.replace(tmp, beside, src_dir_fd=pfd, dst_dir_fd=pfd)
                # recorded as the sandbox's version: reported once, not on every pull; no
                # source: the file in place is the user's, not one this pull brought
                self.new_record.put(path, size, mtime, sha)
                self.result.conflicts.append(path)
                return
        os.replace(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
        self.written(path, size, mtime, sha)

    def written(self, path: str, size: int, mtime: int, sha: str) -> None:
        """A file this pull put in place: recorded and counted."""
        self.keep(path, size, mtime, sha)
        self.result.files_written += 1
        self.result.bytes_written += size
        if len(self.result.written) < _LISTED:
            self.result.written.append(path)

    def _local_sha(self, pfd: int, name: str, st: os.stat_result) -> str | None:
        """Content hash of the local file (None for a symlink or anything not regular)."""
        if not stat.S_ISREG(st.st_mode):
            return None
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=pfd)
        except OSError:
            return None
        try:
            return hash_file(fd)
        finally:
            os.close(fd)


_NAMES = itertools.count()


def _draw_run() -> None:
    """The temp names' prefix, `.ukc-pull.PID.RANDOM`: drawn at import and in every forked
    child (the warm process's commands), not per file (a getpid and a urandom call per file
    are costly on large pulls)."""
    global _RUN
    _RUN = f"{_TMP}{os.getpid()}.{secrets.token_hex(6)}"


_RUN = ""
_draw_run()
os.register_at_fork(after_in_child=_draw_run)


def _temp_name() -> str:
    """`.ukc-pull.PID.RANDOM` and a count: the pid tells a later pull whether the writer is
    still alive."""
    return f"{_RUN}{next(_NAMES):x}"


def _create_temp(pfd: int, mode: int) -> tuple[str, int]:
    """A new temp file in `pfd`, created with `mode` through the umask (its final bits)."""
    tmp = _temp_name()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    return tmp, os.open(tmp, flags, mode, dir_fd=pfd)


def _sweep_dead_temps(dir_fd: int) -> None:
    """Remove temp files that a killed pull left in this directory (a live pull's stay)."""
    try:
        names = os.listdir(dir_fd)
    except OSError:
        return
    for name in names:
        if not name.startswith(_TMP):
            continue
        if writer_alive(name[len(_TMP) :].partition(".")[0]):
            continue  # names without a pid are an older ukc's: swept
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            _unlink_quiet(name, dir_fd)


def _unlink_quiet(name: str, dir_fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)


#: entries of the pull record per `have` frame
_HAVE_CHUNK = 2000


def _send_have(s: HelperSession, record: PullRecord) -> None:
    """What we last pulled, as the sandbox had it (unchanged remote files are not resent), in
    frames of `_HAVE_CHUNK` entries: never the whole record as one JSON text."""
    part: dict[str, list[int]] = {}
    for path, e in record.entries.items():
        part[path] = [e.size, e.mtime_ns]
        if len(part) >= _HAVE_CHUNK:
            s.send({"op": "have", "have": part})
            part = {}
    if part:
        s.send({"op": "have", "have": part})


def pull(
    shell: RemoteShell,
    opts: SyncOptions,
    *,
    instance_uuid: str = "",
    helper: bool | None = None,
) -> PullResult:
    """Bring the declared back paths home. Raises `SyncHaltedError` when the root is missing,
    `SyncStalledError` when the sandbox stalls or the pull outlives `opts.timeout_s`.

    `instance_uuid` names the sandbox read: with the boot id the sandbox reports, it is the
    source of what this pull brings; without it no remote deletion is ever mirrored.
    `helper`: True reads through the python helper, False through the sandbox's own find
    and tar (`tarpull`: an image without python3); None takes what `capability` recorded for
    the instance, else tries the helper and takes tar (and records it) when the sandbox
    cannot run python3.
    """
    back = opts.back_paths()
    for b in back:
        reason = check_path(b, back)
        if reason is not None:
            raise HostileEntryError(f"sync.back path {_safe_label(b)} refused: {reason}")
    # the records the scan and the push loaded are not needed here: freed before this pull's
    # own record and writes take their share (feeds and the keeper compare the index's file,
    # and the next scan reads it again if it must)
    journal.release(Path(opts.state_dir) / PULL_JOURNAL)
    tree = _Tree(Path(opts.local_root))
    try:
        if not back:
            return PullResult()
        known = recorded_tools(opts, instance_uuid) if helper is None else None
        if helper is True or (helper is None and known != "shell"):
            try:
                result = _pull_helper(shell, opts, tree, back, instance_uuid)
            except MissingToolError as exc:
                if helper is True or not is_missing_interpreter(exc, opts):
                    raise
                # learnt from the helper's own failure (as a push learns it): shell from now on
                record_tools(opts, instance_uuid, "shell")
            else:
                if helper is None:
                    record_tools(opts, instance_uuid, "python")
                return result
        # why here: tarpull builds on this module's judge and writer
        from reconciler.sync.tarpull import pull_tar

        return pull_tar(shell, opts, tree, back, instance_uuid)
    finally:
        tree.close()


def _pull_helper(
    shell: RemoteShell, opts: SyncOptions, tree: _Tree, back: tuple[str, ...], uuid: str
) -> PullResult:
    record = pull_record(opts)
    # read-only: a pull leaves nothing behind in the sandbox (not even the helper cache); the
    # one started while the command ran, if it did (`start_pull_ahead`)
    s, kept = HelperSession.for_pull(shell, opts)
    try:
        hello = _ask(s, opts, record, back)
    except (RemoteError, OSError):
        if not kept:
            raise
        # the helper started ahead is gone (the command ended it; `_ask` closed it): a new
        # one, whose failure says why if it fails too
        s = HelperSession(shell, opts, read_only=True)
        hello = _ask(s, opts, record, back)
    with s:
        boot = hello.get("boot_id") if isinstance(hello, dict) else None
        puller = _Puller(s, opts, tree, source_id(uuid, boot))
        try:
            while True:
                hdr = s.reader.frame(_HEADER_LIMIT)
                if isinstance(hdr, dict) and hdr.get("end") is True:
                    puller.seen.end = hdr
                    break
                if isinstance(hdr, dict) and "files" in hdr:
                    ok = puller.files(hdr)
                else:
                    ok = puller.entry(hdr)
                if not ok:
                    s.close(abort=True)
                    break
        except BaseException:
            # a stalled or broken stream: what was written is ours all the same
            puller.finish()
            _save_record(opts, puller.new_record)
            raise
        return _conclude(opts, tree, back, puller)


def _ask(s: HelperSession, opts: SyncOptions, record: PullRecord, back: tuple[str, ...]) -> Any:
    """Send the pull's requests (hello, what we have, the back paths); its hello's answer.
    The helper is ended if it does not answer."""
    try:
        s.hello(
            {
                "op": "hello",
                "root": opts.remote_root,
                "state_dir": opts.remote_state_dir,
                "boot_paths": list(opts.boot_id_paths),
                "uuid": "",
                "digest": "-",
            }
        )
        _send_have(s, record)
        s.send({"op": "pull", "back": list(back), "flush": True})
        s.flush()
        return s.read_hello(_HEADER_LIMIT)
    except BaseException:
        s.close(abort=True)
        raise


def _conclude(opts: SyncOptions, tree: _Tree, back: tuple[str, ...], puller: _Puller) -> PullResult:
    """After a pull's stream: wait for its writes, mirror deletions, save the record."""
    puller.finish()
    result = puller.result
    puller.seen.aborted = result.aborted
    puller.seen.stopped = result.stopped
    if opts.back_delete:
        # only now: the stream ended and every pooled write finished
        outcome = mirror_deletes(tree, back, puller.record, puller.new_record, puller.seen)
        result.deleted = outcome.deleted
        result.kept = outcome.kept
        result.deletes_skipped = outcome.skipped
    _save_record(opts, puller.new_record)
    return result


def _save_record(opts: SyncOptions, record: PullRecord) -> None:
    # no fsync (the journal's writes): a lost record makes the next pull compare contents
    # instead (safe)
    save_pull_record(opts.state_dir, record)
