"""`LocalShell`: the RemoteShell that runs `sh -c` locally (used by the sync tests and others)."""

from __future__ import annotations

import os

import pytest

from reconciler.transport.local_shell import LocalShell


def test_stdin_stdout_stderr_and_the_exit_code_come_back() -> None:
    shell = LocalShell()
    proc = shell.start("cat; echo oops >&2; exit 3")
    proc.write(b"hello " * 5_000)  # under a pipe buffer: nobody reads yet
    proc.close_stdin()
    out = bytearray()
    while chunk := proc.read():
        out += chunk
    assert bytes(out) == b"hello " * 5_000
    assert proc.read_stderr() == b"oops\n"
    assert proc.wait(10) == 3
    shell.close()


def test_a_chatty_stderr_does_not_block_the_process() -> None:
    shell = LocalShell()
    proc = shell.start("head -c 3000000 /dev/zero >&2; echo done")
    assert proc.read() == b"done\n"
    assert proc.wait(10) == 0
    shell.close()


def test_wait_with_a_timeout_raises_timeout_error_and_kill_is_idempotent() -> None:
    shell = LocalShell()
    proc = shell.start("sleep 30")
    with pytest.raises(TimeoutError):
        proc.wait(0.05)
    proc.kill()
    proc.kill()
    assert proc.wait(5) != 0
    shell.close()


def test_commands_started_are_counted() -> None:
    shell = LocalShell()
    shell.start("true").wait(5)
    shell.start("true").wait(5)
    assert shell.started == ["true", "true"]
    shell.close()


def test_a_killed_process_leaves_none_of_its_pipes_open_here() -> None:
    """A shell that starts commands all day (the sync tests' stand-in for SSH) must not leak a
    descriptor per command."""

    def open_fds() -> set[str]:
        return set(os.listdir("/proc/self/fd"))

    shell = LocalShell()
    before = open_fds()
    for _ in range(5):
        proc = shell.start("echo out; echo err >&2")
        proc.close_stdin()
        assert proc.wait(10) == 0
        proc.kill()
    shell.close()
    assert open_fds() - before == set()
