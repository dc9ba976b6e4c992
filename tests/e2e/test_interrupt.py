"""Ctrl-C in a real `ukc apply` process while a long command runs on the local metro."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.ukc import Ukc
from tests.support.waiting import eventually

pytestmark = pytest.mark.metro


def spec(token: str, trap: str = "") -> str:
    # `token` makes the sandbox's sleep findable among the host's processes
    return f"""\
name: demo
directory: ./work
commands:
  - name: slow
    run: {trap}echo started; sleep {token}; echo finished
  - name: after
    run: echo after > out.txt
sync:
  back: ["out.txt"]
"""


def sleeping(token: str) -> bool:
    """Whether a `sleep <token>` still runs anywhere on the host (sandboxes included)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[:2] == [b"sleep", token.encode()]:
            return True
    return False


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Apply:
    """`ukc apply` as a background process whose output lines arrive with their time."""

    def __init__(self, ukc: Ukc, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "apply", "session.yaml"],
            cwd=ukc.project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # a Ctrl-C at a terminal reaches a foreground apply, which never inherits an ignored
            # SIGINT (a runner started in the background, `cmd &`, passes one on)
            preexec_fn=_sigint_default,
        )
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), line))

    def wait_for(self, text: str, timeout_s: float) -> float:
        """When a line containing `text` arrived (fails after `timeout_s`)."""
        end = time.monotonic() + timeout_s
        while True:
            try:
                at, line = self.lines.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {text!r} within {timeout_s}s: {self.seen}") from None
            self.seen.append(line)
            if text in line:
                return at

    def finish(self, timeout_s: float) -> int:
        code = self.proc.wait(timeout_s)
        while not self.lines.empty():
            self.seen.append(self.lines.get()[1])
        return code


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
def test_ctrl_c_in_apply_stops_the_remote_command_and_records_interrupted(
    ukc: Ukc, warm: bool
) -> None:
    token = f"{20 + os.getpid() % 1000 / 1000 + (0.0001 if warm else 0.0002):.4f}"
    (ukc.project / "work").mkdir()
    ukc.write_spec(spec(token))
    env = ukc.env() | ({} if warm else {"UKC_WARM": "0"})
    apply = Apply(ukc, env)
    try:
        apply.wait_for("| started", 120)
        assert eventually(lambda: sleeping(token), 10)
        sent = time.monotonic()
        apply.proc.send_signal(signal.SIGINT)
        said = apply.wait_for("interrupt: stopping command 'slow' in session demo", 10)
        assert said - sent < 2.0, f"the interrupt was announced {said - sent:.1f}s late"
        code = apply.finish(30)
    finally:
        if apply.proc.poll() is None:
            apply.proc.kill()
    output = "".join(apply.seen)
    assert code == 130, output
    assert "| finished" not in output
    assert eventually(lambda: not sleeping(token), 10), "the remote command still runs"

    rec = ukc.status()["sessions"]["demo"]
    assert rec["phase"] == "Interrupted", rec
    stopped = rec["interruption"]
    assert "run command 'slow'" in stopped["during"]
    assert any("create instance" in a for a in stopped["finished"])
    assert any("run command 'after'" in a for a in stopped["not_done"])
    assert any("bring back" in a for a in stopped["not_done"])
    slow = next(c for c in rec["commands"] if c["name"] == "slow")
    assert slow["interrupted"] and slow["exit_code"] is None
    assert not (ukc.project / "work" / "out.txt").exists()

    plan = ukc.run("plan", "session.yaml", check=0)
    assert "run command 'slow' (last run was interrupted)" in plan.stdout, plan.stdout


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
def test_a_second_ctrl_c_quits_at_once_while_the_command_ignores_the_first(
    ukc: Ukc, warm: bool
) -> None:
    token = f"{21 + os.getpid() % 1000 / 1000 + (0.0001 if warm else 0.0002):.4f}"
    (ukc.project / "work").mkdir()
    # the command ignores SIGTERM: only the kill after the grace period would end it
    ukc.write_spec(spec(token, trap="trap '' TERM; "))
    apply = Apply(ukc, ukc.env() | ({} if warm else {"UKC_WARM": "0"}))
    try:
        apply.wait_for("| started", 120)
        apply.proc.send_signal(signal.SIGINT)
        apply.wait_for("interrupt: stopping command 'slow'", 10)
        time.sleep(0.3)
        sent = time.monotonic()
        apply.proc.send_signal(signal.SIGINT)
        code = apply.finish(30)
        took = time.monotonic() - sent
    finally:
        if apply.proc.poll() is None:
            apply.proc.kill()
    assert code == 130, "".join(apply.seen)
    assert took < 3.0, f"the second Ctrl-C took {took:.1f}s to quit"
    rec = ukc.status()["sessions"]["demo"]
    assert rec["phase"] == "Interrupted"
    assert "run command 'slow'" in rec["interruption"]["during"]
    # the sandbox's command is not left behind for long: the grace period still ends it
    assert eventually(lambda: not sleeping(token), 20)
