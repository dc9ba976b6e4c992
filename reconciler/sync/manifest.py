"""The local manifest: what the local tree holds, scanned against an index so that unchanged
files are never re-hashed and an unchanged tree costs one stat per path.

It covers the local root minus what the ignore rules exclude. An entry is
`(type, size, mtime_ns, mode, ref)` with type "f" (regular file, ref = sha256 hex), "d"
(directory, ref = "") or "l" (symlink, ref = the link target, never followed). Sockets, fifos
and devices are not synced. The digest covers paths, types, sizes, modes and refs but not
mtimes, so it identifies content, and the remote can hold the same digest for the same tree;
`mtimes` covers the files' mtimes. Both are sums of per-entry hashes (`entry`), so a scan
moves them by what changed.

The index (`index.jnl`, a `journal`) is the last scan: every entry, each file's inode, and
the digests, counts and bytes of that state. A file whose inode, size and mtime match its
index entry keeps the entry (and its sha256); a scan that finds nothing changed writes
nothing, and one that finds a change appends it. The push record (`push.jnl`) is the manifest
of our last push with the same metadata: when it equals the index a scan started from, what
to push is exactly what the scan found changed (`Manifest.basis`). It also names the index
position it pushed: after scans that no push followed, the index lines since that position
(each keeps the entries it replaced) tell the same (`since_push`).
"""

from __future__ import annotations

import functools
import hashlib
import operator
import os
import stat
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from reconciler._util.gcpause import gc_paused
from reconciler.errors import SyncHaltedError
from reconciler.sync import hasher, journal
from reconciler.sync.entry import (
    DIGEST_MOD,
    SHARED_INTS,
    Entry,
    content_hash,
    hash_sums,
)
from reconciler.sync.feed import ChangeFeed, feed_for
from reconciler.sync.ignore import IGNORE_FILE, IgnoreRules, load_rules
from reconciler.sync.options import SyncOptions
from reconciler.sync.records import INDEX, PUSH_RECORD, drop_legacy

__all__ = [
    "CHUNK",
    "READ_FLAGS",
    "Basis",
    "Entry",
    "Manifest",
    "PushRecord",
    "halt_in_sight",
    "hash_file",
    "last_push_record",
    "push_meta",
    "record_push",
    "scan_local",
    "since_push",
]

#: read/write chunk size everywhere in the engine (the issue caps it at 1 MiB)
CHUNK = 1 << 20

#: how the scan and both pushes open a local file to read it. O_NONBLOCK: a fifo put in a
#: file's place after it was listed would block the open until some writer came; with it the
#: open returns, and the fstat that follows refuses anything but a regular file
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK

#: a tuple of the five fields as an `Entry`, without a Python frame (a scan makes one per file)
_new_entry: Callable[[tuple[str, int, int, int, str]], Entry] = functools.partial(
    tuple.__new__, Entry
)
_SHARED = SHARED_INTS.get
_NAME = operator.attrgetter("name")
#: new files listed per batch a full walk hashes (here or in its `hasher`); batches the
#: hasher may hold at once (more: the walk hashes the batch itself)
_BATCH = 256
_AHEAD = 2
#: new files a full walk lists before it starts a hasher. why: its start and the batches'
#: round trips cost more than they save on a small tree (the 2k tree's initial apply was
#: ~0.08 s slower with it, the 100k tree's ~1.3 s faster)
HASHER_FROM = 4096

#: what a state's metadata holds besides what a push adds
_META_KEYS = ("digest", "mtimes", "files", "bytes")


@dataclass(frozen=True)
class Basis:
    """The index state a scan started from (its `(digest, mtimes)`) and the entries there of
    the paths the scan found changed (None: the path was not there)."""

    key: tuple[str, str]
    old: Mapping[str, Entry | None]


@dataclass(frozen=True)
class Manifest:
    """A tree: relative "/"-separated path -> `Entry` (the root itself is not an entry).

    `entries` is never modified once a manifest holds it (records share it)."""

    entries: Mapping[str, Entry] = field(default_factory=dict)
    basis: Basis | None = field(default=None, compare=False, repr=False)
    #: the index's position (inode, length) whose state these entries are, when a scan made
    #: them: a push record names it, and a later scan tells what changed since from the
    #: index's lines after it (`since_push`)
    at: list[int] | None = field(default=None, compare=False, repr=False)

    @cached_property
    def digest(self) -> str:
        return self._sums[0]

    def digest_of(self, paths: Iterable[str]) -> str:
        """The digest of the part of the tree at `paths` (each one an entry)."""
        entries = self.entries
        return _hex(sum(content_hash(p, entries[p]) for p in paths))

    @cached_property
    def mtimes(self) -> str:
        return self._sums[1]

    @cached_property
    def _sums(self) -> tuple[str, str]:
        """Both digests of the whole tree, from one pass (each is asked for with the other),
        which counts the files and their bytes on the way."""
        digest, mtimes, files, size = hash_sums(self.entries.items())
        self.__dict__.setdefault("file_count", files)
        self.__dict__.setdefault("total_bytes", size)
        return _hex(digest), _hex(mtimes)

    @cached_property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries.values() if e.type == "f")

    @cached_property
    def file_count(self) -> int:
        return sum(1 for e in self.entries.values() if e.type == "f")

    @property
    def key(self) -> tuple[str, str]:
        """What a record must match for a push of this tree to have nothing to do."""
        return (self.digest, self.mtimes)

    def meta(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "mtimes": self.mtimes,
            "files": self.file_count,
            "bytes": self.total_bytes,
        }

    def _preset(self, meta: Mapping[str, Any]) -> None:
        """Take digests and counts a record vouches for (they are cached properties)."""
        self.__dict__.update(
            digest=meta["digest"],
            mtimes=meta["mtimes"],
            file_count=meta["files"],
            total_bytes=meta["bytes"],
        )

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.entries))

    def to_json(self) -> dict[str, list[Any]]:
        return {p: list(e) for p, e in self.entries.items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        entries: dict[str, Entry] = {}
        for path, raw in data.items():
            t, size, mtime_ns, mode, ref = raw
            entries[str(path)] = Entry(str(t), int(size), int(mtime_ns), int(mode), str(ref))
        return cls(entries)


def _hex(value: int) -> str:
    return format(value % DIGEST_MOD, "064x")


def _valid(meta: Mapping[str, Any]) -> bool:
    """Metadata of a tree that is not empty (an empty one is checked against the guard)."""
    return _valid_meta(meta) and meta["files"] > 0


def _valid_meta(meta: Mapping[str, Any] | None) -> bool:
    return (
        meta is not None
        and isinstance(meta.get("digest"), str)
        and isinstance(meta.get("mtimes"), str)
        and type(meta.get("files")) is int
        and type(meta.get("bytes")) is int
    )


def hash_file(fd: int, size: int = -1) -> str:
    """sha256 of an open file, read in chunks (never the whole file in memory). `size`: what
    fstat said, for a small file read in one call (one more byte asked: the end is seen without
    a second read)."""
    if 0 <= size < CHUNK:
        data = os.read(fd, size + 1)
        if len(data) == size:
            return hashlib.sha256(data).hexdigest()
        # it grew, or the read came short: read on to the end
        return _hash_on(fd, hashlib.sha256(data))
    return _hash_on(fd, hashlib.sha256())


def _hash_on(fd: int, h: hashlib._Hash) -> str:
    """`h` (a sha256) updated with the rest of the open file `fd`, as hex."""
    while True:
        chunk = os.read(fd, CHUNK)
        if not chunk:
            return h.hexdigest()
        h.update(chunk)


def push_meta(opts: SyncOptions) -> dict[str, Any] | None:
    """Our last push's metadata (digest, mtimes, files, bytes, instance_uuid, boot_id) without
    reading its entries, or None when we never pushed (or the record is unusable)."""
    meta = journal.read_meta(Path(opts.state_dir) / PUSH_RECORD)
    if meta is None:
        j = journal.load(Path(opts.state_dir) / PUSH_RECORD)
        meta = j.meta if j.exists else None
    return meta if _valid_meta(meta) else None


#: the manifest built on a loaded push record (a write installs new entries and metadata)
_PUSHED: dict[Path, tuple[Manifest, tuple[Manifest, dict[str, Any]]]] = {}


def last_push_record(opts: SyncOptions) -> tuple[Manifest, dict[str, Any]] | None:
    """Our last push record (manifest + metadata), or None when we never pushed.

    Callers must not modify what they get: it may be shared with the next caller.
    """
    path = Path(opts.state_dir) / PUSH_RECORD
    j = journal.load(path)
    if not j.exists or not _valid_meta(j.meta):
        return None
    hit = _PUSHED.get(path)
    if hit is not None and hit[0].entries is j.entries and hit[1][1] is j.meta:
        return hit[1]
    manifest = Manifest(j.entries)
    manifest._preset(j.meta)
    if len(_PUSHED) >= 64:
        _PUSHED.clear()
    found = (manifest, j.meta)
    _PUSHED[path] = (manifest, found)
    return found


def since_push(opts: SyncOptions, local: Manifest, last: Mapping[str, Any]) -> Basis | None:
    """What changed between our last push (its metadata `last`) and `local`: the paths and
    their entries as pushed, without reading the push record or comparing whole trees. The
    scan's own basis when it started from the pushed state; else, when scans came between
    (a `ukc plan`, a watch), the index's lines since the position the record names; None
    when neither tells (then the whole record is compared)."""
    key = (last["digest"], last["mtimes"])
    basis = local.basis
    if basis is not None and basis.key == key:
        return basis
    pos, at = last.get("index"), local.at
    if at is None or not (
        isinstance(pos, list) and len(pos) == 2 and all(type(v) is int for v in pos)
    ):
        return None
    old = journal.changes_since(
        Path(opts.state_dir) / INDEX,
        pos,
        at,
        lambda m: (m.get("digest"), m.get("mtimes")) == key,
    )
    return None if old is None else Basis(key, old)


def record_push(
    opts: SyncOptions,
    local: Manifest,
    instance_uuid: str,
    boot_id: str,
    *,
    delta: Basis | None,
) -> None:
    """`local` is what the sandbox now holds. `delta`: the push record was that basis's
    state, so only the paths it names are written."""
    path = Path(opts.state_dir) / PUSH_RECORD
    meta = _record_meta(local, instance_uuid, boot_id)
    basis = delta
    if basis is not None:
        key = basis.key
        # never parsed: the record is only appended to (100,000 entries cost 60 MB parsed)
        appended = journal.append(
            path,
            local.entries,
            basis.old.keys(),
            meta,
            lambda m: (m.get("digest"), m.get("mtimes")) == key,
        )
        if appended:
            return
    # the index holds the same entries (most often): its bytes are the record's, not a
    # second encoding of every entry
    if journal.derive(Path(opts.state_dir) / INDEX, path, local.entries, meta):
        return
    journal.load(path).write(local.entries, {}, meta, None)


class PushRecord:
    """The record a push will leave (`record_push`'s), when it copies the index (the push of a
    new tree: 12 MB at 100,000 files): its bytes are written beside the record while the
    sandbox's helper finishes (`stage`), put in place once the push is done (`write`)."""

    def __init__(
        self,
        opts: SyncOptions,
        local: Manifest,
        instance_uuid: str,
        boot_id: str,
        *,
        delta: Basis | None,
    ) -> None:
        self.opts, self.local, self.delta = opts, local, delta
        self.instance_uuid, self.boot_id = instance_uuid, boot_id
        self._staged: journal.Staged | None = None
        self._tried = False

    def stage(self) -> None:
        """Write ahead what can be (at most once; nothing when the record takes a delta)."""
        if self._tried:
            return
        self._tried = True
        state_dir = Path(self.opts.state_dir)
        delta = self.delta
        try:
            if delta is not None and journal.fits(state_dir / PUSH_RECORD, delta.old.keys()):
                return  # one appended line: nothing worth writing ahead
            self._staged = journal.stage_derive(
                state_dir / INDEX,
                state_dir / PUSH_RECORD,
                self.local.entries,
                _record_meta(self.local, self.instance_uuid, self.boot_id),
            )
        except OSError:
            # (a full disk, say) the push goes on; `write` then records as it always did,
            # and fails there if it must: not while the sandbox's answer is awaited
            self._staged = None

    def write(self) -> None:
        """The sandbox now holds the tree: record it."""
        staged, self._staged = self._staged, None
        if staged is not None:
            staged.install()
            return
        record_push(self.opts, self.local, self.instance_uuid, self.boot_id, delta=self.delta)

    def discard(self) -> None:
        """The push failed: nothing written ahead is left."""
        staged, self._staged = self._staged, None
        if staged is not None:
            staged.discard()


def _record_meta(local: Manifest, instance_uuid: str, boot_id: str) -> dict[str, Any]:
    meta = {**local.meta(), "instance_uuid": instance_uuid, "boot_id": boot_id}
    if local.at is not None:
        meta["index"] = local.at
    return meta


class _Scan:
    """One scan: entries found so far, the paths whose entry (or inode) differs from the index,
    and the change hint still to give."""

    def __init__(
        self,
        root: str,
        rules: IgnoreRules,
        prev: Mapping[str, Entry],
        prev_inos: Mapping[str, int],
        hint: Callable[[], None] | None,
        *,
        incremental: bool,
        changes: ChangeFeed | None = None,
        overlay: bool = False,
    ) -> None:
        self.root = root
        #: watches the directories it lists, when the feed has inotify
        self.watch = changes.watch if changes is not None and changes.inotify else None
        self.rules = rules
        self.hint = hint
        self.entries: MutableMapping[str, Entry]
        self.inos: MutableMapping[str, int]
        if incremental:
            # a copy of the index, changed in place; compared against itself. A probed index
            # (`journal.probe`) is changed on top instead: a copy would parse it whole
            if isinstance(prev, journal.Probed):
                self.entries, self.inos = journal.Overlay(prev), journal.Overlay(prev_inos)
            else:
                self.entries, self.inos = dict(prev), dict(prev_inos)
            self.prev: Mapping[str, Entry] = self.entries
            self.prev_inos: Mapping[str, int] = self.inos
        else:
            self.entries, self.inos = {}, {}
            self.prev, self.prev_inos = prev, prev_inos
        #: a walk over a trusted index keeps only what differs from it in `entries`/`inos`
        #: (a second 100,000-entry manifest and its paths and inodes are ~17 MB) and the
        #: index's paths not listed yet (what is left when the walk ends is gone)
        self.unlisted: set[str] | None = set(prev) if overlay else None
        self.changed: list[str] = []
        self.added = 0
        self.seen: set[str] = set()
        #: directories to walk afresh whatever the index says
        self.forced: set[str] = set()
        #: a full walk lists new files (`defer`) and hashes them in batches, with a `hasher`
        #: process (`child`) once a batch is full (`share`); `finish` hashes what is left
        self.share = False
        self.queue: list[tuple[str, str]] = []
        self.sent: deque[list[tuple[str, str]]] = deque()
        self.child: hasher.Hasher | None = None
        self.started = False
        #: batches listed before a hasher may start (`HASHER_FROM`)
        self.wait_batches = HASHER_FROM // _BATCH
        self.shared = 0  # files the hasher hashed
        #: the new files hashed in batches (by the hasher or here), and their share of the
        #: tree's digests (`hash_sums`'s four)
        self.summed: set[str] = set()
        self.sums = (0, 0, 0, 0)
        #: big files hashed on a thread beside the walk (`_hash_big`), entered here with no
        #: sha256 yet: (path, the entry whose ref `finish` fills in, its hash to come)
        self.hashing: list[tuple[str, Entry, Future[str]]] = []
        #: that thread (the `hasher` process is `child`)
        self.big_hashing: ThreadPoolExecutor | None = None

    def note(self, rel: str, e: Entry | None, was: Entry | None) -> None:
        self.changed.append(rel)
        if was is None:
            self.added += 1
        call = self.hint
        # a directory's mtime moves with its files: only a new directory is news
        if call is not None and (e is None or e.type != "d" or was is None or was.type != "d"):
            self.hint = None
            call()

    def walk(self, dir_path: str, rel_dir: str) -> None:
        if self.watch is not None:
            self.watch(dir_path, rel_dir)  # before the listing: nothing falls between
        try:
            it = os.scandir(dir_path)
        except (FileNotFoundError, NotADirectoryError):
            return  # vanished while walking: the next pass sees it
        with it:
            children = sorted(it, key=_NAME)
        prev, prev_inos, unlisted = self.prev, self.prev_inos, self.unlisted
        excluded = self.rules.excluded
        hash_in = self.defer if self.share else self.hash_in
        prefix = f"{rel_dir}/" if rel_dir else ""
        for child in children:
            rel = prefix + child.name
            was = prev.get(rel)
            # a new file (as listed): the fstat after its open is its stat, no lstat first;
            # one that is no longer a regular file (or gone) is looked at as any other path
            if (
                was is None
                and child.is_file(follow_symlinks=False)
                and (excluded(rel, False) or hash_in(rel, child.path, None))
            ):
                continue
            try:
                cst = child.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if unlisted is None:
                self.visit(rel, child.path, cst, descend=True)
                continue
            # a walk over the index: an unchanged file (most of them) keeps its entry without
            # a call of its own (`visit`'s first case, inline)
            if (
                was is not None
                and was.mtime_ns == cst.st_mtime_ns
                and was.size == cst.st_size
                and was.type == "f"
                and stat.S_ISREG(cst.st_mode)
                and was.mode == cst.st_mode & 0o7777
                and prev_inos.get(rel) == cst.st_ino
                and not excluded(rel, False)
            ) or self.visit(rel, child.path, cst, descend=True):
                unlisted.discard(rel)

    def visit(self, rel: str, path: str, cst: os.stat_result, *, descend: bool) -> bool:
        """Record the entry at `rel` (walking into a directory when `descend`, or when it is
        new); False when it is not part of the manifest (excluded, vanished, not a file,
        directory or link)."""
        mode = cst.st_mode
        if stat.S_ISREG(mode):
            if self.rules.excluded(rel, False):
                return False
            was = self.prev.get(rel)
            perm = mode & 0o7777
            if (
                was is not None
                and was.mtime_ns == cst.st_mtime_ns
                and was.size == cst.st_size
                and was.type == "f"
                and self.prev_inos.get(rel) == cst.st_ino
            ):
                e = was if was.mode == perm else was._replace(mode=perm)
                if e is not was or self.unlisted is None:
                    self.entries[rel] = e
                    self.inos[rel] = cst.st_ino
                if e is not was:
                    self.note(rel, e, was)
                return True
            return self.hash_in(rel, path, was)
        if stat.S_ISDIR(mode):
            if self.rules.excluded(rel, True):
                return False
            was = self.prev.get(rel)
            e = Entry("d", 0, cst.st_mtime_ns, SHARED_INTS[mode & 0o7777], "")
            # another inode: a directory moved or made in its place, whose old children no
            # event names (a revisit walks it afresh)
            fresh = (
                was is None
                or was.type != "d"
                or self.prev_inos.get(rel) != cst.st_ino
                or rel in self.forced
            )
            if not descend and fresh and was is not None:
                self.drop_under(rel)
            if e == was and not fresh:
                e = was
            else:
                self.note(rel, e, was)
            if e is not was or self.unlisted is None:
                self.entries[rel] = e
                self.inos[rel] = cst.st_ino
            if descend or fresh:
                self.walk(path, rel)
            return True
        if stat.S_ISLNK(mode):
            if self.rules.excluded(rel, False):
                return False
            try:
                target = os.readlink(path)
            except OSError:
                return False
            was = self.prev.get(rel)
            e = Entry("l", len(target), cst.st_mtime_ns, 0o777, target)
            if e == was:
                e = was
            else:
                self.note(rel, e, was)
            if e is not was or self.unlisted is None:
                self.entries[rel] = e
            return True
        return False  # sockets, fifos and devices are not part of a source tree

    def hash_in(self, rel: str, path: str, was: Entry | None) -> bool:
        """Record the regular file at `path` with its sha256; False when what is there now is
        not one (a fifo is refused by its fstat, never read) or cannot be opened."""
        # once per new file (100,000 on a first scan): `hash_file`'s small read, the entry's
        # tuple and `note`'s common case inline, with no call of their own
        try:
            fd = os.open(path, READ_FLAGS)
        except OSError:
            return False
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode):
                return False
            size = fst.st_size
            if size < CHUNK:
                data = os.read(fd, size + 1)
                digest = (
                    hashlib.sha256(data).hexdigest()
                    if len(data) == size
                    else _hash_on(fd, hashlib.sha256(data))
                )
            else:
                # why a thread: hashlib and the reads release the GIL, so a big file's
                # sha256 (~5 ms per 8 MiB) runs on the other core while the walk goes on
                if self.big_hashing is None:
                    self.big_hashing = ThreadPoolExecutor(1, "ukc-scan-hash")
                pending = self.big_hashing.submit(_hash_big, fd)
                fd = -1  # the thread closes it
                digest = ""
        finally:
            if fd >= 0:
                os.close(fd)
        e = _new_entry(
            ("f", _SHARED(size, size), fst.st_mtime_ns, SHARED_INTS[fst.st_mode & 0o7777], digest)
        )
        if not digest:
            self.hashing.append((rel, e, pending))
        self.entries[rel] = e
        self.inos[rel] = fst.st_ino
        self.changed.append(rel)
        if was is None:
            self.added += 1
        call = self.hint
        if call is not None:  # a file is news (see `note`)
            self.hint = None
            call()
        return True

    def defer(self, rel: str, path: str, was: Entry | None) -> bool:
        """List the new file at `path` to be hashed with its batch (`hash_in`'s place in a
        full walk): news (see `note`) once the first one is hashed."""
        queue = self.queue
        queue.append((rel, path))
        if len(queue) >= _BATCH:
            self.dispatch()
        return True

    def dispatch(self) -> None:
        """Hand the full batch to the hasher, or hash it here while the hasher has enough."""
        batch, self.queue = self.queue, []
        h = self.child
        if h is None and not self.started:
            if self.wait_batches > 0:
                self.wait_batches -= 1
            else:
                self.started = True  # a tree with many new files: worth a second process
                h = self.child = hasher.start(READ_FLAGS, CHUNK, os.path.join(self.root, ""))
        if h is not None:
            sent = self.sent
            while sent and h.ready():
                done = sent.popleft()
                self.absorb(done, h.take(len(done)))
            if len(sent) < _AHEAD and h.submit([rel for rel, _ in batch]):
                sent.append(batch)
                return
        for rel, path in batch:
            self.hash_here(rel, path)

    def absorb(self, batch: list[tuple[str, str]], answer: hasher.Answer | None) -> None:
        """Record a batch the hasher answered (None: it could not; hashed here)."""
        if answer is None or len(answer.results) != len(batch):
            for rel, path in batch:
                self.hash_here(rel, path)
            return
        entries, inos, changed, summed = self.entries, self.inos, self.changed, self.summed
        files = size_sum = 0
        for (rel, path), r in zip(batch, answer.results, strict=True):
            if r is None:
                self.hash_here(rel, path)  # not a small regular file, or gone: looked at here
                continue
            size, mtime_ns, mode, ino, digest = r
            entries[rel] = _new_entry(
                ("f", _SHARED(size, size), mtime_ns, SHARED_INTS[mode & 0o7777], digest)
            )
            inos[rel] = ino
            changed.append(rel)
            summed.add(rel)
            files += 1
            size_sum += size
        self.added += files
        self.shared += files
        call = self.hint
        if call is not None and files:  # a file is news (see `note`)
            self.hint = None
            call()
        d, m, f, b = self.sums
        self.sums = (d + answer.digest, m + answer.mtimes, f + files, b + size_sum)

    def sums_of(self, items: Iterable[tuple[str, Entry]]) -> tuple[int, int, int, int]:
        """`hash_sums` of `items`, which name each path hashed in a batch once (their share is
        summed already: a full walk never changes an entry it made)."""
        summed = self.summed
        if not summed:
            return hash_sums(items)
        digest, mtimes, files, size = hash_sums((p, e) for p, e in items if p not in summed)
        d, m, f, b = self.sums
        return digest + d, mtimes + m, files + f, size + b

    def hash_here(self, rel: str, path: str) -> None:
        """A listed new file, as `walk` looks at one: hashed (and summed, as the hasher's are:
        nothing is left to sum after the walk), or else looked at by its lstat."""
        if self.hash_in(rel, path, None):
            e = self.entries[rel]
            # (a big file's sha256 comes later, from `finish`: it is summed with the rest)
            if e.ref:
                d, m, f, b = self.sums
                digest, mtimes, _, size = hash_sums(((rel, e),))
                self.sums = (d + digest, m + mtimes, f + 1, b + size)
                self.summed.add(rel)
            return
        try:
            cst = os.lstat(path)
        except FileNotFoundError:
            return
        if self.visit(rel, path, cst, descend=True) and self.unlisted is not None:
            self.unlisted.discard(rel)

    def finish_batches(self) -> None:
        """Hash what a full walk listed and has not hashed yet; the hasher is done."""
        self.share = False
        batch, self.queue = self.queue, []
        for rel, path in batch:  # while the hasher ends its own
            self.hash_here(rel, path)
        h, sent = self.child, self.sent
        while sent:
            done = sent.popleft()
            self.absorb(done, h.take(len(done)) if h is not None else None)
        self.close_child()

    def close_child(self) -> None:
        h, self.child = self.child, None
        self.sent.clear()
        if h is not None:
            h.close()

    def finish(self) -> None:
        """Wait for the big files' hashes and put them in their entries (those the walk did
        not drop since). A read that failed on the thread raises here, as it would inline."""
        try:
            for rel, e, pending in self.hashing:
                digest = pending.result()
                if self.entries.get(rel) is e:
                    self.entries[rel] = e._replace(ref=digest)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Stop hashing: the thread ends once its files are closed (none is left open)."""
        if self.big_hashing is not None:
            self.big_hashing.shutdown()
            self.big_hashing = None
        self.hashing = []

    def revisit(self, rel: str) -> None:
        """Bring the entry at `rel` (and what is under it) up to date, parents first."""
        if rel in self.seen:
            return
        self.seen.add(rel)
        parent = rel.rpartition("/")[0]
        if parent and parent not in self.entries:
            self.revisit(parent)
        up = self.entries.get(parent) if parent else None
        if parent and (up is None or up.type != "d"):
            self.drop(rel)  # under a path that is not a synced directory
            return
        path = os.path.join(self.root, rel)
        try:
            cst = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            self.drop(rel)
            return
        was = self.entries.get(rel)
        if was is not None and was.type == "d" and not stat.S_ISDIR(cst.st_mode):
            self.drop_under(rel)
        if not self.visit(rel, path, cst, descend=False):
            self.drop(rel)

    def drop(self, rel: str) -> None:
        was = self.entries.pop(rel, None)
        self.inos.pop(rel, None)
        if was is not None:
            self.note(rel, None, was)
            if was.type == "d":
                self.drop_under(rel)

    def drop_under(self, rel: str) -> None:
        prefix = rel + "/"
        entries = self.entries
        under = (
            entries.under(prefix)
            if isinstance(entries, journal.Overlay)
            else [p for p in entries if p.startswith(prefix)]
        )
        for p in under:
            self.entries.pop(p)
            self.inos.pop(p, None)
            self.changed.append(p)


def _hash_big(fd: int) -> str:
    """sha256 of the open file (on the scan's hashing thread), which it then closes."""
    try:
        return hash_file(fd)
    finally:
        os.close(fd)


def scan_local(
    opts: SyncOptions,
    rules: IgnoreRules | None = None,
    *,
    on_change: Callable[[], None] | None = None,
) -> Manifest:
    """Walk the local root and build its manifest, hashing only files the index cannot vouch
    for; with a `feed` attached for the session, re-stat only the paths it noted.

    Raises `SyncHaltedError` when the root is missing (or not a directory), or when it is empty
    while our last push record had files: both look like an accident (unmounted volume,
    `rm -rf` in the wrong window) and a push would delete the sandbox's copy.

    `on_change` is called once, as soon as an entry is seen that differs from our last push
    (new, other type, size or mtime), or when the walk ends with entries missing, or when the
    tree's keeper names changed paths the rules do not exclude (before they are looked at): a
    hint that a push is coming, which lets the caller open its connection while the walk goes
    on. It decides nothing; the manifest does.
    """
    changes = feed_for(Path(opts.state_dir))
    try:
        with gc_paused():
            manifest, ident = _scan(opts, rules, on_change, changes)
    except BaseException:
        if changes is not None:
            changes.note_all()  # what it took was not looked at
        raise
    if changes is not None:
        changes.settle(ident)
    if ident is not None:
        object.__setattr__(manifest, "at", list(ident))
    return manifest


def _unchanged(
    opts: SyncOptions, index: journal.Snapshot, on_change: Callable[[], None] | None
) -> Manifest:
    """The tree is the index's (its keeper saw nothing change): its metadata is the
    manifest's, and its entries are parsed only if someone reads them."""
    meta = index.meta
    if on_change is not None:
        pushed = push_meta(opts)
        if pushed is None or (pushed["digest"], pushed["mtimes"]) != (
            meta["digest"],
            meta["mtimes"],
        ):
            on_change()
    manifest = Manifest(index, Basis((meta["digest"], meta["mtimes"]), {}))
    manifest._preset(meta)
    return manifest


def _check_root(root: Path) -> None:
    """`SyncHaltedError` unless `root` is a directory."""
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise SyncHaltedError(
            f"local root {root} is missing; nothing was sent or deleted"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise SyncHaltedError(f"local root {root} is not a directory; nothing was sent or deleted")


def _in_sight(paths: Iterable[str], rules: IgnoreRules) -> bool:
    """Whether one of a keeper's named `paths` may be part of the manifest: neither it nor a
    directory above it is excluded (a keeper watches excluded directories too: `.git`)."""
    above: dict[str, bool] = {}  # why: a named directory's thousands of paths share these
    for named in paths:
        rel = named.rstrip("/")
        parts = rel.split("/")
        hidden = False
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            out = above.get(parent)
            if out is None:
                out = above[parent] = rules.excluded(parent, True)
            if out:
                hidden = True
                break
        if hidden:
            continue
        if named.endswith("/"):
            if not rules.excluded(rel, True):
                return True
        elif not (rules.excluded(rel, False) and rules.excluded(rel, True)):
            return True
    return False


def halt_in_sight(opts: SyncOptions) -> str | None:
    """What a scan of the tree would halt on, as far as it shows without a walk: a missing
    root, an unusable `.ukcignore`, or a root whose top shows nothing to sync while our last
    push had files (the scan's emptied-root guard; only a walk tells). None: nothing in sight
    (the scan may still find something)."""
    root = Path(opts.local_root)
    try:
        _check_root(root)
        rules = load_rules(opts)
        last = push_meta(opts)
        if last is None or not last["files"]:
            return None
        with os.scandir(root) as entries:
            for entry in entries:
                kind = entry.is_dir(follow_symlinks=False)
                if (kind or entry.is_file(follow_symlinks=False) or entry.is_symlink()) and not (
                    rules.excluded(entry.name, kind)
                ):
                    return None
    except SyncHaltedError as err:
        return str(err)
    except OSError as err:
        return f"local root {root} cannot be read ({err.strerror})"
    return f"local root {root} shows nothing to sync while the last push had files"


def _overlaid(
    old: Mapping[str, Entry],
    old_inos: Mapping[str, int],
    entries: Mapping[str, Entry],
    inos: Mapping[str, int],
    changed: list[str],
) -> tuple[Mapping[str, Entry], Mapping[str, int]]:
    """The index's state with what a walk found different (`entries`, `inos`: the changed
    paths still there) put in, and the other `changed` paths taken out; the index's own
    when nothing changed."""
    if not changed:
        return old, old_inos
    full, full_inos = dict(old), dict(old_inos)
    full.update(entries)
    full_inos.update(inos)
    for p in changed:
        if p not in entries:
            full.pop(p, None)
        if p not in inos:
            full_inos.pop(p, None)
    return full, full_inos


def _told_index(
    state_dir: Path, peeked: journal.Snapshot | None, only: set[str] | None, rules_key: str
) -> journal.Journal:
    """The index a keeper's answer `only` is about. When the scan looks at those paths alone,
    only their entries (and their directories', and all under a directory named "dir/") are
    read from it (`journal.probe`): one changed file at 100,000 is otherwise most of the
    apply's time, parsing every entry. Else (or when the probe cannot tell) it is loaded whole."""
    if (
        only
        and peeked is not None
        and IGNORE_FILE not in only
        and _valid_meta(peeked.meta)
        and peeked.meta.get("rules") == rules_key
    ):
        named = {p.rstrip("/") for p in only}
        paths = set(named)
        for p in named:
            while "/" in p:
                p = p.rpartition("/")[0]
                paths.add(p)
        probed = journal.probe(peeked, paths, [p for p in only if p.endswith("/")])
        if probed is not None:
            return probed
    return journal.load(state_dir / INDEX)


def _scan(
    opts: SyncOptions,
    rules: IgnoreRules | None,
    on_change: Callable[[], None] | None,
    changes: ChangeFeed | None,
) -> tuple[Manifest, list[int] | None]:
    root = Path(opts.local_root)
    _check_root(root)
    rules = rules if rules is not None else load_rules(opts)
    rules_key = rules.key
    state_dir = Path(opts.state_dir)
    only: set[str] | None = None
    if changes is not None and changes.keeper is not None:
        # the keeper vouches for an index by its bytes: ask before reading them all
        peeked = journal.peek(state_dir / INDEX)
        only = changes.take(peeked.ident if peeked is not None else None)
        if (
            only == set()
            and peeked is not None
            and _valid(peeked.meta)
            and peeked.meta.get("rules") == rules_key
        ):
            return _unchanged(opts, peeked, on_change), peeked.ident
        if on_change is not None and only and _in_sight(only, rules):
            # why on the keeper's word: it comes before the index is loaded and a changed
            # file hashed (~20 ms of a 2k tree): the push's connection and helper start
            # meanwhile. A path named that turns out unchanged (made and removed, written
            # back as it was) costs a helper start no push uses
            on_change()
            on_change = None
        index = _told_index(state_dir, peeked, only, rules_key)
        if peeked is None or index.ident != peeked.ident:
            only = None  # not the index it vouched for
    else:
        index = journal.load(state_dir / INDEX)
        only = changes.take(index.ident) if changes is not None else None
    if index.meta.get("rules") != rules_key:
        # scanned under other rules (`sync.exclude`, `sync.back`, `.ukcignore`): paths no
        # longer excluded were never listed, so what changed since is not enough: walk
        only = None
    trusted = index.exists and _valid_meta(index.meta)
    old: Mapping[str, Entry] = index.entries if index.exists else {}
    old_inos: Mapping[str, int] = index.inos if index.exists else {}
    pushed = push_meta(opts) if on_change is not None else None
    hint = on_change
    if on_change is not None and (
        not trusted
        or pushed is None
        or pushed["digest"] != index.meta["digest"]
        or pushed["mtimes"] != index.meta["mtimes"]
    ):
        hint = None
        on_change()  # the index is not what we pushed: a push is coming whatever the walk finds
    incremental = trusted and only is not None and IGNORE_FILE not in only
    scan = _Scan(
        str(root),
        rules,
        old,
        old_inos,
        hint,
        incremental=incremental,
        changes=changes,
        overlay=trusted and not incremental,
    )
    try:
        if incremental:
            assert only is not None
            # and their directories, whose mtimes moved; parents first: a new directory is
            # walked whole, and its children are then current; "dir/" asks for a walk afresh
            scan.forced = {p[:-1] for p in only if p.endswith("/")}
            named = {p.rstrip("/") for p in only}
            targets = named | {p.rpartition("/")[0] for p in named if "/" in p}
            for rel in sorted(targets, key=lambda p: (p.count("/"), p)):
                scan.revisit(rel)
        else:
            scan.share = True
            scan.walk(str(root), "")
            scan.finish_batches()
    except BaseException:
        scan.abandon()
        raise
    finally:
        scan.close_child()
    scan.finish()
    if not incremental:
        if scan.unlisted is not None:
            gone = sorted(scan.unlisted)
            scan.unlisted = None
        elif len(scan.entries) - scan.added != len(old):
            gone = [p for p in old if p not in scan.entries]
        else:
            gone = []
        scan.changed.extend(gone)
        if gone and scan.hint is not None:
            scan.hint()  # deletions only
    entries: Mapping[str, Entry] = scan.entries
    inos: Mapping[str, int] = scan.inos
    changed = scan.changed
    if not incremental and trusted:
        # the walk kept what differs from the index: the new state is the index's, changed
        entries, inos = _overlaid(old, old_inos, entries, inos, changed)
    if not entries:
        last = pushed if pushed is not None else push_meta(opts)
        if last is not None and last["files"] > 0:
            n = last["files"]
            raise SyncHaltedError(
                f"local root {root} is empty but the last push had {n} files; refusing to "
                f"delete {n} files in the sandbox: restore the directory, or drop the session "
                "(`ukc delete`) and re-create it"
            )
    if not trusted:
        manifest = Manifest(entries)
        digest, mtimes, files, size = scan.sums_of(entries.items())
        manifest._preset(
            {"digest": _hex(digest), "mtimes": _hex(mtimes), "files": files, "bytes": size}
        )
        index.write(entries, inos, {**manifest.meta(), "rules": rules_key}, None)
        drop_legacy(state_dir)
        return manifest, index.ident
    meta = index.meta
    prior = {p: old.get(p) for p in changed}
    key = (meta["digest"], meta["mtimes"])
    if not prior:
        # nothing changed: the index's own state (a walk's equal copy is dropped)
        manifest = Manifest(old, Basis(key, {}))
        manifest._preset(meta)
        if meta.get("rules") != rules_key:
            # the walk under these rules found the same tree: say so (no walk next time)
            index.write(old, old_inos, {**meta, "rules": rules_key}, [], {})
        return manifest, index.ident
    manifest = Manifest(entries, Basis(key, prior))
    # the index's sums moved by what changed: the old entries' hashes out, the new ones' in,
    # each side summed in one pass (a first scan into a seeded index changes every path)
    out = hash_sums((p, was) for p, was in prior.items() if was is not None)
    got = scan.sums_of((p, entries[p]) for p in prior if p in entries)
    new_meta = {
        "digest": _hex(int(meta["digest"], 16) - out[0] + got[0]),
        "mtimes": _hex(int(meta["mtimes"], 16) - out[1] + got[1]),
        "files": meta["files"] - out[2] + got[2],
        "bytes": meta["bytes"] - out[3] + got[3],
        "rules": rules_key,
    }
    manifest._preset(new_meta)
    index.write(entries, inos, new_meta, list(prior), prior)
    return manifest, index.ident
