"""`TarReader`: a bounded reader of an untrusted tar stream (the sandbox's `tar -c`).

why not `tarfile`: it reads a pax or GNU long-name header whole into memory, with a size the
stream chooses (a 2^40-byte pax header is a request for a terabyte), follows whatever member
types it knows, and trusts sizes. Here every header is 512 bytes checked by its checksum;
the meta headers (pax `x`/`g`, GNU `L`/`K`) are read only up to `META_LIMIT` bytes each and
at most `_META_RUN` in a row; numeric fields are octal or base-256, never negative, below
2^63; the data of a member is handed out in pieces the caller sizes, never more than the
header said, and skipped (never buffered) when the caller does not want it. What a member
*is* (its type, name, size) is reported; judging it (`pull.check_path`, the caps) is the
caller's. A stream that breaks any rule raises `HostileEntryError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from reconciler.errors import HostileEntryError

__all__ = ["META_LIMIT", "Member", "TarReader"]

BLOCK = 512
#: largest pax or GNU long-name header we read: one path (at most 4096 characters, 4 bytes
#: each in UTF-8) with room to spare, as the helper's header frames
META_LIMIT = 1 << 16
#: meta headers allowed before one member (a pax header, a long name and a long link name are
#: three; a stream that sends endless ones gets nothing for it)
_META_RUN = 4
#: skipped data is read in pieces of this size (never held whole)
_SKIP = 1 << 20
_MAX_INT = 1 << 63

#: typeflag -> kind: "f" regular file, "d" directory, "l" symlink, "h" hard link, "o" a fifo
#: or device; anything else is "?" (unknown: refused, its data skipped)
_KINDS = {
    b"0": "f",
    b"\0": "f",
    b"7": "f",  # contiguous file: a regular file to every reader
    b"5": "d",
    b"2": "l",
    b"1": "h",
    b"3": "o",
    b"4": "o",
    b"6": "o",
}


class Source(Protocol):
    """Where the stream comes from: `exact(n)` returns n bytes or raises (end of stream)."""

    def exact(self, n: int) -> bytes: ...


@dataclass(frozen=True)
class Member:
    """One member's header. `name` is decoded as the sandbox's file names are (UTF-8 with
    surrogate escapes); `mtime_exact` when a pax header gave nanoseconds."""

    name: str
    kind: str
    size: int
    mode: int
    mtime_ns: int
    mtime_exact: bool
    #: a pax header marked it sparse (its data is not the file's bytes)
    sparse: bool = False


def _number(field: bytes, what: str) -> int:
    """An octal field (NUL/space padded) or a base-256 one (first byte 0x80)."""
    if field[:1] == b"\x80":
        value = int.from_bytes(field[1:], "big")
    elif field[:1] == b"\xff":
        raise HostileEntryError(f"tar header has a negative {what}")
    else:
        text = field.replace(b"\0", b" ").strip()
        if not text:
            return 0
        if text.strip(b"01234567"):
            raise HostileEntryError(f"tar header has a malformed {what} field")
        value = int(text, 8)
    if value >= _MAX_INT:
        raise HostileEntryError(f"tar header has a {what} of 2^63 or more")
    return value


def _decimal(text: bytes, what: str) -> int:
    if not text or len(text) > 19 or not text.isdigit():
        raise HostileEntryError(f"pax header has a malformed {what}")
    value = int(text)
    if value >= _MAX_INT:
        raise HostileEntryError(f"pax header has a {what} of 2^63 or more")
    return value


def _pax_mtime(text: bytes) -> int:
    """`seconds[.fraction]` as nanoseconds (exact: no float)."""
    sec, _, frac = text.partition(b".")
    if frac and (len(frac) > 30 or not frac.isdigit()):
        raise HostileEntryError("pax header has a malformed mtime")
    ns = _decimal(sec, "mtime") * 1_000_000_000 + int((frac[:9] or b"0").ljust(9, b"0"))
    if ns >= _MAX_INT:
        raise HostileEntryError("pax header has an mtime of 2^63 ns or more")
    return ns


def _pax(data: bytes) -> dict[bytes, bytes]:
    """The records of a pax header: `LEN key=value\\n` each, LEN counting the whole record."""
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 21)
        if space == -1:
            raise HostileEntryError("malformed pax header record")
        length = _decimal(data[pos:space], "record length")
        end = pos + length
        if length <= space - pos + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise HostileEntryError("malformed pax header record")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise HostileEntryError("malformed pax header record")
        out[key] = value
        pos = end
    return out


def _cstr(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def _decode(name: bytes) -> str:
    return name.decode("utf-8", "surrogateescape")


class TarReader:
    """Members of a tar stream, one at a time: `next()` gives the next member's header (or
    None at the end of the archive), `read(n)` up to n bytes of its data, `skip()` the rest.
    `next()` skips whatever data of the previous member was not read."""

    def __init__(self, source: Source) -> None:
        self._src = source
        #: data bytes of the current member not read yet, and the padding after them
        self._left = 0
        self._pad = 0
        self.ended = False

    def read(self, n: int) -> bytes:
        """Up to `n` bytes (at least 1 while any are left) of the current member's data."""
        n = min(n, self._left)
        if n <= 0:
            return b""
        data = self._src.exact(n)
        self._left -= n
        return data

    def skip(self) -> None:
        """Discard the rest of the current member's data and its padding."""
        while self._left:
            self.read(_SKIP)
        if self._pad:
            self._src.exact(self._pad)
            self._pad = 0

    def _begin(self, size: int) -> None:
        self._left = size
        self._pad = -size % BLOCK

    def _meta(self, size: int, what: str) -> bytes:
        """The payload of a meta header, read whole only when small."""
        if size > META_LIMIT:
            raise HostileEntryError(
                f"tar stream has a {what} of {size} bytes (the limit is {META_LIMIT})"
            )
        self._begin(size)
        data = self.read(size)
        self.skip()
        return data

    def next(self) -> Member | None:
        self.skip()
        if self.ended:
            return None
        pax: dict[bytes, bytes] = {}
        long_name: bytes | None = None
        for _ in range(_META_RUN + 1):
            block = self._src.exact(BLOCK)
            if block == bytes(BLOCK):
                if pax or long_name is not None:
                    raise HostileEntryError("tar stream ends after a header without its member")
                self.ended = True
                return None
            self._check(block)
            flag = block[156:157]
            size = _number(block[124:136], "size")
            if flag == b"x":
                pax.update(_pax(self._meta(size, "pax header")))
                continue
            if flag == b"g":
                self._meta(size, "pax global header")  # defaults we never use
                continue
            if flag == b"L":
                long_name = _cstr(self._meta(size, "long name"))
                continue
            if flag == b"K":
                self._meta(size, "long link name")  # a link's target is never used
                continue
            if flag == b"S":
                # GNU sparse: its map may run on in more blocks; we never ask for one
                raise HostileEntryError("tar stream has a GNU sparse member")
            return self._member(block, flag, size, pax, long_name)
        raise HostileEntryError(f"tar stream has more than {_META_RUN} meta headers in a row")

    def _member(
        self,
        block: bytes,
        flag: bytes,
        size: int,
        pax: dict[bytes, bytes],
        long_name: bytes | None,
    ) -> Member:
        name = _cstr(block[0:100])
        if block[257:263] == b"ustar\0":  # POSIX ustar: a prefix field (GNU's has none)
            prefix = _cstr(block[345:500])
            if prefix:
                name = prefix + b"/" + name
        if long_name is not None:
            name = long_name
        mtime_ns = _number(block[136:148], "mtime") * 1_000_000_000
        if mtime_ns >= _MAX_INT:
            raise HostileEntryError("tar header has an mtime of 2^63 ns or more")
        exact = False
        if b"path" in pax:
            name = pax[b"path"]
        if b"size" in pax:
            size = _decimal(pax[b"size"], "size")
        if b"mtime" in pax:
            mtime_ns = _pax_mtime(pax[b"mtime"])
            exact = True
        sparse = any(k.startswith(b"GNU.sparse.") for k in pax)
        self._begin(size)
        return Member(
            name=_decode(name),
            kind=_KINDS.get(flag, "?"),
            size=size,
            mode=_number(block[100:108], "mode") & 0o7777,
            mtime_ns=mtime_ns,
            mtime_exact=exact,
            sparse=sparse,
        )

    @staticmethod
    def _check(block: bytes) -> None:
        want = _number(block[148:156], "checksum")
        unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
        if want == unsigned:
            return
        # some writers summed signed bytes
        signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127)
        if want != signed:
            raise HostileEntryError("tar header checksum does not match (not a tar stream?)")
