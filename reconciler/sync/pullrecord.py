"""The pull record: each file sync-back wrote here, as the sandbox had it (size, mtime, sha256)
and which sandbox it came from ("instance-uuid/boot-id", for `sync.back_delete`).

Kept as a journal (`journal`), like the index and the push record: a pull appends one line
naming the files it wrote or dropped, so pulling one changed file of 100,000 writes one short
line instead of the whole record, and a pull that changed nothing writes nothing. In memory an
entry is the journal's `Entry` tuple: `("f", size, mtime_ns, source number, sha256)`, the
source numbered in the record's metadata (`sources`) instead of repeated in every entry. The
metadata also holds the file count and bytes, so `ukc plan` reads one line.

An older ukc kept the record as one JSON document (`pull.json`, path -> [size, mtime, sha256,
source]); it is read when there is no journal, and the first save replaces it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from reconciler.sync import journal
from reconciler.sync.entry import Entry
from reconciler.sync.records import read_record

__all__ = ["PULL_JOURNAL", "PULL_LEGACY", "PullRecord", "load_pull_record", "pull_meta"]

PULL_JOURNAL = "pull.jnl"
#: the whole-document record of an older ukc
PULL_LEGACY = "pull.json"
_VERSION = 2


class PullRecord(MutableMapping[str, list[Any]]):
    """path -> [size, mtime_ns, sha256(, source)] over compact entries.

    The entries it was loaded with are never modified (the journal's state, shared with its
    cache): the first change copies them. `changed` names the paths set or removed since.
    """

    def __init__(self, entries: Mapping[str, Entry], sources: list[str]) -> None:
        self._base = entries
        self._own: dict[str, Entry] | None = None
        self.sources = list(sources)
        self._numbers = {s: i + 1 for i, s in enumerate(self.sources)}
        self.changed: set[str] = set()

    @property
    def entries(self) -> Mapping[str, Entry]:
        return self._own if self._own is not None else self._base

    def _mine(self) -> dict[str, Entry]:
        if self._own is None:
            self._own = dict(self._base)
        return self._own

    def copy(self) -> PullRecord:
        """A record to change while this one stays as it was."""
        return PullRecord(self.entries, self.sources)

    def source_of(self, e: Entry) -> str:
        n = e.mode
        return self.sources[n - 1] if 0 < n <= len(self.sources) else ""

    def put(self, path: str, size: int, mtime_ns: int, sha: str, source: str = "") -> None:
        n = 0
        if source:
            n = self._numbers.get(source, 0)
            if not n:
                self.sources.append(source)
                n = self._numbers[source] = len(self.sources)
        e = Entry("f", size, mtime_ns, n, sha)
        if self.entries.get(path) != e:
            self._mine()[path] = e
            self.changed.add(path)

    def __getitem__(self, path: str) -> list[Any]:
        e = self.entries[path]
        source = self.source_of(e)
        return [e.size, e.mtime_ns, e.ref, source] if source else [e.size, e.mtime_ns, e.ref]

    def __setitem__(self, path: str, rec: list[Any]) -> None:
        source = rec[3] if len(rec) >= 4 and isinstance(rec[3], str) else ""
        self.put(path, rec[0], rec[1], rec[2], source)

    def __delitem__(self, path: str) -> None:
        del self._mine()[path]
        self.changed.add(path)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, path: object) -> bool:
        return path in self.entries

    def meta(self) -> dict[str, Any]:
        """The metadata saved with the entries: sources in use, file count and bytes."""
        entries = self.entries
        used = sorted({e.mode for e in entries.values() if e.mode})
        if len(used) < len(self.sources):
            # drop the sources no entry names any more (renumbering the entries that do)
            renumber = {old: new + 1 for new, old in enumerate(used)}
            mine = self._mine()
            for p, e in mine.items():
                if e.mode and renumber[e.mode] != e.mode:
                    mine[p] = e._replace(mode=renumber[e.mode])
                    self.changed.add(p)
            self.sources = [self.sources[n - 1] for n in used]
            self._numbers = {s: i + 1 for i, s in enumerate(self.sources)}
            entries = mine
        return {
            "version": _VERSION,
            "sources": list(self.sources),
            "files": len(entries),
            "bytes": sum(e.size for e in entries.values()),
        }


def _sources(meta: Mapping[str, Any]) -> list[str] | None:
    raw = meta.get("sources")
    if meta.get("version") != _VERSION or not isinstance(raw, list):
        return None
    return raw if all(isinstance(s, str) for s in raw) else None


def load_pull_record(state_dir: Path) -> PullRecord:
    """Our last pull record (an empty one when there is none or it cannot be read: the next
    pull then compares contents, which is slower, never wrong)."""
    state_dir = Path(state_dir)
    j = journal.load(state_dir / PULL_JOURNAL)
    if j.exists:
        sources = _sources(j.meta)
        if sources is not None:
            return PullRecord(j.entries, sources)
        return PullRecord({}, [])
    return _legacy(state_dir)


def _legacy(state_dir: Path) -> PullRecord:
    data = read_record(state_dir, PULL_LEGACY) or {}
    files = data.get("files")
    rec = PullRecord({}, [])
    if not isinstance(files, dict):
        return rec
    for path, v in files.items():
        if (
            isinstance(v, list)
            and len(v) >= 3
            and type(v[0]) is int
            and type(v[1]) is int
            and isinstance(v[2], str)
        ):
            source = v[3] if len(v) >= 4 and isinstance(v[3], str) else ""
            rec.put(path, v[0], v[1], v[2], source)
    return rec


def save_pull_record(state_dir: Path, rec: PullRecord) -> None:
    """Make `rec` the record: one appended line with what changed, or (no journal yet, or the
    deltas outgrew the state) the whole state, written atomically."""
    state_dir = Path(state_dir)
    path = state_dir / PULL_JOURNAL
    j = journal.load(path)
    meta = rec.meta()
    current = _sources(j.meta) if j.exists else None
    if current is not None and not rec.changed and j.meta == meta:
        return
    # appended only onto the state `rec` was built on (same sources numbering)
    changed = rec.changed if current is not None and j.entries is rec._base else None
    j.write(rec.entries, {}, meta, changed)
    with contextlib.suppress(OSError):
        (state_dir / PULL_LEGACY).unlink()


def pull_meta(state_dir: Path) -> dict[str, Any] | None:
    """File count and bytes of the record without reading its entries (None: read them)."""
    meta = journal.read_meta(Path(state_dir) / PULL_JOURNAL)
    if meta is None or _sources(meta) is None:
        return None
    if type(meta.get("files")) is not int or type(meta.get("bytes")) is not int:
        return None
    return meta
