"""Per-session records kept as append-only journals: the whole state once, then deltas.

A journal file holds JSON lines. The first line sets the whole state (`"reset"`); each later
line is a delta: entries set, entries removed, and the state's metadata after it. One changed
file costs one short appended line instead of rewriting a record of every path (12 MB at
100,000 files). Once the deltas outgrow the state, the next write compacts: the whole state,
written atomically under a new inode.

A delta line may also keep the entries it replaced (`was`): what changed between two
positions of one journal, and how it was at the first, is then read from the lines between
them alone (`changes_since`; the index's lines do, so a push after scans that no push
followed compares only what they changed).

Every line carries a sequence number. A line that does not parse (a writer killed
mid-append) or breaks the sequence (two writers at once) ends the journal there: what precedes
it is a state one writer wrote whole, with the metadata of that same state, and the next write
compacts. A lost or cut journal only costs time (a re-hash, a remote scan), never a wrong
answer, because entries are only trusted together with the metadata written beside them.

Loaded journals are kept in-process by path with the inode and the length read: a later load
reads only what was appended since, so a watch that scans on every edit parses the record once.
States are never modified in place: a write installs new dicts (the scan's own), so a
`Manifest` built on a state stays what it was.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import re
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from reconciler._util.atomic import install_staged, write_atomic, write_staged
from reconciler._util.gcpause import gc_paused
from reconciler.sync.entry import SHARED_INTS, Entry

__all__ = [
    "Journal",
    "Overlay",
    "Probed",
    "Snapshot",
    "Staged",
    "changes_since",
    "derive",
    "entries_of",
    "fits",
    "load",
    "peek",
    "probe",
    "read_meta",
    "release",
    "rewrite",
    "stage_derive",
]

#: deltas may grow to this multiple of the compacted state (plus `_SLACK`) before a compaction
_GROWTH = 1
_SLACK = 256 << 10
#: entries per line of a compacted state
_CHUNK = 2000
#: a metadata line is looked for in this many bytes at the end of the file
_TAIL = 64 << 10
_CACHE_MAX = 64
#: bytes per read when a journal is copied
_COPY = 1 << 20


@dataclass
class Journal:
    """One journal's state as last read or written by this process."""

    path: Path
    entries: Mapping[str, Entry] = field(default_factory=dict)
    #: inode numbers by path (the hash index: an entry is trusted only for the same inode)
    inos: Mapping[str, int] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    seq: int = -1
    #: the file as read: its inode and the bytes consumed (None: no file)
    ino: int | None = None
    length: int = 0
    #: bytes of the last compacted state: deltas may grow to about as much
    base: int = 0
    #: the file ended in a line that did not parse or broke the sequence
    broken: bool = False

    @property
    def exists(self) -> bool:
        return self.ino is not None and self.seq >= 0

    @property
    def ident(self) -> list[int] | None:
        """The file as read or written (inode, length): another state has another."""
        return [self.ino, self.length] if self.exists and self.ino is not None else None

    def write(
        self,
        entries: Mapping[str, Entry],
        inos: Mapping[str, int],
        meta: dict[str, Any],
        changed: Collection[str] | None,
        was: Mapping[str, Entry | None] | None = None,
    ) -> None:
        """Make `entries`/`inos`/`meta` the journal's state (they are kept, not copied).

        `changed`: the paths whose entry (or inode) differs from the current state, which makes
        the write one appended line; None (or a journal that cannot take an append) rewrites
        the whole state. `was`: the changed paths' entries in the current state (None: not
        there), kept in the line, so that what changed since any earlier line can be told
        from the lines after it (`changes_since`)."""
        line = b""
        if (
            changed is not None
            and self.exists
            and not self.broken
            and self.length + _least_bytes(changed) <= _GROWTH * self.base + _SLACK
        ):
            sets = {p: entries[p] for p in changed if p in entries}
            delta: dict[str, Any] = {"seq": self.seq + 1, "meta": meta, "base": self.base}
            if sets:
                delta["set"] = sets
                delta["ino"] = [inos.get(p, 0) for p in sets]
            gone = [p for p in changed if p not in entries]
            if gone:
                delta["del"] = gone
            if was is not None:
                delta["was"] = {p: was.get(p) for p in changed}
            line = _line(delta)
            if self.length + len(line) > _GROWTH * self.base + _SLACK or not self._append(line):
                line = b""
        if not line:
            self._compact(entries, inos, meta)
        else:
            self.seq += 1
        self.entries, self.inos, self.meta = entries, inos, meta
        _remember(self)

    def _append(self, line: bytes) -> bool:
        """Append one line if the file is still the one we read, to its end; else False."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            if st.st_ino != self.ino or st.st_size != self.length:
                return False  # another writer: a compaction makes one consistent state
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        self.length += len(line)
        return True

    def _compact(
        self, entries: Mapping[str, Entry], inos: Mapping[str, int], meta: dict[str, Any]
    ) -> None:
        # the state in lines of `_CHUNK` entries (the first one the reset): writing and
        # reading it never holds the whole state as one JSON text and its parse at once;
        # inodes as a list in the order of the entries (a path is written and parsed once)
        paths = list(entries)
        written = [0, 0, 0]  # lines, bytes, bytes of the entries (the base)

        def lines() -> Iterator[bytes]:
            # each line is encoded as it is written: never 12 MB of lines at once
            for start in range(0, max(len(paths), 1), _CHUNK):
                part = paths[start : start + _CHUNK]
                line: dict[str, Any] = {"seq": written[0]}
                if not written[0]:
                    line["reset"] = True
                line["set"] = {p: entries[p] for p in part}
                line["ino"] = [inos.get(p, 0) for p in part]
                data = _line(line)
                written[0] += 1
                written[1] += len(data)
                yield data
            written[2] = written[1]
            data = _line({"seq": written[0], "meta": meta, "base": written[2]})
            written[0] += 1
            written[1] += len(data)
            yield data

        self.path.parent.mkdir(parents=True, exist_ok=True)
        # no fsync: a lost or torn journal reads as "none", which only costs time
        write_atomic(self.path, lines(), durable=False)
        st = os.stat(self.path)
        self.ino, self.length, self.base = st.st_ino, written[1], written[2]
        self.seq, self.broken = written[0] - 1, False


def _least_bytes(paths: Collection[str]) -> int:
    """The fewest bytes a delta naming `paths` can take (each one quoted, with a separator):
    a delta that cannot fit is never encoded (100,000 new entries are a 12 MB line)."""
    return sum(map(len, paths)) + 3 * len(paths)


def _line(obj: dict[str, Any]) -> bytes:
    # ASCII (non-UTF-8 names travel as \udcXX escapes), one object per line
    return json.dumps(obj, separators=(",", ":")).encode("ascii") + b"\n"


_CACHE: dict[Path, Journal] = {}
#: list -> Entry without a Python frame per entry (`_entries` checked the lists' shape)
_ENTRY: Callable[[list[Any]], Entry] = functools.partial(tuple.__new__, Entry)


def _remember(j: Journal) -> None:
    if j.path not in _CACHE and len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
    _CACHE[j.path] = j


def release(keep: Path) -> None:
    """Forget every loaded state but `keep`'s: what only this cache holds is freed (a
    100,000-entry index is ~60 MB). The next load of a forgotten journal reads it whole."""
    for path in list(_CACHE):
        if path != Path(keep):
            del _CACHE[path]


def rewrite(path: Path, parts: Iterable[Mapping[str, Entry]], meta: dict[str, Any]) -> None:
    """Make the journal at `path` the state that `parts` set one after the other (a later
    part's entry replaces an earlier one's), with `meta`, written atomically in lines of at
    most `_CHUNK` entries as the parts come: the whole state is never in memory. No inodes.
    The state is not kept loaded (the next `load` reads it)."""
    path = Path(path)
    _CACHE.pop(path, None)
    written = [0, 0]  # lines, bytes

    def lines() -> Iterator[bytes]:
        for part in parts:
            paths = list(part)
            for start in range(0, len(paths), _CHUNK):
                cut = paths[start : start + _CHUNK]
                line: dict[str, Any] = {"seq": written[0]}
                if not written[0]:
                    line["reset"] = True
                line["set"] = {p: part[p] for p in cut}
                line["ino"] = [0] * len(cut)
                data = _line(line)
                written[0] += 1
                written[1] += len(data)
                yield data
        first = {"reset": True} if not written[0] else {}
        yield _line({"seq": written[0], **first, "meta": meta, "base": written[1]})

    path.parent.mkdir(parents=True, exist_ok=True)
    # no fsync: a lost or torn journal reads as "none", which only costs time
    write_atomic(path, lines(), durable=False)


def entries_of(text: bytes) -> dict[str, Entry] | None:
    """Entries encoded as JSON `{path: [type, size, mtime_ns, mode, ref]}` (None: malformed)."""
    try:
        return _entries(json.loads(text))
    except ValueError:
        return None


def _entries(raw: object) -> dict[str, Entry] | None:
    """JSON `{path: [type, size, mtime_ns, mode, ref]}` as entries; None when malformed."""
    if not isinstance(raw, dict):
        return None
    shared = SHARED_INTS.get
    for v in raw.values():
        if not (
            type(v) is list
            and len(v) == 5
            and type(v[0]) is str
            and type(v[1]) is int
            and type(v[2]) is int
            and type(v[3]) is int
            and type(v[4]) is str
        ):
            return None
        # sizes and modes below 4096 as shared objects (the parser makes one per number)
        v[1] = shared(v[1], v[1])
        v[3] = shared(v[3], v[3])
    return dict(zip(raw.keys(), map(_ENTRY, raw.values()), strict=True))


def _lines(read: Callable[[int], bytes]) -> Iterator[bytes]:
    """The complete lines (each with its newline) of what `read(n)` returns until it returns
    b"", `_COPY` bytes at a time: a 12 MB journal is never one bytes object. A last line
    without its newline (an append in progress, or cut) is not one."""
    rest = b""
    while True:
        chunk = read(_COPY)
        if not chunk:
            return
        data = rest + chunk if rest else chunk
        pos = 0
        while True:
            end = data.find(b"\n", pos)
            if end < 0:
                break
            yield data[pos : end + 1]
            pos = end + 1
        rest = data[pos:]


def _apply(j: Journal, lines: Iterable[bytes], start: int) -> None:
    """Apply complete `lines` (read from offset `start`) to `j`."""
    entries: dict[str, Entry] | None = None
    inos: dict[str, int] | None = None
    pos = 0
    for data in lines:
        end = len(data) - 1
        try:
            obj = json.loads(data[:end].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            obj = None
        # a reset is the first line, and only the first
        ok = (
            isinstance(obj, dict)
            and obj.get("seq") == j.seq + 1
            and (obj.get("reset") is True) == (j.seq < 0)
        )
        sets = _entries(obj.get("set", {})) if ok and obj is not None else None
        raw_ino = obj.get("ino", []) if ok and obj is not None else None
        gone = obj.get("del", []) if ok and obj is not None else None
        if (
            obj is None
            or sets is None
            or not isinstance(raw_ino, list)
            or len(raw_ino) != len(sets)
            or not all(type(v) is int for v in raw_ino)
            or not isinstance(gone, list)
            or not isinstance(obj.get("meta", {}), dict)
        ):
            j.broken = True
            break
        # 0: no inode recorded (directories and links of the push record)
        got_inos = {p: n for p, n in zip(sets, raw_ino, strict=True) if n}
        if obj.get("reset") is True:
            entries, inos = sets, got_inos
            j.base = len(data)  # (a later line may name the whole compaction's size)
        else:
            if entries is None:
                entries, inos = dict(j.entries), dict(j.inos)
            assert inos is not None
            entries.update(sets)
            inos.update(got_inos)
            if len(got_inos) < len(sets):
                # set without an inode (a directory turned into a link): none is kept
                for p in sets:
                    if p not in got_inos:
                        inos.pop(p, None)
            for p in gone:
                if isinstance(p, str):
                    entries.pop(p, None)
                    inos.pop(p, None)
        if type(obj.get("base")) is int:
            j.base = obj["base"]
        if "meta" in obj:
            j.meta = dict(obj["meta"])
        j.seq += 1
        pos += len(data)
    if entries is not None and inos is not None:
        j.entries, j.inos = entries, inos
    j.length = start + pos


def load(path: Path) -> Journal:
    """The journal at `path` (an empty one when there is none), reading only what was
    appended since this process last read or wrote it."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except (FileNotFoundError, NotADirectoryError):
        return Journal(path)
    except OSError:
        return Journal(path, broken=True)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        j = _CACHE.get(path)
        if j is not None and j.ino == st.st_ino and j.length <= st.st_size and not j.broken:
            if j.length == st.st_size:
                return j
            f.seek(j.length)
            j = Journal(path, j.entries, j.inos, dict(j.meta), j.seq, j.ino, j.length, j.base)
        else:
            j = Journal(path, ino=st.st_ino)
        with gc_paused():
            _apply(j, _lines(f.read), j.length)
    if j.seq < 0:
        j.ino = None if not j.broken else j.ino
    _remember(j)
    return j


class Snapshot(Mapping[str, Entry]):
    """A journal as it was at one moment (inode, length), its metadata, and its entries
    parsed only if someone asks for them: an unchanged tree needs only the metadata.

    It holds the file open, not its bytes (12 MB at 100,000 entries): writers only append
    to a journal or replace it whole under a new inode, so the first `length` bytes of the
    open file stay that state."""

    def __init__(
        self,
        path: Path,
        fd: int,
        ino: int,
        length: int,
        meta: dict[str, Any],
        last: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = path
        self.ident = [ino, length]
        self.meta = meta
        #: the last line's sequence number and compaction size (what a probe needs)
        self.seq: object = last.get("seq") if last is not None else None
        self.base: object = last.get("base") if last is not None else None
        self._fd: int | None = fd
        self._closer = weakref.finalize(self, os.close, fd)
        self._entries: Mapping[str, Entry] | None = None
        self._inos: Mapping[str, int] = {}

    def _load(self) -> Mapping[str, Entry]:
        if self._entries is None:
            j = Journal(self.path, ino=self.ident[0])
            with gc_paused():
                _apply(j, _lines(self._reader()), 0)
            self._entries = j.entries if j.exists else {}
            self._inos = j.inos if j.exists else {}
            self._fd = None
            self._closer()
            if j.exists and not j.broken and j.length == self.ident[1]:
                _remember(j)
        return self._entries

    def _reader(self) -> Callable[[int], bytes]:
        """`read(n)` of the state's bytes from its start (b"" at its end)."""
        fd, end, done = self._fd, self.ident[1], [0]

        def read(n: int) -> bytes:
            if fd is None or done[0] >= end:
                return b""
            data = os.pread(fd, min(n, end - done[0]), done[0])
            done[0] += len(data)
            return data

        return read

    def inos(self) -> Mapping[str, int]:
        """The state's inode numbers (parsed with its entries)."""
        self._load()
        return self._inos

    def __getitem__(self, key: str) -> Entry:
        return self._load()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


def peek(path: Path) -> Snapshot | None:
    """The journal's metadata (from its last line), its entries left unread; None when there
    is none (or its last line is not a metadata line)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        start = max(0, st.st_size - _TAIL)
        tail = os.pread(fd, st.st_size - start, start)
        last = _last_line(tail, start)
        meta = last.get("meta") if last is not None else None
        if not isinstance(meta, dict):
            os.close(fd)
            return None
        return Snapshot(path, fd, st.st_ino, start + len(tail), dict(meta), last)
    except BaseException:
        os.close(fd)
        raise


#: paths (and directories) a probe looks for at most: each is one more alternative of the
#: pattern searched through the whole journal: beyond a few dozen, parsing it all costs
#: about as much (bench/PROFILE.md, session 32)
PROBE_MAX = 64

_V = TypeVar("_V")


class Probed(Mapping[str, _V]):
    """A journal state of which some paths are known (`known`: the value, or None: not
    there), as is every path under the directories `under` (each "dir/"); looking up any
    other path, or iterating, parses the whole state (`whole()`), once."""

    def __init__(
        self,
        known: dict[str, _V | None],
        under: tuple[str, ...],
        whole: Callable[[], Mapping[str, _V]],
    ) -> None:
        self._known = known
        self._under = under
        self._whole = whole
        self._state: Mapping[str, _V] | None = None

    @property
    def parsed(self) -> bool:
        """Whether the whole state was needed (what a probe is there to spare)."""
        return self._state is not None

    def _all(self) -> Mapping[str, _V]:
        if self._state is None:
            self._state = self._whole()
        return self._state

    def __getitem__(self, key: str) -> _V:
        known = self._known
        if key in known:
            value = known[key]
            if value is None:
                raise KeyError(key)
            return value
        if self._under and key.startswith(self._under):
            raise KeyError(key)
        return self._all()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __bool__(self) -> bool:
        return any(v is not None for v in self._known.values()) or bool(self._all())

    def known(self) -> list[str]:
        """The paths known to be there (without parsing anything)."""
        return [k for k, v in self._known.items() if v is not None]

    def covers(self, prefix: str) -> bool:
        """Whether every path that starts with `prefix` (a directory's "dir/") is known."""
        return prefix.startswith(self._under) if self._under else False


class Overlay(MutableMapping[str, _V]):
    """`base` with changes made on top of it, never in it (a state is not modified in
    place): a scan's working copy of a probed state, which a copy would parse whole."""

    def __init__(self, base: Mapping[str, _V]) -> None:
        self._base = base
        self._top: dict[str, _V] = {}
        #: removed from `base` (never also in `_top`)
        self._gone: set[str] = set()

    @property
    def base(self) -> Mapping[str, _V]:
        return self._base

    def __getitem__(self, key: str) -> _V:
        top = self._top
        if key in top:
            return top[key]
        if key in self._gone:
            raise KeyError(key)
        return self._base[key]

    def __setitem__(self, key: str, value: _V) -> None:
        self._top[key] = value
        self._gone.discard(key)

    def __delitem__(self, key: str) -> None:
        self[key]  # KeyError when it is not there
        self._top.pop(key, None)
        self._gone.add(key)

    def __iter__(self) -> Iterator[str]:
        top, gone, base = self._top, self._gone, self._base
        for key in base:
            if key not in gone:
                yield key
        for key in top:
            if key not in base:
                yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __bool__(self) -> bool:
        if self._top:
            return True
        base = self._base
        if isinstance(base, Probed) and any(k not in self._gone for k in base.known()):
            return True
        return any(True for _ in self)

    def under(self, prefix: str) -> list[str]:
        """The paths that start with `prefix` (a directory's "dir/"), without parsing a
        probed base that knows every path under it."""
        base = self._base
        if isinstance(base, Probed) and base.covers(prefix):
            named = dict.fromkeys(itertools.chain(base.known(), self._top))
            return [k for k in named if k.startswith(prefix) and k in self]
        return [k for k in self if k.startswith(prefix)]


def probe(snap: Snapshot, paths: Collection[str], under: Collection[str] = ()) -> Journal | None:
    """The journal `snap` names, read for `paths` and for every path under the directories
    `under` (each ending in "/") only: the lines that name one of them are parsed, the others
    only searched (a 100,000-entry state is 12 MB: parsed whole, it was most of a one-file
    apply); any other path is parsed with the whole state when first looked up. None: too
    many paths to be worth it, or the lines parsed do not make a journal (`load` then tells
    what holds).

    Why unparsed lines are trusted: a probe is made of a state a keeper vouched for by inode
    and length, and a scan tells a keeper only of a state it held whole, or probed and then
    appended its own line to; the lines parsed are checked as `load` checks them."""
    seq, base = snap.seq, snap.base
    if len(paths) + len(under) > PROBE_MAX or type(seq) is not int or type(base) is not int:
        return None
    wanted = set(paths)
    dirs = tuple(under)
    # a path's name as every line writes it (`_line`: JSON, ASCII); a directory's without
    # its closing quote (every path under it starts so)
    needles = [json.dumps(p).encode("ascii") for p in wanted]
    needles += [json.dumps(d).encode("ascii")[:-1] for d in dirs]
    entries: dict[str, Entry | None] = dict.fromkeys(wanted)
    inos: dict[str, int | None] = dict.fromkeys(wanted)
    if needles:
        found = re.compile(b"|".join(map(re.escape, needles)))
        read = snap._reader()
        last = -1  # the sequence number of the last line parsed
        rest = b""
        while True:
            chunk = read(_COPY)
            if not chunk:
                break
            data = rest + chunk if rest else chunk
            end = data.rfind(b"\n") + 1  # whole lines only (a name never spans two)
            after = 0  # the end of the line parsed last
            for hit in found.finditer(data, 0, end):
                if hit.start() < after:
                    continue  # in that line
                start = data.rfind(b"\n", 0, hit.start()) + 1
                after = data.index(b"\n", hit.start()) + 1
                got = _probed_line(data[start : after - 1], last, seq)
                if got is None:
                    return None
                last, sets, got_inos, gone = got
                for p, e in sets.items():
                    if p in wanted or (dirs and p.startswith(dirs)):
                        entries[p] = e
                        inos[p] = got_inos.get(p)
                for p in gone:
                    if isinstance(p, str) and (p in wanted or (dirs and p.startswith(dirs))):
                        entries[p] = inos[p] = None
            rest = data[end:]
        if rest:
            return None  # the state ends in a cut line: not one a keeper vouched for
    return Journal(
        snap.path,
        Probed(entries, dirs, snap._load),
        Probed(inos, dirs, snap.inos),
        dict(snap.meta),
        seq,
        snap.ident[0],
        snap.ident[1],
        base,
    )


def _probed_line(
    data: bytes, last: int, seq: int
) -> tuple[int, dict[str, Entry], dict[str, int], list[Any]] | None:
    """One line a probe parses, checked as `_apply` checks it (and numbered after `last`, at
    most `seq`): (its sequence number, entries set, their inodes, paths removed); None when
    it is not one."""
    try:
        obj = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(obj, dict):
        return None
    got = obj.get("seq")
    if type(got) is not int or not last < got <= seq or (got == 0) != (obj.get("reset") is True):
        return None
    sets = _entries(obj.get("set", {}))
    raw_ino, gone = obj.get("ino", []), obj.get("del", [])
    if (
        sets is None
        or not isinstance(raw_ino, list)
        or len(raw_ino) != len(sets)
        or not all(type(v) is int for v in raw_ino)
        or not isinstance(gone, list)
        or not isinstance(obj.get("meta", {}), dict)
    ):
        return None
    # 0: no inode recorded
    return got, sets, {p: n for p, n in zip(sets, raw_ino, strict=True) if n}, gone


def _last_meta(tail: bytes, start: int) -> dict[str, Any] | None:
    """The metadata of the last line of `tail` (the end of a journal, from offset `start`);
    None when the last line is cut, not whole in `tail`, or not a metadata line."""
    obj = _last_line(tail, start)
    meta = obj.get("meta") if obj is not None else None
    return dict(meta) if isinstance(meta, dict) else None


def _last_line(tail: bytes, start: int) -> dict[str, Any] | None:
    """The last line of `tail` (the end of a journal, from offset `start`), parsed; None when
    it is cut, not whole in `tail`, or not an object."""
    if not tail.endswith(b"\n"):
        return None
    cut = tail.rfind(b"\n", 0, len(tail) - 1)
    if cut < 0 and start > 0:
        return None
    try:
        obj = json.loads(tail[cut + 1 : -1].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def append(
    path: Path,
    entries: Mapping[str, Entry],
    changed: Collection[str],
    meta: dict[str, Any],
    expect: Callable[[dict[str, Any]], bool],
) -> bool:
    """Append one delta (the `changed` paths: their entries in `entries`, or removed) to the
    journal at `path` without reading its entries, if its current metadata passes `expect`
    and the deltas may still grow; False (nothing written) otherwise: the caller then writes
    the whole state."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        size = os.fstat(fd).st_size
        start = max(0, size - _TAIL)
        tail = os.pread(fd, size - start, start)
        cut = tail.rfind(b"\n", 0, len(tail) - 1)
        if not tail.endswith(b"\n") or (cut < 0 and start > 0):
            return False
        try:
            last = json.loads(tail[cut + 1 : -1].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return False
        if not isinstance(last, dict) or not isinstance(last.get("meta"), dict):
            return False
        seq, base = last.get("seq"), last.get("base")
        if type(seq) is not int or type(base) is not int or not expect(last["meta"]):
            return False
        if size + _least_bytes(changed) > _GROWTH * base + _SLACK:
            return False
        sets = {p: entries[p] for p in changed if p in entries}
        gone = [p for p in changed if p not in entries]
        delta: dict[str, Any] = {"seq": seq + 1, "meta": meta, "base": base}
        if sets:
            delta["set"] = sets
            delta["ino"] = [0] * len(sets)
        if gone:
            delta["del"] = gone
        line = _line(delta)
        if size + len(line) > _GROWTH * base + _SLACK or os.fstat(fd).st_size != size:
            return False
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
        return True
    finally:
        os.close(fd)


def fits(path: Path, changed: Collection[str]) -> bool:
    """Whether `append` would likely take a delta naming `changed` (the journal is there, its
    last line whole, and the deltas may grow by that much): a guess from its size and last
    line; `append` itself decides."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        size = os.fstat(fd).st_size
        start = max(0, size - _TAIL)
        last = _last_line(os.pread(fd, size - start, start), start)
    finally:
        os.close(fd)
    base = last.get("base") if last is not None else None
    return type(base) is int and size + _least_bytes(changed) <= _GROWTH * base + _SLACK


def read_meta(path: Path) -> dict[str, Any] | None:
    """The journal's current metadata without reading its entries (the last line holds it);
    None when there is no journal, or when it can only be had by reading it all."""
    path = Path(path)
    j = _CACHE.get(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if j is not None and j.ino == st.st_ino and j.length == st.st_size and not j.broken:
            return j.meta if j.exists else None
        seen = _METAS.get(path)
        if seen is not None and seen[0] == (st.st_ino, st.st_size):
            # why: a watch pass asks for the push record's metadata three times; the file
            # only grows by appends or is replaced whole (a new inode), as `_CACHE` assumes
            return dict(seen[1])
        start = max(0, st.st_size - _TAIL)
        f.seek(start)
        tail = f.read()
    meta = _last_meta(tail, start)
    if meta is None:
        return None
    if len(_METAS) >= _CACHE_MAX:
        _METAS.clear()
    _METAS[path] = ((st.st_ino, st.st_size), dict(meta))
    return dict(meta)


#: the metadata `read_meta` last read from each journal's tail, by its (inode, length)
_METAS: dict[Path, tuple[tuple[int, int], dict[str, Any]]] = {}


def changes_since(
    path: Path, at: list[int], upto: list[int], expect: Callable[[dict[str, Any]], bool]
) -> dict[str, Entry | None] | None:
    """The paths the journal at `path` changed between two of its positions (inode, length)
    and their entries at the first one (None: not there then), read from the lines between
    them alone; None when that cannot be told: another file, a line there without the
    entries it replaced (`Journal.write`'s `was`), or the state at `at` is not one
    `expect` accepts (its metadata line is checked: a reused inode is another state)."""
    ino, start, end = at[0], at[1], upto[1]
    if upto[0] != ino or not 0 < start <= end:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_ino != ino or st.st_size < end:
            return None
        head = os.pread(fd, min(start, _TAIL), start - min(start, _TAIL))
        data = os.pread(fd, end - start, start) if end > start else b""
    finally:
        os.close(fd)
    cut = head.rfind(b"\n", 0, len(head) - 1)
    if not head.endswith(b"\n") or (cut < 0 and len(head) < start):
        return None
    try:
        last = json.loads(head[cut + 1 : -1].decode("ascii"))
        lines = [json.loads(line.decode("ascii")) for line in data.splitlines()]
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(last, dict) or not isinstance(last.get("meta"), dict):
        return None
    seq = last.get("seq")
    if type(seq) is not int or not expect(last["meta"]) or (data and not data.endswith(b"\n")):
        return None
    old: dict[str, Entry | None] = {}
    for obj in lines:
        seq += 1
        if not isinstance(obj, dict) or obj.get("seq") != seq or obj.get("reset"):
            return None
        was, sets, gone = obj.get("was"), obj.get("set", {}), obj.get("del", [])
        if not (isinstance(was, dict) and isinstance(sets, dict) and isinstance(gone, list)):
            return None
        if not all(p in was for p in sets) or not all(type(p) is str and p in was for p in gone):
            return None
        for p, raw in was.items():
            if p in old:
                continue  # an earlier line named it: its entry then is the one kept
            if raw is None:
                old[p] = None
                continue
            got = _entries({p: raw})
            if got is None:
                return None
            old[p] = got[p]
    return old


class _CutShortError(Exception):
    """The journal being copied ended before the state it was read as."""


def derive(source: Path, path: Path, entries: Mapping[str, Entry], meta: dict[str, Any]) -> bool:
    """Make the journal at `path` hold `entries` with `meta` by copying the bytes of the
    journal at `source`, when this process last read or wrote that one as exactly `entries`
    (and it has not been replaced since), plus one metadata line; False (nothing written)
    otherwise. Why: the push record is most often the index's state, and encoding 100,000
    entries a second time is the bulk of recording an initial push."""
    staged = stage_derive(source, path, entries, meta)
    if staged is None:
        return False
    staged.install()
    return True


class Staged:
    """A journal's next state written beside it, not yet in its place (`install`)."""

    def __init__(self, tmp: Path, after: Journal) -> None:
        self.tmp = tmp
        self.after = after

    def install(self) -> None:
        install_staged(self.tmp, self.after.path)
        self.after.ino = os.stat(self.after.path).st_ino
        _remember(self.after)

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


def stage_derive(
    source: Path, path: Path, entries: Mapping[str, Entry], meta: dict[str, Any]
) -> Staged | None:
    """`derive`'s bytes written beside `path`, to be installed later; None when `derive`
    could not make them."""
    j = _CACHE.get(Path(source))
    if j is None or j.entries is not entries or not j.exists or j.broken or j.ino is None:
        return None
    try:
        fd = os.open(j.path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    tail = _line({"seq": j.seq + 1, "meta": meta, "base": j.base})
    copied = [0]

    def parts(f: BinaryIO) -> Iterator[bytes]:
        # in chunks: the index is 12 MB at 100,000 entries
        while copied[0] < j.length:
            data = f.read(min(_COPY, j.length - copied[0]))
            if not data:
                raise _CutShortError  # the temp file is removed, nothing replaced
            copied[0] += len(data)
            yield data
        yield tail

    path = Path(path)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_ino != j.ino or st.st_size < j.length:
            return None
        # writers append or replace whole: the first `length` bytes are still that state
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp = write_staged(path, parts(f))
        except _CutShortError:
            return None
    after = Journal(path, j.entries, j.inos, meta, j.seq + 1, None, j.length + len(tail), j.base)
    return Staged(tmp, after)
