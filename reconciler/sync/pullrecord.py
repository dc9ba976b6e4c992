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
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import IO, Any

from reconciler.sync import journal
from reconciler.sync.entry import Entry
from reconciler.sync.records import read_record

__all__ = ["PULL_JOURNAL", "PULL_LEGACY", "PullRecord", "load_pull_record", "pull_meta"]

PULL_JOURNAL = "pull.jnl"
#: the whole-document record of an older ukc
PULL_LEGACY = "pull.json"
_VERSION = 2


#: changes held as entries before they are encoded into the spool (one journal line's worth)
_SPOOL = 2000


class PullRecord(MutableMapping[str, list[Any]]):
    """path -> [size, mtime_ns, sha256(, source)] over compact entries.

    The entries it was loaded with are never modified (the journal's state, shared with its
    cache). Changes are held as entries up to `_SPOOL` of them, then encoded (one JSON text
    per `_SPOOL` entries): a pull that brings 100,000 files does not keep 100,000 paths,
    digests and tuples alive (nor the heap they fragment); the save writes the state from the
    loaded entries and the encoded parts, one part at a time (`journal.rewrite`). Reading a
    changed record as a mapping decodes it whole (tests, rare callers).
    """

    def __init__(self, entries: Mapping[str, Entry], sources: list[str]) -> None:
        self._base = entries
        self._recent: dict[str, Entry] = {}
        #: encoded earlier changes: JSON texts of at most `_SPOOL` entries, oldest first, each
        #: as (offset, length) in an unnamed temp file, or the text itself when none can be made
        self._spool: list[tuple[int, int] | bytes] = []
        self._spool_file: IO[bytes] | None = None
        self._removed: set[str] = set()
        self.sources = list(sources)
        self._numbers = {s: i + 1 for i, s in enumerate(self.sources)}
        # the state's counts, kept as changes come (`meta` without decoding the spool)
        self._files = len(entries)
        self._bytes = sum(e.size for e in entries.values())
        #: loaded entries per source number still in the state; numbers a change used
        self._uses = Counter(e.mode for e in entries.values())
        self._new_modes: set[int] = set()
        self._view: dict[str, Entry] | None = None

    @property
    def changed(self) -> set[str]:
        """The paths set or removed since loading that are not encoded yet."""
        return set(self._recent) | self._removed

    @property
    def spooled(self) -> bool:
        return bool(self._spool)

    @property
    def entries(self) -> Mapping[str, Entry]:
        if not (self._recent or self._spool or self._removed):
            return self._base
        if self._view is None:
            view = dict(self._base)
            for text in self._spooled():
                view.update(journal.entries_of(text) or {})
            view.update(self._recent)
            for p in self._removed:
                view.pop(p, None)
            self._view = view
        return self._view

    def copy(self) -> PullRecord:
        """A record to change while this one stays as it was."""
        return PullRecord(self.entries, self.sources)

    def source_of(self, e: Entry) -> str:
        n = e.mode
        return self.sources[n - 1] if 0 < n <= len(self.sources) else ""

    def _current(self, path: str) -> Entry | None:
        """The entry of `path` as far as known without decoding the spool."""
        e = self._recent.get(path)
        if e is None and path not in self._removed:
            e = self._base.get(path)
        return e

    def put(self, path: str, size: int, mtime_ns: int, sha: str, source: str = "") -> None:
        n = 0
        if source:
            n = self._numbers.get(source, 0)
            if not n:
                self.sources.append(source)
                n = self._numbers[source] = len(self.sources)
        e = Entry("f", size, mtime_ns, n, sha)
        was = self._current(path)
        if was == e:
            return
        self._view = None
        if was is None:
            # (a path sent twice by a sandbox, its first copy spooled, is counted twice: the
            # counts are for `ukc plan`, the entries are right)
            self._files += 1
            self._bytes += size
        else:
            self._bytes += size - was.size
            if path not in self._recent:
                self._uses[was.mode] -= 1  # a loaded entry replaced
        self._new_modes.add(n)
        self._removed.discard(path)
        self._recent[path] = e
        if len(self._recent) >= _SPOOL:
            self._spool_text(_encode(self._recent))
            self._recent = {}

    def _spool_text(self, text: bytes) -> None:
        """Keep encoded changes on disk: a pull of 100,000 files would hold ~10 MB of them
        (the sync-back's peak RSS grew by that much to the end of the pull)."""
        try:
            f = self._spool_file
            if f is None:
                # open as long as the record lives; unnamed, so gone with its last fd
                f = self._spool_file = tempfile.TemporaryFile()  # noqa: SIM115
            at = f.seek(0, os.SEEK_END)
            f.write(text)
        except OSError:
            self._spool.append(text)  # no room for a temp file: held here, as before
            return
        self._spool.append((at, len(text)))

    def _spooled(self) -> Iterator[bytes]:
        """The encoded changes, oldest first."""
        for part in self._spool:
            if isinstance(part, bytes):
                yield part
                continue
            at, n = part
            f = self._spool_file
            assert f is not None
            f.seek(at)
            yield f.read(n)

    def __getitem__(self, path: str) -> list[Any]:
        e = self.entries[path]
        source = self.source_of(e)
        return [e.size, e.mtime_ns, e.ref, source] if source else [e.size, e.mtime_ns, e.ref]

    def __setitem__(self, path: str, rec: list[Any]) -> None:
        source = rec[3] if len(rec) >= 4 and isinstance(rec[3], str) else ""
        self.put(path, rec[0], rec[1], rec[2], source)

    def __delitem__(self, path: str) -> None:
        if not self.forget(path):
            raise KeyError(path)

    def pop(self, path: str, *default: Any) -> Any:
        """Remove `path` (its value is not returned: the spool is not decoded for it)."""
        if not self.forget(path) and not default:
            raise KeyError(path)
        return default[0] if default else None

    def forget(self, path: str) -> bool:
        """Remove `path` from the record; False when it was not known (before the spool)."""
        was = self._current(path)
        if was is None:
            return False
        self._view = None
        self._files -= 1
        self._bytes -= was.size
        if self._recent.pop(path, None) is None:
            self._uses[was.mode] -= 1
        self._removed.add(path)
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, path: object) -> bool:
        return path in self.entries

    def _renumbering(self) -> dict[int, int]:
        """Old -> new source numbers once the sources no entry names are dropped."""
        if self._spool:
            used = {n for n, k in self._uses.items() if n and k > 0} | (self._new_modes - {0})
        else:
            used = {e.mode for e in self.entries.values() if e.mode}
        return {old: new + 1 for new, old in enumerate(sorted(used))}

    def meta(self) -> dict[str, Any]:
        """The metadata saved with the entries: sources in use, file count and bytes (a
        record that spooled drops unused sources when it is written: `save_pull_record`)."""
        renumber = self._renumbering()
        if len(renumber) < len(self.sources) and not self._spool:
            # drop the sources no entry names any more (renumbering the entries that do)
            for p, e in list(self.entries.items()):
                if e.mode and renumber[e.mode] != e.mode:
                    self._recent[p] = e._replace(mode=renumber[e.mode])
            self._view = None
        sources = [self.sources[old - 1] for old in sorted(renumber)]
        if not self._spool:
            self.sources = sources
            self._numbers = {s: i + 1 for i, s in enumerate(self.sources)}
            entries = self.entries
            return {
                "version": _VERSION,
                "sources": list(sources),
                "files": len(entries),
                "bytes": sum(e.size for e in entries.values()),
            }
        return {
            "version": _VERSION,
            "sources": sources,
            "files": self._files,
            "bytes": self._bytes,
        }

    def parts(self) -> Iterator[Mapping[str, Entry]]:
        """The state as parts to write one after the other (a later one's entry replaces an
        earlier one's): the loaded entries but those removed, then the changes, each part
        decoded when its turn comes, sources renumbered as `meta` says."""
        renumber = self._renumbering()
        removed = self._removed
        base = self._base

        def fix(part: Mapping[str, Entry]) -> dict[str, Entry]:
            return {
                p: e._replace(mode=renumber.get(e.mode, 0)) if e.mode else e
                for p, e in part.items()
                if p not in removed
            }

        paths = list(base)
        for start in range(0, len(paths), _SPOOL):
            yield fix({p: base[p] for p in paths[start : start + _SPOOL]})
        for text in self._spooled():
            yield fix(journal.entries_of(text) or {})
        yield fix(self._recent)


def _encode(entries: Mapping[str, Entry]) -> bytes:
    return json.dumps(entries, separators=(",", ":")).encode("ascii")


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
    deltas outgrew the state) the whole state, written atomically; a record whose changes
    were spooled is written whole from its parts, never held whole in memory."""
    state_dir = Path(state_dir)
    path = state_dir / PULL_JOURNAL
    j = journal.load(path)
    if rec.spooled:
        journal.rewrite(path, rec.parts(), rec.meta())
    else:
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
