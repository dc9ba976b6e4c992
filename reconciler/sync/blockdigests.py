"""Block digests of big files, remembered by content: what a delta upload compares against.

A big file the sandbox already has is sent as the blocks whose digests differ from the remote
copy's. When our push record is trusted, that copy is content we pushed, and its digests are
the ones this side computed while sending it: remembered here under the content's sha256, they
spare the round trip that asks the sandbox for them (and its read of the whole file).

What is remembered is only a belief about the remote file. The helper checks the file's size
and mtime against the push's `base`, builds the new file and verifies the result's sha256
before it replaces anything; a file that is not what we remember is sent whole in the same
push (`push._Sender.settle`). The file is local state, but read as untrusted all the same: a
malformed one is ignored (the cost is one round trip).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from reconciler._util.atomic import write_atomic

__all__ = [
    "BLOCK",
    "FILE",
    "Digester",
    "block_count",
    "digest_of",
    "digests",
    "digests_until",
    "load",
    "save",
]

#: block size of delta uploads (fixed offsets: in-place edits and appends, not insertions)
BLOCK = 1 << 16
FILE = "blocks.json"
#: digests of at most this many bytes are read back (1 MiB of digests: 8 GiB of big files)
MAX_FILE_BYTES = 2 << 20
_SHA = re.compile(r"^[0-9a-f]{64}$")
_HEX = re.compile(r"^(?:[0-9a-f]{16})*$")


def block_count(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK


def digest_of(block: bytes | memoryview) -> bytes:
    """One block's 8-byte digest."""
    return hashlib.sha1(block).digest()[:8]


def digests(fd: int, size: int) -> bytes:
    """The 8-byte digests of the file's `BLOCK`-sized blocks, concatenated."""
    out = digests_until(fd, size, lambda: False)
    assert out is not None
    return out


def digests_until(fd: int, size: int, stop: Callable[[], bool]) -> bytes | None:
    """`digests`, or None once `stop()` says so (asked before each block)."""
    out = []
    for i in range(block_count(size)):
        if stop():
            return None
        out.append(digest_of(os.pread(fd, BLOCK, i * BLOCK)))
    return b"".join(out)


class Digester:
    """The block digests of bytes fed in order, in pieces of any size (a whole upload's)."""

    def __init__(self) -> None:
        self._out: list[bytes] = []
        self._carry = b""

    def feed(self, data: bytes) -> None:
        view = memoryview(self._carry + data if self._carry else data)
        whole = len(view) - len(view) % BLOCK
        for i in range(0, whole, BLOCK):
            self._out.append(digest_of(view[i : i + BLOCK]))
        self._carry = bytes(view[whole:])

    def result(self) -> bytes:
        tail = [digest_of(self._carry)] if self._carry else []
        return b"".join(self._out + tail)


def load(state_dir: Path) -> dict[str, bytes]:
    """content sha256 -> block digests, as the last push left them ({} if none or malformed)."""
    try:
        with open(state_dir / FILE, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            return {}
        doc = json.loads(raw)
    except (OSError, ValueError):
        return {}
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, dict) or doc.get("bs") != BLOCK:
        return {}
    out: dict[str, bytes] = {}
    for sha, hexed in files.items():
        if isinstance(hexed, str) and _SHA.match(sha) and _HEX.match(hexed):
            out[sha] = bytes.fromhex(hexed)
    return out


def save(
    state_dir: Path, before: Mapping[str, bytes], learned: Mapping[str, bytes], keep: Iterable[str]
) -> None:
    """Remember the digests (`learned` in this push, else known `before` it) of the contents
    in `keep`, the local tree's big files: the file never holds more than the tree does.
    Nothing is written when that is what `before` held; a failure is ignored."""
    wanted: dict[str, bytes] = {}
    for sha in keep:
        dg = learned.get(sha, before.get(sha))
        if dg is not None:
            wanted[sha] = dg
    if wanted == before:
        return
    doc = {"bs": BLOCK, "files": {sha: dg.hex() for sha, dg in sorted(wanted.items())}}
    # not durable: a lost file costs one round trip, never a wrong byte
    with contextlib.suppress(OSError):
        write_atomic(state_dir / FILE, json.dumps(doc).encode("ascii"), durable=False)
