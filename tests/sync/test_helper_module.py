"""The sync helper driven in-process: every operation, its error paths, and a hostile tree.

The helper runs in the sandbox, where the sandbox's own user may have planted symlinks, fifos
and odd names in the tree it writes: these tests plant them and check that nothing outside the
root is read, written or removed, and that a refused entry never desynchronises the stream.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reconciler.sync import helper
from reconciler.sync.options import SyncOptions
from reconciler.sync.remote import _PROGRAM, MAX_FRAME, encode_frame, helper_command, program
from tests.support.synctree import REMOTE_PYTHON


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class Answers:
    """What the helper wrote, read as the client would: frames and raw bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def raw(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        assert len(out) == n, f"answer ends after {len(out)} of {n} bytes"
        self.pos += n
        return out

    def u32(self) -> int:
        value: int = struct.unpack(">I", self.raw(4))[0]
        return value

    def frame(self) -> Any:
        n = self.u32()
        assert n <= MAX_FRAME
        return json.loads(self.raw(n).decode("ascii"))

    def chunks(self) -> bytes:
        """The chunk frames of one pulled file, up to its zero-length end."""
        out = b""
        while n := self.u32():
            out += self.raw(n)
        return out

    @property
    def done(self) -> bool:
        return self.pos == len(self.data)


@dataclass
class Box:
    """A sandbox's view: the root the helper writes, its state dir, and a directory outside
    the root that a planted symlink points at (it must never change)."""

    root: Path
    state: Path
    boot: Path
    outside: Path

    def hello(self, **kw: Any) -> dict[str, Any]:
        req: dict[str, Any] = {
            "op": "hello",
            "root": str(self.root),
            "state_dir": str(self.state),
            "boot_paths": [str(self.boot)],
            "uuid": "u1",
            "digest": "-",
        }
        req.update(kw)
        return req

    def serve(self, *items: dict[str, Any] | bytes, hello: dict[str, Any] | None = None) -> Any:
        """Run a helper on hello + `items` (frames, or raw bytes sent as they are); return
        the hello answer and the rest of the answers."""
        data = encode_frame(hello or self.hello())
        for item in items:
            data += item if isinstance(item, bytes) else encode_frame(item)
        out = io.BytesIO()
        h = helper.Helper(io.BytesIO(data), out, _umask())
        try:
            h.serve()
        finally:
            h.stop_pool()
            h.drop_dirs()
        answers = Answers(out.getvalue())
        return answers.frame(), answers

    def outside_state(self) -> list[tuple[str, bytes]]:
        return sorted(
            (str(p.relative_to(self.outside)), p.read_bytes() if p.is_file() else b"")
            for p in self.outside.rglob("*")
        )

    def temps(self) -> list[str]:
        return [str(p) for p in self.root.rglob(helper.TMP + "*")]


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    b = Box(
        root=tmp_path / "sandbox" / "workspace",
        state=tmp_path / "sandbox" / "run",
        boot=tmp_path / "sandbox" / "boot_id",
        outside=tmp_path / "outside",
    )
    b.root.mkdir(parents=True)
    b.boot.write_text("boot-1\n")
    b.outside.mkdir()
    (b.outside / "secret").write_bytes(b"keep me")
    yield b


def put(path: str, data: bytes, *, mode: int = 0o644, commit: bool = True) -> list[Any]:
    header = {"op": "put", "path": path, "size": len(data), "mode": mode, "mtime_ns": 10**18}
    return [header, data + (b"\x01" if commit else b"\x00")]


SYNC: dict[str, Any] = {"op": "sync", "flush": True}


# -- framing


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"\x00\x00", EOFError),  # a header cut short
        (struct.pack(">I", 10) + b'{"op"', EOFError),  # a body cut short
        (struct.pack(">I", 2) + b"\xff\xfe", ValueError),  # not ASCII
        (encode_frame({"op": "format the disk"}), KeyError),
    ],
)
def test_a_broken_or_unknown_request_stops_the_helper(
    box: Box, raw: bytes, error: type[Exception]
) -> None:
    with pytest.raises(error):
        box.serve(raw)


@pytest.mark.parametrize("text", [b"NaN", b'{"a":Infinity}', b'{"op":"sync"} x', b"[1,]", b""])
def test_json_that_the_client_never_sends_is_refused(text: bytes) -> None:
    with pytest.raises(ValueError):
        helper.JLOADS(text.decode("ascii"))


def test_an_input_that_ends_between_requests_ends_the_helper_cleanly(box: Box) -> None:
    hello, answers = box.serve(SYNC)
    assert hello["boot_id"] == "boot-1"
    assert answers.frame() == {"errors": [], "error_count": 0, "written": 0, "bytes": 0}
    assert answers.done


# -- put


@pytest.mark.parametrize("threads", [0, 2])
@pytest.mark.parametrize("mode", [0o644, 0o666, 0o4755, 0o600])
def test_a_put_lands_whole_with_its_mode_and_mtime(box: Box, threads: int, mode: int) -> None:
    small, big = b"x" * 1000, os.urandom(helper.SMALL + 12345)
    _, answers = box.serve(
        *put("a/b/small", small, mode=mode),
        *put("a/big", big, mode=mode),
        *put("empty", b"", mode=mode),
        SYNC,
        hello=box.hello(threads=threads),
    )
    assert answers.frame() == {
        "errors": [],
        "error_count": 0,
        "written": 3,
        "bytes": len(small) + len(big),
    }
    for name, data in (("a/b/small", small), ("a/big", big), ("empty", b"")):
        st = os.stat(box.root / name)
        assert (box.root / name).read_bytes() == data
        assert stat.S_IMODE(st.st_mode) == mode
        assert st.st_mtime_ns == 10**18
    assert box.temps() == []


@pytest.mark.parametrize("threads", [0, 2])
@pytest.mark.parametrize("size", [100, helper.SMALL + 1])
def test_a_put_through_a_symlinked_directory_writes_nothing_outside_the_root(
    box: Box, threads: int, size: int
) -> None:
    (box.root / "sub").symlink_to(box.outside)
    before = box.outside_state()
    _, answers = box.serve(
        *put("sub/planted", b"p" * size),
        *put("sub/secret", b"p" * size),
        *put("after", b"still in sync"),
        SYNC,
        hello=box.hello(threads=threads),
    )
    reply = answers.frame()
    assert reply["error_count"] == 2
    assert [e.split(":")[0] for e in reply["errors"]] == ["sub/planted", "sub/secret"]
    assert box.outside_state() == before
    assert (box.root / "after").read_bytes() == b"still in sync"


@pytest.mark.parametrize("threads", [0, 2])
def test_a_put_onto_a_planted_symlink_replaces_the_link_not_its_target(
    box: Box, threads: int
) -> None:
    (box.root / "x").symlink_to(box.outside / "secret")
    _, answers = box.serve(*put("x", b"new"), SYNC, hello=box.hello(threads=threads))
    assert answers.frame()["error_count"] == 0
    assert not (box.root / "x").is_symlink()
    assert (box.root / "x").read_bytes() == b"new"
    assert (box.outside / "secret").read_bytes() == b"keep me"


@pytest.mark.parametrize("threads", [0, 2])
@pytest.mark.parametrize("path", ["", "../escape", "a/../../escape", "a/..", "a/.", "a/"])
def test_a_put_whose_path_could_leave_the_root_is_refused(
    box: Box, threads: int, path: str
) -> None:
    _, answers = box.serve(
        *put(path, b"e"), *put("after", b"ok"), SYNC, hello=box.hello(threads=threads)
    )
    reply = answers.frame()
    assert reply["error_count"] == 1
    assert reply["errors"] == [f"{path}: bad path"]
    assert not (box.root.parent / "escape").exists()
    assert (box.root / "after").read_bytes() == b"ok"


@pytest.mark.parametrize("threads", [0, 2])
@pytest.mark.parametrize("size", [3, helper.SMALL + 1])
def test_a_discarded_put_keeps_the_old_file_and_leaves_no_temp(
    box: Box, threads: int, size: int
) -> None:
    (box.root / "f").write_bytes(b"old")
    _, answers = box.serve(
        *put("f", b"n" * size, commit=False), SYNC, hello=box.hello(threads=threads)
    )
    assert answers.frame() == {"errors": [], "error_count": 0, "written": 0, "bytes": 0}
    assert (box.root / "f").read_bytes() == b"old"
    assert box.temps() == []


@pytest.mark.parametrize("threads", [0, 2])
@pytest.mark.parametrize("size", [3, helper.SMALL + 1])
def test_a_put_onto_a_directory_fails_and_leaves_no_temp(box: Box, threads: int, size: int) -> None:
    (box.root / "d" / "child").mkdir(parents=True)
    _, answers = box.serve(*put("d", b"n" * size), SYNC, hello=box.hello(threads=threads))
    reply = answers.frame()
    assert reply["error_count"] == 1
    assert reply["errors"][0].startswith("d: ")
    assert (box.root / "d" / "child").is_dir()
    assert box.temps() == []


@pytest.mark.parametrize("threads", [0, 2])
def test_a_put_under_a_regular_file_is_an_error_and_the_stream_goes_on(
    box: Box, threads: int
) -> None:
    (box.root / "f").write_bytes(b"file")
    _, answers = box.serve(
        *put("f/child", b"c"), *put("after", b"ok"), SYNC, hello=box.hello(threads=threads)
    )
    reply = answers.frame()
    assert reply["error_count"] == 1
    assert "Not a directory" in reply["errors"][0]
    assert (box.root / "after").read_bytes() == b"ok"


@pytest.mark.parametrize("size", [10, helper.SMALL + 10])
def test_a_put_whose_data_is_cut_short_stops_the_helper(box: Box, size: int) -> None:
    header = {"op": "put", "path": "f", "size": size, "mode": 0o644, "mtime_ns": 1}
    with pytest.raises(EOFError):
        box.serve(header, b"123")


def test_a_temp_left_by_a_killed_helper_with_the_same_pid_is_replaced(box: Box) -> None:
    stale = box.root / f"{helper.TMP}big.{os.getpid()}"
    stale.write_bytes(b"stale")
    big = b"b" * (helper.SMALL + 1)
    _, answers = box.serve(*put("big", big), SYNC)
    assert answers.frame()["error_count"] == 0
    assert (box.root / "big").read_bytes() == big
    assert not stale.exists()


def test_the_error_list_is_bounded_but_the_count_is_not(box: Box) -> None:
    bad = [item for i in range(helper.MAX_ERRORS + 10) for item in put(f"{i}/{'x' * 900}/..", b"")]
    _, answers = box.serve(*bad, SYNC)
    reply = answers.frame()
    assert reply["error_count"] == helper.MAX_ERRORS + 10
    assert len(reply["errors"]) == helper.MAX_ERRORS
    assert all(len(e) == helper.MAX_ERROR_CHARS for e in reply["errors"])


def test_many_directories_do_not_exhaust_the_helpers_file_descriptors(box: Box) -> None:
    count = helper.MAX_DIR_FDS * 2 + 5
    files = [item for i in range(count) for item in put(f"d{i}/f", b"x")]
    _, answers = box.serve(*files, SYNC)
    assert answers.frame()["written"] == count
    assert len(list(box.root.glob("d*/f"))) == count


# -- patch and blocks

OLD = b"aaaabbbbcccc"


def patch(path: str, new: bytes, blocks: list[int], *, commit: bool = True, sha: str = "") -> Any:
    header = {
        "op": "patch",
        "path": path,
        "size": len(new),
        "bs": 4,
        "send": blocks,
        "sha256": sha or hashlib.sha256(new).hexdigest(),
        "mode": 0o640,
        "mtime_ns": 7 * 10**17,
    }
    data = b"".join(new[i * 4 : (i + 1) * 4] for i in blocks)
    return [header, data + (b"\x01" if commit else b"\x00")]


@pytest.mark.parametrize(
    ("new", "blocks"),
    [(b"aaaaXXXXcccc", [1]), (b"aaaaXXXXccccdd", [1, 3]), (b"aaaaXX", [1]), (b"aaaabbbbcccc", [])],
)
def test_a_patch_rebuilds_the_file_from_its_old_blocks_and_the_changed_ones(
    box: Box, new: bytes, blocks: list[int]
) -> None:
    (box.root / "f").write_bytes(OLD)
    _, answers = box.serve(*patch("f", new, blocks), SYNC)
    reply = answers.frame()
    assert reply["error_count"] == 0, reply
    assert reply["written"] == 1
    assert reply["bytes"] == sum(len(new[i * 4 : (i + 1) * 4]) for i in blocks)
    assert (box.root / "f").read_bytes() == new
    st = os.stat(box.root / "f")
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o640, 7 * 10**17)
    assert box.temps() == []


def test_a_patch_whose_result_does_not_match_its_sha256_changes_nothing(box: Box) -> None:
    (box.root / "f").write_bytes(OLD)
    _, answers = box.serve(*patch("f", b"aaaaXXXXcccc", [1], sha="0" * 64), SYNC)
    reply = answers.frame()
    assert reply["errors"] == ["f: patched content does not match its sha256"]
    assert (box.root / "f").read_bytes() == OLD
    assert box.temps() == []


@pytest.mark.parametrize("belief", ["other mtime", "other size", "other content"])
def test_a_patch_made_for_another_old_file_is_asked_for_again_and_blocks_the_record(
    box: Box, belief: str
) -> None:
    (box.root / "f").write_bytes(OLD)
    os.utime(box.root / "f", ns=(5, 5))
    base = {"other mtime": [12, 6], "other size": [13, 5], "other content": [12, 5]}[belief]
    header, data = patch("f", b"aaaaXXXXcccc", [1])
    if belief == "other content":
        header["sha256"] = hashlib.sha256(b"what the client thought").hexdigest()
    header.update(base=base, redo=True)
    finish = {"op": "finish", "record": {"boot_id": "boot-1", "uuid": "u1", "digest": "d"}}
    whole = put("f", b"aaaaXXXXcccc")
    _, answers = box.serve(header, data, SYNC, finish, *whole, finish)
    assert answers.frame() == {
        "errors": [],
        "error_count": 0,
        "written": 0,
        "bytes": 0,
        "redo": ["f"],
    }
    first = answers.frame()
    assert (first["redo"], first["recorded"]) == (["f"], False)
    second = answers.frame()
    assert ("redo" in second, second["recorded"], second["errors"]) == (False, True, [])
    assert (box.root / "f").read_bytes() == b"aaaaXXXXcccc"
    assert box.temps() == []


def test_a_discarded_patch_changes_nothing_and_is_no_error(box: Box) -> None:
    (box.root / "f").write_bytes(OLD)
    _, answers = box.serve(*patch("f", b"aaaaXXXXcccc", [1], commit=False), SYNC)
    assert answers.frame()["error_count"] == 0
    assert (box.root / "f").read_bytes() == OLD
    assert box.temps() == []


def _blocks_patch(old: bytes, new: bytes, bs: int) -> tuple[list[int], bytes]:
    """The blocks of `new` that differ from `old` at the same offsets, and their bytes."""
    n = (len(new) + bs - 1) // bs
    send = [i for i in range(n) if new[i * bs : (i + 1) * bs] != old[i * bs : (i + 1) * bs]]
    return send, b"".join(new[i * bs : (i + 1) * bs] for i in send)


@pytest.mark.parametrize("shape", ["first and last", "middle", "grown", "shrunk", "same"])
def test_a_patch_of_a_file_over_many_chunks_has_the_new_content_and_its_sha256(
    box: Box, shape: str
) -> None:
    bs = 1 << 16
    old = os.urandom(2 * helper.CHUNK + 3 * bs + 100)  # chunks, blocks and a partial block
    new = bytearray(old)
    if shape == "first and last":
        new[:10] = b"x" * 10
        new[-5:] = b"y" * 5
    elif shape == "middle":
        new[helper.CHUNK - 7 : helper.CHUNK + bs + 9] = os.urandom(bs + 16)  # across a chunk
    elif shape == "grown":
        new[5 * bs : 5 * bs + 1] = b"z"
        new += os.urandom(helper.CHUNK + 77)
    elif shape == "shrunk":
        new[bs : bs + 2] = b"zz"
        del new[helper.CHUNK + 5 :]
    new = bytearray(new)
    send, data = _blocks_patch(old, bytes(new), bs)
    (box.root / "f").write_bytes(old)
    header = {
        "op": "patch",
        "path": "f",
        "size": len(new),
        "bs": bs,
        "send": send,
        "sha256": hashlib.sha256(new).hexdigest(),
        "mode": 0o600,
        "mtime_ns": 10**18,
    }
    _, answers = box.serve(header, data + b"\x01", SYNC)
    reply = answers.frame()
    assert reply["error_count"] == 0, reply
    assert (reply["written"], reply["bytes"]) == (1, len(data))
    got = (box.root / "f").read_bytes()
    assert hashlib.sha256(got).hexdigest() == header["sha256"]
    assert got == new
    assert box.temps() == []


def test_a_patch_whose_blocks_come_out_of_order_leaves_the_old_file_and_the_stream_in_step(
    box: Box,
) -> None:
    (box.root / "f").write_bytes(OLD)
    new = b"XXXXbbbbYYYY"
    header, _ = patch("f", new, [2, 0])
    _, answers = box.serve(header, b"YYYYXXXX\x01", *put("after", b"ok"), SYNC)
    reply = answers.frame()
    assert reply["errors"] == ["f: patch blocks out of order"]
    assert (box.root / "f").read_bytes() == OLD
    assert (box.root / "after").read_bytes() == b"ok"
    assert box.temps() == []


@pytest.mark.parametrize(
    "plant", ["missing", "symlink", "symlinked parent", "bad path", "fifo", "directory"]
)
def test_a_patch_of_a_file_it_cannot_open_safely_is_an_error_and_the_stream_goes_on(
    box: Box, plant: str
) -> None:
    path = {"symlinked parent": "sub/secret", "bad path": "../secret"}.get(plant, "f")
    if plant == "symlink":
        (box.root / "f").symlink_to(box.outside / "secret")
    if plant == "fifo":
        os.mkfifo(box.root / "f")  # nobody writes it: an open that waits would never return
    if plant == "directory":
        (box.root / "f").mkdir()
    if plant == "symlinked parent":
        (box.root / "sub").symlink_to(box.outside)
    before = box.outside_state()
    _, answers = box.serve(*patch(path, b"aaaaXXXXcccc", [1]), *put("after", b"ok"), SYNC)
    reply = answers.frame()
    assert reply["error_count"] == 1
    assert reply["errors"][0].startswith(path + ": ")
    assert box.outside_state() == before
    assert (box.root / "after").read_bytes() == b"ok"
    assert box.temps() == []


def test_block_digests_are_never_more_than_asked_for_and_refuse_what_is_not_a_file(
    box: Box,
) -> None:
    (box.root / "f").write_bytes(OLD)
    (box.root / "d").mkdir()
    (box.root / "link").symlink_to(box.outside / "secret")
    (box.root / "sub").symlink_to(box.outside)
    paths = ["f", "f", "d", "link", "sub/secret", "missing", "../secret"]
    req = {"op": "blocks", "bs": 4, "paths": paths, "max": [10, 2, 9, 9, 9, 9, 9], "flush": 1}
    _, answers = box.serve(req)
    digests = [hashlib.sha1(OLD[i : i + 4]).digest()[:8] for i in (0, 4, 8)]
    assert answers.frame() == {"n": 3}
    assert answers.raw(24) == b"".join(digests)
    assert answers.frame() == {"n": 2}
    assert answers.raw(16) == b"".join(digests[:2])
    assert [answers.frame() for _ in paths[2:]] == [{"n": -1}] * 5
    assert answers.done


# -- mkdir, link, meta


def test_mkdir_link_and_meta_set_what_they_are_asked_to(box: Box) -> None:
    (box.root / "existing").mkdir(mode=0o700)
    (box.root / "f").write_bytes(b"f")
    (box.root / "old").write_bytes(b"replaced by a link")
    _, answers = box.serve(
        {"op": "mkdir", "path": "new/deep", "mode": 0o751},
        {"op": "mkdir", "path": "existing", "mode": 0o755},
        {"op": "link", "path": "l", "target": "../anywhere"},
        {"op": "link", "path": "old", "target": "f"},
        {"op": "meta", "path": "f", "mode": 0o600, "mtime_ns": 5 * 10**17},
        SYNC,
    )
    assert answers.frame()["error_count"] == 0
    assert stat.S_IMODE(os.stat(box.root / "new/deep").st_mode) == 0o751
    assert stat.S_IMODE(os.stat(box.root / "existing").st_mode) == 0o755
    assert os.readlink(box.root / "l") == "../anywhere"
    assert os.readlink(box.root / "old") == "f"
    st = os.stat(box.root / "f")
    assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o600, 5 * 10**17)
    assert box.temps() == []


def test_mkdir_link_and_meta_never_act_through_a_planted_symlink(box: Box) -> None:
    (box.root / "sub").symlink_to(box.outside)
    (box.root / "dirlink").symlink_to(box.outside)
    (box.root / "filelink").symlink_to(box.outside / "secret")
    os.chmod(box.outside / "secret", 0o600)
    os.chmod(box.outside, 0o700)
    before = box.outside_state()
    _, answers = box.serve(
        {"op": "mkdir", "path": "sub/new", "mode": 0o777},
        {"op": "mkdir", "path": "dirlink", "mode": 0o777},
        {"op": "link", "path": "sub/l", "target": "x"},
        {"op": "meta", "path": "filelink", "mode": 0o777, "mtime_ns": 1},
        {"op": "meta", "path": "sub/secret", "mode": 0o777, "mtime_ns": 1},
        {"op": "link", "path": "..", "target": "x"},
        SYNC,
    )
    reply = answers.frame()
    assert reply["error_count"] == 6
    assert box.outside_state() == before
    assert stat.S_IMODE(os.stat(box.outside).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(box.outside / "secret").st_mode) == 0o600


def test_a_meta_of_a_missing_file_is_an_error(box: Box) -> None:
    _, answers = box.serve({"op": "meta", "path": "gone", "mode": 0o644, "mtime_ns": 1}, SYNC)
    assert answers.frame()["error_count"] == 1


# -- remove


def test_remove_takes_files_links_and_empty_dirs_and_keeps_the_rest(box: Box) -> None:
    for d in ("empty", "full/inner", "keep/me", "keep2"):
        (box.root / d).mkdir(parents=True)
    (box.root / "f").write_bytes(b"f")
    (box.root / "full/inner/x").write_bytes(b"x")
    (box.root / "link").symlink_to(box.outside / "secret")
    (box.root / "sub").symlink_to(box.outside)
    before = box.outside_state()
    paths = ["f", "link", "empty", "full", "gone", "gone/deeper", "f/under", "", "keep", "keep2"]
    paths += ["sub/secret", "../outside/secret"]
    _, answers = box.serve(
        {"op": "remove", "paths": paths, "protect": ["keep/me", "keep2"], "flush": True}, SYNC
    )
    assert answers.frame() == {"removed": 3, "kept": ["full", "", "keep", "keep2"]}
    reply = answers.frame()
    # under a symlinked dir: not a directory to it, so nothing there to remove (no error)
    assert [e.split(":")[0] for e in reply["errors"]] == ["../outside/secret"]
    assert sorted(p.name for p in box.root.iterdir()) == ["full", "keep", "keep2", "sub"]
    assert box.outside_state() == before


def test_a_strict_remove_of_a_non_empty_dir_is_an_error_and_the_kept_list_is_bounded(
    box: Box,
) -> None:
    names = [f"d{i}" for i in range(15)]
    for name in names:
        (box.root / name / "x").mkdir(parents=True)
    (box.root / "sub").symlink_to(box.outside)
    _, answers = box.serve(
        {"op": "remove", "paths": [*names, "sub/secret", "../x"], "strict": True}, SYNC
    )
    assert answers.frame() == {"removed": 0, "kept": names[:10]}
    reply = answers.frame()
    assert reply["error_count"] == 16  # 15 non-empty dirs and the `..` path
    assert (box.outside / "secret").exists()


# -- scan


def test_a_scan_reports_every_kind_of_entry_and_hashes_only_what_is_wanted(box: Box) -> None:
    (box.root / "d").mkdir(mode=0o750)
    (box.root / "d/f").write_bytes(b"hash me")
    (box.root / "g").write_bytes(b"size differs")
    (box.root / "l").symlink_to(box.outside)
    os.mkfifo(box.root / "fifo")
    st_f, st_g = os.stat(box.root / "d/f"), os.stat(box.root / "g")
    want = {"d/f": [st_f.st_size, st_f.st_mtime_ns], "g": [1, st_g.st_mtime_ns]}
    _, answers = box.serve({"op": "scan", "want": want})
    entries = {e[0]: e for e in answers.frame()["scan"]}
    assert answers.frame() == {"scan_end": True, "count": 5}
    assert answers.done
    assert entries["d"][1:] == ["d", 0, os.stat(box.root / "d").st_mtime_ns, 0o750, ""]
    assert entries["d/f"][5] == hashlib.sha256(b"hash me").hexdigest()
    assert entries["g"][1:3] == ["f", 12]
    assert entries["g"][5] == ""
    assert entries["l"][1:3] == ["l", len(str(box.outside))]
    assert entries["l"][4:] == [0o777, str(box.outside)]
    assert entries["fifo"][1] == "o"
    assert "l/secret" not in entries  # a symlinked dir is not walked


def test_a_big_tree_is_scanned_in_frames_far_below_the_clients_cap(box: Box) -> None:
    names = [f"{i:04d}-" + "\udcff" * 200 for i in range(300)]
    for name in names:
        os.close(os.open(os.fsencode(box.root) + b"/" + os.fsencode(name), os.O_CREAT, 0o644))
    _, answers = box.serve({"op": "scan"})
    seen: list[str] = []
    frames = 0
    while "scan" in (reply := answers.frame()):
        frames += 1
        seen += [e[0] for e in reply["scan"]]
    assert reply == {"scan_end": True, "count": 300}
    assert frames > 1
    assert sorted(seen) == sorted(names)


def test_a_root_that_vanished_scans_as_empty(box: Box) -> None:
    out = io.BytesIO()
    h = helper.Helper(io.BytesIO(), out, _umask())
    h.root = str(box.root / "vanished")
    h.op_scan({})
    assert Answers(out.getvalue()).frame() == {"scan_end": True, "count": 0}


# -- hello, finish, unrecord


def test_the_remote_record_is_fresh_only_for_the_same_boot_instance_digest_and_root(
    box: Box,
) -> None:
    record = {"x": 1, "entries": {"a": [1]}}
    first, answers = box.serve({"op": "finish", "record": record, "flush": True})
    assert first["has_record"] is False
    assert answers.frame()["recorded"] is True
    assert json.loads((box.state / "record.manifest.json").read_text()) == {"a": [1]}
    saved = json.loads((box.state / "record.json").read_text())
    assert saved == {"x": 1, "root": str(box.root)}
    # a record names its boot, instance and digest: the client sends them in the record
    (box.state / "record.json").write_text(
        json.dumps({"boot_id": "boot-1", "uuid": "u1", "digest": "d1", "root": str(box.root)})
    )
    fresh, _ = box.serve(hello=box.hello(digest="d1"))
    assert fresh["fresh"] is True
    assert fresh["record"] == {
        "boot_id": "boot-1",
        "uuid": "u1",
        "digest": "d1",
        "root": str(box.root),
    }
    for change in ({"uuid": "u2"}, {"digest": "d2"}, {"root": str(box.root / "other")}):
        hello, _ = box.serve(hello=box.hello(**{"digest": "d1", **change}))
        assert hello["fresh"] is False
        assert hello["has_record"] is True
    box.boot.write_text("boot-2\n")
    hello, _ = box.serve(hello=box.hello(digest="d1"))
    assert (hello["fresh"], hello["boot_id"]) == (False, "boot-2")


@pytest.mark.parametrize("record", [b"\xff", b"{", b"[1]", b'"text"'])
def test_a_garbled_remote_record_is_never_fresh(box: Box, record: bytes) -> None:
    box.state.mkdir()
    (box.state / "record.json").write_bytes(record)
    hello, _ = box.serve()
    assert hello["fresh"] is False
    assert hello["record"] is None


def test_the_boot_id_is_the_first_non_empty_one_and_bounded(box: Box) -> None:
    empty, long = box.boot.parent / "empty", box.boot.parent / "long"
    empty.write_text("  \n")
    long.write_text("b" * 1000)
    paths = [str(box.boot.parent / "missing"), str(empty), str(long), str(box.boot)]
    hello, _ = box.serve(hello=box.hello(boot_paths=paths))
    assert hello["boot_id"] == "b" * 256
    hello, _ = box.serve(hello=box.hello(boot_paths=[str(empty)]))
    assert (hello["boot_id"], hello["fresh"]) == ("", False)


def test_a_push_with_errors_writes_no_record_and_unrecord_forgets_it(box: Box) -> None:
    _, answers = box.serve(*put("../x", b""), {"op": "finish", "record": {"a": 1}})
    reply = answers.frame()
    assert (reply["recorded"], reply["error_count"]) == (False, 1)
    _, answers = box.serve({"op": "finish", "record": None})
    assert answers.frame()["recorded"] is False
    _, answers = box.serve({"op": "finish", "record": {"a": 1}})
    assert answers.frame()["recorded"] is True
    box.serve({"op": "unrecord"}, {"op": "unrecord"})  # the second finds nothing: no error


def test_the_write_pool_is_at_most_sixteen_threads(box: Box) -> None:
    data = encode_frame(box.hello(threads=1000)) + b"".join(
        item if isinstance(item, bytes) else encode_frame(item) for item in put("f", b"x")
    )
    h = helper.Helper(io.BytesIO(data), io.BytesIO(), _umask())
    try:
        h.serve()
        assert len(h.workers) == helper.MAX_THREADS
    finally:
        h.stop_pool()
        h.drop_dirs()
    assert (box.root / "f").read_bytes() == b"x"


# -- pull


def test_a_pull_streams_the_back_paths_and_never_follows_a_link(box: Box) -> None:
    (box.root / "out/d").mkdir(parents=True)
    big = os.urandom(helper.CHUNK * 2 + 5)
    (box.root / "out/big").write_bytes(big)
    (box.root / "out/d/small").write_bytes(b"s")
    (box.root / "out/same").write_bytes(b"same")
    (box.root / "out/link").symlink_to(box.outside)
    (box.root / "out/flink").symlink_to(box.outside / "secret")
    os.mkfifo(box.root / "out/fifo")
    (box.root / "top").write_bytes(b"t")
    st = os.stat(box.root / "out/same")
    have = {"out/same": [st.st_size, st.st_mtime_ns], "out/big": [1, 1]}
    req = {"op": "pull", "back": ["out", "top", "nothing", "no/such"], "have": have}
    _, answers = box.serve(req)
    heads: dict[str, Any] = {}
    data: dict[str, bytes] = {}
    batched: list[str] = []
    while "end" not in (head := answers.frame()):
        if "files" in head:  # small files: names, then their bytes one after the other
            for name, _, mode, mtime in head["files"]:
                path = head["dir"] + "/" + name
                heads[path] = {"path": path, "type": "f", "mode": mode, "mtime_ns": mtime}
                batched.append(path)
            for name, size, _, _ in head["files"]:
                data[head["dir"] + "/" + name] = answers.raw(size)
            continue
        heads[head["path"]] = head
        if head["type"] == "f" and not head.get("unchanged"):
            data[head["path"]] = answers.chunks()
    assert head == {"end": True, "errors": 0, "missing": ["nothing", "no/such"]}
    assert answers.done
    assert data == {"out/big": big, "out/d/small": b"s", "top": b"t"}
    assert batched == ["out/d/small"]  # `top` is a back path itself; `big` is not small
    assert heads["out/same"]["unchanged"] is True
    assert {p: h["type"] for p, h in heads.items()} == {
        "out": "d",
        "out/big": "f",
        "out/d": "d",
        "out/d/small": "f",
        "out/fifo": "o",
        "out/flink": "l",
        "out/link": "l",
        "out/same": "f",
        "top": "f",
    }


def test_a_pull_through_a_symlinked_parent_is_counted_as_an_error_not_followed(
    box: Box,
) -> None:
    (box.root / "sub").symlink_to(box.outside)
    _, answers = box.serve({"op": "pull", "back": ["sub/secret", "../outside/secret"]})
    assert answers.frame() == {"end": True, "errors": 2, "missing": []}
    assert answers.done


def test_a_pull_counts_what_it_could_not_read_but_not_what_vanished(box: Box) -> None:
    h = helper.Helper(io.BytesIO(), io.BytesIO(), _umask())
    h.pull_failed(FileNotFoundError("gone"))
    assert h.pull_errors == 0
    h.pull_failed(PermissionError("no"))
    assert h.pull_errors == 1
    fd = os.open(box.root, os.O_RDONLY)
    os.close(fd)
    h.pull_walk(fd, "closed", {})  # a directory it cannot list
    assert h.pull_errors == 2
    assert h.out.getvalue() == b""  # type: ignore[attr-defined]


def test_a_file_that_vanishes_before_it_is_opened_is_skipped_without_an_error(
    box: Box,
) -> None:
    (box.root / "f").write_bytes(b"f")
    st = os.stat(box.root / "f")
    (box.root / "f").unlink()
    h = helper.Helper(io.BytesIO(), io.BytesIO(), _umask())
    fd = os.open(box.root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        h.pull_entry(fd, "f", "f", st, {})
        (box.root / "d").mkdir()
        st_d = os.stat(box.root / "d")
        (box.root / "d").rmdir()
        h.pull_entry(fd, "d", "d", st_d, {})
    finally:
        os.close(fd)
    answers = Answers(h.out.getvalue())  # type: ignore[attr-defined]
    assert answers.frame()["path"] == "d"  # announced from its stat, then gone
    assert answers.done
    assert h.pull_errors == 0


def test_a_name_too_long_to_remove_is_an_error(box: Box) -> None:
    _, answers = box.serve({"op": "remove", "paths": ["x" * 300]}, SYNC)
    assert answers.frame() == {"removed": 0, "kept": []}
    assert answers.frame()["errors"][0].startswith("x" * 100)


# -- in a real process


def _frames(*items: dict[str, Any] | bytes) -> bytes:
    return b"".join(item if isinstance(item, bytes) else encode_frame(item) for item in items)


def test_a_disk_that_refuses_the_data_fails_each_file_and_the_stream_goes_on(box: Box) -> None:
    # the sandbox's disk is full, as the helper sees it: writes past a file size limit fail
    # with EFBIG (SIGXFSZ ignored), for a big put, a pooled small put and a growing patch
    opts = SyncOptions(
        local_root=box.root,
        state_dir=box.state,
        remote_state_dir=str(box.state / "cache"),
        remote_python=REMOTE_PYTHON,
    )
    (box.root / "p").write_bytes(OLD)
    grown = OLD + b"z" * (512 << 10)
    stream = program().payload + _frames(
        box.hello(threads=2),
        *put("big", b"b" * (helper.SMALL + 1)),
        *put("small", b"s" * (512 << 10)),
        *patch("p", grown, [2, *range(3, len(grown) // 4)]),
        *put("fits", b"ok"),
        SYNC,
    )
    command = f"trap '' XFSZ; ulimit -f 256; {helper_command(opts, cache=False)}"
    out = subprocess.run(["sh", "-c", command], input=stream, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    answers = Answers(out.stdout)
    assert answers.frame()["boot_id"] == "boot-1"
    reply = answers.frame()
    assert sorted(e.split(":")[0] for e in reply["errors"]) == ["big", "p", "small"]
    assert all("File too large" in e for e in reply["errors"])
    assert (reply["written"], reply["bytes"]) == (1, 2)
    assert sorted(p.name for p in box.root.iterdir()) == ["fits", "p"]
    assert (box.root / "p").read_bytes() == OLD


def test_without_the_json_accelerator_the_helper_speaks_the_same_frames(box: Box) -> None:
    # `_json` is an optional accelerator: an interpreter built without it uses the json module
    code = (
        "import sys\n"
        "sys.modules['_json'] = None\n"
        "ns = {'__name__': 'helper'}\n"
        "exec(compile(sys.argv[1], 'helper', 'exec'), ns)\n"
        "assert ns['JLOADS'] is sys.modules['json'].loads\n"
        "ns['main']()\n"
    )
    stream = _frames(box.hello(), *put("a", b"a"), SYNC)
    out = subprocess.run(
        [REMOTE_PYTHON, "-E", "-S", "-c", code, _PROGRAM.decode("ascii")],
        input=stream,
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    answers = Answers(out.stdout)
    assert answers.frame()["boot_id"] == "boot-1"
    assert answers.frame() == {"errors": [], "error_count": 0, "written": 1, "bytes": 1}
    assert answers.done


# -- puts: a batch read at once; in a root empty at hello, new files made without a temp


def puts(*files: tuple[str, bytes, bool]) -> list[Any]:
    heads = [[p, len(d), 0o644, 10**18] for p, d, _ in files]
    return [{"op": "puts", "files": heads}, b"".join(d + bytes([ok]) for _, d, ok in files)]


def serve_after_hello(box: Box, plant: Any, *items: Any, inp: Any = None) -> tuple[Any, Any]:
    """hello, then `plant()` (the sandbox acting between hello and the files), then `items`."""
    data = b"".join(i if isinstance(i, bytes) else encode_frame(i) for i in (*items, SYNC))
    h = helper.Helper(inp(data) if inp else io.BytesIO(data), io.BytesIO(), _umask())
    h.op_hello(box.hello())
    plant()
    try:
        h.serve()
    finally:
        h.drop_dirs()
    answers = Answers(h.out.getvalue())  # type: ignore[attr-defined]
    answers.frame()  # hello's
    return h, answers.frame()


@pytest.mark.parametrize("empty", [True, False])
def test_only_a_root_empty_at_hello_gets_new_files_without_a_temp(box: Box, empty: bool) -> None:
    if not empty:
        (box.root / "old").write_bytes(b"o")
    h, reply = serve_after_hello(box, lambda: None, *puts(("a", b"1", True)))
    assert h.direct is empty
    assert reply["written"] == 1
    assert (box.root / "a").read_bytes() == b"1"


def _temp_blocked(dirpath: Path) -> None:
    """A directory where the helper's temp for `f` would go: a file written through a temp
    there fails, one made under its own name does not."""
    (dirpath / f"{helper.TMP}f.{os.getpid()}").mkdir(exist_ok=True)


@pytest.mark.parametrize("how", ["mkdir", "parent of a file"])
def test_new_files_in_a_directory_the_push_made_get_no_temp_in_a_root_that_was_not_empty(
    box: Box, how: str
) -> None:
    (box.root / "old").mkdir()
    _temp_blocked(box.root / "old")
    made: list[Any] = [{"op": "mkdir", "path": "new", "mode": 0o755}] if how == "mkdir" else []

    class Planting(io.BytesIO):
        """Blocks the temp in `new` once the helper made it (before the files are read)."""

        def read(self, n: int | None = -1) -> bytes:
            if (box.root / "new").is_dir() and not (box.root / "new" / "f").exists():
                _temp_blocked(box.root / "new")
            return super().read(n)

    items = [*made, *puts(("old/f", b"1", True)), *puts(("new/f", b"2", True))]
    if how != "mkdir":
        # the parent is made for the first file, then the second batch finds it made
        items = [*puts(("old/f", b"1", True), ("new/g", b"0", True)), *puts(("new/f", b"2", True))]
    h, reply = serve_after_hello(box, lambda: None, *items, inp=Planting)
    assert not h.direct
    assert (box.root / "new" / "f").read_bytes() == b"2"
    # an old directory's new file still goes through a temp (blocked here: an error)
    assert reply["error_count"] == 1 and reply["errors"][0].startswith("old/f: ")
    assert not (box.root / "old" / "f").exists()


def test_puts_into_a_directory_the_push_made_never_follow_a_symlink_planted_there(
    box: Box,
) -> None:
    (box.root / "old").write_bytes(b"o")

    class Planting(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            new = box.root / "new"
            if new.is_dir() and not (new / "x").is_symlink() and not (new / "x").exists():
                (new / "x").symlink_to(box.outside / "secret")
                (new / "dangling").symlink_to(box.outside / "made")
            return super().read(n)

    before = box.outside_state()
    _, reply = serve_after_hello(
        box,
        lambda: None,
        {"op": "mkdir", "path": "new", "mode": 0o755},
        *puts(("new/x", b"n", True), ("new/dangling", b"d", True), ("new/ok", b"k", True)),
        inp=Planting,
    )
    assert reply["error_count"] == 0, reply
    assert box.outside_state() == before
    assert not (box.outside / "made").exists()
    for name, data in (("x", b"n"), ("dangling", b"d"), ("ok", b"k")):
        assert not (box.root / "new" / name).is_symlink()
        assert (box.root / "new" / name).read_bytes() == data
    assert box.temps() == []


def test_a_kept_helpers_next_push_writes_through_temps_in_the_directories_the_last_one_made(
    box: Box,
) -> None:
    (box.root / "old").write_bytes(b"o")
    data = b"".join(
        i if isinstance(i, bytes) else encode_frame(i)
        for i in (
            {"op": "mkdir", "path": "new", "mode": 0o755},
            *puts(("new/a", b"1", True)),
            SYNC,
            box.hello(),
            *puts(("new/f", b"2", True)),
            SYNC,
        )
    )

    class Planting(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            if (box.root / "new" / "a").exists():
                _temp_blocked(box.root / "new")
            return super().read(n)

    h = helper.Helper(Planting(data), io.BytesIO(), _umask())
    h.op_hello(box.hello())
    try:
        h.serve()
    finally:
        h.drop_dirs()
    answers = Answers(h.out.getvalue())  # type: ignore[attr-defined]
    answers.frame()
    assert answers.frame()["written"] == 1
    answers.frame()  # the second hello's
    second = answers.frame()
    assert second["error_count"] == 1 and second["errors"][0].startswith("new/f: ")


def test_puts_never_follow_a_symlink_planted_after_an_empty_roots_hello(box: Box) -> None:
    def plant() -> None:
        (box.root / "dangling").symlink_to(box.outside / "new")
        (box.root / "x").symlink_to(box.outside / "secret")
        (box.root / "sub").symlink_to(box.outside)

    before = box.outside_state()
    h, reply = serve_after_hello(
        box,
        plant,
        *puts(
            ("dangling", b"d", True), ("x", b"n", True), ("sub/z", b"z", True), ("ok", b"k", True)
        ),
    )
    assert h.direct
    assert reply["error_count"] == 1 and reply["errors"][0].startswith("sub/z: ")
    assert box.outside_state() == before
    assert not (box.outside / "new").exists()
    for name, data in (("dangling", b"d"), ("x", b"n"), ("ok", b"k")):
        assert not (box.root / name).is_symlink()
        assert (box.root / name).read_bytes() == data
    assert box.temps() == []


@pytest.mark.parametrize("empty", [True, False])
@pytest.mark.parametrize("path", ["", "../escape", "a/../../escape", "a/..", "a/.", "a/"])
def test_puts_refuse_a_path_that_could_leave_the_root(box: Box, empty: bool, path: str) -> None:
    if not empty:
        (box.root / "old").write_bytes(b"o")
    (box.root.parent / "a").mkdir()  # `a/..` opened as a parent would be the root's parent
    _, reply = serve_after_hello(
        box, lambda: None, *puts(("a/f", b"1", True), (path, b"e", True), ("after", b"ok", True))
    )
    assert reply["error_count"] == 1
    assert reply["errors"] == [f"{path}: bad path"]
    assert not (box.root.parent / "escape").exists()
    assert sorted(p.name for p in box.root.parent.iterdir()) == ["a", "boot_id", "workspace"]
    assert (box.root / "after").read_bytes() == b"ok"


@pytest.mark.parametrize("empty", [True, False])
def test_a_discarded_file_in_puts_leaves_nothing_and_the_rest_lands(box: Box, empty: bool) -> None:
    if not empty:
        (box.root / "old").write_bytes(b"o")
    _, reply = serve_after_hello(box, lambda: None, *puts(("gone", b"g", False), ("b", b"2", True)))
    assert reply == {"errors": [], "error_count": 0, "written": 1, "bytes": 1}
    assert not (box.root / "gone").exists()
    assert box.temps() == []


@pytest.mark.parametrize("size", [-1, 1.5, "1"])
def test_a_puts_with_a_size_that_is_not_a_count_stops_the_helper(box: Box, size: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        box.serve({"op": "puts", "files": [["a", 3, 0o644, 1], ["b", size, 0o644, 1]]}, b"xxx\x01")
    assert not (box.root / "a").exists()


def test_a_puts_batch_too_big_to_read_at_once_is_read_file_by_file(box: Box) -> None:
    class Reads(io.BytesIO):
        most = 0

        def read(self, n: int | None = -1) -> bytes:
            Reads.most = max(Reads.most, n or 0)
            return super().read(n)

    big = b"b" * (helper.PUTS_AT_ONCE // 2)
    _, reply = serve_after_hello(
        box, lambda: None, *puts(("a", big, True), ("b", big, True)), inp=Reads
    )
    assert reply["written"] == 2 and (box.root / "b").read_bytes() == big
    assert Reads.most <= helper.CHUNK


@pytest.mark.parametrize("empty", [True, False])
def test_a_puts_file_the_disk_takes_only_in_part_is_an_error_never_a_short_file(
    box: Box, empty: bool
) -> None:
    # a write past the file size limit comes back short, the next one fails with EFBIG
    # (SIGXFSZ ignored): the file is not kept cut, and the batch's other files land
    opts = SyncOptions(
        local_root=box.root,
        state_dir=box.state,
        remote_state_dir=str(box.state / "cache"),
        remote_python=REMOTE_PYTHON,
    )
    if not empty:
        (box.root / "old").write_bytes(b"o")
    stream = program().payload + _frames(
        box.hello(), *puts(("big", b"b" * 3000, True), ("fits", b"ok", True)), SYNC
    )
    command = f"trap '' XFSZ; ulimit -f 2; {helper_command(opts, cache=False)}"
    out = subprocess.run(["sh", "-c", command], input=stream, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    answers = Answers(out.stdout)
    answers.frame()  # hello's
    reply = answers.frame()
    assert [e.split(":")[0] for e in reply["errors"]] == ["big"]
    assert "File too large" in reply["errors"][0]
    assert (reply["written"], reply["bytes"]) == (1, 2)
    assert sorted(p.name for p in box.root.iterdir()) == ["fits"] + ([] if empty else ["old"])


def test_a_batch_that_comes_back_to_a_directory_after_the_fd_cache_was_dropped_lands_there(
    box: Box,
) -> None:
    # "a" is opened, then more directories than the helper keeps fds of (its cache is closed
    # and dropped), then "a" again: its old fd must not be used (EBADF, or the reused fd of
    # another directory: a file written in the wrong place). A push in path order happened
    # to re-open the same chain of directories into the same fd numbers; this order does not
    many = [(f"d{i:03d}/f", b"x", True) for i in range(helper.MAX_DIR_FDS + 5)]
    files = [("a/first", b"1", True), *many, ("a/second", b"2", True)]
    _h, reply = serve_after_hello(box, lambda: None, *puts(*files))
    assert reply.get("errors", []) == []
    assert (box.root / "a" / "second").read_bytes() == b"2"
    assert sorted(p.name for p in (box.root / "a").iterdir()) == ["first", "second"]
