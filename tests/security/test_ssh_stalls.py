"""A sandbox's SSH peer that stalls: it must not hang `ukc` on the channel itself.

A sandbox owns its network namespace: it can stop its sshd and answer port 2222 with
anything, e.g. an SSH server that accepts a connection and then never answers a request or
never reads what we send. Here that server is a real paramiko server on a real TCP socket
whose handlers block; the client side is the production `SshShell` and `run_command`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from reconciler.errors import SyncStalledError, TransportError
from reconciler.sync.options import SyncOptions
from reconciler.sync.pull import pull
from reconciler.transport.base import CommandResult
from reconciler.transport.commands import run_command
from reconciler.transport.sshclient import SshShell


class _Stalling(paramiko.ServerInterface):
    """Accepts anyone; `exec` requests either never get an answer or are accepted and then
    their input is never read."""

    def __init__(self, answer_exec: bool, release: threading.Event) -> None:
        self.answer_exec = answer_exec
        self.release = release

    def get_allowed_auths(self, username: str) -> str:
        return "none"

    def check_auth_none(self, username: str) -> int:
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        if not self.answer_exec:
            self.release.wait()  # the server's transport thread stops here: no answer
            return False
        return True  # accepted; nobody ever reads the channel


@dataclass
class Peer:
    shell: SshShell
    release: threading.Event


def _peer(answer_exec: bool) -> Iterator[Peer]:
    listener = socket.create_server(("127.0.0.1", 0))
    release = threading.Event()
    servers: list[paramiko.Transport] = []

    def serve() -> None:
        conn, _ = listener.accept()
        server = paramiko.Transport(conn)
        servers.append(server)
        server.add_server_key(paramiko.ECDSAKey.generate())
        server.start_server(server=_Stalling(answer_exec, release))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    sock = socket.create_connection(listener.getsockname())
    transport = paramiko.Transport(sock)
    transport.start_client(timeout=30)
    transport.auth_none("root")
    shell = SshShell(transport, sock, fqdn="stalling.test", host_key_fingerprint="-")
    try:
        yield Peer(shell, release)
    finally:
        release.set()
        shell.close()
        for server in servers:
            server.close()
        listener.close()


@pytest.fixture
def silent_peer() -> Iterator[Peer]:
    yield from _peer(answer_exec=False)


@pytest.fixture
def deaf_peer() -> Iterator[Peer]:
    yield from _peer(answer_exec=True)


def _within(fn: object, seconds: float = 60) -> object:
    """Run `fn` in a thread: what it returned or raised, or fail when it is still blocked."""
    box: list[object] = [None]

    def run() -> None:
        try:
            box[0] = fn()  # type: ignore[operator]
        except BaseException as exc:
            box[0] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    return box[0]


def test_a_peer_that_never_answers_an_exec_request_fails_the_start(silent_peer: Peer) -> None:
    silent_peer.shell.start_timeout_s = 2.0
    outcome = _within(lambda: silent_peer.shell.start("true"))
    assert isinstance(outcome, TransportError), outcome
    assert str(outcome) == "ssh stalling.test: the sandbox did not start a process within 2 s"


def test_a_command_whose_peer_never_reads_its_input_still_times_out(deaf_peer: Peer) -> None:
    # the environment travels over stdin: 4 MiB of it is more than the channel's window
    env = {"BIG": "x" * (4 << 20)}
    outcome = _within(
        lambda: run_command(
            deaf_peer.shell,
            "true",
            env=env,
            timeout_s=2,
            on_stdout=lambda _: None,
            on_stderr=lambda _: None,
        )
    )
    assert isinstance(outcome, CommandResult), outcome
    assert (outcome.timed_out, outcome.exit_code) == (True, None)


@pytest.mark.parametrize("helper", [True, False], ids=["python helper", "find and tar"])
def test_a_sync_back_over_a_peer_that_never_answers_is_stopped_by_its_watchdog(
    deaf_peer: Peer, tmp_path: Path, helper: bool
) -> None:
    opts = SyncOptions(
        local_root=tmp_path,
        state_dir=tmp_path / ".state",
        back=("out/",),
        session="deaf",
        idle_timeout_s=2.0,
    )
    outcome = _within(lambda: pull(deaf_peer.shell, opts, helper=helper))
    assert isinstance(outcome, SyncStalledError), outcome
    assert str(outcome).startswith(
        "sync-back of session 'deaf': the sync helper in the sandbox did not answer for 2 s"
    )


class _DyingChannel:
    """A channel whose exec answer never comes, on a connection that dies meanwhile: the exec
    wait ends (with `fail`) only when the channel is closed, and the close itself raises, as
    paramiko's does when it cannot send its message on a dead socket."""

    def __init__(self, fail: BaseException | None) -> None:
        self.fail = fail
        self.closed = threading.Event()

    def exec_command(self, command: str) -> None:
        if self.fail is not None:
            raise self.fail
        self.closed.wait(30)
        raise paramiko.SSHException("Channel closed.")

    def close(self) -> None:
        self.closed.set()
        raise EOFError()


class _DyingTransport:
    def __init__(self, channel: _DyingChannel) -> None:
        self.channel = channel

    def open_session(self, **_: object) -> _DyingChannel:
        return self.channel


def _dying_shell(channel: _DyingChannel) -> SshShell:
    shell = SshShell(
        _DyingTransport(channel),  # type: ignore[arg-type]
        socket.socket(),
        fqdn="dying.test",
        host_key_fingerprint="-",
    )
    shell.start_timeout_s = 0.5
    return shell


def test_a_start_whose_peer_dies_before_the_timeout_fails_cleanly_with_no_thread_traceback() -> (
    None
):
    seen: list[BaseException | None] = []
    hook = threading.excepthook
    threading.excepthook = lambda args: seen.append(args.exc_value)  # the timer's thread
    try:
        channel = _DyingChannel(fail=None)
        outcome = _within(lambda: _dying_shell(channel).start("true"))
        time.sleep(0.2)  # the timer's thread ends after the start returned
    finally:
        threading.excepthook = hook
    assert isinstance(outcome, TransportError), outcome
    assert str(outcome) == "ssh dying.test: the sandbox did not start a process within 0.5 s"
    assert seen == []


def test_a_start_refused_on_a_connection_that_died_is_a_transport_error() -> None:
    channel = _DyingChannel(fail=EOFError())
    outcome = _within(lambda: _dying_shell(channel).start("true"))
    assert isinstance(outcome, TransportError), outcome
    assert str(outcome).startswith("ssh dying.test: cannot start a process")
