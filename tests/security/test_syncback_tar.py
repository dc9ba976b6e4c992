"""Attacks on sync-back from a sandbox without python3, where its own find and tar send.

The twins of `test_syncback_bounds.py` for `sync.tarpull`, and the attacks a tar stream
adds. The sandbox's root can replace find or tar (`tests.support.hostile_tar.plant`: a real
program first on the sandbox's PATH, run by the engine's real command line), or wrap the real
tar to change the tree after the listing. What must hold, as on the helper's path: bounded
disk, memory and time; only regular files and directories written, inside the back paths,
through the one writer; a clean stop that keeps what was written, says why, and mirrors no
deletion.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reconciler.errors import MissingToolError, SyncStalledError
from reconciler.sync.options import SyncOptions
from reconciler.sync.pull import PullResult, pull, pull_record
from reconciler.sync.pullrecord import PULL_LEGACY
from reconciler.sync.records import write_record
from reconciler.transport.local_shell import LocalShell
from tests.support.hostile_helper import run_in_child
from tests.support.hostile_tar import plant, real_tar_after, sandbox_shell
from tests.support.synctree import snapshot, write

MTIME = 1_600_000_000_000_000_000


@dataclass
class Attack:
    """A local tree, a "sandbox" tree without python3, and a bin dir first on its PATH."""

    base: Path
    local: Path
    state: Path
    sandbox: Path
    bin: Path
    shell: LocalShell

    def opts(self, **kw: Any) -> SyncOptions:
        args: dict[str, Any] = {
            "local_root": self.local,
            "state_dir": self.state,
            "back": ("out/",),
            "remote_root": str(self.sandbox),
            "remote_python": str(self.base / "no-python3"),
            "boot_id_paths": (str(self.base / "boot_id"),),
            "session": "victim",
        }
        args.update(kw)
        return SyncOptions(**args)

    def child_opts(self, **kw: Any) -> dict[str, Any]:
        args: dict[str, Any] = {
            "local_root": str(self.local),
            "state_dir": str(self.state),
            "back": ["out/"],
            "remote_root": str(self.sandbox),
            "remote_python": str(self.base / "no-python3"),
            "boot_id_paths": [str(self.base / "boot_id")],
            "session": "victim",
        }
        args.update(kw)
        return args

    def child_env(self) -> dict[str, str]:
        return {"PATH": f"{self.bin}:{os.environ.get('PATH', '')}"}

    def tar(self, body: str) -> None:
        plant(self.bin, "tar", body)

    def find(self, body: str) -> None:
        plant(self.bin, "find", body)

    def pull(self, **kw: Any) -> PullResult:
        return pull(self.shell, self.opts(**kw), instance_uuid="i-1")

    def files(self) -> dict[str, int]:
        """Every file under the local root (not following links) -> its size."""
        out = {}
        for dirpath, _, names in os.walk(self.local):
            for name in names:
                p = Path(dirpath) / name
                out[str(p.relative_to(self.local))] = p.lstat().st_size
        return out


@pytest.fixture
def attack(tmp_path: Path) -> Iterator[Attack]:
    local = tmp_path / "local"
    (local / "out").mkdir(parents=True)
    sandbox = tmp_path / "sandbox"
    (sandbox / "out").mkdir(parents=True)
    (tmp_path / "boot_id").write_text("b\n")
    write(tmp_path / "outside/target.txt", "precious")
    shell = sandbox_shell(tmp_path / "bin")
    yield Attack(tmp_path, local, tmp_path / "state", sandbox, tmp_path / "bin", shell)
    shell.close()


def _previously_pulled(attack: Attack) -> None:
    """out/old.txt came from sandbox i-1 (boot b) and is gone there now."""
    (attack.local / "out/old.txt").write_text("pulled before")
    sha = hashlib.sha256(b"pulled before").hexdigest()
    write_record(
        attack.state,
        PULL_LEGACY,
        {"version": 1, "files": {"out/old.txt": [13, MTIME, sha, "i-1/b"]}},
    )


def _outside(attack: Attack) -> dict[str, tuple[object, ...]]:
    state = snapshot(attack.base, skip=(attack.local, attack.state, attack.sandbox))
    with open("/etc/passwd", "rb") as f:
        state["/etc/passwd"] = (hashlib.sha256(f.read()).hexdigest(),)
    return state


# --- disk: sizes and counts --------------------------------------------------------------


def test_a_tar_header_announcing_2_to_the_62_bytes_is_refused_before_a_byte_is_written(
    attack: Attack,
) -> None:
    # the listing shows a 1-byte file; the planted tar claims 2^62 bytes for it and streams
    # 1 MiB blocks for as long as we read (the child may write at most 64 MiB)
    write(attack.sandbox / "out/huge.bin", "x")
    attack.tar(
        """
        names()
        raw(header("./out/huge.bin", 1 << 62))
        block = b"x" * (1 << 20)
        while True:
            raw(block)
        """
    )
    out = run_in_child(
        "pull",
        attack.child_opts(),
        limits={"RLIMIT_FSIZE": 64 << 20},
        timeout=120,
        env=attack.child_env(),
    )
    assert "error" not in out, out
    stopped = out["result"]["stopped"]
    assert stopped == (
        f"stopped at sync.back_max_bytes = 17179869184: out/huge.bin announces {1 << 62} "
        "bytes, only 17179869184 are left"
    )
    assert attack.files() == {}  # not a byte, not even a temp file


def test_the_byte_cap_stops_before_the_file_that_would_pass_it_and_keeps_what_came_before(
    attack: Attack,
) -> None:
    # the real find and tar: the listing order is the helper's (sorted), whatever the
    # directory's; the deletion of out/old.txt must not be mirrored after the stop
    _previously_pulled(attack)
    for name in ("c.bin", "b.bin", "a.bin"):
        write(attack.sandbox / "out" / name, b"y" * 400_000)
    result = attack.pull(back_max_bytes=1_000_000, back_delete=True)
    assert result.stopped == (
        "stopped at sync.back_max_bytes = 1000000: out/c.bin announces 400000 bytes, "
        "only 200000 are left"
    )
    assert sorted(attack.files()) == ["out/a.bin", "out/b.bin", "out/old.txt"]
    assert result.deleted == []
    assert result.deletes_skipped == [
        "the sync-back stopped before the end of the listing: no remote deletions mirrored"
    ]
    assert set(pull_record(attack.opts())) == {"out/a.bin", "out/b.bin", "out/old.txt"}


def test_a_file_that_grew_after_the_listing_may_only_use_what_is_left_of_the_byte_cap(
    attack: Attack,
) -> None:
    # the wrapped tar grows the file by 2 MB between the listing and the archive
    write(attack.sandbox / "out/grow.log", b"g" * 1000)
    attack.tar(real_tar_after("head -c 2000000 /dev/zero >> out/grow.log"))
    result = attack.pull(back_max_bytes=1_000_000)
    assert result.stopped == (
        "stopped at sync.back_max_bytes = 1000000: out/grow.log announces 2001000 bytes, "
        "only 1000000 are left"
    )
    assert attack.files() == {}
    # within the cap the grown file comes whole, recorded as tar sent it
    write(attack.sandbox / "out/grow.log", b"g" * 1000)
    result = attack.pull()
    assert (result.files_written, result.stopped) == (1, None)
    assert attack.files() == {"out/grow.log": 2_001_000}
    assert pull_record(attack.opts())["out/grow.log"][0] == 2_001_000


def test_the_entry_cap_stops_a_find_that_lists_endless_empty_directories(
    attack: Attack,
) -> None:
    attack.find(
        """
        entry("out", kind="d", mode=0o755)
        i = 0
        while True:
            entry("out/d%d" % i, kind="d", mode=0o755)
            i += 1
        """
    )
    result = attack.pull(back_max_files=500)
    assert result.stopped == (
        "stopped at sync.back_max_files = 500: the sandbox listed more entries "
        "(files and directories)"
    )
    assert len(os.listdir(attack.local / "out")) == 499  # "out" itself was the first entry


def test_the_refusal_cap_stops_the_pull_and_the_report_stays_short(attack: Attack) -> None:
    write(attack.sandbox / "out/after.txt", "hi")
    attack.find(
        """
        for i in range(5000):
            entry("elsewhere/%d" % i, size=1)
        entry("out/after.txt", size=2, mtime="5.0")
        """
    )
    result = attack.pull(back_max_refused=50)
    assert result.stopped == (
        "stopped at sync.back_max_refused = 50: 51 entries refused or not written"
    )
    assert (result.refused, len(result.rejected)) == (51, 51)
    assert not (attack.local / "out/after.txt").exists()
    huge = attack.pull()  # default cap: all refused, 100 listed, the real file still comes
    assert (huge.stopped, huge.refused, len(huge.rejected)) == (None, 5000, 100)
    assert (attack.local / "out/after.txt").read_text() == "hi"


# --- memory ------------------------------------------------------------------------------


def test_thousands_of_long_refused_paths_leave_memory_flat(attack: Attack) -> None:
    # 3,000 paths of 60,000 characters: 180 MB if any of them were kept before judging
    attack.find(
        """
        for i in range(3000):
            entry("out/%d/" % i + "a" * 60_000, kind="d", mode=0o755)
        """
    )
    for back_delete in (False, True):
        out = run_in_child(
            "pull",
            attack.child_opts(back_delete=back_delete),
            limits={"RLIMIT_AS": 2 << 30},
            timeout=180,
            env=attack.child_env(),
        )
        assert "error" not in out, out
        assert out["result"]["refused"] == 3000
        grown = out["peak_mib"] - out["before_mib"]
        assert grown < 40, f"peak RSS grew by {grown:.0f} MiB (back_delete={back_delete})"


def test_paths_just_under_the_length_limit_are_bounded_by_the_entry_budget(
    attack: Attack,
) -> None:
    # endless 4,000-character paths: the listing held for sorting stays within the budget
    attack.find(
        """
        i = 0
        while True:
            entry("out/" + ("%06d" % i) * 40 + "/" + "b" * 200 + "/" + "c" * 200, kind="d")
            i += 1
        """
    )
    out = run_in_child(
        "pull",
        attack.child_opts(back_max_files=100),
        limits={"RLIMIT_AS": 2 << 30},
        timeout=120,
        env=attack.child_env(),
    )
    assert "error" not in out, out
    assert "the paths listed reach" in out["result"]["stopped"]
    assert "over the 256 per allowed entry" in out["result"]["stopped"]


@pytest.mark.parametrize(
    ("kind", "what"),
    [
        (b"x", "pax header"),
        (b"g", "pax global header"),
        (b"L", "long name"),
        (b"K", "long link name"),
    ],
)
def test_a_2_to_the_40_byte_meta_header_is_refused_without_being_read(
    attack: Attack, kind: bytes, what: str
) -> None:
    # tarfile would read this header whole: a terabyte asked of our memory
    write(attack.sandbox / "out/a.txt", "a")
    attack.tar(
        f"""
        names()
        raw(header("././@PaxHeader", 1 << 40, kind={kind!r}))
        block = b"0" * (1 << 20)
        while True:
            raw(block)
        """
    )
    out = run_in_child(
        "pull",
        attack.child_opts(),
        limits={"RLIMIT_AS": 2 << 30},
        timeout=120,
        env=attack.child_env(),
    )
    assert "error" not in out, out
    assert out["result"]["aborted"] == (
        f"sandbox sent a broken tar stream: tar stream has a {what} of {1 << 40} bytes "
        "(the limit is 65536)"
    )
    assert out["peak_mib"] - out["before_mib"] < 40
    assert attack.files() == {}


def test_endless_meta_headers_before_a_member_end_the_stream(attack: Attack) -> None:
    write(attack.sandbox / "out/a.txt", "a")
    attack.tar(
        """
        names()
        while True:
            pax({"comment": "x" * 100})
        """
    )
    result = attack.pull()
    assert result.aborted == (
        "sandbox sent a broken tar stream: tar stream has more than 4 meta headers in a row"
    )
    assert attack.files() == {}


# --- names --------------------------------------------------------------------------------

NAMES = {
    "dot-dot at the start": ("../escape.txt", "../escape.txt: '..', '.' or empty component"),
    "absolute name": ("/tmp/ukc-escape.txt", "/tmp/ukc-escape.txt: absolute path"),
    "dot-dot inside": ("./out/../../escape.txt", "./out/../../escape.txt: '..', '.'"),
    "outside the back paths": ("./src/main.py", "./src/main.py: outside the declared"),
    "state dir": ("./.ukc/status.json", "./.ukc/status.json: inside .ukc/"),
    "not asked for": ("./out/extra.txt", "./out/extra.txt: a tar member not asked for"),
    "sent twice": ("./out/a.txt", "./out/a.txt: a tar member not asked for, or sent twice"),
    "pax path": ("pax:../../escape.txt", "../../escape.txt: '..', '.' or empty component"),
}


@pytest.mark.parametrize("case", list(NAMES))
def test_a_tar_member_named_anything_but_what_was_asked_ends_the_stream(
    attack: Attack, case: str
) -> None:
    name, reason = NAMES[case]
    write(attack.sandbox / "out/a.txt", "a")
    write(attack.sandbox / "out/b.txt", "b")
    hostile = (
        f'pax({{"path": {name.removeprefix("pax:")!r}}}); member("x", b"pwned")'
        if name.startswith("pax:")
        else f"member({name!r}, b'pwned')"
    )
    attack.tar(
        f"""
        names()
        member("./out/a.txt", b"a")
        {hostile}
        member("./out/b.txt", b"b")
        end()
        """
    )
    _previously_pulled(attack)
    before = _outside(attack)
    result = attack.pull(back_delete=True)
    assert _outside(attack) == before
    assert attack.files() == {"out/a.txt": 1, "out/old.txt": 13}
    assert len(result.rejected) == 1 and result.rejected[0].startswith(reason), result.rejected
    assert result.aborted is not None and "which was not asked for" in result.aborted
    assert result.deletes_skipped == ["the stream was abandoned: no remote deletions mirrored"]


# --- what a member is ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("swap", "reason"),
    [
        ("ln -s /etc/passwd out/x", "symlink (never followed or written)"),
        ("mkfifo out/x", "not a regular file or directory (fifo, socket or device)"),
        ("mknod out/x c 1 3", "not a regular file or directory (fifo, socket or device)"),
    ],
)
def test_a_file_swapped_after_the_listing_for_a_link_or_a_device_is_refused(
    attack: Attack, swap: str, reason: str
) -> None:
    # the real tar archives what it finds: the attacker swapped the file in between
    if swap.startswith("mknod") and os.geteuid() != 0:
        pytest.skip("mknod needs root")
    write(attack.sandbox / "out/x", "was a file")
    write(attack.sandbox / "out/y", "fine")
    attack.tar(real_tar_after(f"rm out/x && {swap}"))
    before = _outside(attack)
    result = attack.pull()
    assert _outside(attack) == before
    assert result.rejected == [f"out/x: {reason}"]
    assert attack.files() == {"out/y": 4}


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        ('member("./out/x", kind=b"1", link=b"/etc/passwd")', "hard link (never followed"),
        ('member("./out/x", kind=b"2", link=b"/etc/passwd")', "symlink (never followed"),
        ('member("./out/x", kind=b"3")', "fifo, socket or device"),
        ('member("./out/x", b"data", kind=b"V")', "an unknown tar member type"),
        ('pax({"GNU.sparse.size": "9"}); member("./out/x", b"data")', "sparse file"),
    ],
)
def test_a_tar_member_that_is_no_regular_file_is_refused_and_the_pull_goes_on(
    attack: Attack, member: str, reason: str
) -> None:
    write(attack.sandbox / "out/x", "data")
    write(attack.sandbox / "out/y", "fine")
    attack.tar(
        f"""
        names()
        {member}
        member("./out/y", b"fine")
        end()
        """
    )
    before = _outside(attack)
    result = attack.pull()
    assert _outside(attack) == before
    assert len(result.rejected) == 1 and reason in result.rejected[0], result.rejected
    assert attack.files() == {"out/y": 4}


def test_a_gnu_sparse_member_ends_the_stream(attack: Attack) -> None:
    write(attack.sandbox / "out/x", "data")
    attack.tar('names()\nmember("./out/x", b"data", kind=b"S")\nend()')
    result = attack.pull()
    assert result.aborted == "sandbox sent a broken tar stream: tar stream has a GNU sparse member"
    assert attack.files() == {}


def test_a_member_whose_data_runs_past_its_header_ends_the_stream_at_the_next_header(
    attack: Attack,
) -> None:
    write(attack.sandbox / "out/a.txt", "0123456789")
    write(attack.sandbox / "out/b.txt", "b")
    attack.tar(
        """
        names()
        raw(header("./out/a.txt", 10) + b"0123456789")
        # its "next header": a member for b.txt whose checksum is not its own
        bad = bytearray(header("./out/b.txt", 1))
        bad[148:156] = b"0000001 "
        raw(bytes(bad) + b"b" + bytes(511))
        end()
        """
    )
    result = attack.pull()
    assert result.aborted == (
        "sandbox sent a broken tar stream: tar header checksum does not match (not a tar stream?)"
    )
    assert attack.files() == {"out/a.txt": 10}


@pytest.mark.parametrize("threads", [0, 2])
def test_a_sandbox_cannot_give_pulled_files_write_for_others_or_set_id_bits(
    attack: Attack, threads: int
) -> None:
    modes = {
        "run.sh": (0o777, 0o755),
        "setuid": (0o4755, 0o755),
        "setgid": (0o2775, 0o755),
        "sticky": (0o1777, 0o755),
        "group-write": (0o664, 0o644),
        "world-write": (0o666, 0o644),
        "private": (0o600, 0o600),
    }
    for name in modes:
        write(attack.sandbox / "out" / name, "x")
    # in the order asked (the helper's: sorted)
    body = "names()\n" + "".join(
        f"member('./out/{n}', b'x', mode={m})\n" for n, (m, _) in sorted(modes.items())
    )
    attack.tar(body + "end()\n")
    for umask in (0o022, 0o000):
        old = os.umask(umask)
        try:
            shutil.rmtree(attack.local / "out")
            shutil.rmtree(attack.state, ignore_errors=True)
            attack.pull(write_threads=threads)
        finally:
            os.umask(old)
        got = {n: oct(stat.S_IMODE((attack.local / "out" / n).stat().st_mode)) for n in modes}
        assert got == {n: oct(want) for n, (_, want) in modes.items()}, f"umask {umask:03o}"


def test_a_tar_that_could_not_read_a_listed_file_mirrors_no_deletion(attack: Attack) -> None:
    # the wrapped tar deletes a listed file first: GNU tar skips it and exits 2
    write(attack.sandbox / "out/a.txt", "a")
    write(attack.sandbox / "out/b.txt", "b")
    _previously_pulled(attack)
    attack.tar(real_tar_after("rm out/b.txt"))
    result = attack.pull(back_delete=True)
    assert result.files_written == 1
    assert (attack.local / "out/old.txt").exists()
    assert result.deletes_skipped == [
        "the sandbox could not list or read 1 entry: no remote deletions mirrored"
    ]


# --- descriptors -------------------------------------------------------------------------


def test_fifteen_hundred_directories_do_not_exhaust_descriptors(attack: Attack) -> None:
    for i in range(1500):
        write(attack.sandbox / f"out/d{i:04d}/f.txt", str(i % 10))
    for threads in (0, 2):
        shutil.rmtree(attack.local / "out")
        shutil.rmtree(attack.state, ignore_errors=True)
        out = run_in_child(
            "pull",
            attack.child_opts(write_threads=threads),
            limits={"RLIMIT_NOFILE": 256},
            timeout=180,
            env=attack.child_env(),
        )
        assert "error" not in out, out
        assert (out["result"]["files_written"], out["result"]["rejected"]) == (1500, [])
    assert len(attack.files()) == 1500


# --- time ----------------------------------------------------------------------------------


def _raised(fn: Any) -> BaseException | None:
    """Run `fn` in a thread; what it raised, or fail when it never returns."""
    box: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            box[0] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the sync-back is still hanging after 60 s"
    return box[0]


STALLS = {
    "find never answers": ("find", "time.sleep(3600)"),
    "find stops mid-listing": ("find", 'entry("out", kind="d")\nraw(b"F")\nflush()'),
    "tar never answers": ("tar", "time.sleep(3600)"),
    "tar stops mid-header": ("tar", 'names()\nmember("./out/done.txt", b"done")\nraw(b"x" * 100)'),
    "tar stops mid-file": (
        "tar",
        'names()\nmember("./out/done.txt", b"done")\nraw(header("./out/part.bin", 10) + b"12345")',
    ),
}


@pytest.mark.parametrize("where", list(STALLS))
def test_a_stalled_find_or_tar_ends_the_sync_back_with_the_session_and_the_seconds(
    attack: Attack, where: str
) -> None:
    _previously_pulled(attack)
    write(attack.sandbox / "out/done.txt", "done")
    write(attack.sandbox / "out/part.bin", "1234567890")
    tool, body = STALLS[where]
    getattr(attack, tool)(textwrap.dedent(body) + "\nflush()\ntime.sleep(3600)\n")
    opts = attack.opts(idle_timeout_s=2.0, back_delete=True)
    err = _raised(lambda: pull(attack.shell, opts, instance_uuid="i-1"))
    assert isinstance(err, SyncStalledError), err
    assert str(err) == (
        "sync-back of session 'victim': the sync helper in the sandbox did not answer for "
        "2 s (sync.idle_timeout); stopped, files brought back so far are kept, no deletions "
        "mirrored"
    )
    assert (attack.local / "out/old.txt").read_text() == "pulled before"  # no deletion
    if where.startswith("tar stops"):
        assert (attack.local / "out/done.txt").read_text() == "done"
        assert "out/done.txt" in pull_record(opts)
    assert not [n for n in os.listdir(attack.local / "out") if n.startswith(".ukc-pull.")]


def test_a_tar_that_reads_none_of_the_names_is_stopped(attack: Attack) -> None:
    # 3,000 long names are more than the pipe holds: our writes block, and nothing comes
    for i in range(3000):
        write(attack.sandbox / f"out/{i:04d}-{'n' * 100}", "x")
    attack.tar("time.sleep(3600)")
    opts = attack.opts(idle_timeout_s=2.0)
    err = _raised(lambda: pull(attack.shell, opts))
    assert isinstance(err, SyncStalledError), err
    assert "did not answer for 2 s (sync.idle_timeout)" in str(err)


def test_a_tar_that_trickles_is_stopped_at_the_overall_deadline(attack: Attack) -> None:
    write(attack.sandbox / "out/slow.bin", b"s" * 1000)
    attack.tar(
        """
        names()
        raw(header("./out/slow.bin", 1000))
        flush()
        for _ in range(1000):
            raw(b"x")
            flush()
            time.sleep(0.5)
        """
    )
    opts = attack.opts(idle_timeout_s=30.0, timeout_s=3.0)
    err = _raised(lambda: pull(attack.shell, opts))
    assert isinstance(err, SyncStalledError), err
    assert str(err).startswith(
        "sync-back of session 'victim' did not finish within 3 s (sync.timeout); stopped"
    )


# --- tools ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tool", ["find", "tar"])
def test_an_image_without_gnu_find_or_tar_fails_naming_the_tool(attack: Attack, tool: str) -> None:
    write(attack.sandbox / "out/a.txt", "a")
    # a busybox-like find without -printf, a tar that is not GNU tar
    script = {
        "find": "#!/bin/sh\necho 'find: unrecognized: -printf' >&2\nexit 1\n",
        "tar": "#!/bin/sh\necho 'tar (busybox) 1.36'\nexit 0\n",
    }[tool]
    attack.bin.mkdir(exist_ok=True)
    (attack.bin / tool).write_text(script)
    (attack.bin / tool).chmod(0o755)
    with pytest.raises(MissingToolError, match=f"no usable GNU {tool}") as info:
        attack.pull()
    assert info.value.tool == tool
