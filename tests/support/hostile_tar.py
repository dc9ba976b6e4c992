"""A sandbox without python3 that replaced its `find` or `tar`: real programs, first on the
sandbox's PATH, that answer with a crafted stream.

On an image without python3, sync-back runs the sandbox's own find and tar
(`reconciler.sync.tarpull`); root in the sandbox can replace either (or wrap the real one to
change the tree between the listing and the archive), so every byte they print is the
attacker's. `plant(bin_dir, name, body)` writes such a program; `sandbox_shell(bin_dir)` is a
`LocalShell` whose PATH finds it first (the engine runs its command line exactly as over SSH).

A planted `tar` body is Python source run with these names:

    names()              the names asked for, as sent on stdin ("./out/a.txt", ...)
    member(name, data=b"", kind=b"0", size=None, mode=0o644, mtime=1, link=b"")
                         one member: a header block (GNU format) and its data, padded
    header(name, size, kind=b"0", mode=0o644, mtime=1, link=b"")   the header block alone
    pax(records)         a pax `x` header carrying `records` (a dict of str -> str)
    end()                the end-of-archive blocks
    raw(data), flush()   anything, and push it to the pipe
    OUT                  stdout (binary)

(`tar --version` answers as GNU tar, as the engine checks.) A planted `find` body has:

    entry(path, kind="f", size=0, mode=0o644, mtime="1.0")   one listing record of find's
                         -printf format ("./" is put before `path`)
    raw(data), flush(), OUT

(`find / -maxdepth 0 ...`, the engine's check for -printf, exits 0.)

`real_tar_after(shell_lines)` is a tar body that runs `shell_lines` in the sandbox's root,
then execs the real GNU tar: the tree changes between the listing and the archive, as when
the attacker wins that race.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

from reconciler.transport.local_shell import LocalShell

__all__ = ["plant", "real_tar_after", "sandbox_shell"]

_TAR = """\
#!/usr/bin/python3
import os, struct, sys, time
if "--version" in sys.argv:
    print("tar (GNU tar) 1.34")
    sys.exit(0)
OUT = sys.stdout.buffer


def names():
    data = sys.stdin.buffer.read()
    return [n.decode("utf-8", "surrogateescape") for n in data.split(b"\\0") if n]


def _octal(value, width):
    if value >= 8 ** (width - 1):
        return b"\\x80" + value.to_bytes(width - 1, "big")
    return ("%0*o" % (width - 1, value)).encode() + b"\\0"


def header(name, size, kind=b"0", mode=0o644, mtime=1, link=b""):
    if isinstance(name, str):
        name = name.encode("utf-8", "surrogateescape")
    block = bytearray(512)
    block[0:100] = name[:100].ljust(100, b"\\0")
    block[100:108] = _octal(mode, 8)
    block[108:116] = _octal(0, 8)
    block[116:124] = _octal(0, 8)
    block[124:136] = _octal(size, 12)
    block[136:148] = _octal(mtime, 12)
    block[148:156] = b" " * 8
    block[156:157] = kind
    block[157:257] = link[:100].ljust(100, b"\\0")
    block[257:265] = b"ustar  \\0"
    block[148:156] = ("%06o" % sum(block)).encode() + b"\\0 "
    return bytes(block)


def raw(data):
    OUT.write(data)


def member(name, data=b"", kind=b"0", size=None, mode=0o644, mtime=1, link=b""):
    n = len(data) if size is None else size
    raw(header(name, n, kind, mode, mtime, link) + data + b"\\0" * (-len(data) % 512))


def pax(records):
    body = b""
    for key, value in records.items():
        item = (" %s=%s\\n" % (key, value)).encode("utf-8", "surrogateescape")
        n = len(item)
        n += len(str(n + len(str(n))))
        body += str(n).encode() + item
    member("././@PaxHeader", body, kind=b"x")


def end():
    raw(b"\\0" * 1024)


def flush():
    OUT.flush()


"""

_FIND = """\
#!/usr/bin/python3
import sys, time
if "-maxdepth" in sys.argv:
    sys.exit(0)
OUT = sys.stdout.buffer


def raw(data):
    OUT.write(data)


def entry(path, kind="f", size=0, mode=0o644, mtime="1.0"):
    if isinstance(path, str):
        path = path.encode("utf-8", "surrogateescape")
    raw(b"F%s %o %d %s ./%s\\0" % (kind.encode(), mode, size, mtime.encode(), path))


def flush():
    OUT.flush()


"""


def plant(bin_dir: Path, name: str, body: str) -> Path:
    """Write the stand-in `find` or `tar` with `body` (Python, see the module's text)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    prelude = {"tar": _TAR, "find": _FIND}[name]
    path = bin_dir / name
    path.write_text(prelude + textwrap.dedent(body) + "\nflush()\n")
    path.chmod(0o755)
    return path


def real_tar_after(shell_lines: str) -> str:
    """A tar body: run `shell_lines` (sh, in the sandbox's root), then the real tar."""
    real = shutil.which("tar", path="/usr/bin:/bin")
    assert real is not None, "GNU tar is needed"
    return f"""
        import subprocess
        if subprocess.run(["sh", "-c", {shell_lines!r}]).returncode != 0:
            sys.exit(9)
        os.execv({real!r}, [{real!r}] + sys.argv[1:])
    """


def sandbox_shell(bin_dir: Path) -> LocalShell:
    """A "sandbox" whose PATH finds the planted programs first."""
    return LocalShell(env={**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"})
