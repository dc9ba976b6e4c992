"""The local manifest: what the local tree holds, with a hash cache so unchanged files are
never re-hashed.

It covers the local root minus what the ignore rules exclude. An entry is
`(type, size, mtime_ns, mode, ref)` with type "f" (regular file, ref = sha256 hex), "d"
(directory, ref = "") or "l" (symlink, ref = the link target, never followed). Sockets, fifos
and devices are not synced. The digest covers paths, types, sizes, modes and refs but not
mtimes, so it identifies content, and the remote can hold the same digest for the same tree.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

from reconciler.errors import SyncHaltedError
from reconciler.sync.ignore import IgnoreRules, load_rules
from reconciler.sync.options import SyncOptions
from reconciler.sync.records import HASH_CACHE, PUSH_RECORD, read_record, write_record

__all__ = [
    "CHUNK",
    "Entry",
    "Manifest",
    "hash_file",
    "last_push_record",
    "scan_local",
]

#: read/write chunk size everywhere in the engine (the issue caps it at 1 MiB)
CHUNK = 1 << 20


class Entry(NamedTuple):
    """One path of a manifest."""

    type: str  # "f" | "d" | "l"
    size: int
    mtime_ns: int
    mode: int  # permission bits only (stat.S_IMODE)
    ref: str  # sha256 hex for files, link target for links, "" for dirs

    def same_content(self, other: Entry) -> bool:
        """Equal as far as the digest is concerned (mtime ignored)."""
        return (self.type, self.size, self.mode, self.ref) == (
            other.type,
            other.size,
            other.mode,
            other.ref,
        )


@dataclass(frozen=True)
class Manifest:
    """A tree: relative "/"-separated path -> `Entry` (the root itself is not an entry)."""

    entries: Mapping[str, Entry] = field(default_factory=dict)

    @cached_property
    def digest(self) -> str:
        return self.digest_of(self.entries)

    def digest_of(self, paths: Iterable[str]) -> str:
        """The digest of the part of the tree at `paths` (each one an entry)."""
        h = hashlib.sha256()
        for path in sorted(paths):
            e = self.entries[path]
            line = f"{path}\0{e.type}\0{e.size}\0{e.mode:o}\0{e.ref}\n"
            h.update(line.encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    @cached_property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries.values() if e.type == "f")

    @cached_property
    def file_count(self) -> int:
        return sum(1 for e in self.entries.values() if e.type == "f")

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


def hash_file(fd: int) -> str:
    """sha256 of an open file, read in chunks (never the whole file in memory)."""
    h = hashlib.sha256()
    while True:
        chunk = os.read(fd, CHUNK)
        if not chunk:
            return h.hexdigest()
        h.update(chunk)


#: parsed push records by path, with the (inode, size, mtime) they were parsed from: one apply
#: reads the same record up to three times (plan, push, the converged pass), ~3 ms each
_RECORDS: dict[Path, tuple[tuple[int, int, int], tuple[Manifest, dict[str, Any]]]] = {}
_RECORDS_MAX = 64


def last_push_record(opts: SyncOptions) -> tuple[Manifest, dict[str, Any]] | None:
    """Our last push record (manifest + metadata), or None when we never pushed.

    Callers must not modify what they get: it may be shared with the next caller.
    """
    path = Path(opts.state_dir) / PUSH_RECORD
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    key = (st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _RECORDS.get(path)
    if hit is not None and hit[0] == key:
        return hit[1]
    data = read_record(opts.state_dir, PUSH_RECORD)
    if data is None or not isinstance(data.get("entries"), dict):
        return None
    try:
        parsed = Manifest.from_json(data["entries"]), data
    except (TypeError, ValueError):
        return None
    if len(_RECORDS) >= _RECORDS_MAX:
        _RECORDS.clear()
    # why the key is safe: records are replaced by rename (a new inode), never rewritten in place
    _RECORDS[path] = (key, parsed)
    return parsed


def scan_local(
    opts: SyncOptions,
    rules: IgnoreRules | None = None,
    *,
    on_change: Callable[[], None] | None = None,
) -> Manifest:
    """Walk the local root and build its manifest, hashing only files the cache cannot vouch for.

    Raises `SyncHaltedError` when the root is missing (or not a directory), or when it is empty
    while our last push record had files: both look like an accident (unmounted volume,
    `rm -rf` in the wrong window) and a push would delete the sandbox's copy.

    `on_change` is called once, as soon as an entry is seen that differs from our last push
    record (new, other type, size or mtime) or when the walk ends with entries missing: a hint
    that a push is coming, which lets the caller open its connection while the walk goes on.
    It decides nothing; the manifest does.
    """
    root = Path(opts.local_root)
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise SyncHaltedError(
            f"local root {root} is missing; nothing was sent or deleted"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise SyncHaltedError(f"local root {root} is not a directory; nothing was sent or deleted")
    rules = rules if rules is not None else load_rules(opts)
    cache_data = read_record(opts.state_dir, HASH_CACHE) or {}
    raw_cache = cache_data.get("files", {})
    cache: dict[str, Any] = raw_cache if isinstance(raw_cache, dict) else {}
    new_cache: dict[str, list[Any]] = {}
    entries: dict[str, Entry] = {}
    hashed = 0
    last = last_push_record(opts) if on_change is not None else None
    pushed: Mapping[str, Entry] = last[0].entries if last is not None else {}
    hint = on_change

    def changed(rel: str, mode: int, size: int, mtime_ns: int) -> None:
        nonlocal hint
        was = pushed.get(rel)
        if stat.S_ISDIR(mode):
            news = was is None or was.type != "d"  # a directory's mtime moves with its files
        elif stat.S_ISREG(mode) or stat.S_ISLNK(mode):
            kind = "f" if stat.S_ISREG(mode) else "l"
            news = was is None or (was.type, was.size, was.mtime_ns) != (kind, size, mtime_ns)
        else:
            news = False  # sockets, fifos, devices are never synced
        call = hint
        if news and call is not None:
            hint = None
            call()

    def walk(dir_path: str, rel_dir: str) -> None:
        nonlocal hashed
        try:
            it = os.scandir(dir_path)
        except (FileNotFoundError, NotADirectoryError):
            return  # vanished while walking: the next pass sees it
        with it:
            children = sorted(it, key=lambda d: d.name)
        for child in children:
            rel = f"{rel_dir}/{child.name}" if rel_dir else child.name
            try:
                cst = child.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            mode = cst.st_mode
            is_dir = stat.S_ISDIR(mode)
            if rules.excluded(rel, is_dir):
                continue
            if hint is not None:
                changed(rel, mode, cst.st_size, cst.st_mtime_ns)
            if is_dir:
                entries[rel] = Entry("d", 0, cst.st_mtime_ns, stat.S_IMODE(mode), "")
                walk(child.path, rel)
            elif stat.S_ISLNK(mode):
                try:
                    target = os.readlink(child.path)
                except OSError:
                    continue
                entries[rel] = Entry("l", len(target), cst.st_mtime_ns, 0o777, target)
            elif stat.S_ISREG(mode):
                key = [cst.st_ino, cst.st_size, cst.st_mtime_ns]
                cached = cache.get(rel)
                if isinstance(cached, list) and len(cached) == 4 and cached[:3] == key:
                    digest = str(cached[3])
                else:
                    try:
                        fd = os.open(child.path, os.O_RDONLY | os.O_NOFOLLOW)
                    except OSError:
                        continue
                    try:
                        fst = os.fstat(fd)
                        digest = hash_file(fd)
                    finally:
                        os.close(fd)
                    hashed += 1
                    key = [fst.st_ino, fst.st_size, fst.st_mtime_ns]
                    cst_size, cst_mtime = fst.st_size, fst.st_mtime_ns
                    entries[rel] = Entry("f", cst_size, cst_mtime, stat.S_IMODE(mode), digest)
                    new_cache[rel] = [*key, digest]
                    continue
                entries[rel] = Entry("f", cst.st_size, cst.st_mtime_ns, stat.S_IMODE(mode), digest)
                new_cache[rel] = [*key, digest]
            # sockets, fifos and devices are not part of a source tree: skipped

    walk(str(root), "")
    if hint is not None and last is not None and any(p not in entries for p in pushed):
        hint()  # deletions only
    manifest = Manifest(entries)
    if not entries:
        last = last_push_record(opts)
        if last is not None and last[0].file_count > 0:
            n = last[0].file_count
            raise SyncHaltedError(
                f"local root {root} is empty but the last push had {n} files; refusing to "
                f"delete {n} files in the sandbox: restore the directory, or drop the session "
                "(`ukc delete`) and re-create it"
            )
    if hashed or set(new_cache) != set(cache):
        write_record(opts.state_dir, HASH_CACHE, {"version": 1, "files": new_cache}, durable=False)
    return manifest
