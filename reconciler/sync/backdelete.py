"""Mirroring remote deletions on sync-back (`sync.back_delete: true`), behind guards.

It runs once a pull's whole stream ended and every pooled write finished, on what the pull saw
(`Seen`: each path the sandbox announced, accepted or refused, and the helper's end frame
`{"end": true, "errors": N, "missing": [back paths]}`), the pull record from before the pull
and the new one being built.

A local file is removed only when all of these hold; each one protects the user's files:
1. the pull record says a pull wrote it: nothing else under the back paths is ever touched;
2. it was pulled from this same instance and boot (the record's source, "uuid/boot_id"): a
   replaced or rebooted sandbox that lacks a file never "deleted" it;
3. the sandbox did not announce it, and the pull had no error: not abandoned, not stopped at
   a cap, no local write failure, and the helper listed and read everything (its end frame
   says so; a missing or malformed end frame counts as an error);
4. its back path, when a directory, did not vanish, empty or change kind in the sandbox (far
   more often an accident than intent; Mutagen halts there too); a single-file back path
   must be reported missing by the helper;
5. no parent the sandbox announced is anything but a directory there (a directory swapped
   for a symlink hides its files; it did not delete them);
6. locally it is still a regular file, reached through no-follow directory fds without
   creating anything, whose sha256 is the recorded one; a changed file is kept, reported
   once, and leaves the record (it is the user's now).
Then directories left empty strictly under a back path that the sandbox did not announce are
removed deepest first with rmdir (never recursively, never a back path or the local root).

A hostile sandbox gains nothing here: it can remove only files it could overwrite in place
with the same pull (unchanged files we wrote).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from reconciler.errors import HostileEntryError
from reconciler.sync.ignore import is_under
from reconciler.sync.manifest import hash_file

__all__ = [
    "REFUSED",
    "DeleteOutcome",
    "DirLookup",
    "Seen",
    "entry_source",
    "mirror_deletes",
    "source_id",
]

#: what a uuid or a boot id may look like (the boot id comes from the untrusted sandbox)
_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: marks a path the sandbox announced but the pull refused
REFUSED = "!"


def source_id(instance_uuid: str, boot_id: object) -> str:
    """`uuid/boot_id` of the sandbox a pull reads, or "" (no deletions) when either is
    unknown or malformed."""
    if not isinstance(boot_id, str) or not _ID.fullmatch(boot_id):
        return ""
    if not _ID.fullmatch(instance_uuid):
        return ""
    return f"{instance_uuid}/{boot_id}"


def entry_source(rec: object) -> str:
    """The source of a pull record entry; "" for entries of an older ukc (3 elements)."""
    if isinstance(rec, list) and len(rec) >= 4 and isinstance(rec[3], str):
        return rec[3]
    return ""


class DirLookup(Protocol):
    """The pull's no-follow directory fds (`pull._Tree`)."""

    def find(self, rel: str) -> int | None: ...

    def forget(self, rel: str) -> None: ...


@dataclass
class Seen:
    """What one pull learnt about the sandbox."""

    #: `source_id` of the sandbox read ("" when unknown)
    source: str
    #: every path the sandbox announced -> its kind ("f", "d", "l", "o"), REFUSED if refused
    paths: dict[str, str]
    #: the helper's end frame, untrusted; None when the stream did not end
    end: object = None
    aborted: str | None = None
    #: the cap the pull stopped at (it did not take in the whole listing)
    stopped: str | None = None
    local_errors: int = 0


@dataclass
class DeleteOutcome:
    deleted: list[str] = field(default_factory=list)
    #: "deleted in the sandbox but ...: path" for each file left in place
    kept: list[str] = field(default_factory=list)
    #: why deletions were not mirrored (all of them, or under one back path)
    skipped: list[str] = field(default_factory=list)


def mirror_deletes(
    tree: DirLookup,
    back: tuple[str, ...],
    record: Mapping[str, list[Any]],
    new_record: MutableMapping[str, list[Any]],
    seen: Seen,
) -> DeleteOutcome:
    """Remove the local files the guards allow; drops them (and vanished ones) from
    `new_record`."""
    out = DeleteOutcome()
    roots = frozenset(back)
    gone = [p for p in record if p not in seen.paths and is_under(p, roots) and _plain(p)]
    ours = [p for p in gone if seen.source and entry_source(record[p]) == seen.source]
    if not ours:
        if gone and not seen.source and any(entry_source(record[p]) for p in gone):
            out.skipped.append(
                "the sandbox's instance or boot id is unknown: no remote deletions mirrored"
            )
        return out
    missing = _missing(seen, back, out)
    if missing is None:
        return out
    halted = _halted_roots(back, record, seen, missing, out)
    deleted_dirs: set[str] = set()
    for path in sorted(ours):
        if any(path == b or path.startswith(b + "/") for b in halted):
            continue
        if path in back and path not in missing:
            out.skipped.append(f"{path}: neither sent nor reported missing by the sandbox")
            continue
        if not _parents_still_dirs(path, seen.paths):
            continue  # hidden behind something that is not a directory: not deleted
        verdict = _delete_one(tree, path, record[path])
        if verdict == "deleted":
            out.deleted.append(path)
            deleted_dirs.update(_dirs_to_tidy(path, back, seen.paths))
        elif verdict == "gone":
            pass
        elif verdict.startswith("error: "):
            reason = verdict.removeprefix("error: ")
            out.kept.append(
                f"deleted in the sandbox but could not be removed here ({reason}): {path}"
            )
            continue  # tried again next time
        else:
            out.kept.append(f"deleted in the sandbox but {verdict}: {path}")
        new_record.pop(path, None)
    _tidy(tree, deleted_dirs)
    return out


def _missing(seen: Seen, back: tuple[str, ...], out: DeleteOutcome) -> set[str] | None:
    """The back paths the helper reported missing, or None (with the reason) when this pull
    had an error: then nothing is deleted."""
    why = None
    end = seen.end if isinstance(seen.end, dict) else None
    errors = end.get("errors") if end is not None else None
    missing = end.get("missing") if end is not None else None
    if seen.aborted is not None:
        why = "the stream was abandoned"
    elif seen.stopped is not None:
        why = "the sync-back stopped before the end of the listing"
    elif seen.local_errors:
        why = f"{seen.local_errors} local write(s) failed"
    elif end is None:
        why = "the sandbox did not finish its listing"
    elif (
        not isinstance(errors, int)
        or isinstance(errors, bool)
        or errors < 0
        or not isinstance(missing, list)
        or not all(isinstance(m, str) and m in back for m in missing)
    ):
        why = "the sandbox sent a malformed end of listing"
    elif errors:
        why = f"the sandbox could not list or read {errors} entr{'y' if errors == 1 else 'ies'}"
    if why is not None:
        out.skipped.append(f"{why}: no remote deletions mirrored")
        return None
    assert isinstance(missing, list)
    return set(missing)


def _halted_roots(
    back: tuple[str, ...],
    record: Mapping[str, list[Any]],
    seen: Seen,
    missing: set[str],
    out: DeleteOutcome,
) -> set[str]:
    """Directory back paths that vanished, emptied or changed kind in the sandbox."""
    halted: set[str] = set()
    for b in back:
        if not any(p.startswith(b + "/") for p in record):
            continue  # never held anything we pulled (or a single file)
        kind = seen.paths.get(b)
        if b in missing or kind is None:
            state = "is missing"
        elif kind != "d":
            state = "is no longer a directory"
        elif not any(p.startswith(b + "/") for p in seen.paths):
            state = "is empty"
        else:
            continue
        halted.add(b)
        out.skipped.append(
            f"{b}/ {state} in the sandbox: no deletions under it (a vanished or emptied "
            "directory is more often an accident)"
        )
    return halted


def _plain(path: str) -> bool:
    """No empty, "." or ".." component: the record is ours, but a path that could walk up
    is never acted on."""
    return all(part not in ("", ".", "..") for part in path.split("/"))


def _parents_still_dirs(path: str, announced: dict[str, str]) -> bool:
    parts = path.split("/")
    for i in range(1, len(parts)):
        kind = announced.get("/".join(parts[:i]))
        if kind is not None and kind != "d":
            return False
    return True


def _delete_one(tree: DirLookup, path: str, rec: list[Any]) -> str:
    """What became of one candidate: "deleted", "gone" (nothing there), "error: ..." (tried
    again next time) or why the local file is kept."""
    size, sha = rec[0], rec[2]
    parent, _, name = path.rpartition("/")
    try:
        pfd = tree.find(parent)
    except HostileEntryError:
        return "its local parent is not a plain directory here"
    except OSError as exc:
        return f"error: {exc.strerror or exc.errno}"
    if pfd is None:
        return "gone"
    st = _lstat(name, pfd)
    if isinstance(st, str):
        return st
    if not stat.S_ISREG(st.st_mode) or st.st_size != size:
        return "changed here"
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=pfd)
    except FileNotFoundError:
        return "gone"
    except OSError as exc:
        return f"error: {exc.strerror or exc.errno}"
    try:
        fst = os.fstat(fd)
        same = (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino)
        local_sha = hash_file(fd) if same else None
    except OSError as exc:
        return f"error: {exc.strerror or exc.errno}"
    finally:
        os.close(fd)
    if local_sha != sha:
        return "changed here"
    # why: the name must still hold the file we hashed (a replacement meanwhile is the user's)
    again = _lstat(name, pfd)
    if isinstance(again, str):
        return again
    if _identity(again) != _identity(st):
        return "changed here"
    try:
        os.unlink(name, dir_fd=pfd)
    except FileNotFoundError:
        return "gone"
    except OSError as exc:
        return f"error: {exc.strerror or exc.errno}"
    return "deleted"


def _lstat(name: str, pfd: int) -> os.stat_result | str:
    """The entry's lstat, or the verdict when there is none ("gone", "error: ...")."""
    try:
        return os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        return "gone"
    except OSError as exc:
        return f"error: {exc.strerror or exc.errno}"


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _dirs_to_tidy(path: str, back: tuple[str, ...], announced: dict[str, str]) -> list[str]:
    """Parents of a deleted file that may be removed once empty: strictly under a back path,
    not a back path themselves, and not announced by the sandbox."""
    parts = path.split("/")
    dirs = []
    for i in range(1, len(parts)):
        d = "/".join(parts[:i])
        if d in back or d in announced:
            continue
        if any(d.startswith(b + "/") for b in back):
            dirs.append(d)
    return dirs


def _tidy(tree: DirLookup, dirs: set[str]) -> None:
    """rmdir each directory left empty, deepest first (never recursive: a non-empty one,
    a symlink or anything else stays)."""
    for d in sorted(dirs, key=lambda d: (-d.count("/"), d)):
        parent, _, name = d.rpartition("/")
        try:
            pfd = tree.find(parent)
            if pfd is None:
                continue
            os.rmdir(name, dir_fd=pfd)
        except (HostileEntryError, OSError):
            continue
        tree.forget(d)
