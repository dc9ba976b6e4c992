"""Sync-back: normal pulls, conflicts, and hostile sandboxes that must not write outside."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from reconciler.sync.engine import plan_pull, pull, pulled_paths
from reconciler.sync.pull import CONFLICT_SUFFIX
from reconciler.sync.remote import encode_frame
from tests.sync.conftest import Site, snapshot, write


class CraftedProcess:
    """A 'remote helper' that ignores its input and replays a crafted answer stream."""

    def __init__(self, stream: bytes) -> None:
        self._out = io.BytesIO(stream)
        self.killed = False

    def write(self, data: bytes) -> None:
        pass

    def close_stdin(self) -> None:
        pass

    def read(self, n: int = 65536) -> bytes:
        return self._out.read(n)

    def read_stderr(self, n: int = 65536) -> bytes:
        return b""

    def wait(self, timeout: float | None = None) -> int:
        return 0

    def kill(self) -> None:
        self.killed = True


class CraftedShell:
    def __init__(self, stream: bytes) -> None:
        self.stream = stream
        self.procs: list[CraftedProcess] = []

    def start(self, command: str) -> CraftedProcess:
        proc = CraftedProcess(self.stream)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        pass


def file_entry(
    path: Any,
    data: bytes,
    *,
    size: int | None = None,
    mode: int = 0o644,
    chunks: Iterable[bytes] | None = None,
) -> bytes:
    hdr = {
        "path": path,
        "type": "f",
        "size": len(data) if size is None else size,
        "mode": mode,
        "mtime_ns": 1_600_000_000_000_000_000,
    }
    out = encode_frame(hdr)
    for chunk in chunks if chunks is not None else [data]:
        out += struct.pack(">I", len(chunk)) + chunk
    return out + struct.pack(">I", 0)


def other_entry(path: Any, kind: str) -> bytes:
    return encode_frame({"path": path, "type": kind, "size": 0, "mode": 0o644, "mtime_ns": 1})


def crafted(*entries: bytes) -> CraftedShell:
    return CraftedShell(
        encode_frame({"boot_id": "b", "fresh": False, "has_record": False})
        + b"".join(entries)
        + encode_frame({"end": True})
    )


@pytest.fixture
def world(site: Site) -> Site:
    """A local root with user files, and an `outside` area a hostile pull must not touch."""
    write(site.local / "src/main.py", "print('mine')\n")
    write(site.local / "out/.keep", "")
    write(site.base / "outside/target.txt", "precious")
    (site.base / "outside/dir").mkdir()
    return site


def outside_state(site: Site) -> dict[str, tuple[object, ...]]:
    """The whole tmp area except the local root and the controller's state dir."""
    state = snapshot(site.base, skip=(site.local / "out", site.state))
    with open("/etc/passwd", "rb") as f:
        state["/etc/passwd"] = (hashlib.sha256(f.read()).hexdigest(),)
    state["/etc listing"] = tuple(sorted(os.listdir("/etc")))
    return state


BACK = ("out/",)


class TestPull:
    def test_declared_paths_come_home_with_modes_and_mtimes(self, world: Site) -> None:
        write(world.remote / "out/report.txt", "done", 0o640)
        write(world.remote / "out/sub/data.bin", os.urandom(3_000_000), 0o755)
        write(world.remote / "src/main.py", "sandbox edit that must not come back")
        result = pull(world.shell, world.opts(back=BACK))
        assert result.files_written == 2
        assert result.rejected == []
        for rel in ("out/report.txt", "out/sub/data.bin"):
            assert (
                snapshot(world.local / rel.rsplit("/", 1)[0])[rel.rsplit("/", 1)[1]]
                == snapshot(world.remote / rel.rsplit("/", 1)[0])[rel.rsplit("/", 1)[1]]
            )
        assert (world.local / "src/main.py").read_text() == "print('mine')\n"
        assert pulled_paths(world.opts(back=BACK)) == {
            world.local / "out/report.txt",
            world.local / "out/sub/data.bin",
        }
        assert plan_pull(world.opts(back=BACK)).known_files == 2

    def test_temp_files_of_a_killed_pull_are_swept_and_a_live_pulls_are_kept(
        self, world: Site
    ) -> None:
        # Regression (crash test): a pull killed between writing a temp file and renaming it
        # left `out/.ukc-pull.*` behind for good.
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        leftovers = {
            "killed": world.local / f"out/.ukc-pull.{dead.pid}.0a1b2c3d4e5f",
            "older ukc": world.local / "out/.ukc-pull.891d198e80c3",
            "killed, top": world.local / f".ukc-pull.{dead.pid}.ffffffffffff",
        }
        live = world.local / f"out/.ukc-pull.{os.getppid()}.0a1b2c3d4e5f"
        for path in [*leftovers.values(), live]:
            write(path, "partial")
        write(world.remote / "out/report.txt", "done")
        result = pull(world.shell, world.opts(back=(*BACK, "top.txt")))
        assert result.files_written == 1
        assert [k for k, p in leftovers.items() if p.exists()] == []
        assert live.exists()

    def test_an_unchanged_remote_is_not_resent(self, world: Site) -> None:
        write(world.remote / "out/report.txt", "done")
        pull(world.shell, world.opts(back=BACK))
        again = pull(world.shell, world.opts(back=BACK))
        assert (again.files_written, again.bytes_written, again.unchanged) == (0, 0, 1)

    def test_a_locally_edited_file_is_kept_and_the_remote_copy_lands_beside_it(
        self, world: Site
    ) -> None:
        write(world.remote / "out/report.txt", "v1")
        pull(world.shell, world.opts(back=BACK))
        write(world.local / "out/report.txt", "my local edit")
        write(world.remote / "out/report.txt", "v2 from the sandbox")
        result = pull(world.shell, world.opts(back=BACK))
        assert result.conflicts == ["out/report.txt"]
        assert (world.local / "out/report.txt").read_text() == "my local edit"
        assert (
            world.local / f"out/report.txt{CONFLICT_SUFFIX}"
        ).read_text() == "v2 from the sandbox"

    def test_an_untouched_local_file_is_updated_in_place(self, world: Site) -> None:
        write(world.remote / "out/report.txt", "v1")
        pull(world.shell, world.opts(back=BACK))
        write(world.remote / "out/report.txt", "v2")
        result = pull(world.shell, world.opts(back=BACK))
        assert (result.files_written, result.conflicts) == (1, [])
        assert (world.local / "out/report.txt").read_text() == "v2"

    def test_remote_deletions_are_not_propagated(self, world: Site) -> None:
        write(world.remote / "out/report.txt", "v1")
        pull(world.shell, world.opts(back=BACK))
        (world.remote / "out/report.txt").unlink()
        pull(world.shell, world.opts(back=BACK))
        assert (world.local / "out/report.txt").read_text() == "v1"

    def test_setuid_bits_are_stripped(self, world: Site) -> None:
        write(world.remote / "out/tool", "#!/bin/sh\n", 0o4755)
        pull(world.shell, world.opts(back=BACK))
        assert stat.S_IMODE((world.local / "out/tool").stat().st_mode) == 0o755


# --- hostile sandboxes -------------------------------------------------------------------


def _symlink_etc(s: Site) -> None:
    os.symlink("/etc", s.remote / "out/etc")
    os.symlink("/etc/passwd", s.remote / "out/passwd")


def _symlink_dir_then_file(s: Site) -> None:
    os.symlink(str(s.base / "outside/dir"), s.remote / "out/lnk")
    write(s.base / "outside/dir/planted.txt", "x")


def _fifo(s: Site) -> None:
    os.mkfifo(s.remote / "out/pipe")


def _device(s: Site) -> None:
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    os.mknod(s.remote / "out/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))


def _control_char(s: Site) -> None:
    write(s.remote / "out/evil\x1b[31mred", "x")


def _newline(s: Site) -> None:
    write(s.remote / "out/two\nlines", "x")


def _local_parent_symlink(s: Site) -> None:
    write(s.remote / "out/sub/target.txt", "overwrite!")
    os.symlink(str(s.base / "outside"), s.local / "out/sub")


def _local_target_symlink(s: Site) -> None:
    write(s.remote / "out/target.txt", "overwrite!")
    os.symlink(str(s.base / "outside/target.txt"), s.local / "out/target.txt")


REAL_CASES = {
    "symlink to /etc": (_symlink_etc, 2, "symlink"),
    "symlink dir then file under it": (_symlink_dir_then_file, 1, "symlink"),
    "fifo": (_fifo, 1, "fifo"),
    "device": (_device, 1, "device"),
    "control characters in name": (_control_char, 1, "control character"),
    "newline in name": (_newline, 1, "control character"),
    "local parent replaced by a symlink": (_local_parent_symlink, 2, "not a plain directory"),
}


@pytest.mark.parametrize("case", list(REAL_CASES))
def test_a_hostile_remote_tree_writes_nothing_outside_the_root(world: Site, case: str) -> None:
    build, n_rejected, reason = REAL_CASES[case]
    write(world.remote / "out/fine.txt", "ok")
    build(world)
    after_build = outside_state(world)
    result = pull(world.shell, world.opts(back=BACK))
    assert outside_state(world) == after_build
    assert len(result.rejected) == n_rejected, result.rejected
    assert all(reason in r for r in result.rejected), result.rejected
    assert (world.local / "out/fine.txt").read_text() == "ok"


def test_a_local_target_that_is_a_symlink_is_not_followed(world: Site) -> None:
    _local_target_symlink(world)
    before = outside_state(world)
    result = pull(world.shell, world.opts(back=BACK))
    assert outside_state(world) == before
    assert result.conflicts == ["out/target.txt"]
    assert os.path.islink(world.local / "out/target.txt")


CRAFTED_CASES: dict[str, tuple[bytes, str]] = {
    "absolute path": (file_entry("/tmp/ukc-escape", b"x"), "absolute path"),
    "dot-dot at the start": (file_entry("../escape.txt", b"x"), "'..'"),
    "dot-dot inside a back path": (file_entry("out/../../escape.txt", b"x"), "'..'"),
    "path outside the back paths": (file_entry("src/main.py", b"pwned"), "outside the declared"),
    "dot-ukc state": (file_entry(".ukc/status.json", b"{}"), "inside .ukc/"),
    "backslash tricks": (file_entry("out\\..\\..\\escape", b"x"), "backslash"),
    "nul in name": (file_entry("out/a\x00b", b"x"), "control character"),
    "c1 control in name": (file_entry("out/a\x85b", b"x"), "control character"),
    "empty component": (file_entry("out//x", b"x"), "empty component"),
    "dot component": (file_entry("out/./x", b"x"), "'.'"),
    "non-string path": (file_entry(["out", "x"], b"x"), "not a string"),
    "reserved temp name": (file_entry("out/.ukc-pull.abc", b"x"), "reserved"),
    "announced more than sent": (file_entry("out/short", b"x" * 10, size=1000), "sent 10 of"),
    "device entry": (other_entry("out/sda", "o"), "fifo, socket or device"),
    "symlink entry": (other_entry("out/lnk", "l"), "symlink"),
    "overlong name": (file_entry("out/" + "n" * 300, b"x"), "longer than 255"),
}


@pytest.mark.parametrize("case", list(CRAFTED_CASES))
def test_a_crafted_hostile_entry_is_rejected_with_its_reason(world: Site, case: str) -> None:
    entry, reason = CRAFTED_CASES[case]
    shell = crafted(entry, file_entry("out/fine.txt", b"ok"))
    before = outside_state(world)
    local_before = snapshot(world.local, skip=(world.local / "out",))
    result = pull(shell, world.opts(back=BACK))
    assert outside_state(world) == before
    assert snapshot(world.local, skip=(world.local / "out",)) == local_before
    assert len(result.rejected) == 1 and reason in result.rejected[0], result.rejected
    assert (world.local / "out/fine.txt").read_bytes() == b"ok"
    assert sorted(os.listdir(world.local / "out")) == [".keep", "fine.txt"]


def test_more_data_than_announced_abandons_the_stream(world: Site) -> None:
    big = file_entry("out/huge", b"", size=10, chunks=[b"y" * (1 << 20), b"y" * (1 << 20)])
    shell = crafted(big, file_entry("out/after.txt", b"never"))
    result = pull(shell, world.opts(back=BACK))
    assert result.aborted is not None and "more data than announced" in result.aborted
    assert shell.procs[0].killed
    assert sorted(os.listdir(world.local / "out")) == [".keep"]


def test_a_malformed_header_abandons_the_stream(world: Site) -> None:
    shell = crafted(encode_frame(["not", "a", "header"]), file_entry("out/after.txt", b"x"))
    result = pull(shell, world.opts(back=BACK))
    assert result.aborted == "sandbox sent a non-object header"
    assert not (world.local / "out/after.txt").exists()


def test_a_crafted_file_under_a_rejected_symlink_stays_inside_the_root(world: Site) -> None:
    shell = crafted(other_entry("out/lnk", "l"), file_entry("out/lnk/passwd", b"root::0:0"))
    before = outside_state(world)
    result = pull(shell, world.opts(back=BACK))
    assert outside_state(world) == before
    assert (world.local / "out/lnk").is_dir() and not (world.local / "out/lnk").is_symlink()
    assert len(result.rejected) == 1


def test_hostile_reasons_are_printable(world: Site) -> None:
    shell = crafted(file_entry("out/\x1b]0;title\x07", b"x"))
    result = pull(shell, world.opts(back=BACK))
    assert all(r.isprintable() for r in result.rejected)


def test_pull_without_back_paths_starts_nothing(world: Site) -> None:
    shell = crafted()
    assert pull(shell, world.opts()).files_written == 0
    assert shell.procs == []


def test_a_missing_local_root_halts_the_pull(world: Site, tmp_path: Path) -> None:
    from reconciler.errors import SyncHaltedError

    with pytest.raises(SyncHaltedError, match="is missing"):
        pull(crafted(), world.opts(back=BACK, local_root=tmp_path / "nope"))
