"""Reaching a session from the command line without a terminal: the relay between a user's
terminal and a sandbox process, what `ukc exec` runs, and what `ukc logs` lets through."""

from __future__ import annotations

import queue
import threading
from contextlib import AbstractContextManager, nullcontext

import pytest

from reconciler import errors
from reconciler.cli.render import printable
from reconciler.reconcile.access import command_line, interact


class ScriptedTerminal:
    """A user who types `keys` one chunk at a time, then ends input; a window resized once."""

    def __init__(self, keys: list[bytes], *, resize_to: tuple[int, int] | None = None) -> None:
        self._keys = list(keys)
        self._resize_to = resize_to
        self.shown = bytearray()
        self.shown_err = bytearray()

    def size(self) -> tuple[int, int] | None:
        return self._resize_to or (80, 24)

    def term(self) -> str:
        return "xterm"

    def raw(self) -> AbstractContextManager[None]:
        return nullcontext()

    def read(self, timeout_s: float) -> bytes | None:
        return self._keys.pop(0) if self._keys else b""

    def write(self, data: bytes) -> None:
        self.shown += data

    def write_err(self, data: bytes) -> None:
        self.shown_err += data

    def resized(self) -> bool:
        return self._resize_to is not None


class EchoProcess:
    """A sandbox process that answers each line of input with it in upper case, then exits
    with the number of lines it got once its input ends."""

    def __init__(self) -> None:
        self._out: queue.Queue[bytes] = queue.Queue()
        self._err: queue.Queue[bytes] = queue.Queue()
        self._lines = 0
        self._done = threading.Event()
        self.sizes: list[tuple[int, int]] = []
        self.stdin_closed = False

    def write(self, data: bytes) -> None:
        for line in data.splitlines():
            self._lines += 1
            self._out.put(line.upper() + b"\n")

    def close_stdin(self) -> None:
        self.stdin_closed = True
        self._err.put(b"bye\n")
        self._out.put(b"")
        self._err.put(b"")
        self._done.set()

    def read(self, n: int = 65536) -> bytes:
        return self._out.get()

    def read_stderr(self, n: int = 65536) -> bytes:
        return self._err.get()

    def wait(self, timeout: float | None = None) -> int:
        if not self._done.wait(timeout):
            raise TimeoutError
        return self._lines

    def kill(self) -> None:
        self.close_stdin()

    def resize(self, cols: int, rows: int) -> None:
        self.sizes.append((cols, rows))


def test_the_relay_sends_keys_shows_output_and_returns_the_exit_status() -> None:
    terminal = ScriptedTerminal([b"ls\n", b"pwd\n", b"make test\n"])
    process = EchoProcess()
    assert interact(process, terminal) == 3
    assert bytes(terminal.shown) == b"LS\nPWD\nMAKE TEST\n"
    assert bytes(terminal.shown_err) == b"bye\n"
    assert process.stdin_closed, "the end of the user's input is the end of the process's"


def test_a_window_size_change_reaches_the_sandbox() -> None:
    terminal = ScriptedTerminal([b"x\n"], resize_to=(132, 43))
    process = EchoProcess()
    interact(process, terminal)
    assert process.sizes and set(process.sizes) == {(132, 43)}


def test_a_process_that_stops_reading_ends_the_relay_at_its_exit() -> None:
    class Gone(EchoProcess):
        def write(self, data: bytes) -> None:
            self.close_stdin()
            raise errors.RemoteError("stdin write failed")

    terminal = ScriptedTerminal([b"a\n", b"b\n"])
    assert interact(Gone(), terminal) == 0


def test_one_argument_is_a_shell_line_and_several_are_exact_arguments() -> None:
    assert command_line(["make && make test"]) == "make && make test"
    assert command_line(["ls", "-la", "a b", "$HOME"]) == "ls -la 'a b' '$HOME'"
    with pytest.raises(errors.UsageError, match="no command given"):
        command_line([])


@pytest.mark.parametrize(
    "hostile",
    [
        "\x1b]0;pwned\x07",  # retitles the terminal
        "\x1b[2J\x1b[H",  # clears the screen
        "\x9b31m",  # an 8-bit CSI
        "line\rover",  # overwrites what came before on the line
    ],
)
def test_sandbox_text_reaches_the_terminal_with_its_control_characters_escaped(
    hostile: str,
) -> None:
    shown = printable(f"before {hostile} after\n")
    assert not any(ord(c) < 0x20 and c not in "\n\t" for c in shown)
    assert not any(0x7F <= ord(c) <= 0x9F for c in shown)
    assert shown.startswith("before ") and shown.endswith(" after\n")


def test_sandbox_text_cannot_reorder_what_the_terminal_shows_with_bidi_controls() -> None:
    # "Trojan Source": an override makes `rm -rf /tmp/x` display as something else
    shown = printable("ok \u202erm -rf /\u202c \u2066x\u2069 \u2028 end\n")
    assert not any(
        c in shown for c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028"
    )
    assert "\\u202e" in shown and shown.endswith(" end\n")


def test_plain_console_lines_pass_unchanged_and_crlf_reads_as_a_newline() -> None:
    assert printable("Server listening on port 2222.\r\n\tok\n") == (
        "Server listening on port 2222.\n\tok\n"
    )


def test_the_ttl_tag_reads_back_and_a_garbled_one_is_no_ttl() -> None:
    from reconciler.reconcile import identity

    assert identity.ttl_from_tags(("ukc", identity.ttl_tag(7200.0))) == 7200
    assert identity.ttl_from_tags(("ukc", "ukc.ttl=-5", "ukc.ttl=2h")) is None
    assert identity.ttl_from_tags(("ukc",)) is None


@pytest.mark.parametrize(
    ("argv", "warm"),
    [
        (["exec", "box", "--", "make"], True),
        (["logs", "box"], True),
        (["ls"], True),
        (["ssh", "box", "--", "uname", "-t"], True),
        (["ssh", "box"], False),
        (["ssh", "-t", "box", "--", "top"], False),
        (["ssh", "box", "--help"], False),
    ],
)
def test_a_shell_or_a_terminal_keeps_ssh_out_of_the_warm_process(
    argv: list[str], warm: bool
) -> None:
    from reconciler.cli.warmclient import worthy

    assert worthy(argv, {}) is warm
