"""Attacks on sync-back and sync by a sandbox that replaced its sync helper (or python3).

Every byte of the helper's stream is the attacker's. Each attack below runs the real engine
against a stand-in interpreter (`tests.support.hostile_helper.fake_python`: a real process on
a real pipe, started exactly as the engine starts python3) or, at the end, a real sandbox of
the local metro. What must hold: bounded disk, memory, descriptors and time; a clean stop
that keeps what was written, says why with the numbers, and mirrors no deletion.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reconciler.errors import RemoteError, SyncStalledError
from reconciler.sync.options import SyncOptions
from reconciler.sync.pull import pull, pull_record
from reconciler.sync.pullrecord import PULL_LEGACY
from reconciler.sync.push import push
from reconciler.sync.records import write_record
from reconciler.transport.local_shell import LocalShell
from tests.support.hostile_helper import fake_python, run_in_child
from tests.support.ukc import Ukc

MTIME = 1_600_000_000_000_000_000


@dataclass
class Attack:
    """A local tree and state dir, and a place for the stand-in interpreter."""

    base: Path
    local: Path
    state: Path
    shell: LocalShell

    def python(self, body: str) -> str:
        return fake_python(self.base / "sandbox-bin", body)

    def opts(self, body: str, **kw: Any) -> SyncOptions:
        args: dict[str, Any] = {
            "local_root": self.local,
            "state_dir": self.state,
            "back": ("out/",),
            "remote_python": self.python(body),
            "session": "victim",
        }
        args.update(kw)
        return SyncOptions(**args)

    def child_opts(self, body: str, **kw: Any) -> dict[str, Any]:
        args: dict[str, Any] = {
            "local_root": str(self.local),
            "state_dir": str(self.state),
            "back": ["out/"],
            "remote_python": self.python(body),
            "session": "victim",
        }
        args.update(kw)
        return args

    def files(self) -> dict[str, int]:
        """Every regular file under the local root -> its size."""
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
    shell = LocalShell()
    yield Attack(tmp_path, local, tmp_path / "state", shell)
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


# --- disk: sizes and counts --------------------------------------------------------------


def test_a_file_announced_at_2_to_the_62_bytes_is_refused_before_a_byte_is_written(
    attack: Attack,
) -> None:
    # the stand-in streams 1 MiB chunks for as long as we read; the child may write at most
    # 64 MiB (a run without the guard fails there instead of filling the disk)
    body = """
        hello()
        entry("out/huge.bin", size=1 << 62)
        block = b"x" * (1 << 20)
        while True:
            chunk(block)
    """
    out = run_in_child(
        "pull", attack.child_opts(body), limits={"RLIMIT_FSIZE": 64 << 20}, timeout=120
    )
    assert "error" not in out, out
    stopped = out["result"]["stopped"]
    assert "sync.back_max_bytes = 17179869184" in stopped
    assert str(1 << 62) in stopped
    assert attack.files() == {}  # not a byte, not even a temp file


def test_the_byte_cap_stops_before_the_file_that_would_pass_it_and_keeps_what_came_before(
    attack: Attack,
) -> None:
    # the sandbox deleted out/old.txt since our last pull: with the pull stopped early, that
    # deletion must not be mirrored
    _previously_pulled(attack)
    body = """
        hello()
        entry("out", kind="d", mode=0o755)
        for name in ("a.bin", "b.bin", "c.bin"):
            entry("out/" + name, size=400_000)
            chunk(b"y" * 400_000)
            end_file()
        frame({"end": True, "errors": 0, "missing": []})
    """
    result = pull(
        attack.shell,
        attack.opts(body, back_max_bytes=1_000_000, back_delete=True),
        instance_uuid="i-1",
    )
    assert result.stopped == (
        "stopped at sync.back_max_bytes = 1000000: out/c.bin announces 400000 bytes, "
        "only 200000 are left"
    )
    assert sorted(attack.files()) == ["out/a.bin", "out/b.bin", "out/old.txt"]
    assert result.deleted == []
    assert result.deletes_skipped == [
        "the sync-back stopped before the end of the listing: no remote deletions mirrored"
    ]
    assert set(pull_record(attack.opts(""))) == {"out/a.bin", "out/b.bin", "out/old.txt"}


def test_the_entry_cap_stops_a_sandbox_that_lists_endless_empty_directories(
    attack: Attack,
) -> None:
    body = """
        hello()
        entry("out", kind="d", mode=0o755)
        i = 0
        while True:
            entry("out/d%d" % i, kind="d", mode=0o755)
            i += 1
    """
    result = pull(attack.shell, attack.opts(body, back_max_files=500))
    assert result.stopped == (
        "stopped at sync.back_max_files = 500: the sandbox listed more entries "
        "(files and directories)"
    )
    assert len(os.listdir(attack.local / "out")) == 499  # "out" itself was the first entry


def test_the_refusal_cap_stops_the_pull_and_the_report_stays_short(attack: Attack) -> None:
    body = """
        hello()
        for i in range(5000):
            entry("elsewhere/%d" % i)
            end_file()
        entry("out/after.txt", size=2)
        chunk(b"hi")
        end_file()
        frame({"end": True, "errors": 0, "missing": []})
    """
    result = pull(attack.shell, attack.opts(body, back_max_refused=50))
    assert result.stopped == (
        "stopped at sync.back_max_refused = 50: 51 entries refused or not written"
    )
    assert result.refused == 51
    assert len(result.rejected) == 51
    assert not (attack.local / "out/after.txt").exists()
    huge = pull(attack.shell, attack.opts(body))  # default cap: all refused, 100 listed
    assert (huge.stopped, huge.refused, len(huge.rejected)) == (None, 5000, 100)
    assert (attack.local / "out/after.txt").read_text() == "hi"


# --- memory ------------------------------------------------------------------------------


def test_thousands_of_long_refused_paths_leave_memory_flat(attack: Attack) -> None:
    # 3,000 paths of 60,000 characters: 180 MB if any of them were kept
    body = """
        hello()
        for i in range(3000):
            entry("out/%d/" % i + "a" * 60_000, kind="d", mode=0o755)
        frame({"end": True, "errors": 0, "missing": []})
    """
    for back_delete in (False, True):
        out = run_in_child(
            "pull",
            attack.child_opts(body, back_delete=back_delete),
            limits={"RLIMIT_AS": 2 << 30},
            timeout=180,
        )
        assert "error" not in out, out
        assert out["result"]["refused"] == 3000
        grown = out["peak_mib"] - out["before_mib"]
        assert grown < 40, f"peak RSS grew by {grown:.0f} MiB (back_delete={back_delete})"


def test_paths_just_under_the_length_limit_are_bounded_by_the_entry_budget(
    attack: Attack,
) -> None:
    # 4,000-character accepted-looking paths: each entry may cost 256 characters of path
    body = """
        hello()
        entry("out", kind="d", mode=0o755)
        i = 0
        while True:
            entry("out/" + ("%06d" % i) * 40 + "/" + "b" * 200 + "/" + "c" * 200, kind="d")
            i += 1
    """
    result = pull(attack.shell, attack.opts(body, back_max_files=100))
    assert result.stopped is not None
    assert "the paths listed reach" in result.stopped
    assert "over the 256 per allowed entry" in result.stopped


def test_a_huge_scan_answer_is_refused_without_being_parsed(attack: Attack) -> None:
    # 16 MiB of `{},{},...`: parsing it whole cost the push side +400 MiB
    (attack.local / "a.txt").write_text("a")
    body = """
        hello()
        body = b'{"scan":[' + b"{}," * ((16 << 20) // 3) + b'{}]}'
        OUT.write(struct.pack(">I", len(body)) + body)
        flush()
        time.sleep(60)
    """
    out = run_in_child(
        "push", attack.child_opts(body, back=[]), limits={"RLIMIT_AS": 2 << 30}, timeout=120
    )
    assert out.get("error", "").startswith("RemoteError: sync helper sent a 16777"), out
    assert "the limit is 1048576" in out["error"]
    grown = out["peak_mib"] - out["before_mib"]
    assert grown < 60, f"peak RSS grew by {grown:.0f} MiB"


def test_a_scan_listing_endless_paths_to_delete_is_stopped_at_its_cap(attack: Attack) -> None:
    (attack.local / "a.txt").write_text("a")
    body = """
        hello()
        flush()
        i = 0
        while True:
            frame({"scan": [["x%d" % n, "f", 1, 1, 420, ""] for n in range(i, i + 5000)]})
            i += 5000
    """
    out = run_in_child(
        "push", attack.child_opts(body, back=[]), limits={"RLIMIT_AS": 2 << 30}, timeout=300
    )
    assert out.get("error", "").startswith("SyncLimitError: push to /workspace: the sandbox "), out
    assert "more than a push may delete (1000000 paths" in out["error"]


def test_a_block_list_longer_than_asked_for_is_refused(attack: Attack) -> None:
    # a big local file the sandbox claims to hold: the push asks for its block digests
    (attack.local / "big.bin").write_bytes(os.urandom(3 << 20))
    body = """
        hello()
        flush()
        frame({"scan": [["big.bin", "f", 3 << 20, 1, 420, ""]]})
        frame({"scan_end": True, "count": 1})
        flush()
        frame({"n": 49})  # the file has 48 blocks of 64 KiB: one digest more than asked for
        OUT.write(b"d" * 8 * 49)
        flush()
        time.sleep(3600)
    """
    with pytest.raises(RemoteError, match=r"malformed block list for big\.bin"):
        push(attack.shell, attack.opts(body, back=(), idle_timeout_s=5.0), instance_uuid="u")


# --- descriptors and names ----------------------------------------------------------------


def test_fifteen_hundred_directories_do_not_exhaust_descriptors(attack: Attack) -> None:
    body = """
        hello()
        entry("out", kind="d", mode=0o755)
        for i in range(1500):
            entry("out/d%04d" % i, kind="d", mode=0o755)
            entry("out/d%04d/f.txt" % i, size=1)
            chunk(b"%d" % (i % 10))
            end_file()
        # and back into the first ones, so cached descriptors must be reopened
        for i in range(0, 1500, 100):
            entry("out/d%04d/g.txt" % i, size=1)
            chunk(b"g")
            end_file()
        frame({"end": True, "errors": 0, "missing": []})
    """
    for threads in (0, 2):
        shutil.rmtree(attack.local / "out")
        shutil.rmtree(attack.state, ignore_errors=True)
        out = run_in_child(
            "pull",
            attack.child_opts(body, write_threads=threads),
            limits={"RLIMIT_NOFILE": 256},
            timeout=180,
        )
        assert "error" not in out, out
        assert (out["result"]["files_written"], out["result"]["rejected"]) == (1515, [])
    assert len(attack.files()) == 1515


def test_a_path_two_thousand_directories_deep_is_walked_without_recursion(
    attack: Attack,
) -> None:
    deep = "/".join(["d"] * 2000)
    body = f"""
        hello()
        entry("out/{deep}/f.txt", size=2)
        chunk(b"ok")
        end_file()
        frame({{"end": True, "errors": 0, "missing": []}})
    """
    try:
        result = pull(attack.shell, attack.opts(body))
        assert (result.files_written, result.rejected) == (1, [])
        assert (attack.local / "out" / deep / "f.txt").read_text() == "ok"
    finally:
        _unwind_chain(attack.local / "out", "d")


def _unwind_chain(top: Path, name: str) -> None:
    """Remove `top/name/name/...` with short paths and no recursion: pytest's own cleanup
    recurses once per level and fails on a tree this deep."""
    while (top / name / name).is_dir():
        os.rename(top / name / name, top / ".lift")
        os.rmdir(top / name)
        os.rename(top / ".lift", top / name)
    shutil.rmtree(top / name, ignore_errors=True)


def test_a_250_byte_name_in_conflict_is_reported_and_the_local_file_kept(
    attack: Attack,
) -> None:
    name = "n" * 250  # + ".ukc-remote" is 261 bytes: no name for the sandbox's copy
    (attack.local / "out" / name).write_text("my own edit")
    body = f"""
        hello()
        entry("out/{name}", size=6)
        chunk(b"theirs")
        end_file()
        entry("out/after.txt", size=5)
        chunk(b"after")
        end_file()
        frame({{"end": True, "errors": 0, "missing": []}})
    """
    for threads in (0, 2):
        result = pull(attack.shell, attack.opts(body, write_threads=threads))
        assert (attack.local / "out" / name).read_text() == "my own edit"
        assert (attack.local / "out/after.txt").read_text() == "after"
        assert len(result.rejected) == 1
        assert "cannot be kept beside it" in result.rejected[0]
        assert result.rejected[0].startswith("out/" + name[:100])
        assert sorted(os.listdir(attack.local / "out")) == ["after.txt", name]


@pytest.mark.parametrize("threads", [0, 2])
def test_a_local_file_that_cannot_be_replaced_is_reported_and_the_pull_goes_on(
    attack: Attack, threads: int
) -> None:
    # an immutable file (chattr +i: even root gets EPERM) that an earlier pull brought back
    def body(version: bytes) -> str:
        return f"""
            hello()
            entry("out/locked.txt", size={len(version)})
            chunk({version!r})
            end_file()
            entry("out/after.txt", size={len(version)})
            chunk({version!r})
            end_file()
            frame({{"end": True, "errors": 0, "missing": []}})
        """

    pull(attack.shell, attack.opts(body(b"v1"), write_threads=threads))
    locked = attack.local / "out/locked.txt"
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        result = pull(attack.shell, attack.opts(body(b"v2"), write_threads=threads))
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert result.rejected == ["out/locked.txt: not written here: operation not permitted"]
    assert locked.read_text() == "v1"
    assert (attack.local / "out/after.txt").read_text() == "v2"
    assert sorted(os.listdir(attack.local / "out")) == ["after.txt", "locked.txt"]


def test_a_full_local_disk_stops_the_pull_and_keeps_what_fit(attack: Attack) -> None:
    # the local root is a 2 MiB tmpfs in a private mount namespace: the third file is ENOSPC
    body = """
        hello()
        entry("out", kind="d", mode=0o755)
        for name in ("a", "b", "c", "d"):
            entry("out/" + name, size=900_000)
            chunk(b"q" * 900_000)
            end_file()
        frame({"end": True, "errors": 0, "missing": []})
    """
    local = str(attack.local)
    out = run_in_child(
        "pull",
        attack.child_opts(body),
        wrap=[
            "unshare",
            "-m",
            "sh",
            "-c",
            f'mount -t tmpfs -o size=2m t {local} && exec "$@"',
            "-",
        ],
        timeout=120,
    )
    assert "error" not in out, out
    result = out["result"]
    assert result["stopped"].startswith("stopped: the local disk is full (no space left on device)")
    assert result["files_written"] == 2
    assert result["rejected"] == ["out/c: not written here: no space left on device"]


# --- modes ---------------------------------------------------------------------------------


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
    body = "hello()\n"
    for name, (mode, _) in modes.items():
        body += f"entry('out/{name}', size=1, mode={mode})\nchunk(b'x')\nend_file()\n"
    body += "entry('out/dir', kind='d', mode=0o7777)\n"
    body += "frame({'end': True, 'errors': 0, 'missing': []})\n"
    for umask in (0o022, 0o000):
        old = os.umask(umask)
        try:
            shutil.rmtree(attack.local / "out")
            pull(attack.shell, attack.opts(body, write_threads=threads))
        finally:
            os.umask(old)
        got = {n: oct(stat.S_IMODE((attack.local / "out" / n).stat().st_mode)) for n in modes}
        assert got == {n: oct(want) for n, (_, want) in modes.items()}, f"umask {umask:03o}"
        assert stat.S_IMODE((attack.local / "out/dir").stat().st_mode) == 0o755


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
    assert not thread.is_alive(), "the sync is still hanging after 60 s"
    return box[0]


@pytest.mark.parametrize(
    "where",
    ["mid-frame", "mid-file", "never answers"],
)
def test_a_stalled_helper_ends_the_sync_back_with_the_session_and_the_seconds(
    attack: Attack, where: str
) -> None:
    _previously_pulled(attack)
    stall = {
        "mid-frame": """
            hello()
            entry("out/done.txt", size=4)
            chunk(b"done")
            end_file()
            OUT.write(b"\\x00\\x00\\x01\\x00{\\"path\\":")
        """,
        "mid-file": """
            hello()
            entry("out/done.txt", size=4)
            chunk(b"done")
            end_file()
            entry("out/partial.bin", size=10)
            chunk(b"12345")
        """,
        "never answers": "",
    }[where]
    body = textwrap.dedent(stall) + "\nflush()\ntime.sleep(3600)\n"
    opts = attack.opts(body, idle_timeout_s=2.0, back_delete=True)
    err = _raised(lambda: pull(attack.shell, opts, instance_uuid="i-1"))
    assert isinstance(err, SyncStalledError), err
    assert str(err) == (
        "sync-back of session 'victim': the sync helper in the sandbox did not answer for "
        "2 s (sync.idle_timeout); stopped, files brought back so far are kept, no deletions "
        "mirrored"
    )
    assert (attack.local / "out/old.txt").read_text() == "pulled before"  # no deletion
    if where != "never answers":
        assert (attack.local / "out/done.txt").read_text() == "done"
        assert "out/done.txt" in pull_record(opts)
    assert not [n for n in os.listdir(attack.local / "out") if n.startswith(".ukc-pull.")]


def test_a_helper_that_trickles_is_stopped_at_the_overall_deadline(attack: Attack) -> None:
    body = """
        hello()
        entry("out/slow.bin", size=1000)
        flush()
        for _ in range(1000):
            chunk(b"x")
            flush()
            time.sleep(0.5)
    """
    opts = attack.opts(body, idle_timeout_s=30.0, timeout_s=3.0)
    err = _raised(lambda: pull(attack.shell, opts))
    assert isinstance(err, SyncStalledError), err
    assert str(err).startswith(
        "sync-back of session 'victim' did not finish within 3 s (sync.timeout); stopped"
    )


def test_a_helper_that_stops_reading_our_upload_ends_the_push(attack: Attack) -> None:
    (attack.local / "big.bin").write_bytes(os.urandom(8 << 20))
    body = """
        hello()
        frame({"scan_end": True, "count": 0})
        flush()
        time.sleep(3600)   # reads nothing: our writes fill the pipe and block
    """
    opts = attack.opts(body, back=(), idle_timeout_s=2.0)
    err = _raised(lambda: push(attack.shell, opts, instance_uuid="u"))
    assert isinstance(err, SyncStalledError), err
    assert str(err) == (
        "push of session 'victim': the sync helper in the sandbox did not read its input for "
        "2 s (sync.idle_timeout); stopped, nothing more is sent or deleted"
    )


def test_a_push_to_a_helper_that_never_answers_is_stopped(attack: Attack) -> None:
    (attack.local / "a.txt").write_text("a")
    opts = attack.opts("time.sleep(3600)\n", back=(), idle_timeout_s=2.0)
    err = _raised(lambda: push(attack.shell, opts, instance_uuid="u"))
    assert isinstance(err, SyncStalledError), err
    assert "did not answer for 2 s (sync.idle_timeout)" in str(err)


# --- a real sandbox ------------------------------------------------------------------------


def _cap_spec(command: str, extra: str = "") -> str:
    return f"""\
        name: capped
        commands:
          - name: make
            run: {json.dumps(command)}
        sync:
          back: [out/]
          back_max_bytes: 1MiB
        {extra}
        """


@pytest.mark.parametrize(
    "image",
    ["", "image: ukc/local-minimal:latest"],
    ids=["python helper", "find and tar (no python3)"],
)
def test_a_real_sandboxs_outputs_stop_at_the_spec_cap_and_land_without_group_write(
    ukc: Ukc, image: str
) -> None:
    command = (
        "mkdir -p out && printf '#!/bin/sh\\necho hi\\n' > out/a-run.sh && "
        "chmod 0777 out/a-run.sh && printf x > out/b-shared && chmod 0666 out/b-shared && "
        "head -c 3000000 /dev/zero > out/z-big.bin"
    )
    ukc.write_spec(_cap_spec(command, image))
    # the common umask of users with a group of their own: it would keep a group write bit
    old = os.umask(0o002)
    try:
        first = ukc.run("apply", "session.yaml", timeout=600)
    finally:
        os.umask(old)
    assert first.returncode == 1, first.stdout + first.stderr
    message = (
        "sync-back of session 'capped' stopped at sync.back_max_bytes = 1048576: "
        "out/z-big.bin announces 3000000 bytes, only 1048557 are left; 2 file(s) brought "
        "back were kept, no deletions mirrored"
    )
    assert message in first.stdout + first.stderr
    status = ukc.status()["sessions"]["capped"]
    assert status["sync"]["back_stopped"] == (
        "stopped at sync.back_max_bytes = 1048576: out/z-big.bin announces 3000000 bytes, "
        "only 1048557 are left"
    )
    assert status["sync"]["back_pending"] is True
    out = ukc.project / "out"
    assert sorted(os.listdir(out)) == ["a-run.sh", "b-shared"]
    assert stat.S_IMODE((out / "a-run.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "b-shared").stat().st_mode) == 0o644
    assert (out / "a-run.sh").read_bytes() == b"#!/bin/sh\necho hi\n"


def _stalling_helper_code() -> str:
    """The marshalled code of a 'helper' that never answers, for the sandbox's python3, as
    base64 (the sandbox runs the host's /usr/bin/python3)."""
    code = (
        "import marshal, sys\n"
        "sys.stdout.buffer.write(marshal.dumps(compile('import time\\ntime.sleep(3600)', "
        "'x', 'exec')))\n"
    )
    raw = subprocess.run(["/usr/bin/python3", "-c", code], capture_output=True, check=True)
    return base64.b64encode(raw.stdout).decode()


def test_a_real_sandbox_that_stalls_its_helper_ends_the_apply_and_deletes_nothing(
    ukc: Ukc,
) -> None:
    from reconciler.sync.remote import _PROGRAM_ID

    hexversion = subprocess.run(
        ["/usr/bin/python3", "-c", "import sys; print('%x' % sys.hexversion)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # the plant comes before the last command: the sync-back's helper starts while the last
    # command runs, so a helper planted by that command itself may come too late for it
    spec = """\
        name: stall
        commands:
          - name: make
            run: {command}
          - name: last
            run: {last}
        sync:
          back: [out/]
          back_delete: true
          idle_timeout: 3s
        """
    ukc.write_spec(
        spec.format(command=json.dumps("mkdir -p out && echo v1 > out/r.txt"), last="'true'")
    )
    ukc.run("apply", "session.yaml", check=0, timeout=600)
    assert (ukc.project / "out/r.txt").read_text() == "v1\n"
    # the sandbox deletes its output and plants a helper (the cached code the bootstrap
    # trusts in its /run) that never answers
    plant = (
        f"rm out/r.txt && echo {_stalling_helper_code()} | base64 -d > "
        f"/run/ukc-sync/helper-{_PROGRAM_ID}-{hexversion}.bin"
    )
    ukc.write_spec(spec.format(command=json.dumps(plant), last="'echo planted'"))
    t0 = time.monotonic()
    second = ukc.run("apply", "session.yaml", timeout=300)
    took = time.monotonic() - t0
    assert second.returncode == 1, second.stdout + second.stderr
    assert (
        "sync-back of session 'stall': the sync helper in the sandbox did not answer for 3 s "
        "(sync.idle_timeout)" in second.stdout + second.stderr
    )
    assert took < 240
    assert (ukc.project / "out/r.txt").read_text() == "v1\n"  # not deleted
    # the status lock is free: another apply gets it at once (and fails the same way)
    third = ukc.run("apply", "session.yaml", timeout=300)
    assert "locked" not in (third.stdout + third.stderr).lower()
    assert "did not answer for 3 s" in third.stdout + third.stderr
