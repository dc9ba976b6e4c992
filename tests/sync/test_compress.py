"""`sync.compress`: the wire's segments (`helper.Packer` / `Unpacker`), the helper's side of
them, and whole pushes and pulls with compression on, against plain ones."""

from __future__ import annotations

import io
import os
import random
import struct
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import pytest

from reconciler.sync import helper
from reconciler.sync.helper import SEG, SEG_RAW, SEG_ZIP, Packer, Unpacker
from reconciler.sync.pull import pull
from reconciler.sync.push import push
from reconciler.sync.remote import encode_frame
from reconciler.transport.base import RemoteProcess
from reconciler.transport.local_shell import LocalShell
from tests.support.synctree import Site, snapshot, write


def _text(n: int, seed: int = 1) -> bytes:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "sync", "helper", "frame", "tree", "\n"]
    out = " ".join(rng.choice(words) for _ in range(n // 4)).encode()
    return out[:n]


def _segments(wire: bytes) -> list[tuple[int, int]]:
    """(kind, length) of each segment of `wire`."""
    out, pos = [], 0
    while pos < len(wire):
        kind, n = SEG.unpack_from(wire, pos)
        out.append((kind, n))
        pos += SEG.size + n
    return out


def _decode(wire: bytes, piece: int) -> bytes:
    """`wire` fed to an Unpacker `piece` bytes at a time, decoded whole."""
    u, out = Unpacker(), b""
    for at in range(0, len(wire), piece):
        u.feed(wire[at : at + piece])
        while chunk := u.take(1 << 20):
            out += chunk
    return out


# -- the codec


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
def test_segments_decode_to_what_was_packed_whatever_pieces_they_arrive_in(piece: int) -> None:
    p = Packer(1)
    parts = [_text(5000), os.urandom(20000), b"tiny", _text(70000, 2), b""]
    wire = b"".join(b"".join(p.pack(x)[0]) for x in parts)
    assert _decode(wire, piece) == b"".join(parts)


def test_text_is_deflated_and_incompressible_bytes_go_raw() -> None:
    p = Packer(1)
    text, noise = _text(1 << 20), os.urandom(1 << 20)
    (_, body), z = p.pack(text)
    assert z is True and len(body) < len(text) // 2
    _, z = p.pack(noise)
    assert z is False
    assert _segments(b"".join(p.pack(noise)[0])) == [(SEG_RAW, 1 << 20)]
    assert p.pack(b"{}")[1] is False  # a control frame: nothing to gain
    # a file's later parts take the first part's answer without a sample of their own
    assert p.pack(noise, True)[1] is True
    assert p.pack(text, False)[1] is False


def test_an_inflate_gives_no_more_than_asked_for_plus_one_step() -> None:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = b"".join(c.compress(bytes(1 << 20)) for _ in range(64)) + c.flush(zlib.Z_SYNC_FLUSH)
    u = Unpacker()
    u.feed(SEG.pack(SEG_ZIP, len(body)) + body)
    assert len(u.take(4)) == helper.INFLATE_STEP
    assert len(u.take(3 << 20)) == 3 << 20


@pytest.mark.parametrize(
    "wire",
    [
        SEG.pack(9, 1) + b"x",  # no such kind
        SEG.pack(SEG_ZIP, 2) + b"\x03\x00" + SEG.pack(SEG_ZIP, 1) + b"\x00",  # after the end
    ],
)
def test_a_malformed_segment_stream_is_refused(wire: bytes) -> None:
    u = Unpacker()
    u.feed(wire)
    with pytest.raises(ValueError):
        while u.take(1 << 20):
            pass


# -- the helper's side


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _hello(tmp_path: Path, **kw: Any) -> dict[str, Any]:
    boot = tmp_path / "boot_id"
    boot.write_text("boot-1\n")
    return {
        "op": "hello",
        "root": str(tmp_path / "root"),
        "state_dir": str(tmp_path / "run"),
        "boot_paths": [str(boot)],
        "uuid": "u1",
        "digest": "-",
        **kw,
    }


def test_the_helper_takes_packed_requests_after_a_hello_that_asks_and_packs_its_answers(
    tmp_path: Path,
) -> None:
    data, noise = _text(300_000), os.urandom(200_000)
    p = Packer(1)
    reqs = b""
    for name, body in (("a.txt", data), ("b.bin", noise)):
        head = {"op": "put", "path": name, "size": len(body), "mode": 0o644, "mtime_ns": 10**18}
        reqs += encode_frame(head) + body + b"\x01"
    reqs += encode_frame({"op": "sync", "flush": True})
    wire = encode_frame(_hello(tmp_path, z=1)) + b"".join(p.pack(reqs)[0])
    out = io.BytesIO()
    helper.Helper(io.BytesIO(wire), out, _umask()).serve()
    assert (tmp_path / "root" / "a.txt").read_bytes() == data
    assert (tmp_path / "root" / "b.bin").read_bytes() == noise
    answers = out.getvalue()
    (n,) = struct.unpack(">I", answers[:4])
    assert b'"z":true' in answers[4 : 4 + n]  # the hello's answer: plain, says it packs
    rest = _decode(answers[4 + n :], 1 << 20)
    assert b'"written":2' in rest


def test_the_helper_inflates_a_bomb_only_as_far_as_a_request_needs(tmp_path: Path) -> None:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = b"".join(c.compress(bytes(1 << 20)) for _ in range(256)) + c.flush(zlib.Z_SYNC_FLUSH)
    wire = encode_frame(_hello(tmp_path, z=1)) + SEG.pack(SEG_ZIP, len(body)) + body
    tracemalloc.start()
    try:
        with pytest.raises(ValueError):  # a zero-length frame: not JSON
            helper.Helper(io.BytesIO(wire), io.BytesIO(), _umask()).serve()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak >> 20} MiB"  # without the bound: 256 MiB


# -- whole syncs


class _Counted:
    """A process whose bytes in and out are counted."""

    def __init__(self, proc: RemoteProcess, counts: dict[str, int]) -> None:
        self._proc = proc
        self._counts = counts

    def write(self, data: bytes) -> None:
        self._counts["sent"] += len(data)
        self._proc.write(data)

    def read(self, n: int) -> bytes:
        got = self._proc.read(n)
        self._counts["read"] += len(got)
        return got

    def __getattr__(self, name: str) -> Any:
        return getattr(self._proc, name)


class _CountingShell:
    """A `LocalShell` whose processes count their bytes (what would cross the wire)."""

    def __init__(self, shell: LocalShell) -> None:
        self.shell = shell
        self.counts = {"sent": 0, "read": 0}

    def start(self, command: str) -> Any:
        return _Counted(self.shell.start(command), self.counts)

    def close(self) -> None:
        self.shell.close()


def _tree(root: Path) -> None:
    for i in range(200):
        write(root / f"d{i % 7}/f{i}.txt", _text(2000 + 37 * i, i))
    write(root / "big.txt", _text(3 << 20, 99))  # sent alone, in parts
    write(root / "noise.bin", os.urandom(2 << 20))
    write(root / "d1/small.bin", os.urandom(5000))


def test_a_compressed_push_and_pull_give_the_trees_a_plain_one_does_with_fewer_bytes(
    site: Site,
) -> None:
    _tree(site.local)
    sent: dict[bool, int] = {}
    for z in (False, True):
        shell = _CountingShell(site.shell)
        remote = site.base / f"remote-{z}"
        opts = site.opts(remote_root=str(remote), state_dir=site.base / f"state-{z}", compress=z)
        push(shell, opts, instance_uuid="u1")  # type: ignore[arg-type]
        assert snapshot(remote) == snapshot(site.local)
        sent[z] = shell.counts["sent"]
        if z:
            # a kept helper's next push (a second hello, inside the packed stream): an edit
            # to a big file sent as changed blocks, and a small one
            started = len(site.shell.started)
            with open(site.local / "noise.bin", "r+b") as f:
                f.seek(1 << 20)
                f.write(os.urandom(1000))
            write(site.local / "d3/f3.txt", "changed")
            push(shell, opts, instance_uuid="u1")  # type: ignore[arg-type]
            assert len(site.shell.started) == started
            assert snapshot(remote) == snapshot(site.local)
    assert sent[True] < 0.75 * sent[False], sent

    got: dict[bool, int] = {}
    for z in (False, True):
        out = site.base / f"remote-{z}" / "out"
        write(out / "big.txt", _text(300_000, 5))  # streamed in chunks
        write(out / "noise.bin", os.urandom(3 << 20))
        for i in range(50):
            write(out / f"r{i}.txt", _text(3000, i))
        home = site.base / f"home-{z}"
        home.mkdir()
        shell = _CountingShell(site.shell)
        opts = site.opts(
            local_root=home,
            remote_root=str(site.base / f"remote-{z}"),
            state_dir=site.base / f"pull-{z}",
            back=("out/",),
            compress=z,
        )
        result = pull(shell, opts)  # type: ignore[arg-type]
        assert result.files_written == 52
        assert snapshot(home / "out") == snapshot(out)
        got[z] = shell.counts["read"] - 3 * (1 << 20)  # the noise goes raw either way
    assert got[True] < 0.5 * got[False], got


def test_by_default_neither_pushes_nor_sync_backs_are_compressed(site: Site) -> None:
    for i in range(100):
        write(site.local / f"out/f{i}.txt", _text(4000, i))
    size = 100 * 4000
    shell = _CountingShell(site.shell)
    push(shell, site.opts(), instance_uuid="u1")  # type: ignore[arg-type]
    assert shell.counts["sent"] > size
    home = site.base / "home"
    home.mkdir()
    opts = site.opts(local_root=home, state_dir=site.base / "pulled", back=("out/",))
    assert pull(shell, opts).files_written == 100  # type: ignore[arg-type]
    assert snapshot(home / "out") == snapshot(site.local / "out")
    assert shell.counts["read"] > size
