"""A second process that hashes small new files for a scan, so a first scan of a big tree uses
two cores: the scan's own process walks and hashes its share meanwhile.

Why a process and not a thread: a file's open, fstat, read and close each give up the GIL for
a few microseconds, and two threads doing that hand it back and forth on every call (two
threads hashing 100,000 small files took 30% longer than one). The child is a bare
interpreter (`-I -S`, ~10 MB, ~15 ms to start) reading lists of paths from a pipe and writing
back, per path, what the scan's own small-file read gives: (size, mtime_ns, mode, inode,
sha256) or None for anything else (gone, not a regular file, big, changed while read), which
the scan then looks at itself as it always did; and the batch's share of the tree's two
digests (`entry.hash_sums` of the files it answered, the same lines), which would otherwise
be summed after the walk, in the scan's process. It reads only what it is told to; it is our
own program, but its answers are checked for shape anyway (a wrong one ends the child's use).
"""

from __future__ import annotations

import contextlib
import marshal
import select
import subprocess
import sys
from typing import Any, NamedTuple

__all__ = ["Answer", "Hasher", "Result"]

#: per path: (size, mtime_ns, st_mode, inode, sha256 hex), or None
Result = tuple[int, int, int, int, str] | None


class Answer(NamedTuple):
    """A batch's results, and the sums of `content_hash` / `mtime_hash` of those not None."""

    results: list[Result]
    digest: int
    mtimes: int


_PROGRAM = r"""
import hashlib, marshal, os, stat, sys
flags, most, prefix = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
inp, out = sys.stdin.buffer, sys.stdout.buffer
sha256, S_ISREG, fstat, read, close, open_ = (
    hashlib.sha256, stat.S_ISREG, os.fstat, os.read, os.close, os.open)
from_bytes = int.from_bytes
while True:
    head = inp.read(4)
    if len(head) < 4:
        break
    rels = marshal.loads(inp.read(int.from_bytes(head, "little")))
    res = []
    digest = mtimes = 0
    for rel in rels:
        try:
            fd = open_(prefix + rel, flags)
        except OSError:
            res.append(None)
            continue
        try:
            st = fstat(fd)
            size = st.st_size
            if not S_ISREG(st.st_mode) or size >= most:
                res.append(None)
                continue
            data = read(fd, size + 1)
            if len(data) != size:
                res.append(None)
                continue
            ref, mtime = sha256(data).hexdigest(), st.st_mtime_ns
            res.append((size, mtime, st.st_mode, st.st_ino, ref))
            # the lines of `entry.hash_sums` (a test holds them equal)
            line = f"{rel}\0f\0{size}\0{st.st_mode & 0o7777:o}\0{ref}\n"
            digest += from_bytes(sha256(line.encode("utf-8", "surrogateescape")).digest())
            line = f"{rel}\0{mtime}\n"
            mtimes += from_bytes(sha256(line.encode("utf-8", "surrogateescape")).digest())
        except OSError:
            res.append(None)
        finally:
            close(fd)
    body = marshal.dumps((res, digest, mtimes))
    out.write(len(body).to_bytes(4, "little") + body)
    out.flush()
"""


class Hasher:
    """The child and the batches it holds (sent, not answered yet), in order."""

    def __init__(self, flags: int, most: int, prefix: str) -> None:
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _PROGRAM, str(flags), str(most), prefix],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
        )
        self.pending = 0

    def submit(self, paths: list[str]) -> bool:
        """Send a batch of paths under the prefix; False when the child is gone (the caller
        hashes it)."""
        proc = self.proc
        if proc is None or proc.stdin is None:
            return False
        body = marshal.dumps(paths)
        try:
            proc.stdin.write(len(body).to_bytes(4, "little") + body)
            proc.stdin.flush()
        except OSError:
            self.close()
            return False
        self.pending += 1
        return True

    def ready(self) -> bool:
        """An answer can be read without waiting for the child to hash."""
        proc = self.proc
        if proc is None or proc.stdout is None or not self.pending:
            return False
        return bool(select.select([proc.stdout], [], [], 0)[0])

    def take(self, n: int) -> Answer | None:
        """The answer to the oldest batch (`n` paths), waiting for it; None when the child
        is gone or answered out of shape (the caller hashes that batch, and the child is
        not used again)."""
        proc = self.proc
        if proc is None or proc.stdout is None or not self.pending:
            return None
        self.pending -= 1
        try:
            head = proc.stdout.read(4)
            got: Any = marshal.loads(proc.stdout.read(int.from_bytes(head, "little")))
        except (OSError, EOFError, ValueError, TypeError):
            got = None
        if not (
            isinstance(got, tuple)
            and len(got) == 3
            and isinstance(got[0], list)
            and len(got[0]) == n
            and type(got[1]) is int
            and type(got[2]) is int
            and all(r is None or (type(r) is tuple and len(r) == 5) for r in got[0])
        ):
            self.close()
            return None
        return Answer(*got)

    def close(self) -> None:
        proc, self.proc = self.proc, None
        self.pending = 0
        if proc is None:
            return
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        try:
            proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start(flags: int, most: int, prefix: str) -> Hasher | None:
    """A hasher of paths under `prefix` (the tree's root and a "/"), or None when no child can
    be started (the scan hashes alone)."""
    try:
        return Hasher(flags, most, prefix)
    except OSError:
        return None
