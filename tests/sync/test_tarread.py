"""`tarread.TarReader` reads what GNU tar writes (gnu and pax formats, long and non-UTF-8
names, exact mtimes), and refuses what no tar writes."""

from __future__ import annotations

import io
import os
import re
import subprocess
from pathlib import Path

import pytest

from reconciler.errors import HostileEntryError
from reconciler.sync.tarread import Member, TarReader


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def exact(self, n: int) -> bytes:
        out = self._f.read(n)
        if len(out) != n:
            raise EOFError("short stream")
        return out


def _members(stream: bytes) -> list[tuple[Member, bytes]]:
    reader = TarReader(_Bytes(stream))
    out = []
    while (m := reader.next()) is not None:
        data = b""
        while chunk := reader.read(7):  # small pieces: the reader never hands out more
            data += chunk
        out.append((m, data))
    return out


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_gnu_tars_own_members_are_read_back_exactly(tmp_path: Path, fmt: str) -> None:
    long = "d" * 150 + "/" + "f" * 200
    odd = os.fsencode("out/caf\xe9") + b"\xff"  # not UTF-8
    (tmp_path / "out" / ("d" * 150)).mkdir(parents=True)
    files = {b"out/a.txt": b"hello", os.fsencode(f"out/{long}"): b"x" * 1000, odd: b""}
    for name, data in files.items():
        (tmp_path / os.fsdecode(name)).write_bytes(data)
    os.utime(tmp_path / "out/a.txt", ns=(1, 1_700_000_000_123_456_789))
    names = b"".join(b"./" + n + b"\0" for n in files)
    stream = subprocess.run(
        ["tar", "-c", "-f", "-", f"--format={fmt}", "--null", "--no-recursion", "-T", "-"],
        input=names,
        cwd=tmp_path,
        capture_output=True,
        check=True,
    ).stdout
    got = {m.name: (m.kind, m.size, data) for m, data in _members(stream)}
    assert got == {
        "./"
        + os.fsdecode(n).encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape"): (
            "f",
            len(d),
            d,
        )
        for n, d in files.items()
    }
    first = _members(stream)[0][0]
    if fmt == "pax":
        assert (first.mtime_ns, first.mtime_exact) == (1_700_000_000_123_456_789, True)
    else:
        assert (first.mtime_ns, first.mtime_exact) == (1_700_000_000_000_000_000, False)


def _block(size_field: bytes, flag: bytes = b"0") -> bytes:
    block = bytearray(512)
    block[0:5] = b"./out"
    block[100:108] = b"0000644\0"
    block[124:136] = size_field
    block[136:148] = b"00000000001\0"
    block[148:156] = b" " * 8
    block[156:157] = flag
    block[148:156] = (b"%06o" % sum(block)) + b"\0 "
    return bytes(block)


@pytest.mark.parametrize(
    ("field", "why"),
    [
        (b"\xff" + b"\xff" * 11, "negative size"),
        (b"\x80" + (1 << 63).to_bytes(11, "big"), "size of 2^63 or more"),
        (b"0000000009z\0", "malformed size field"),
    ],
)
def test_sizes_no_tar_writes_are_refused(field: bytes, why: str) -> None:
    with pytest.raises(HostileEntryError, match=re.escape(why)):
        TarReader(_Bytes(_block(field))).next()


def test_a_base_256_size_is_read_as_gnu_tar_writes_it() -> None:
    size = (1 << 33) + 5  # past the 8 GiB of eleven octal digits
    member = TarReader(_Bytes(_block(b"\x80" + size.to_bytes(11, "big")))).next()
    assert member is not None and member.size == size


def test_a_header_after_a_pax_header_without_its_member_is_refused() -> None:
    pax = b"16 path=./out/x\n"
    stream = _block(b"%011o\0" % len(pax), b"x") + pax.ljust(512, b"\0") + bytes(1024)
    with pytest.raises(HostileEntryError, match="ends after a header without its member"):
        TarReader(_Bytes(stream)).next()


@pytest.mark.parametrize(
    "record", [b"99 path=x\n", b"5 path=x\n", b"abc path=x\n", b"10 pathx\n\n"]
)
def test_malformed_pax_records_are_refused(record: bytes) -> None:
    stream = _block(b"%011o\0" % len(record), b"x") + record.ljust(512, b"\0")
    with pytest.raises(HostileEntryError, match="pax header"):
        TarReader(_Bytes(stream)).next()
