"""`ukc ssh`, `ukc exec`, `ukc logs` and `ukc ls` end to end on the local metro: a session
reached with nothing put together by hand, and only the instance the status file pins."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime

import pytest

from tests.support.cmdlines import CmdlineWatch
from tests.support.ukc import Ukc
from tests.support.waiting import eventually

pytestmark = pytest.mark.metro

SECRET = "s3cret-value-for-exec-4f1c"
SPEC = """\
name: box
directory: ./work
ttl: 2h
env: {GREETING: hello}
secret_env: {API_KEY: H11_EXEC_SECRET}
commands:
  - name: build
    run: cat input.txt && printf 'title\\033]0;pwned\\007done\\n'
"""


@pytest.fixture
def box(ukc: Ukc) -> Ukc:
    work = ukc.project / "work"
    work.mkdir()
    (work / "input.txt").write_text("from the spec dir\n")
    ukc.write_spec(SPEC)
    ukc.extra_env["H11_EXEC_SECRET"] = SECRET
    ukc.run("apply", "session.yaml", check=0)
    return ukc


def on_terminal(ukc: Ukc, *args: str, keys: list[bytes], timeout: float = 60) -> tuple[int, bytes]:
    """Run `ukc` on a pseudo-terminal, type `keys` once it shows something (one chunk a second
    apart): its exit code and everything the terminal showed."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: becomes ukc on the terminal
        os.chdir(ukc.project)
        os.execve(sys.executable, [sys.executable, "-m", "reconciler", *args], ukc.env())
    shown = b""
    deadline = time.monotonic() + timeout
    pending = list(keys)
    next_key = time.monotonic() + 10.0  # or as soon as the shell said something
    while time.monotonic() < deadline:
        if shown and len(pending) == len(keys):
            next_key = min(next_key, time.monotonic() + 0.5)
        if pending and time.monotonic() >= next_key:
            os.write(fd, pending.pop(0))
            next_key = time.monotonic() + 1.0
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the terminal's other end closed: ukc exited
                break
            if not chunk:
                break
            shown += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), shown


def test_ssh_gives_an_interactive_shell_in_the_workspace_and_its_exit_code(box: Ukc) -> None:
    code, shown = on_terminal(
        box,
        "ssh",
        "box",
        keys=[b"cat input.txt; echo $((6*7)); tty\r", b"exit 5\r"],
    )
    assert code == 5, shown
    assert b"from the spec dir" in shown and b"42" in shown
    assert b"/dev/pts/" in shown, "the shell runs on a pseudo-terminal"


def test_an_interactive_ssh_login_shows_no_error_about_login_records(box: Ukc) -> None:
    code, shown = on_terminal(box, "ssh", "box", keys=[b"exit 0\r"])
    assert code == 0, shown
    assert b"lastlog" not in shown and b"No such file" not in shown, shown


def test_ssh_runs_a_command_or_a_script_from_stdin_and_passes_their_exit_codes(
    box: Ukc,
) -> None:
    proc = box.run("ssh", "box", "--", "cat input.txt; exit 3")
    assert proc.returncode == 3 and proc.stdout == "from the spec dir\n", proc.stderr
    script = subprocess.run(
        [sys.executable, "-m", "reconciler", "ssh", "box"],
        cwd=box.project,
        env=box.env(),
        input="pwd\nexit 4\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert script.returncode == 4 and script.stdout.strip().endswith("/workspace")


def test_ssh_refuses_a_sandbox_presenting_another_host_key(box: Ukc) -> None:
    status_file = box.project / ".ukc" / "status.json"
    doc = json.loads(status_file.read_text())
    real = doc["sessions"]["box"]["instance"]["pin"]
    doc["sessions"]["box"]["instance"]["pin"] = "SHA256:" + "A" * 43
    status_file.write_text(json.dumps(doc))
    workspace = box.workspace(doc["sessions"]["box"]["instance"]["uuid"])
    for command in ("ssh", "exec"):
        proc = box.run(command, "box", "--", "touch /workspace/reached")
        assert proc.returncode == 1, proc.stderr
        assert f"host key {real} differs from the expected SHA256:AAA" in proc.stderr
        assert not (workspace / "reached").exists(), f"{command} reached a sandbox not pinned"


def test_a_session_never_applied_is_not_reached_and_the_error_says_to_apply(
    ukc: Ukc,
) -> None:
    ukc.write_spec("name: fresh\n")
    for command in (("ssh", "fresh"), ("exec", "fresh", "--", "true"), ("logs", "fresh")):
        proc = ukc.run(*command)
        assert proc.returncode == 2 and "run `ukc apply session.yaml` first" in proc.stderr
    proc = ukc.run("exec", "nosuch", "--", "true")
    assert proc.returncode == 2 and "known sessions: fresh" in proc.stderr


def test_exec_streams_output_passes_the_exit_code_and_masks_secrets(box: Ukc) -> None:
    proc = box.run("exec", "box", "--", 'echo "$GREETING $API_KEY"; pwd; echo oops >&2; exit 7')
    assert proc.returncode == 7
    assert proc.stdout == "hello ***\n/workspace\n" and proc.stderr == "oops\n"
    exact = box.run("exec", "box", "--", "printf", "%s|", "a b", "$HOME")
    assert exact.returncode == 0 and exact.stdout == "a b|$HOME|"


def test_exec_never_puts_the_secret_on_a_command_line(box: Ukc) -> None:
    with CmdlineWatch().running() as argv:
        proc = box.run("exec", "box", "--", 'sleep 2.417; test -n "$API_KEY" && echo set')
    assert proc.returncode == 0 and proc.stdout == "set\n"
    assert argv.saw("sleep 2.417"), "the scan saw the command run"
    assert not argv.saw(SECRET)


def test_exec_stops_at_its_timeout_with_124(box: Ukc) -> None:
    started = time.monotonic()
    proc = box.run("exec", "box", "--timeout", "1", "--", "echo begun; sleep 30")
    assert proc.returncode == 124 and proc.stdout == "begun\n"
    assert time.monotonic() - started < 20


def test_logs_shows_the_console_then_the_last_command_output_with_controls_escaped(
    box: Ukc,
) -> None:
    proc = box.run("logs", "box", check=0)
    head, _, commands = proc.stdout.partition("== command build (exit 0")
    assert head.startswith("== console of ukc-") and "state running" in head
    assert "from the spec dir" in commands
    assert "title\\x1b]0;pwned\\x07done" in commands
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout
    console_only = box.run("logs", "box", "--no-commands", "--lines", "2", check=0)
    assert "== command" not in console_only.stdout
    assert len(console_only.stdout.splitlines()) == 3


def test_ls_lists_sessions_across_projects_with_this_directorys_marked_ours(
    box: Ukc, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = Ukc(tmp_path_factory.mktemp("other"), box.metro, {})
    (other.project / "work").mkdir()
    other.write_spec("name: box\ndirectory: ./work\n")
    other.run("apply", "session.yaml", check=0)
    try:
        doc = json.loads(box.run("ls", "-o", "json", check=0).stdout)
        mine = [s for s in doc["sessions"] if s["here"]]
        theirs = [s for s in doc["sessions"] if s["name"] == "box" and not s["here"]]
        # a converged apply leaves the instance suspended (`suspend: true`)
        assert [(s["name"], s["ours"], s["state"]) for s in mine] == [("box", True, "standby")]
        assert 7000 < mine[0]["ttl_left_s"] <= 7200, "the ttl it was created with, counting down"
        assert any(not s["ours"] for s in theirs), "another checkout's session is not ours"
        text = box.run("ls", check=0).stdout.splitlines()
        assert text[0].split() == [
            "NAME",
            "PROJECT",
            "STATE",
            "AGE",
            "TTL",
            "LEFT",
            "OURS",
            "INSTANCE",
        ]
        assert any("(here)" in line and " 1h5" in line and " yes " in line for line in text[1:])
    finally:
        other.run("delete", "session.yaml", check=0)


def test_logs_follow_prints_what_the_console_gains_until_ctrl_c(box: Ukc) -> None:
    follower = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "logs", "box", "-F", "--no-commands"],
        cwd=box.project,
        env=box.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    shown: list[str] = []
    assert follower.stdout is not None
    reader = threading.Thread(target=lambda: shown.extend(follower.stdout or ()), daemon=True)
    reader.start()
    header = "== following the console (Ctrl-C stops) ==\n"

    def followed() -> str:
        return "".join(shown).partition(header)[2]

    try:
        assert eventually(lambda: header in "".join(shown), 60), "".join(shown)
        before = followed().count("Accepted publickey for root")
        box.run("exec", "box", "--", "true", check=0)  # its sshd logs a new login
        assert eventually(lambda: followed().count("Accepted publickey for root") > before, 60), (
            "".join(shown)
        )
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(timeout=30)
        reader.join(5)
    assert follower.returncode == 0, follower.stderr.read() if follower.stderr else ""


def test_a_runner_with_the_project_secret_reaches_the_session_after_its_own_apply(
    ukc: Ukc, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = {"UKC_PROJECT": f"reach-{os.getpid()}-{time.time_ns()}", "UKC_SESSION_SECRET": "f" * 32}
    ukc.extra_env.update(env)
    (ukc.project / "work").mkdir()
    ukc.write_spec("name: shared\ndirectory: ./work\ncommands: ['hostname > /tmp/h']\n")
    ukc.run("apply", "session.yaml", check=0)
    first = ukc.run("exec", "shared", "--", "cat /tmp/h", check=0).stdout
    clone = Ukc(tmp_path_factory.mktemp("clone"), ukc.metro, dict(env))
    (clone.project / "work").mkdir()
    clone.write_spec("name: shared\ndirectory: ./work\ncommands: ['hostname > /tmp/h']\n")
    assert "run `ukc apply session.yaml` first" in clone.run("exec", "shared", "--", "true").stderr
    clone.run("apply", "session.yaml", check=0)
    assert clone.run("exec", "shared", "--", "cat /tmp/h", check=0).stdout == first


def test_a_session_past_its_ttl_is_not_reached_and_the_error_says_how_to_keep_it(
    ukc: Ukc,
) -> None:
    (ukc.project / "work").mkdir()
    # autokill off: the platform would reclaim the idle instance once down for the ttl
    ukc.write_spec("name: brief\ndirectory: ./work\nttl: 10s\nautokill: off\n")
    ukc.run("apply", "session.yaml", check=0)
    created = ukc.status()["sessions"]["brief"]["instance"]["created_at"]
    expiry = datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp() + 10
    time.sleep(max(0.0, expiry - time.time()) + 0.5)
    proc = ukc.run("exec", "brief", "--", "touch /workspace/late")
    assert proc.returncode == 2 and "session 'brief' expired at" in proc.stderr
    assert "raise `ttl` in the spec to keep it" in proc.stderr
    uuid = ukc.status()["sessions"]["brief"]["instance"]["uuid"]
    assert not (ukc.workspace(uuid) / "late").exists()


def interrupted(box: Ukc, verb: str, marker: str) -> tuple[int, str, str]:
    """`ukc VERB box -- CMD` (no terminal) interrupted by Ctrl-C once CMD is up: its exit code,
    its stderr, and what CMD's TERM trap left in /workspace/MARKER."""
    running = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "reconciler",
            verb,
            "box",
            "--",
            f"trap 'echo stopped > /workspace/{marker}; exit 143' TERM; echo up; sleep 60 & wait",
        ],
        cwd=box.project,
        env=box.env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert running.stdout is not None
    assert running.stdout.readline() == "up\n"
    running.send_signal(signal.SIGINT)
    _, err = running.communicate(timeout=60)
    uuid = box.status()["sessions"]["box"]["instance"]["uuid"]
    left = box.workspace(uuid) / marker
    return running.returncode, err, left.read_text() if left.exists() else ""


def test_ctrl_c_stops_the_command_exec_runs_with_a_signal_and_exits_130(box: Ukc) -> None:
    code, err, trapped = interrupted(box, "exec", "stopped")
    assert code == 130, err
    assert "interrupt: stopping the command in session box" in err
    assert trapped == "stopped\n"


def test_ctrl_c_stops_a_command_ssh_runs_without_a_terminal_and_exits_130(box: Ukc) -> None:
    # without a terminal, closing the channel does not stop the remote command: sshd only
    # closes its pipes, and a silent command would keep running in the sandbox
    code, err, trapped = interrupted(box, "ssh", "ssh-stopped")
    assert code == 130, err
    assert "interrupt: stopping the command in session box" in err
    assert trapped == "stopped\n"
    # the shell and its sleep are gone, and the pid record with them
    left = box.run("exec", "box", "--", "ls /tmp/.ukc-stop-* 2>/dev/null | wc -l").stdout
    assert left.strip() == "0"


def test_logs_of_a_session_whose_instance_is_gone_still_shows_its_commands_output(
    box: Ukc,
) -> None:
    name = box.status()["sessions"]["box"]["instance"]["name"]
    with box.api() as client:
        client.request("DELETE", "/v1/instances", json=[{"name": name}])
    proc = box.run("logs", "box", check=0)
    assert "warning: no console: session 'box': instance" in proc.stderr
    assert "gone from metro local" in proc.stderr
    assert "== command build (exit 0" in proc.stdout and "from the spec dir" in proc.stdout
    gone = box.run("exec", "box", "--", "true")
    assert gone.returncode == 2 and "run `ukc apply session.yaml` to create it again" in gone.stderr
