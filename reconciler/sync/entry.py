"""One path of a manifest, and the order-free hashes its digests are sums of."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import NamedTuple

__all__ = ["DIGEST_MOD", "SHARED_INTS", "Entry", "content_hash", "hash_sums", "mtime_hash"]

#: digests are sums of per-entry sha256 values modulo this: one changed entry moves a digest
#: by its old and new hash, so a scan that finds one change needs no pass over the tree
DIGEST_MOD = 1 << 256

#: one int object per value below 4096, for entries' modes and small sizes to share (28 bytes
#: each, 5.6 MB at 100,000 small files; Python shares only up to 256)
SHARED_INTS: dict[int, int] = {i: i for i in range(4096)}


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


def content_hash(path: str, e: Entry) -> int:
    """What `path` adds to a manifest's digest: its type, size, mode and ref (not its mtime)."""
    line = f"{path}\0{e.type}\0{e.size}\0{e.mode:o}\0{e.ref}\n"
    return int.from_bytes(hashlib.sha256(line.encode("utf-8", "surrogateescape")).digest())


def mtime_hash(path: str, e: Entry) -> int:
    """What `path` adds to a manifest's mtime digest (files only: pushes set file mtimes)."""
    if e.type != "f":
        return 0
    line = f"{path}\0{e.mtime_ns}\n"
    return int.from_bytes(hashlib.sha256(line.encode("utf-8", "surrogateescape")).digest())


def hash_sums(items: Iterable[tuple[str, Entry]]) -> tuple[int, int, int, int]:
    """The sums of `content_hash` and of `mtime_hash` over `items` (path, entry pairs; not
    reduced), the files among them and their bytes, in one pass: the same lines as those two
    (a test holds them equal), without two calls and two generator steps per entry (~0.2 s
    of a 100,000-file tree's digests)."""
    sha256 = hashlib.sha256
    from_bytes = int.from_bytes
    digest = mtimes = files = size_sum = 0
    for path, (kind, size, mtime_ns, mode, ref) in items:
        line = f"{path}\0{kind}\0{size}\0{mode:o}\0{ref}\n"
        digest += from_bytes(sha256(line.encode("utf-8", "surrogateescape")).digest())
        if kind == "f":
            line = f"{path}\0{mtime_ns}\n"
            mtimes += from_bytes(sha256(line.encode("utf-8", "surrogateescape")).digest())
            files += 1
            size_sum += size
    return digest, mtimes, files, size_sum
