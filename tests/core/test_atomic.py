"""Whole-or-nothing small files, and the temp files of killed writers."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler._util.atomic import sweep_dead_temps, write_atomic


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_write_atomic_leaves_the_new_content_with_the_given_mode_and_no_temp_file(
    tmp_path: Path,
) -> None:
    target = tmp_path / "salt"
    target.write_bytes(b"old")
    write_atomic(target, b"new content", mode=0o600)
    assert target.read_bytes() == b"new content"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["salt"]


def test_a_killed_writers_temp_file_is_swept_and_a_live_writers_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "push.json"
    dead = tmp_path / f".push.json.{_dead_pid()}.tmp"
    live = tmp_path / f".push.json.{os.getppid()}.tmp"  # our parent is alive while we run
    other = tmp_path / ".other.json.1.tmp"
    for path in (dead, live, other):
        path.write_bytes(b"partial")
    write_atomic(target, b"{}")
    assert not dead.exists()
    assert live.exists() and other.exists()


def test_sweeping_ignores_names_that_carry_no_pid(tmp_path: Path) -> None:
    odd = tmp_path / ".salt.notapid.tmp"
    odd.write_bytes(b"x")
    sweep_dead_temps(tmp_path / "salt")
    assert odd.exists()


def test_sweeping_a_missing_directory_is_a_no_op(tmp_path: Path) -> None:
    sweep_dead_temps(tmp_path / "absent" / "salt")


def test_a_write_with_a_backup_keeps_the_previous_generation_there(tmp_path: Path) -> None:
    target, backup = tmp_path / "status.json", tmp_path / "status.json.bak"
    write_atomic(target, b"first", backup=backup)
    assert not backup.exists()  # nothing was replaced
    write_atomic(target, b"second", backup=backup)
    assert target.read_bytes() == b"second"
    assert backup.read_bytes() == b"first"


def test_a_reader_never_finds_the_file_missing_while_it_is_replaced_with_a_backup(
    tmp_path: Path,
) -> None:
    target, backup = tmp_path / "status.json", tmp_path / "status.json.bak"
    write_atomic(target, b"0", backup=backup, durable=False)
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "path, misses, reads = sys.argv[1], 0, 0\n"
            "import os\n"
            "while not os.path.exists(path + '.stop'):\n"
            "    reads += 1\n"
            "    try:\n"
            "        open(path, 'rb').close()\n"
            "    except FileNotFoundError:\n"
            "        misses += 1\n"
            "print(reads, misses)\n",
            str(target),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for generation in range(1, 3000):
            write_atomic(target, str(generation).encode(), backup=backup, durable=False)
    finally:
        (tmp_path / "status.json.stop").touch()
        out, _ = reader.communicate(timeout=30)
    reads, misses = (int(n) for n in out.split())
    assert reads > 0
    assert misses == 0, f"{misses} of {reads} reads found no status file"
    assert backup.read_bytes() == b"2998"


def test_a_write_that_fails_leaves_the_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "salt"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["salt"]


def test_content_written_in_parts_is_whole_or_not_there_at_all(tmp_path: Path) -> None:
    target = tmp_path / "journal"
    write_atomic(target, (bytes([i]) * 1000 for i in range(3)), durable=False)
    assert target.read_bytes() == b"\x00" * 1000 + b"\x01" * 1000 + b"\x02" * 1000

    def parts_then_failure() -> Iterator[bytes]:
        yield b"new"
        raise OSError("the source ended early")

    with pytest.raises(OSError, match="ended early"):
        write_atomic(target, parts_then_failure(), durable=False)
    assert target.read_bytes()[:3] == b"\x00\x00\x00"  # the old file, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal"]
