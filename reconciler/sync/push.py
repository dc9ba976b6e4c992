"""Push: make the sandbox's copy of the session directory equal the local tree.

The result's counters prove a no-change push: `files_sent == 0`, `bytes_sent == 0`,
`remote_scanned is False`.

One helper process serves the whole push: hello (boot id + remote record) -> scan only when the
record cannot be trusted -> batched uploads -> deletes last (skipped after any error) -> type
swaps -> remote record -> local record. The remote record is dropped before the first change,
so an interrupted push forces a full scan next time instead of trusting a half-applied tree.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.errors import RemoteError, SyncError, SyncLimitError
from reconciler.sync import blockdigests
from reconciler.sync.blockdigests import BLOCK, block_count
from reconciler.sync.diff import TransferPlan, changes_of, diff_manifests
from reconciler.sync.ignore import IgnoreRules, is_under, load_rules
from reconciler.sync.manifest import (
    CHUNK,
    READ_FLAGS,
    Basis,
    Entry,
    Manifest,
    PushRecord,
    last_push_record,
    push_meta,
    scan_local,
    since_push,
)
from reconciler.sync.options import SyncOptions
from reconciler.sync.remote import HelperSession
from reconciler.transport.base import RemoteShell

__all__ = [
    "MAX_REMOTE_ONLY",
    "MAX_REMOTE_ONLY_CHARS",
    "DigestsAhead",
    "PushResult",
    "big_files",
    "greet",
    "push",
    "read_remote_scan",
    "ungreet",
]


@dataclass
class PushResult:
    """What one push did. `bytes_sent` counts file content bytes only."""

    files_sent: int
    bytes_sent: int
    deleted: int
    remote_scanned: bool
    boot_id: str
    digest: str
    plan: TransferPlan | None = None


#: a scan may name at most this many paths that are not in the local tree (and would be
#: deleted), with at most this many characters of path between them. why: the sandbox
#: decides what a scan holds; what we keep of it must not grow with what it claims. Paths in
#: the local tree and excluded ones are bounded by the local tree, or not kept.
MAX_REMOTE_ONLY = 1_000_000
MAX_REMOTE_ONLY_CHARS = 64 << 20
#: one shared entry per type for remote-only paths: deleting them needs only the path and type
_REMOTE_ONLY = {t: Entry(t, 0, 0, 0, "") for t in ("f", "d", "l", "o")}


class RemoteScan:
    """A remote scan's entries, checked and kept with bounded memory whatever the sandbox
    sends: a path of the local tree keeps one entry however often it is repeated, excluded
    paths are dropped, and other paths (deletion candidates) stop at `MAX_REMOTE_ONLY` /
    `MAX_REMOTE_ONLY_CHARS`. The helper's frames and the shell path's `find` output both
    end here."""

    def __init__(self, local: Manifest, rules: IgnoreRules, opts: SyncOptions) -> None:
        self._mine = local.entries
        self._rules = rules
        self._opts = opts
        self.entries: dict[str, Entry] = {}
        self._others = 0
        self._chars = 0

    def add(self, path: str, kind: str, size: int, mtime_ns: int, mode: int, ref: str) -> None:
        entries = self.entries
        if path in self._mine:
            entries[path] = Entry(kind, size, mtime_ns, mode, ref)
            return
        if path in entries or not self._rules.deletable(path, kind == "d"):
            return
        self._others += 1
        self._chars += len(path)
        if self._others > MAX_REMOTE_ONLY or self._chars > MAX_REMOTE_ONLY_CHARS:
            raise SyncLimitError(
                f"push to {self._opts.remote_root}: the sandbox lists {self._others} paths "
                f"({self._chars} characters) that are not in the local tree, more than a push "
                f"may delete ({MAX_REMOTE_ONLY} paths, {MAX_REMOTE_ONLY_CHARS} characters); "
                "stopped before any change (exclude them with sync.exclude or .ukcignore)"
            )
        entries[path] = _REMOTE_ONLY[kind]


def read_remote_scan(s: HelperSession, local: Manifest, rules: IgnoreRules) -> Manifest:
    """The sandbox's tree from the helper's streamed scan, checked entry by entry
    (`RemoteScan` bounds what is kept)."""
    kept = RemoteScan(local, rules, s.opts)
    while True:
        frame = s.reader.frame()
        batch = frame.get("scan") if isinstance(frame, dict) else None
        if not isinstance(batch, list):
            if isinstance(frame, dict) and frame.get("scan_end") is True:
                return Manifest(kept.entries)
            raise RemoteError(f"sync helper sent a malformed scan frame ({len(kept.entries)} read)")
        for item in batch:
            ok = (
                isinstance(item, list)
                and len(item) == 6
                and isinstance(item[0], str)
                and item[0]
                and item[1] in _REMOTE_ONLY
                and all(type(v) is int for v in item[2:5])
                and isinstance(item[5], str)
            )
            if not ok:
                raise RemoteError(
                    f"sync helper sent a malformed scan entry ({len(kept.entries)} read)"
                )
            kept.add(item[0], item[1], item[2], item[3], item[4], item[5])


#: files at least this big that the remote already has are sent as changed blocks only
DELTA_MIN = 1 << 20
#: files up to this size go in batches: one `puts` frame names up to `BATCH_FILES` files of
#: up to `BATCH_BYTES` together, their contents follow. why: at 100,000 small files a frame,
#: a JSON encode and decode and two fstat calls per file were most of an initial push
BATCH_FILE = 256 << 10
BATCH_FILES = 512
BATCH_BYTES = 1 << 20


def big_files(local: Manifest) -> list[tuple[str, int, int]]:
    """The files of `local` a first push digests while it sends them: path, size, mtime."""
    return [
        (path, e.size, e.mtime_ns)
        for path, e in local.entries.items()
        if e.type == "f" and e.size >= DELTA_MIN
    ]


class DigestsAhead:
    """Block digests of big files computed ahead of their push (`make`), by (file path, size,
    mtime_ns): a push that sends such a file whole takes them (`take`) instead of digesting
    what it sends. One per apply: made while its sandboxes boot, taken by its pushes (threads
    of their own, hence the lock)."""

    def __init__(self) -> None:
        self._got: dict[tuple[str, int, int], bytes] = {}
        self._lock = threading.Lock()

    def make(
        self,
        trees: Iterable[tuple[Path, Iterable[tuple[str, int, int]]]],
        stop: Callable[[], bool],
    ) -> None:
        """The block digests the next pushes from these roots compute while they send these
        files whole, now (while the sandboxes boot and this side waits). What an earlier call
        left is dropped. A file that is not the scanned one is skipped; `stop()` is asked
        between blocks (once the pushes may begin, they digest the rest themselves, as
        without this)."""
        with self._lock:
            self._got.clear()
        for root, files in trees:
            self._digest_tree(os.path.join(root, ""), files, stop)

    def take(self, file: str, size: int, mtime_ns: int) -> bytes | None:
        with self._lock:
            return self._got.pop((file, size, mtime_ns), None)

    def files(self) -> list[tuple[str, int, int]]:
        """What is held now: (file path, size, mtime_ns) each."""
        with self._lock:
            return list(self._got)

    def _digest_tree(
        self, prefix: str, files: Iterable[tuple[str, int, int]], stop: Callable[[], bool]
    ) -> None:
        for path, size, mtime_ns in files:
            try:
                fd = os.open(prefix + path, READ_FLAGS)
            except OSError:
                continue
            try:
                if not _scanned(fd, size, mtime_ns):
                    continue
                got = blockdigests.digests_until(fd, size, stop)
                if got is None:
                    return
                if _scanned(fd, size, mtime_ns):
                    with self._lock:
                        self._got[(prefix + path, size, mtime_ns)] = got
            except OSError:
                continue
            finally:
                os.close(fd)


def _scanned(fd: int, size: int, mtime_ns: int) -> bool:
    st = os.fstat(fd)
    return stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (size, mtime_ns)


#: block digests of remote files read after the small files went out only up to this many
#: bytes (well inside an SSH channel's window: the helper must never block writing them)
_DEFERRED_DIGESTS = 256 << 10


class _Sender:
    """Streams the plan's operations into one helper session."""

    def __init__(
        self,
        session: HelperSession,
        local: Manifest,
        root: Path,
        previous: Manifest,
        state_dir: Path,
        ahead: DigestsAhead | None = None,
    ) -> None:
        self.s = session
        self.ahead = ahead
        self.local = local
        self.root = root
        #: joined by string concatenation (a `Path` join per file cost more than its read)
        self.prefix = os.path.join(root, "")
        self.previous = previous
        self.files = 0
        self.bytes = 0
        self.errors: list[str] = []
        #: path -> the remote file's 8-byte block digests, concatenated
        self.remote_blocks: dict[str, bytes] = {}
        #: block digests asked for and not read yet (path, most blocks), and ours meanwhile
        self.awaiting: list[tuple[str, int]] = []
        self.local_blocks: dict[str, bytes] = {}
        #: content sha256 -> block digests: remembered from earlier pushes (`blockdigests`,
        #: read once this push sends a big file), and learned in this one (sent intact)
        self.state_dir = state_dir
        self.known: dict[str, bytes] | None = None
        self.learned: dict[str, bytes] = {}
        #: paths whose remote digests are remembered ones, not the sandbox's answer; and those
        #: sent as patches on that belief, which the helper may ask for again (`settle`)
        self.remembered: set[str] = set()
        self.redo_ok: set[str] = set()
        #: small files waiting for their batch, and their bytes
        self.batch: list[tuple[str, Entry]] = []
        self.batch_bytes = 0

    def prepare_delta(self, paths: tuple[str, ...]) -> None:
        """Ask (one request) for the block digests of big files the remote already has.

        The answer is read when first needed (`await_blocks`): meanwhile this side digests its
        own copies and the small files go out, instead of both sides waiting in turn. Only
        while the answer fits in the channel's window (`_DEFERRED_DIGESTS`): a helper blocked
        writing it would stop reading what we send."""
        wanted: list[tuple[str, int]] = []
        entries, previous = self.local.entries, self.previous.entries
        for path in paths:
            mine = entries[path]
            if mine.size < DELTA_MIN or mine.type != "f":
                continue  # most files, looked at first: one lookup each
            if self.known is None:
                self.known = blockdigests.load(self.state_dir)
            theirs = previous.get(path)
            if theirs is None or theirs.type != "f":
                continue
            known = self.known.get(theirs.ref) if theirs.ref else None
            if known is not None and len(known) == 8 * block_count(theirs.size):
                self.remote_blocks[path] = known
                self.remembered.add(path)
            else:
                wanted.append((path, block_count(mine.size)))
        if not wanted:
            return
        self.s.send(
            {
                "op": "blocks",
                "paths": [p for p, _ in wanted],
                "max": [n for _, n in wanted],
                "bs": BLOCK,
                "flush": True,
            }
        )
        self.s.flush()
        self.awaiting = wanted
        if 8 * sum(n for _, n in wanted) > _DEFERRED_DIGESTS:
            self.await_blocks()
            return
        for path, _ in wanted:
            digests = self._local_digests(path)
            if digests is not None:
                self.local_blocks[path] = digests

    def await_blocks(self) -> None:
        """Read the block digests asked for (before anything else is read from the helper)."""
        wanted, self.awaiting = self.awaiting, []
        for path, most in wanted:
            head = self.s.reader.frame(1 << 10)
            n = head.get("n") if isinstance(head, dict) else None
            if type(n) is not int or not -1 <= n <= most:
                raise RemoteError(f"sync helper sent a malformed block list for {path}")
            if n >= 0:
                # raw digests: bounded by what we asked for, never parsed into objects
                self.remote_blocks[path] = self.s.reader.exact(8 * n)

    def _local_digests(self, path: str) -> bytes | None:
        """The block digests of our copy while it is still the scanned one, else None (then
        `_put` digests what it reads)."""
        e = self.local.entries[path]
        try:
            fd = os.open(self.prefix + path, READ_FLAGS)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns) != (
                e.size,
                e.mtime_ns,
            ):
                return None
            return blockdigests.digests(fd, e.size)
        except OSError:
            return None
        finally:
            os.close(fd)

    def alone(self, path: str) -> bool:
        """Whether `upload` sends this path's file alone (whole or as changed blocks), not in
        a batch of small files (files with remote block digests are bigger than a batch's)."""
        e = self.local.entries[path]
        return e.type == "f" and e.size > BATCH_FILE

    def upload(self, path: str) -> None:
        e = self.local.entries[path]
        if e.type == "f" and e.size <= BATCH_FILE and path not in self.remote_blocks:
            self.batch.append((path, e))
            self.batch_bytes += e.size
            if len(self.batch) >= BATCH_FILES or self.batch_bytes >= BATCH_BYTES:
                self.send_batch()
            return
        self.send_batch()  # the helper applies operations in the order they were planned
        if e.type == "d":
            self.s.send({"op": "mkdir", "path": path, "mode": e.mode})
        elif e.type == "l":
            self.s.send({"op": "link", "path": path, "target": e.ref})
        else:
            self._put(path, e)

    def meta(self, path: str) -> None:
        self.send_batch()
        e = self.local.entries[path]
        self.s.send({"op": "meta", "path": path, "mode": e.mode, "mtime_ns": e.mtime_ns})

    def send_batch(self) -> None:
        """Send the waiting small files: one `puts` frame naming each one's path, size, mode
        and mtime, then per file its bytes and a trailer byte (1 = commit, 0 = discard)."""
        if not self.batch:
            return
        heads: list[list[Any]] = []
        parts: list[bytes] = []
        # why a directory fd: an open by name in it skips the walk of every path component
        # (~0.35 us of ~9 a file here); one per directory of the batch (the paths come sorted)
        at, dfd = None, -1
        try:
            for path, e in self.batch:
                parent, _, name = path.rpartition("/")
                if parent != at:
                    if dfd >= 0:
                        os.close(dfd)
                    at, dfd = parent, self._open_dir(parent)
                data = self._read_small(path, e, dfd, name)
                if data is None:
                    continue  # could not open it: the error is noted, the helper never hears of it
                heads.append([path, e.size, e.mode, e.mtime_ns])
                if len(data) == e.size:
                    parts += (data, b"\x01")
                    self.files += 1
                    self.bytes += e.size
                else:
                    # changed since the scan: keep the stream in step, tell the helper to discard
                    parts += (bytes(e.size), b"\x00")
                    self.errors.append(f"{path}: changed while it was being sent")
        finally:
            if dfd >= 0:
                os.close(dfd)
        self.batch = []
        self.batch_bytes = 0
        if heads:
            self.s.send({"op": "puts", "files": heads})
            self.s.send_raw(b"".join(parts))

    def _open_dir(self, parent: str) -> int:
        """An fd of the tree's directory `parent`, or -1 (its files are then opened by path,
        which notes why they cannot be)."""
        try:
            return os.open(self.prefix + parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return -1

    def _read_small(self, path: str, e: Entry, dfd: int = -1, name: str = "") -> bytes | None:
        """The file's bytes if it is still the scanned one (short bytes when it is not), or
        None when it cannot be opened (error noted). `name` in directory `dfd` is `path`.

        One read and one fstat after it: a write before or during the read moves the mtime
        that fstat then sees (a write after it does not matter: the bytes are read)."""
        try:
            if dfd >= 0:
                fd = os.open(name, READ_FLAGS, dir_fd=dfd)
            else:
                fd = os.open(self.prefix + path, READ_FLAGS)
        except OSError as exc:
            self.errors.append(f"{path}: {exc.strerror or 'cannot open'}")
            return None
        try:
            data = os.read(fd, e.size + 1)  # one more: a file that grew is not the scanned one
            st = os.fstat(fd)
        except OSError:
            return b""  # not readable as a file (a directory now): changed
        finally:
            os.close(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size == e.size and st.st_mtime_ns == e.mtime_ns:
            return data
        return b""

    def _put(self, path: str, e: Entry) -> None:
        try:
            fd = os.open(self.prefix + path, READ_FLAGS)
        except OSError as exc:
            self.errors.append(f"{path}: {exc.strerror or 'cannot open'}")
            return
        try:
            st = os.fstat(fd)
            intact = (
                stat.S_ISREG(st.st_mode) and st.st_size == e.size and st.st_mtime_ns == e.mtime_ns
            )
            self.await_blocks()
            remote = self.remote_blocks.get(path)
            blocks = None
            mine = None
            if intact and remote is not None:
                mine = self.local_blocks.pop(path, None)
                if mine is None:
                    mine = blockdigests.digests(fd, e.size)
                blocks = self._changed_blocks(mine, e, remote)
            digester = None
            header: dict[str, Any]
            if blocks is not None:
                header = {"op": "patch", "bs": BLOCK, "send": blocks, "sha256": e.ref}
                spans = [(i * BLOCK, min(BLOCK, e.size - i * BLOCK)) for i in blocks]
                if path in self.remembered:
                    # the helper checks the belief (size, mtime, then the result's sha256)
                    # and asks again instead of failing when it does not hold
                    theirs = self.previous.entries[path]
                    header.update(base=[theirs.size, theirs.mtime_ns], redo=True)
                    self.redo_ok.add(path)
            else:
                header = {"op": "put"}
                spans = [(0, e.size)]
                if e.size >= DELTA_MIN and mine is None:
                    # for the next edit of this file: digested while the sandbox booted, else
                    # as it is sent
                    if intact and self.ahead is not None:
                        mine = self.ahead.take(self.prefix + path, e.size, e.mtime_ns)
                    if mine is None:
                        digester = blockdigests.Digester()
            header.update(path=path, size=e.size, mode=e.mode, mtime_ns=e.mtime_ns)
            self.s.send(header)
            sent = 0
            z = None  # deflated or not: the first part's sample decides for the whole file
            for offset, length in spans:
                while length:
                    n = min(CHUNK, length)
                    chunk = os.pread(fd, n, offset) if intact else b""
                    if len(chunk) != n:
                        # changed under us: keep the stream in step, then tell the helper to discard
                        intact = False
                        chunk = bytes(n)
                    elif digester is not None:
                        digester.feed(chunk)
                    z = self.s.send_raw(chunk, z)
                    offset += n
                    length -= n
                    sent += n
            if intact:
                after = os.fstat(fd)
                intact = after.st_mtime_ns == e.mtime_ns and after.st_size == e.size
            self.s.send_raw(b"\x01" if intact else b"\x00")
        finally:
            os.close(fd)
        if intact:
            self.files += 1
            self.bytes += sent
            learned = digester.result() if digester is not None else mine
            if learned is not None and e.ref:
                self.learned[e.ref] = learned
        else:
            self.errors.append(f"{path}: changed while it was being sent")

    @staticmethod
    def _changed_blocks(mine: bytes, e: Entry, remote: bytes | None) -> list[int] | None:
        """Indices of the blocks to send, or None when a whole upload is cheaper."""
        if remote is None:
            return None
        changed = [
            i
            for i in range((e.size + BLOCK - 1) // BLOCK)
            if mine[i * 8 : i * 8 + 8] != remote[i * 8 : i * 8 + 8]
        ]
        if len(changed) * BLOCK * 2 > e.size:
            return None
        return changed

    def barrier(self) -> list[str]:
        """Wait for the helper to apply everything so far; all errors (ours and its)."""
        self.send_batch()
        self.await_blocks()
        reply = self.settle({"op": "sync"})
        remote = [str(x) for x in reply.get("errors", [])][:50]
        return self.errors + remote

    def settle(self, req: dict[str, Any], meanwhile: Callable[[], None] | None = None) -> Any:
        """`req`'s answer once everything sent has landed: files the helper could not patch
        from remembered digests (the sandbox's copy was not the one we remember) are sent
        whole and `req` asked again. Each such file at most once, and only files that were
        sent so: what the sandbox names is checked, never followed. `meanwhile` runs while
        the first answer is awaited."""
        while True:
            reply = self.s.call(req, meanwhile=meanwhile)
            meanwhile = None
            redo = reply.get("redo") if isinstance(reply, dict) else None
            if not redo or reply.get("errors") or self.errors:
                return reply  # errors (a resent file that changed meanwhile too): the caller stops
            if not isinstance(redo, list) or not all(
                isinstance(p, str) and p in self.redo_ok for p in redo
            ):
                raise RemoteError(
                    f"sync helper asks again for {len(redo) if isinstance(redo, list) else '?'} "
                    "files that were not sent as patches from remembered digests"
                )
            for path in redo:
                self.redo_ok.discard(path)
                self.remembered.discard(path)
                self.remote_blocks.pop(path, None)
                self._put(path, self.local.entries[path])


def push(
    shell: RemoteShell,
    opts: SyncOptions,
    *,
    instance_uuid: str,
    local: Manifest | None = None,
    rules: IgnoreRules | None = None,
    ahead: DigestsAhead | None = None,
) -> PushResult:
    """Sync the local tree to the sandbox. Raises `SyncHaltedError` (guards) or `SyncError`.
    `ahead`: big files' block digests made ahead of this push (it takes those it uses)."""
    rules = rules if rules is not None else load_rules(opts)
    if not Path(opts.local_root).is_dir():
        scan_local(opts, rules)  # raises the missing-root guard before any remote contact
    s, kept = HelperSession.for_push(shell, opts)
    try:
        hello: Any = None
        if not (kept and s.greeted):
            _send_hello(s, opts, instance_uuid)
        s.greeted = False  # the answer read next is this push's
        if kept:
            try:
                hello = s.read_hello(1 << 16)
            except (RemoteError, OSError):
                # the kept helper is gone (its channel closed while idle): start one
                s.close(abort=True)
                s, kept = HelperSession(shell, opts), False
                _send_hello(s, opts, instance_uuid)
        # a new helper's interpreter starts (tens of ms over TLS-SSH) while we scan the local
        # tree and read our last record; freshness is judged here after
        if local is None:
            local = scan_local(opts, rules)
        last = push_meta(opts)
        if hello is None:
            hello = s.read_hello(1 << 16)
        result, record = _push(s, opts, rules, local, last, hello, instance_uuid, ahead)
    except BaseException:
        s.close(abort=True)
        raise
    s.park()
    if record is not None:
        record.write()
    return result


def greet(shell: RemoteShell, opts: SyncOptions, instance_uuid: str) -> bool:
    """Say hello ahead of a push over `shell` to the helper the last push left there (a
    watch's pass does it when it starts, under the status lock: the answer's round trip then
    overlaps the pass's observation). True: the caller must `ungreet(shell)` once the pass's
    pushes are done (it reads an answer no push read)."""
    return HelperSession.greet(shell, opts, _hello(opts, instance_uuid))


def ungreet(shell: RemoteShell) -> None:
    HelperSession.ungreet(shell)


def _hello(opts: SyncOptions, instance_uuid: str) -> dict[str, Any]:
    return {
        "op": "hello",
        "root": opts.remote_root,
        "state_dir": opts.remote_state_dir,
        "boot_paths": list(opts.boot_id_paths),
        "uuid": instance_uuid,
        "digest": "-",
        "threads": opts.write_threads,
        "flush": True,
    }


def _send_hello(s: HelperSession, opts: SyncOptions, instance_uuid: str) -> None:
    s.hello(_hello(opts, instance_uuid))
    s.flush()


def _push(
    s: HelperSession,
    opts: SyncOptions,
    rules: IgnoreRules,
    local: Manifest,
    last: dict[str, Any] | None,
    hello: Any,
    instance_uuid: str,
    ahead: DigestsAhead | None = None,
) -> tuple[PushResult, PushRecord | None]:
    """The push after hello: (result, the record to write now that the sandbox holds the
    tree; None when our record already describes it)."""
    if not isinstance(hello, dict):
        raise RemoteError("sync helper answered hello with a non-object frame")
    boot_id = str(hello.get("boot_id", ""))[:128]

    def scan(want: dict[str, list[int]]) -> Manifest:
        s.send({"op": "scan", "want": want, "flush": True})
        s.flush()
        return read_remote_scan(s, local, rules)

    previous, plan, delta, scanned = judge(
        opts,
        rules,
        local,
        last,
        hello.get("record"),
        boot_id,
        instance_uuid,
        scan,
        remote_empty=hello.get("empty") is True,
    )
    result = PushResult(0, 0, 0, scanned, boot_id, local.digest, plan)
    if plan.empty and not scanned:
        return result, None  # our record already describes this tree
    record = PushRecord(opts, local, instance_uuid, boot_id, delta=delta)
    try:
        result.deleted = _apply(
            s, plan, local, previous, opts, rules, instance_uuid, boot_id, result, ahead, record
        )
    except BaseException:
        record.discard()
        raise
    return result, record


def judge(
    opts: SyncOptions,
    rules: IgnoreRules,
    local: Manifest,
    last: dict[str, Any] | None,
    record: Any,
    boot_id: str,
    instance_uuid: str,
    scan: Callable[[dict[str, list[int]]], Manifest],
    *,
    remote_empty: bool = False,
) -> tuple[Manifest, TransferPlan, Basis | None, bool]:
    """What the remote holds and the plan to make it `local`: (previous, plan, the state the
    push record takes a delta from (None: written whole), whether the remote was scanned).
    The remote's `record` (what it says our last push left, in this boot) is trusted when it
    matches our own; otherwise `scan` (given the local files' sizes and mtimes: equal remote
    ones are hashed) is called, unless the remote said its root is empty (`remote_empty`),
    which is what a scan would list. Trusted, only what changed since our last push is
    compared when the scans since tell it (`since_push`). Both sync paths decide here."""
    fresh = last is not None and _record_matches(
        record, boot_id, instance_uuid, last["digest"], opts
    )
    if not fresh:
        if remote_empty:
            # a first push: no sizes and mtimes of every file sent (4 MB of JSON and ~15 MB
            # of lists at 100,000 files) for a walk of nothing. Said by the sandbox, like a
            # scan: a sandbox that lies only keeps files of its own, as a lying scan could
            previous, why = Manifest({}), "remote root empty (no trusted remote record)"
        else:
            want = {p: [e.size, e.mtime_ns] for p, e in local.entries.items() if e.type == "f"}
            previous, why = scan(want), "remote scanned (no trusted remote record)"
        return previous, diff_manifests(local, previous, rules, reason=why), None, True
    assert last is not None
    reason = "remote record matches our last push"
    if (last["digest"], last["mtimes"]) == local.key:
        return local, TransferPlan(reason=reason), None, False
    basis = since_push(opts, local, last)
    if basis is not None:
        # only the paths that changed since our last push (as the index's scans found them)
        previous, plan = changes_of(local, basis, rules, reason=reason)
        return previous, plan, basis, False
    pushed = last_push_record(opts)
    if pushed is None:
        raise SyncError(f"push to {opts.remote_root}: our push record vanished")
    previous = pushed[0]
    return previous, diff_manifests(local, previous, rules, reason=reason), None, False


def _record_matches(
    rec: Any, boot_id: str, instance_uuid: str, digest: object, opts: SyncOptions
) -> bool:
    """True when the sandbox's record is the one our last push wrote, in this very boot."""
    return (
        isinstance(rec, dict)
        and bool(boot_id)
        and bool(digest)
        and rec.get("boot_id") == boot_id
        and rec.get("uuid") == instance_uuid
        and rec.get("digest") == digest
        and rec.get("root") == opts.remote_root
    )


def _apply(
    s: HelperSession,
    plan: TransferPlan,
    local: Manifest,
    previous: Manifest,
    opts: SyncOptions,
    rules: IgnoreRules,
    instance_uuid: str,
    boot_id: str,
    result: PushResult,
    ahead: DigestsAhead | None = None,
    ours: PushRecord | None = None,
) -> int:
    root = Path(opts.local_root)
    sender = _Sender(s, local, root, previous, Path(opts.state_dir), ahead)
    sender.prepare_delta(plan.uploads)
    s.send({"op": "unrecord"})
    replaced = frozenset(plan.replaces)
    # paths under a type swap wait for its removal (no swap: every upload goes now)
    now = [p for p in plan.uploads if not is_under(p, replaced)] if replaced else plan.uploads
    # files sent alone (big ones) go after the rest: the sandbox's slow part, creating the
    # small files one by one, then starts at once and goes on while the big files' bytes
    # (the transport's slow part) follow; big files first left the two taking turns. Safe:
    # no directory, link or file of the plan depends on a file being there before it
    later = []
    for path in now:
        if sender.alone(path):
            later.append(path)
        else:
            sender.upload(path)
    for path in later:
        sender.upload(path)
    for path in plan.metas:
        sender.meta(path)
    deleted = 0
    if plan.deletes or plan.replaces:
        # the barrier: no delete unless every upload so far landed
        errors = sender.barrier()
        result.files_sent, result.bytes_sent = sender.files, sender.bytes
        if errors:
            raise SyncError(
                f"push to {opts.remote_root}: {len(errors)} errors ({errors[0]}); "
                f"{len(plan.deletes)} deletes skipped"
            )
        protect = list(rules.back)
        if plan.deletes:
            reply = s.call({"op": "remove", "paths": list(plan.deletes), "protect": protect})
            deleted += int(reply.get("removed", 0))
        if plan.replaces:
            # deepest first: a swapped path under another swapped path goes before its parent
            order = sorted(plan.replaces, key=lambda p: (-p.count("/"), p))
            reply = s.call({"op": "remove", "paths": order, "protect": protect, "strict": True})
            deleted += int(reply.get("removed", 0))
            for path in plan.uploads:
                if is_under(path, replaced):
                    sender.upload(path)
    sender.send_batch()
    # the record names the tree, not its entries: the sandbox never needs our manifest
    record = {"version": 2, "boot_id": boot_id, "uuid": instance_uuid, "digest": local.digest}
    sender.await_blocks()
    # one round trip: the helper records the new manifest only if it saw no error
    # our record's bytes are written while the helper drains (installed only once it said
    # it recorded: a push that fails leaves our last record as it was)
    stage = ours.stage if ours is not None and not sender.errors else None
    reply = sender.settle({"op": "finish", "record": None if sender.errors else record}, stage)
    errors = sender.errors + [str(x) for x in reply.get("errors", [])][:50]
    result.files_sent, result.bytes_sent = sender.files, sender.bytes
    if errors or reply.get("recorded") is not True:
        first = errors[0] if errors else "manifest not recorded"
        raise SyncError(f"push to {opts.remote_root}: {len(errors)} errors ({first})")
    if sender.known is not None:  # a big file was sent: remember its digests
        keep = (e.ref for e in local.entries.values() if e.type == "f" and e.size >= DELTA_MIN)
        blockdigests.save(Path(opts.state_dir), sender.known, sender.learned, keep)
    return deleted
