"""Attacks on the shell+tar push (a sandbox without python3): the sandbox answers our `find`,
`sha256sum` and `head` with whatever it likes (it owns the image: its PATH decides which
programs run), and swaps directories for links behind our record.

Each attack replaces one tool on the sandbox's PATH with a hostile script, runs a real push,
and checks that nothing outside the sandbox root was touched and that memory and time stay
bounded.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.errors import RemoteError, SyncError, SyncStalledError
from reconciler.sync.engine import push
from reconciler.sync.options import SyncOptions
from reconciler.sync.tarpush import MAX_FIELD, MAX_HELLO
from reconciler.transport.local_shell import LocalShell
from tests.support.synctree import NO_PYTHON, snapshot, write


class World:
    """A local tree, a sandbox root, a victim file beside the root (outside it), and a
    directory whose programs come first on the sandbox's PATH."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.local = base / "local"
        self.sandbox = base / "sandbox"
        self.root = self.sandbox / "workspace"
        self.bin = base / "hostile-bin"
        for d in (self.local, self.root, self.bin):
            d.mkdir(parents=True)
        self.boot = self.sandbox / "boot_id"
        self.boot.write_text("boot-1\n")
        self.victim = write(self.sandbox / "victim.txt", "must survive\n")
        write(self.local / "a.txt", "a")
        write(self.local / "d/b.txt", "b")
        self.shell = LocalShell(env={**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}"})

    def opts(self, **kw: object) -> SyncOptions:
        args: dict[str, object] = {
            "local_root": self.local,
            "state_dir": self.base / "state",
            "remote_root": str(self.root),
            "remote_state_dir": str(self.sandbox / "run"),
            "boot_id_paths": (str(self.boot),),
            "remote_python": NO_PYTHON,
        }
        args.update(kw)
        return SyncOptions(**args)  # type: ignore[arg-type]

    def hostile(self, tool: str, script: str) -> None:
        path = self.bin / tool
        path.write_text("#!/bin/sh\n" + script)
        path.chmod(0o755)

    def outside_untouched(self) -> None:
        assert self.victim.read_text() == "must survive\n"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.shell.close()


def _first_push_then_lose_the_record(w: World) -> None:
    """A push that makes the next one scan (its record removed: a reboot, say)."""
    push(w.shell, w.opts(), instance_uuid="u1")
    shutil.rmtree(w.sandbox / "run")


class TestHostileScan:
    def test_a_scan_naming_a_path_above_the_root_deletes_nothing_outside_it(
        self, world: World
    ) -> None:
        _first_push_then_lose_the_record(world)
        # find answers one entry the local tree lacks: a delete candidate, outside the root
        world.hostile("find", r"printf 'f\0001\0001.0\000644\000../victim.txt\000\000'")
        with pytest.raises(RemoteError, match="a path outside the root"):
            push(world.shell, world.opts(), instance_uuid="u1")
        world.outside_untouched()

    def test_an_absolute_or_dotted_path_is_refused(self, world: World) -> None:
        _first_push_then_lose_the_record(world)
        for path in (r"/etc/passwd", r"d/./b.txt", r"d//b.txt", r"d/..", r"x/../../victim.txt"):
            world.hostile("find", rf"printf 'f\0001\0001.0\000644\000{path}\000\000'")
            with pytest.raises(RemoteError, match="a path outside the root"):
                push(world.shell, world.opts(), instance_uuid="u1")
        world.outside_untouched()

    def test_nul_less_garbage_is_refused_after_one_field_not_buffered(self, world: World) -> None:
        _first_push_then_lose_the_record(world)
        # an endless stream with no separator: refused once one field's bound is passed
        world.hostile("find", "exec tr -d '\\000' < /dev/urandom")
        started = time.monotonic()
        with pytest.raises(RemoteError, match=f"longer than {MAX_FIELD} bytes"):
            push(world.shell, world.opts(), instance_uuid="u1")
        assert time.monotonic() - started < 10
        world.outside_untouched()

    def test_endless_well_formed_output_is_cut_at_the_deadline(self, world: World) -> None:
        _first_push_then_lose_the_record(world)
        # one local path, repeated forever: nothing new to keep, so only the clock ends it
        world.hostile("find", r"while :; do printf 'f\0001\0001.0\000644\000a.txt\000\000'; done")
        started = time.monotonic()
        with pytest.raises(SyncStalledError, match="did not finish within 3 s"):
            push(world.shell, world.opts(timeout_s=3.0), instance_uuid="u1")
        assert time.monotonic() - started < 15
        assert (world.root / "a.txt").read_text() == "a"

    def test_malformed_numbers_and_types_are_refused(self, world: World) -> None:
        _first_push_then_lose_the_record(world)
        for entry in (
            r"f\000-1\0001.0\000644\000x\000\000",  # negative size
            r"f\0001\000soon\000644\000x\000\000",  # mtime not a number
            r"f\0001\0001.0\000999\000x\000\000",  # mode not octal
            r"Q\0001\0001.0\000644\000x\000\000",  # no such type
            r"f\0001\0001.0\000644\000x\000/etc\000",  # a link target on a file
        ):
            world.hostile("find", f"printf '{entry}'")
            with pytest.raises(RemoteError, match="the sandbox's scan sent"):
                push(world.shell, world.opts(), instance_uuid="u1")
        world.outside_untouched()


class TestHostileAnswers:
    def test_a_hash_answer_for_a_path_not_asked_is_refused(self, world: World) -> None:
        _first_push_then_lose_the_record(world)
        digest = "0" * 64
        world.hostile("sha256sum", f"printf '{digest}  ./../victim.txt\\000'")
        with pytest.raises(RemoteError, match="malformed or unasked"):
            push(world.shell, world.opts(), instance_uuid="u1")
        world.outside_untouched()

    def test_an_endless_hello_is_cut_at_its_bound(self, world: World) -> None:
        # the boot id as asked, then a "record" without end
        world.hostile("head", 'case "$*" in *record.json*) exec cat /dev/zero;; esac; echo b1')
        with pytest.raises(RemoteError, match=f"longer than {MAX_HELLO} bytes"):
            push(world.shell, world.opts(idle_timeout_s=5.0), instance_uuid="u1")


class TestSwappedLinks:
    def test_a_directory_swapped_for_a_link_out_of_the_root_is_never_written_through(
        self, world: World
    ) -> None:
        push(world.shell, world.opts(), instance_uuid="u1")
        # the sandbox swaps d/ for a link to the directory holding the victim, keeping our
        # record (so the push trusts that d/ is still a directory)
        shutil.rmtree(world.root / "d")
        os.symlink(world.sandbox, world.root / "d")
        write(world.local / "d/victim.txt", "overwritten?")
        write(world.local / "d/b.txt", "b2")
        with pytest.raises(SyncError, match="a symbolic link"):
            push(world.shell, world.opts(), instance_uuid="u1")
        world.outside_untouched()
        assert not (world.sandbox / "b.txt").exists()
        # the failed push dropped the record: the next one scans, sees the link and swaps it
        push(world.shell, world.opts(), instance_uuid="u1")
        world.outside_untouched()
        assert not (world.root / "d").is_symlink()
        assert snapshot(world.root) == snapshot(world.local)

    def test_a_deleted_file_below_a_swapped_link_is_not_deleted_through_it(
        self, world: World
    ) -> None:
        write(world.local / "d/victim.txt", "ours")
        push(world.shell, world.opts(), instance_uuid="u1")
        shutil.rmtree(world.root / "d")
        os.symlink(world.sandbox, world.root / "d")
        (world.local / "d/victim.txt").unlink()  # a delete of d/victim.txt, through the link
        with pytest.raises(SyncError, match="a symbolic link"):
            push(world.shell, world.opts(), instance_uuid="u1")
        world.outside_untouched()


def test_a_tar_that_fails_is_named_by_its_first_complaint_and_changes_nothing(
    world: World,
) -> None:
    push(world.shell, world.opts(), instance_uuid="u1")
    before = snapshot(world.root)
    world.hostile(
        "tar",
        "cat >/dev/null\n"
        "echo \"tar: x: Ignoring unknown extended header keyword 'hdrcharset'\" >&2\n"
        "echo 'tar: a.txt: Cannot write: No space left on device' >&2\n"
        "echo 'tar: Exiting with failure status due to previous errors' >&2\n"
        "exit 2\n",
    )
    write(world.local / "a.txt", "changed")
    with pytest.raises(RemoteError, match="Cannot write: No space left on device"):
        push(world.shell, world.opts(), instance_uuid="u1")
    assert snapshot(world.root) == before
    assert not (world.sandbox / "run" / "record.json").exists()  # the next push scans
