"""The boot marker, written and read through a plain shell (the local stand-in for a sandbox)."""

from __future__ import annotations

import shutil
from pathlib import Path

from reconciler.reconcile import bootmark
from reconciler.transport.commands import ShellTransport
from reconciler.transport.local_shell import LocalShell


def _shell_only(tmp_path: Path) -> ShellTransport:
    """A "sandbox" whose PATH holds `sh` and nothing else."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sh = shutil.which("sh")
    assert sh is not None
    (bin_dir / "sh").symlink_to(sh)
    return ShellTransport("local", LocalShell(cwd=tmp_path, env={"PATH": str(bin_dir)}))


def test_a_boot_marker_is_left_by_the_sandboxs_shell_alone_without_starting_a_program(
    tmp_path: Path,
) -> None:
    mark = tmp_path / "ukc-boot"
    token = bootmark.new_token()
    bootmark.leave_mark(_shell_only(tmp_path), token, str(mark))
    assert mark.read_text() == token + "\n"


def test_a_boot_marker_left_again_replaces_the_last_one_whole(tmp_path: Path) -> None:
    mark = tmp_path / "ukc-boot"
    shell = ShellTransport("local", LocalShell(cwd=tmp_path))
    first, second = bootmark.new_token(), bootmark.new_token()
    bootmark.leave_mark(shell, first, str(mark))
    bootmark.leave_mark(shell, second, str(mark))
    assert bootmark.read_mark(shell, str(mark)) == second


def test_a_boot_marker_cut_short_reads_as_no_marker(tmp_path: Path) -> None:
    # why it matters: the marker is written in place, so a write cut short (or read while it
    # is written) must read as a cold boot, never as a marked one
    mark = tmp_path / "ukc-boot"
    shell = ShellTransport("local", LocalShell(cwd=tmp_path))
    token = bootmark.new_token()
    for cut in (token[:31], token[:1], ""):
        mark.write_text(cut)
        assert bootmark.read_mark(shell, str(mark)) == ""
    mark.write_text(token + "\n")
    assert bootmark.read_mark(shell, str(mark)) == token


def test_a_boot_marker_path_is_one_word_to_the_shell_never_a_second_command(
    tmp_path: Path,
) -> None:
    mark = tmp_path / "boot mark; touch planted"
    shell = ShellTransport("local", LocalShell(cwd=tmp_path))
    token = bootmark.new_token()
    bootmark.leave_mark(shell, token, str(mark))
    assert mark.read_text() == token + "\n"
    assert bootmark.read_mark(shell, str(mark)) == token
    assert not (tmp_path / "planted").exists()
