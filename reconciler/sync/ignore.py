"""Ignore rules: which local paths the push leaves alone.

The rules are the spec's `sync.exclude` and the `.ukcignore` file in the local root; an
excluded path is neither scanned nor ever deleted remotely. Gitignore semantics come from
`pathspec`
(negation, anchoring, directory-only rules); `sync.back` paths are excluded from the push
because they are outputs of the sandbox, not inputs.

`.ukc/` (ukc's state: status, session keys, records), at any depth, is excluded before any
rule is looked at, so no rule (`!.ukc/`, `!.ukc/**`, in `.ukcignore` or `sync.exclude`) can
send it into the sandbox. `.ukcignore` is read only as a regular file of at most
`MAX_IGNORE_BYTES`, opened without following a symlink; anything else stops the sync with a
`SyncHaltedError` that says what was found.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

import pathspec

from reconciler.errors import SyncHaltedError
from reconciler.sync.options import SyncOptions

__all__ = [
    "IGNORE_FILE",
    "MAX_IGNORE_BYTES",
    "IgnoreRules",
    "is_state",
    "is_under",
    "load_rules",
    "matcher",
]

IGNORE_FILE = ".ukcignore"
MAX_IGNORE_BYTES = 1 << 20
STATE_DIR = ".ukc"


def is_state(rel: str, is_dir: bool) -> bool:
    """True for a directory named `.ukc` at any depth, and everything below one."""
    if STATE_DIR not in rel:  # the common case, without splitting
        return False
    parts = rel.split("/")
    return STATE_DIR in parts[:-1] or (is_dir and parts[-1] == STATE_DIR)


def is_under(rel: str, roots: Collection[str]) -> bool:
    """True when `rel` equals one of `roots` or lies below one of them.

    `roots` are normalised relative paths (no trailing "/"). This looks up each "/"-prefix of
    `rel`, so with a set the cost follows the path's depth, not the number of roots.
    """
    if rel in roots:
        return True
    i = rel.find("/")
    while i != -1:
        if rel[:i] in roots:
            return True
        i = rel.find("/", i + 1)
    return False


def matcher(patterns: Iterable[str]) -> Callable[[str], bool]:
    """A test of relative "/"-separated paths against gitignore-style `patterns` (a later
    `!pattern` takes back what an earlier one matched, as in .gitignore)."""
    return pathspec.GitIgnoreSpec.from_lines(list(patterns)).match_file


class IgnoreRules:
    """A compiled set of gitignore-style rules plus the sync-back paths."""

    def __init__(self, patterns: Iterable[str], back: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        self.back = tuple(back)
        self._back_set = frozenset(self.back)
        self._spec = pathspec.GitIgnoreSpec.from_lines(self.patterns)
        # why: with no user rule (blank lines and comments do not count) only `.ukc/` applies,
        # and matching it by hand is ~10x cheaper than pathspec's regexes on every scanned path
        self._only_ukc = not any(
            line.strip() and not line.startswith("#") for line in self.patterns
        )

    @property
    def key(self) -> str:
        """Names this rule set: an index scanned under other rules holds other paths (one
        that became excluded, none under one that no longer is)."""
        text = json.dumps([self.patterns, self.back], ensure_ascii=True)
        return hashlib.sha256(text.encode("ascii")).hexdigest()[:32]

    def excluded(self, rel: str, is_dir: bool) -> bool:
        """True when the path (relative, "/"-separated) is excluded or a sync-back path."""
        if self._back_set and is_under(rel, self._back_set):
            return True
        if is_state(rel, is_dir):
            return True  # before the rules: none of them can bring it back
        if self._only_ukc:
            return False
        return bool(self._spec.match_file(rel + "/" if is_dir else rel))

    def deletable(self, rel: str, is_dir: bool) -> bool:
        """True when a remote path may be deleted: neither excluded nor holding a back path."""
        if self.excluded(rel, is_dir):
            return False
        # why: a directory that contains a sync-back path holds sandbox outputs
        return not any(b.startswith(rel + "/") for b in self.back)


def load_rules(opts: SyncOptions) -> IgnoreRules:
    """Rules from the spec plus `<root>/.ukcignore` (when present)."""
    lines = list(opts.exclude)
    text = read_ignore_file(Path(opts.local_root) / IGNORE_FILE)
    if text is not None:
        lines += text.splitlines()
    return IgnoreRules(lines, opts.back_paths())


def read_ignore_file(path: Path) -> str | None:
    """The text of `.ukcignore`, None when there is none (or no root). Raises
    `SyncHaltedError` for a symlink, anything but a regular file, or one over
    `MAX_IGNORE_BYTES`."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SyncHaltedError(
                f"{path} is a symbolic link; ukc reads it only as a regular file (nothing was sent)"
            ) from None
        raise SyncHaltedError(f"{path} cannot be read ({exc.strerror}); nothing was sent") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SyncHaltedError(
                f"{path} is not a regular file ({_kind(st.st_mode)}); nothing was sent"
            )
        data = b""
        while len(data) <= MAX_IGNORE_BYTES:  # it may grow while we read: never past the cap
            piece = os.read(fd, MAX_IGNORE_BYTES + 1 - len(data))
            if not piece:
                break
            data += piece
        if st.st_size > MAX_IGNORE_BYTES or len(data) > MAX_IGNORE_BYTES:
            raise SyncHaltedError(
                f"{path} is {max(st.st_size, len(data))} bytes, more than the "
                f"{MAX_IGNORE_BYTES} byte limit for ignore files; nothing was sent"
            )
    except OSError as exc:
        raise SyncHaltedError(f"{path} cannot be read ({exc.strerror}); nothing was sent") from None
    finally:
        os.close(fd)
    return data.decode("utf-8", "surrogateescape")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a fifo"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a file"
