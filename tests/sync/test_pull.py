"""Sync-back: normal pulls, conflicts, and hostile sandboxes that must not write outside."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import resource
import shutil
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from reconciler.sync.engine import PullResult, plan_pull, pull, pulled_paths, start_pull_ahead
from reconciler.sync.pull import CONFLICT_SUFFIX, pull_record
from reconciler.sync.pullrecord import PULL_JOURNAL, PULL_LEGACY
from reconciler.sync.records import write_record
from reconciler.sync.remote import encode_frame
from reconciler.transport.local_shell import LocalShell
from tests.support.synctree import Site, snapshot, write


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


def crafted(*entries: bytes, end: object = None) -> CraftedShell:
    """A sandbox (boot id "b") that sends `entries`, then `end` (default `{"end": true}`)."""
    return CraftedShell(
        encode_frame({"boot_id": "b", "fresh": False, "has_record": False})
        + b"".join(entries)
        + encode_frame({"end": True} if end is None else end)
    )


#: how a sandbox is read: its python3 runs the helper, or (an image without python3) its own
#: find and tar send what the helper would (`sync.tarpull`)
TOOLS = ["python helper", "find and tar"]


@pytest.fixture(params=TOOLS)
def bare(site: Site, request: pytest.FixtureRequest) -> Site:
    """The site, read one way or the other (a python3 that is not there: find and tar)."""
    if request.param == "python helper":
        return site
    return dataclasses.replace(site, remote_python=str(site.base / "sandbox/no-python3"))


def _furnish(site: Site) -> Site:
    """A local root with user files, and an `outside` area a hostile pull must not touch."""
    write(site.local / "src/main.py", "print('mine')\n")
    write(site.local / "out/.keep", "")
    write(site.base / "outside/target.txt", "precious")
    (site.base / "outside/dir").mkdir()
    return site


@pytest.fixture
def world(bare: Site) -> Site:
    """A furnished site, read both ways."""
    return _furnish(bare)


@pytest.fixture
def crafted_world(site: Site) -> Site:
    """A furnished site for crafted helper streams (the helper's protocol only)."""
    return _furnish(site)


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

    @pytest.mark.timeout(30)
    @pytest.mark.parametrize("threads", [0, 2])
    def test_a_remote_file_where_a_local_directory_is_refused_without_hanging(
        self, world: Site, threads: int
    ) -> None:
        # Regression: the refusal was made under the writer's lock, which it took again: the
        # pull hung forever on the first such file.
        write(world.local / "out/report/keep.txt", "mine")
        write(world.remote / "out/report", "a file now")
        result = pull(world.shell, world.opts(back=BACK, write_threads=threads))
        assert result.rejected == ["out/report: a local directory has that name"]
        assert (world.local / "out/report/keep.txt").read_text() == "mine"

    @pytest.mark.parametrize("threads", [0, 2])
    def test_modes_come_from_the_sandboxs_read_and_execute_bits_through_the_local_umask(
        self, world: Site, threads: int
    ) -> None:
        # sandbox mode -> local mode under umask 022, 077 and 000: reads as the sandbox has
        # them (the owner's always), execute where readable when the owner's x is set, write
        # for the owner only
        cases = {
            "out/a": (0o644, 0o644, 0o600, 0o644),
            "out/b": (0o666, 0o644, 0o600, 0o644),
            "out/c": (0o755, 0o755, 0o700, 0o755),
            "out/d": (0o600, 0o600, 0o600, 0o600),
            "out/e": (0o777, 0o755, 0o700, 0o755),
            "out/f": (0o640, 0o640, 0o600, 0o640),
            "out/g": (0o700, 0o700, 0o700, 0o700),
            "out/h": (0o444, 0o644, 0o600, 0o644),
            "out/i": (0o070, 0o640, 0o600, 0o640),
        }
        for rel, (mode, *_) in cases.items():
            write(world.remote / rel, rel, mode)
        for column, umask in enumerate((0o022, 0o077, 0o000), start=1):
            old = os.umask(umask)
            try:
                shutil.rmtree(world.local / "out")
                shutil.rmtree(world.state, ignore_errors=True)
                pull(world.shell, world.opts(back=BACK, write_threads=threads))
            finally:
                os.umask(old)
            got = {rel: oct(stat.S_IMODE((world.local / rel).stat().st_mode)) for rel in cases}
            want = {rel: oct(row[column]) for rel, row in cases.items()}
            assert got == want, f"umask {umask:03o}"

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
    "lone surrogate in name": (file_entry("out/a\ud800b", b"x"), "not a valid file name"),
}


@pytest.mark.parametrize("case", list(CRAFTED_CASES))
def test_a_crafted_hostile_entry_is_rejected_with_its_reason(
    crafted_world: Site, case: str
) -> None:
    world = crafted_world
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


@pytest.mark.parametrize("case", list(CRAFTED_CASES))
def test_a_crafted_hostile_entry_after_an_accepted_sibling_is_rejected_all_the_same(
    crafted_world: Site, case: str
) -> None:
    # the parent of an accepted path has only its names checked from then on (`judge`)
    world = crafted_world
    entry, reason = CRAFTED_CASES[case]
    shell = crafted(file_entry("out/fine.txt", b"ok"), entry, file_entry("out/more.txt", b"2"))
    before = outside_state(world)
    result = pull(shell, world.opts(back=BACK))
    assert outside_state(world) == before
    assert len(result.rejected) == 1 and reason in result.rejected[0], result.rejected
    assert sorted(os.listdir(world.local / "out")) == [".keep", "fine.txt", "more.txt"]


def test_a_sibling_of_a_single_file_back_path_is_refused_after_that_file(
    crafted_world: Site,
) -> None:
    # the file's parent is not under a back path: its siblings are not either
    world = crafted_world
    shell = crafted(file_entry("out/a.txt", b"a"), file_entry("out/b.txt", b"b"))
    result = pull(shell, world.opts(back=("out/a.txt",)))
    assert result.files_written == 1 and (world.local / "out/a.txt").read_bytes() == b"a"
    assert len(result.rejected) == 1 and "outside the declared" in result.rejected[0]
    assert not (world.local / "out/b.txt").exists()


def test_a_small_file_sent_in_several_chunks_is_written_whole(crafted_world: Site) -> None:
    world = crafted_world
    shell = crafted(file_entry("out/parts.txt", b"abcdef", chunks=[b"ab", b"cd", b"ef"]))
    result = pull(shell, world.opts(back=BACK))
    assert result.files_written == 1 and not result.rejected
    assert (world.local / "out/parts.txt").read_bytes() == b"abcdef"


def test_a_chunk_past_a_small_files_announced_size_abandons_the_stream(
    crafted_world: Site,
) -> None:
    world = crafted_world
    extra = file_entry("out/x", b"abc", chunks=[b"abc", b"d"])
    shell = crafted(extra, file_entry("out/after.txt", b"never"))
    result = pull(shell, world.opts(back=BACK))
    assert result.aborted is not None and "more data than announced" in result.aborted
    assert sorted(os.listdir(world.local / "out")) == [".keep"]


def test_a_forked_process_names_its_temp_files_with_its_own_pid() -> None:
    from reconciler.sync.pull import _temp_name

    parent = _temp_name()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(w, _temp_name().encode())
        os._exit(0)
    os.close(w)
    child = os.read(r, 200).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert parent.split(".")[2] == str(os.getpid())
    assert child.split(".")[2] == str(pid)
    assert child.split(".")[3][:12] != parent.split(".")[3][:12]


class StallingProcess(CraftedProcess):
    """A crafted helper that, once its stream is read, says so (`marker`) and stalls."""

    def __init__(self, stream: bytes, marker: Path) -> None:
        super().__init__(stream)
        self.marker = marker

    def read(self, n: int = 65536) -> bytes:
        data = super().read(n)
        if not data:
            self.marker.write_text("stalled")
            time.sleep(60)
        return data


class StallingShell(CraftedShell):
    def __init__(self, stream: bytes, marker: Path) -> None:
        super().__init__(stream)
        self.marker = marker

    def start(self, command: str) -> StallingProcess:
        return StallingProcess(self.stream, self.marker)


_PULL_UNTIL_KILLED = """
import pickle, sys
from pathlib import Path
sys.path.insert(0, ".")
from reconciler.sync.pull import pull
from tests.sync.test_pull import StallingShell
base = Path(sys.argv[1])
opts = pickle.loads((base / "opts").read_bytes())
pull(StallingShell((base / "stream").read_bytes(), base / "stalled"), opts)
"""


def test_a_pull_killed_in_the_middle_of_a_file_leaves_nothing_of_it_behind(
    crafted_world: Site,
) -> None:
    world = crafted_world
    marker = world.base / "stalled"
    hdr = {"path": "out/big.bin", "type": "f", "size": 3 << 20, "mode": 0o644, "mtime_ns": 1}
    half = b"x" * 65536
    stream = (
        encode_frame({"boot_id": "b", "fresh": False, "has_record": False})
        + encode_frame(hdr)
        + struct.pack(">I", len(half))
        + half
    )
    (world.base / "stream").write_bytes(stream)
    (world.base / "opts").write_bytes(pickle.dumps(world.opts(back=BACK)))
    # a process of its own (not a fork of this threaded one), killed while it waits for bytes
    child = subprocess.Popen(
        [sys.executable, "-c", _PULL_UNTIL_KILLED, str(world.base)],
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        deadline = time.monotonic() + 30
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert marker.exists()
    finally:
        child.kill()
        child.wait()
    # the file's bytes went to an unnamed file: no temp name for a later pull to sweep
    assert sorted(os.listdir(world.local / "out")) == [".keep"]


def test_a_file_is_written_through_a_temp_name_where_it_cannot_be_unnamed(
    crafted_world: Site,
) -> None:
    from reconciler.sync.pull import _TMP, _Puller, _Tree

    world = crafted_world
    tree = _Tree(world.local)
    try:
        puller = _Puller(None, world.opts(back=BACK), tree, "")
        pfd = tree.dir("out")
        for unnamed, name in ((True, "a.txt"), (False, "b.txt")):
            puller.unnamed = unnamed  # False: a filesystem without O_TMPFILE
            puller.write_data(f"out/{name}", pfd, name, b"data", 0o644, 1)
        assert not puller.result.rejected and puller.result.files_written == 2
        tmp, fd = puller.create_temp(pfd, 0o644)
        os.close(fd)
        assert tmp.startswith(_TMP)
        os.unlink(tmp, dir_fd=pfd)
    finally:
        tree.close()
    assert sorted(os.listdir(world.local / "out")) == [".keep", "a.txt", "b.txt"]
    assert (world.local / "out/b.txt").read_bytes() == b"data"


def files_frame(rel: Any, files: list[tuple[Any, bytes]], items: Any = None) -> bytes:
    """A `files` frame (small files of one directory) and their bytes."""
    listed = [[n, len(d), 0o644, 1_600_000_000_000_000_000] for n, d in files]
    return encode_frame({"dir": rel, "files": listed if items is None else items}) + b"".join(
        d for _, d in files
    )


def test_the_small_files_of_a_files_frame_are_written(crafted_world: Site) -> None:
    world = crafted_world
    shell = crafted(files_frame("out", [("a.txt", b"a"), ("b.txt", b"bb"), ("c", b"")]))
    result = pull(shell, world.opts(back=BACK))
    assert result.files_written == 3 and not result.rejected and result.aborted is None
    assert (world.local / "out/b.txt").read_bytes() == b"bb"
    assert (world.local / "out/c").read_bytes() == b""


HOSTILE_NAMES = ["..", "../../escape", "x/../../../etc/passwd", ".ukc", "", "a\\b", "n\x00", 7]


def test_hostile_names_in_a_files_frame_are_refused_and_the_rest_written(
    crafted_world: Site,
) -> None:
    world = crafted_world
    files = [("fine.txt", b"ok")] + [(n, b"evil") for n in HOSTILE_NAMES] + [("more", b"2")]
    before = outside_state(world)
    result = pull(crafted(files_frame("out", files)), world.opts(back=BACK))
    assert outside_state(world) == before
    assert result.refused == len(HOSTILE_NAMES) and result.aborted is None, result.rejected
    assert sorted(os.listdir(world.local / "out")) == [".keep", "fine.txt", "more"]


@pytest.mark.parametrize(
    "rel", ["..", "/etc", ".ukc", "elsewhere", "out/../..", ""], ids=lambda r: repr(r)
)
def test_a_files_frame_for_a_directory_outside_the_back_paths_writes_nothing(
    crafted_world: Site, rel: str
) -> None:
    world = crafted_world
    before = outside_state(world)
    local_before = snapshot(world.local)
    result = pull(crafted(files_frame(rel, [("passwd", b"x"), ("b", b"y")])), world.opts(back=BACK))
    assert outside_state(world) == before and snapshot(world.local) == local_before
    assert result.refused == 2 and result.files_written == 0


MALFORMED_FILES = {
    "files not a list": {"dir": "out", "files": "a"},
    "no files": {"dir": "out", "files": []},
    "dir not a string": {"dir": ["out"], "files": [["a", 1, 0o644, 1]]},
    "short item": {"dir": "out", "files": [["a", 1, 0o644]]},
    "negative size": {"dir": "out", "files": [["a", -1, 0o644, 1]]},
    "bool size": {"dir": "out", "files": [["a", True, 0o644, 1]]},
    "huge mtime": {"dir": "out", "files": [["a", 1, 0o644, 1 << 63]]},
    "too many files": {"dir": "out", "files": [[f"f{i}", 0, 0o644, 1] for i in range(1025)]},
    "over 2 MiB": {"dir": "out", "files": [["a", 1 << 20, 0o644, 1], ["b", (1 << 20) + 1, 0, 1]]},
}


@pytest.mark.parametrize("case", list(MALFORMED_FILES))
def test_a_malformed_or_oversized_files_frame_abandons_the_stream_before_its_bytes(
    crafted_world: Site, case: str
) -> None:
    world = crafted_world
    shell = crafted(encode_frame(MALFORMED_FILES[case]), file_entry("out/after.txt", b"x"))
    result = pull(shell, world.opts(back=BACK))
    assert result.aborted is not None and "files frame" in result.aborted
    assert shell.procs[0].killed
    assert sorted(os.listdir(world.local / "out")) == [".keep"]


def test_a_files_frame_counts_each_file_against_the_caps_before_its_bytes(
    crafted_world: Site,
) -> None:
    world = crafted_world
    files = [("a", b"a" * 100), ("b", b"b" * 100), ("c", b"c" * 100)]
    shell = crafted(files_frame("out", files))
    result = pull(shell, world.opts(back=BACK, back_max_bytes=250))
    assert result.stopped is not None and "back_max_bytes = 250" in result.stopped
    assert sorted(os.listdir(world.local / "out")) == [".keep", "a", "b"]
    assert shell.procs[0].killed


def test_more_data_than_announced_abandons_the_stream(crafted_world: Site) -> None:
    world = crafted_world
    big = file_entry("out/huge", b"", size=10, chunks=[b"y" * (1 << 20), b"y" * (1 << 20)])
    shell = crafted(big, file_entry("out/after.txt", b"never"))
    result = pull(shell, world.opts(back=BACK))
    assert result.aborted is not None and "more data than announced" in result.aborted
    assert shell.procs[0].killed
    assert sorted(os.listdir(world.local / "out")) == [".keep"]


def test_a_malformed_header_abandons_the_stream(crafted_world: Site) -> None:
    world = crafted_world
    shell = crafted(encode_frame(["not", "a", "header"]), file_entry("out/after.txt", b"x"))
    result = pull(shell, world.opts(back=BACK))
    assert result.aborted == "sandbox sent a non-object header"
    assert not (world.local / "out/after.txt").exists()


def test_a_crafted_file_under_a_rejected_symlink_stays_inside_the_root(crafted_world: Site) -> None:
    world = crafted_world
    shell = crafted(other_entry("out/lnk", "l"), file_entry("out/lnk/passwd", b"root::0:0"))
    before = outside_state(world)
    result = pull(shell, world.opts(back=BACK))
    assert outside_state(world) == before
    assert (world.local / "out/lnk").is_dir() and not (world.local / "out/lnk").is_symlink()
    assert len(result.rejected) == 1


def test_hostile_reasons_are_printable(crafted_world: Site) -> None:
    world = crafted_world
    shell = crafted(file_entry("out/\x1b]0;title\x07", b"x"))
    result = pull(shell, world.opts(back=BACK))
    assert all(r.isprintable() for r in result.rejected)


def test_pull_without_back_paths_starts_nothing(crafted_world: Site) -> None:
    world = crafted_world
    shell = crafted()
    assert pull(shell, world.opts()).files_written == 0
    assert shell.procs == []


def test_a_missing_local_root_halts_the_pull(crafted_world: Site, tmp_path: Path) -> None:
    world = crafted_world
    from reconciler.errors import SyncHaltedError

    with pytest.raises(SyncHaltedError, match="is missing"):
        pull(crafted(), world.opts(back=BACK, local_root=tmp_path / "nope"))


# --- sync.back_delete: mirroring remote deletions, behind guards ---------------------------

UUID = "3f1c9a2e-0001"
CLEAN_END = {"end": True, "errors": 0, "missing": []}


def mirrored(site: Site, uuid: str = UUID, **kw: Any) -> PullResult:
    """A pull with `sync.back_delete: true` from instance `uuid` (boot id: the site's)."""
    opts = site.opts(**{"back": BACK, "back_delete": True, **kw})
    return pull(site.shell, opts, instance_uuid=uuid)


def dir_entry(path: str) -> bytes:
    return encode_frame({"path": path, "type": "d", "size": 0, "mode": 0o755, "mtime_ns": 1})


def pulled_crafted(site: Site, *entries: bytes, end: object = None) -> PullResult:
    """A crafted sandbox (boot id "b") pulled from with `sync.back_delete: true`."""
    shell = crafted(*entries, end=CLEAN_END if end is None else end)
    return pull(shell, site.opts(back=BACK, back_delete=True), instance_uuid=UUID)


def crafted_abc(site: Site) -> None:
    """A first crafted pull that brings out/a.txt, out/b.txt and out/c.txt home."""
    first = pulled_crafted(
        site,
        dir_entry("out"),
        file_entry("out/a.txt", b"a"),
        file_entry("out/b.txt", b"b"),
        file_entry("out/c.txt", b"c"),
    )
    assert first.files_written == 3


class TestBackDelete:
    def test_back_delete_is_off_by_default_so_a_remote_deletion_keeps_the_local_file(
        self, world: Site
    ) -> None:
        write(world.remote / "out/a.txt", "a")
        write(world.remote / "out/b.txt", "b")
        pull(world.shell, world.opts(back=BACK), instance_uuid=UUID)
        (world.remote / "out/b.txt").unlink()
        result = pull(world.shell, world.opts(back=BACK), instance_uuid=UUID)
        assert (world.local / "out/b.txt").read_text() == "b"
        assert (result.deleted, result.kept, result.deletes_skipped) == ([], [], [])
        assert not plan_pull(world.opts(back=BACK)).mirrors_deletes
        assert plan_pull(world.opts(back=BACK, back_delete=True)).mirrors_deletes

    def test_back_delete_removes_a_file_the_sandbox_deleted_when_unchanged_here(
        self, world: Site
    ) -> None:
        write(world.remote / "out/a.txt", "a")
        write(world.remote / "out/b.txt", "b")
        write(world.remote / "out/sub/c.txt", "c")
        assert mirrored(world).deleted == []
        (world.remote / "out/b.txt").unlink()
        result = mirrored(world)
        assert result.deleted == ["out/b.txt"]
        assert (result.kept, result.deletes_skipped) == ([], [])
        assert result.unchanged == 2  # the other two were not resent
        assert not (world.local / "out/b.txt").exists()
        assert sorted(os.listdir(world.local / "out")) == [".keep", "a.txt", "sub"]
        record = pull_record(world.opts())
        assert "out/b.txt" not in record
        assert record["out/a.txt"][3] == f"{UUID}/boot-1"

    def test_a_file_pulled_with_its_source_is_still_updated_in_place(self, world: Site) -> None:
        write(world.remote / "out/a.txt", "v1")
        mirrored(world)
        write(world.remote / "out/a.txt", "v2")
        result = mirrored(world)
        assert (result.files_written, result.conflicts) == (1, [])
        assert (world.local / "out/a.txt").read_text() == "v2"

    def test_back_delete_keeps_a_locally_edited_file_and_reports_it_once(self, world: Site) -> None:
        write(world.remote / "out/a.txt", "a")
        write(world.remote / "out/b.txt", "bbbb")
        mirrored(world)
        write(world.local / "out/b.txt", "BBBB")  # same size: only the content tells
        (world.remote / "out/b.txt").unlink()
        result = mirrored(world)
        assert result.deleted == []
        assert result.kept == ["deleted in the sandbox but changed here: out/b.txt"]
        assert (world.local / "out/b.txt").read_text() == "BBBB"
        again = mirrored(world)
        assert (again.deleted, again.kept) == ([], [])
        assert (world.local / "out/b.txt").read_text() == "BBBB"

    def test_back_delete_never_removes_a_local_file_ukc_did_not_pull(self, world: Site) -> None:
        write(world.remote / "out/a.txt", "a")
        write(world.remote / "out/b.txt", "b")
        write(world.local / "out/mine.txt", "mine")
        write(world.local / "out/notes/todo.txt", "todo")
        mirrored(world)
        (world.remote / "out/b.txt").unlink()
        result = mirrored(world)
        assert result.deleted == ["out/b.txt"]
        assert (world.local / "out/mine.txt").read_text() == "mine"
        assert (world.local / "out/notes/todo.txt").read_text() == "todo"
        assert (world.local / "out/.keep").exists()

    def test_back_delete_never_removes_a_file_recorded_by_an_older_ukc(self, world: Site) -> None:
        write(world.remote / "out/a.txt", "a")
        write(world.remote / "out/b.txt", "b")
        mirrored(world)
        # an older ukc wrote [size, mtime_ns, sha256]: where it came from is unknown
        old = {p: rec[:3] for p, rec in pull_record(world.opts()).items()}
        (world.state / PULL_JOURNAL).unlink()
        write_record(world.state, PULL_LEGACY, {"version": 1, "files": old})
        (world.remote / "out/b.txt").unlink()
        result = mirrored(world)
        assert result.deleted == []
        assert (world.local / "out/b.txt").read_text() == "b"
        record = pull_record(world.opts())
        assert record["out/b.txt"] == old["out/b.txt"]
        assert record["out/a.txt"][3] == f"{UUID}/boot-1"  # seen unchanged: this sandbox's now

    @pytest.mark.parametrize("change", ["rebooted", "another instance", "no instance uuid"])
    def test_back_delete_deletes_nothing_pulled_from_another_sandbox_or_boot(
        self, world: Site, change: str
    ) -> None:
        write(world.remote / "out/a.txt", "a")
        write(world.remote / "out/b.txt", "b")
        mirrored(world)
        (world.remote / "out/b.txt").unlink()
        uuid = {"rebooted": UUID, "another instance": "9d8e7f6a-0002", "no instance uuid": ""}
        if change == "rebooted":
            world.reboot("boot-2")
        result = mirrored(world, uuid=uuid[change])
        again = mirrored(world, uuid=uuid[change])  # nor on any later pull from it
        assert result.deleted == again.deleted == []
        assert (world.local / "out/b.txt").read_text() == "b"
        assert "out/b.txt" in pull_record(world.opts())
        if change == "no instance uuid":
            assert "instance or boot id is unknown" in result.deletes_skipped[0]
        else:
            assert result.deletes_skipped == []

    def test_back_delete_deletes_nothing_after_an_aborted_stream(self, crafted_world: Site) -> None:
        world = crafted_world
        crafted_abc(world)
        result = pulled_crafted(
            world,
            dir_entry("out"),
            file_entry("out/a.txt", b"a"),
            encode_frame(["not", "a", "header"]),
        )
        assert result.aborted is not None
        assert result.deleted == []
        assert (world.local / "out/b.txt").read_bytes() == b"b"
        assert result.deletes_skipped == ["the stream was abandoned: no remote deletions mirrored"]

    def test_a_clean_crafted_stream_mirrors_its_deletions(self, crafted_world: Site) -> None:
        world = crafted_world
        # the control for the crafted guards below: the same stream with a clean end deletes
        crafted_abc(world)
        result = pulled_crafted(world, dir_entry("out"), file_entry("out/a.txt", b"a"))
        assert result.deleted == ["out/b.txt", "out/c.txt"]

    @pytest.mark.parametrize(
        ("end", "why"),
        [
            ({"end": True, "errors": 2, "missing": []}, "could not list or read 2 entries"),
            ({"end": True}, "malformed end of listing"),
            ({"end": True, "errors": "0", "missing": []}, "malformed"),
            ({"end": True, "errors": False, "missing": []}, "malformed"),
            ({"end": True, "errors": -1, "missing": []}, "malformed"),
            ({"end": True, "errors": 0, "missing": "out"}, "malformed"),
            ({"end": True, "errors": 0, "missing": [5]}, "malformed"),
            ({"end": True, "errors": 0, "missing": ["src"]}, "malformed"),
        ],
    )
    def test_back_delete_deletes_nothing_when_the_sandbox_reports_an_error_or_garbles_it(
        self, crafted_world: Site, end: dict[str, object], why: str
    ) -> None:
        world = crafted_world
        crafted_abc(world)
        result = pulled_crafted(world, dir_entry("out"), file_entry("out/a.txt", b"a"), end=end)
        assert result.deleted == []
        assert sorted(os.listdir(world.local / "out")) == [".keep", "a.txt", "b.txt", "c.txt"]
        assert len(result.deletes_skipped) == 1 and why in result.deletes_skipped[0]

    def test_back_delete_deletes_nothing_when_the_sandbox_cannot_list_a_back_path(
        self, world: Site
    ) -> None:
        back = ("out/", "gen/x/")
        write(world.remote / "out/a.txt", "a")
        write(world.remote / "out/b.txt", "b")
        mirrored(world, back=back)
        (world.remote / "out/b.txt").unlink()
        write(world.remote / "gen", "a file where a directory should be")  # ENOTDIR: an error
        result = mirrored(world, back=back)
        assert result.deleted == []
        assert (world.local / "out/b.txt").read_text() == "b"
        assert result.deletes_skipped == [
            "the sandbox could not list or read 1 entry: no remote deletions mirrored"
        ]

    def test_back_delete_deletes_nothing_after_a_local_write_failed(self, world: Site) -> None:
        write(world.remote / "out/a.txt", "a")
        write(world.remote / "out/b.txt", "b")
        mirrored(world, write_threads=2)
        (world.remote / "out/b.txt").unlink()
        write(world.remote / "out/big.bin", os.urandom(200_000))
        # why a file size limit: it makes a local write fail even for root (EFBIG; Python
        # ignores SIGXFSZ), on the pooled small-file path
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
        try:
            result = mirrored(world, write_threads=2)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert result.rejected == ["out/big.bin: not written here: file too large"]
        assert result.deleted == []
        assert (world.local / "out/b.txt").read_text() == "b"
        assert result.deletes_skipped == ["1 local write(s) failed: no remote deletions mirrored"]

    @pytest.mark.parametrize(
        ("change", "state"),
        [("removed", "is missing"), ("emptied", "is empty"), ("now a file", "is no longer a")],
    )
    def test_back_delete_halts_under_a_back_directory_that_vanished_or_emptied(
        self, world: Site, change: str, state: str
    ) -> None:
        write(world.remote / "out/a.txt", "a")
        write(world.remote / "out/sub/b.txt", "b")
        mirrored(world)
        shutil.rmtree(world.remote / "out")
        if change == "emptied":
            (world.remote / "out").mkdir()
        elif change == "now a file":
            write(world.remote / "out", "x")
        result = mirrored(world)
        assert result.deleted == []
        assert (world.local / "out/a.txt").read_text() == "a"
        assert (world.local / "out/sub/b.txt").read_text() == "b"
        assert len(result.deletes_skipped) == 1
        assert result.deletes_skipped[0].startswith(f"out/ {state}")

    def test_back_delete_removes_a_single_file_back_path_the_sandbox_deleted(
        self, bare: Site
    ) -> None:
        site = bare
        back = ("report.txt",)
        write(site.remote / "report.txt", "r")
        mirrored(site, back=back)
        assert os.listdir(site.local) == ["report.txt"]
        (site.remote / "report.txt").unlink()
        result = mirrored(site, back=back)
        assert (result.deleted, result.deletes_skipped) == (["report.txt"], [])
        assert site.local.is_dir() and os.listdir(site.local) == []

    def test_back_delete_keeps_a_single_file_back_path_not_reported_missing(
        self, crafted_world: Site
    ) -> None:
        world = crafted_world
        opts = world.opts(back=("report.txt",), back_delete=True)
        pull(crafted(file_entry("report.txt", b"r"), end=CLEAN_END), opts, instance_uuid=UUID)
        result = pull(crafted(end=CLEAN_END), opts, instance_uuid=UUID)
        assert result.deleted == []
        assert (world.local / "report.txt").read_bytes() == b"r"
        assert "neither sent nor reported missing" in result.deletes_skipped[0]
        reported = {"end": True, "errors": 0, "missing": ["report.txt"]}
        assert pull(crafted(end=reported), opts, instance_uuid=UUID).deleted == ["report.txt"]

    def test_back_delete_counts_a_refused_entry_as_present_and_still_mirrors_the_rest(
        self, crafted_world: Site
    ) -> None:
        world = crafted_world
        crafted_abc(world)
        result = pulled_crafted(
            world,
            dir_entry("out"),
            file_entry("out/a.txt", b"a"),
            other_entry("out/b.txt", "l"),  # now a symlink there: refused, but it exists
        )
        assert len(result.rejected) == 1
        assert result.deleted == ["out/c.txt"]
        assert (world.local / "out/b.txt").read_bytes() == b"b"

    def test_back_delete_keeps_files_under_a_remote_directory_that_became_a_symlink(
        self, world: Site
    ) -> None:
        write(world.remote / "out/a.txt", "a")
        write(world.remote / "out/sub/b.txt", "b")
        mirrored(world)
        shutil.rmtree(world.remote / "out/sub")
        os.symlink(world.base / "outside/dir", world.remote / "out/sub")
        result = mirrored(world)
        assert result.deleted == []
        assert (world.local / "out/sub/b.txt").read_text() == "b"

    def test_back_delete_does_not_remove_a_symlink_swapped_in_for_the_file(
        self, world: Site
    ) -> None:
        write(world.remote / "out/a.txt", "a")
        write(world.remote / "out/b.txt", "precious")
        mirrored(world)
        (world.remote / "out/b.txt").unlink()
        # the link's target has the recorded content: only not following it keeps the link
        (world.local / "out/b.txt").unlink()
        os.symlink(world.base / "outside/target.txt", world.local / "out/b.txt")
        before = outside_state(world)
        result = mirrored(world)
        assert outside_state(world) == before
        assert os.path.islink(world.local / "out/b.txt")
        assert result.kept == ["deleted in the sandbox but changed here: out/b.txt"]
        assert result.deleted == []

    def test_back_delete_does_not_remove_through_a_symlink_swapped_in_for_a_parent(
        self, world: Site
    ) -> None:
        write(world.remote / "out/a.txt", "a")
        write(world.remote / "out/sub/b.txt", "b")
        mirrored(world)
        shutil.rmtree(world.remote / "out/sub")
        moved = world.base / "outside/moved"
        os.rename(world.local / "out/sub", moved)
        os.symlink(moved, world.local / "out/sub")
        before = outside_state(world)
        result = mirrored(world)
        assert outside_state(world) == before
        assert (moved / "b.txt").read_text() == "b"
        assert os.path.islink(world.local / "out/sub")
        assert result.kept == [
            "deleted in the sandbox but its local parent is not a plain directory here: "
            "out/sub/b.txt"
        ]
        assert "out/sub/b.txt" not in pull_record(world.opts())

    def test_back_delete_removes_emptied_directories_but_not_ones_still_in_use(
        self, world: Site
    ) -> None:
        for rel in ("out/a.txt", "out/x/deep/f.txt", "out/y/g.txt", "out/z/h.txt"):
            write(world.remote / rel, rel)
        mirrored(world)
        write(world.local / "out/z/mine.txt", "mine")  # the user's file keeps out/z
        shutil.rmtree(world.remote / "out/x")
        shutil.rmtree(world.remote / "out/z")
        (world.remote / "out/y/g.txt").unlink()  # out/y stays in the sandbox, empty
        result = mirrored(world)
        assert result.deleted == ["out/x/deep/f.txt", "out/y/g.txt", "out/z/h.txt"]
        assert not (world.local / "out/x").exists()
        assert (world.local / "out/y").is_dir() and os.listdir(world.local / "out/y") == []
        assert os.listdir(world.local / "out/z") == ["mine.txt"]
        assert (world.local / "out/a.txt").exists()

    def test_back_delete_never_removes_the_back_directory_itself(self, bare: Site) -> None:
        site = bare
        write(site.remote / "out/a.txt", "a")
        mirrored(site)
        (site.remote / "out/a.txt").unlink()
        os.symlink("/etc", site.remote / "out/lnk")  # the sandbox still lists something
        result = mirrored(site)
        assert result.deleted == ["out/a.txt"]
        assert (site.local / "out").is_dir() and os.listdir(site.local / "out") == []


class LateExitProcess:
    """A process whose exit is learnt late, as an SSH channel's exit status may be: a look
    that does not wait sees it running (everything else is the real process's)."""

    def __init__(self, proc: Any) -> None:
        self._proc = proc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._proc, name)

    def wait(self, timeout: float | None = None) -> int:
        if timeout == 0:
            raise TimeoutError("no exit status yet")
        code: int = self._proc.wait(timeout)
        return code


class LateExitShell(LocalShell):
    def start(self, command: str) -> Any:
        return LateExitProcess(super().start(command))


class TestStartedAhead:
    def test_a_helper_started_ahead_serves_the_pull_and_reads_what_the_command_wrote_after(
        self, site: Site
    ) -> None:
        start_pull_ahead(site.shell, site.opts(back=BACK), instance_uuid="u1")
        assert len(site.shell.started) == 1  # running while the command runs
        write(site.remote / "out/report.txt", "written by the command meanwhile")
        result = pull(site.shell, site.opts(back=BACK), instance_uuid="u1")
        assert result.files_written == 1
        assert len(site.shell.started) == 1
        assert (site.local / "out/report.txt").read_text() == "written by the command meanwhile"
        # read-only as any pull's: not even the helper's code cache is left in the sandbox
        assert not site.remote_state.exists() or not list(site.remote_state.iterdir())

    def test_a_helper_started_ahead_that_the_command_killed_is_replaced(self, site: Site) -> None:
        start_pull_ahead(site.shell, site.opts(back=BACK), instance_uuid="u1")
        site.shell._procs[-1].kill()
        write(site.remote / "out/report.txt", "done")
        assert pull(site.shell, site.opts(back=BACK), instance_uuid="u1").files_written == 1
        assert len(site.shell.started) == 2

    def test_a_helper_started_ahead_that_died_before_its_exit_was_known_is_replaced(
        self, site: Site
    ) -> None:
        shell = LateExitShell()
        try:
            start_pull_ahead(shell, site.opts(back=BACK), instance_uuid="u1")
            os.killpg(shell._procs[-1].pid, 9)
            shell._procs[-1].wait(10)
            write(site.remote / "out/report.txt", "done")
            assert pull(shell, site.opts(back=BACK), instance_uuid="u1").files_written == 1
            assert len(shell.started) == 2
        finally:
            shell.close()

    def test_a_sandbox_known_to_have_no_python3_starts_nothing_ahead(self, site: Site) -> None:
        s = dataclasses.replace(site, remote_python=str(site.base / "sandbox/no-python3"))
        write(s.remote / "out/report.txt", "done")
        assert pull(s.shell, s.opts(back=BACK), instance_uuid="u1").files_written == 1
        started = len(s.shell.started)
        start_pull_ahead(s.shell, s.opts(back=BACK), instance_uuid="u1")
        assert len(s.shell.started) == started
