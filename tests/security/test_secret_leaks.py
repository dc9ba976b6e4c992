"""Secrets against the whole flow: a command that prints its secret in every way it can.

The attacker here is the sandbox: a session command receives a `secret_env` value and prints
it whole, split over writes, byte by byte, encoded, in an error, in a command that times out,
through `exec: http`. `ukc` must show and store none of it, in any form, anywhere: terminal,
status file, `.ukc/`, the metro's state and logs, the warm process's directory, and the
command line of any process on the host while the commands run.
"""

from __future__ import annotations

import base64
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.support.canary import Canaries, assert_nowhere
from tests.support.cmdlines import CmdlineWatch
from tests.support.ukc import Ukc

#: the sandbox prints the value of SECRET (from the controller's CANARY_SECRET)
SECRET_ENV = "secret_env: {SECRET: CANARY_SECRET}\n"

# why python3 in the sandbox: each os.write is one write, whatever the shell buffers
BYTE_BY_BYTE = (
    "python3 -c 'import os, time\n"
    's = os.environ["SECRET"].encode()\n'
    "for i in range(len(s)):\n"
    "    os.write(1, s[i:i + 1]); os.write(2, s[i:i + 1]); time.sleep(0.005)\n"
    'os.write(1, b"\\n"); os.write(2, b"\\n")\''
)
TWO_WRITES = (
    'printf \'two writes: %s\' "$(printf %s "$SECRET" | cut -c1-12)"; sleep 0.5; '
    'printf \'%s\\n\' "$(printf %s "$SECRET" | cut -c13-)"'
)
ENCODED = (
    'printf %s "$SECRET" | base64; '
    "printf 'a%s' \"$SECRET\" | base64; "
    "printf 'ab%s' \"$SECRET\" | base64 | tr '+/' '-_'; "
    "printf %s \"$SECRET\" | od -An -tx1 | tr -d ' \\n'; echo; "
    "printf %s \"$SECRET\" | od -An -tx1 | tr -d ' \\n' | tr a-f A-F; echo; "
    'python3 -c \'import os, urllib.parse as u; print(u.quote(os.environ["SECRET"], safe=""))\''
)


def command(name: str, run: str, timeout: str = "") -> str:
    line = f"  - name: {name}\n    run: {json.dumps(run)}\n"
    return line + (f"    timeout: {timeout}\n" if timeout else "")


def session(name: str, *commands: str, extra: str = "") -> str:
    return f"name: {name}\ndirectory: ./work\n{SECRET_ENV}{extra}commands:\n" + "".join(commands)


def on_terminal(ukc: Ukc, *args: str, timeout: float = 240) -> tuple[int, str]:
    """Run `ukc` with a pseudo-terminal as stdout and stderr: what a user's terminal shows."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", *args],
        cwd=ukc.project,
        env={**ukc.env(), "TERM": "xterm", "COLUMNS": "120", "LINES": "40"},
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    shown = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: every writer is gone
            break
        if not data:
            break
        shown += data
    os.close(leader)
    code = proc.wait(timeout=30)
    return code, shown.decode("utf-8", "replace")


def state_files(ukc: Ukc, own_uuids: set[str]) -> list[Path]:
    """The metro's state and logs; of the sandboxes' workspaces only this test's own."""
    state = ukc.metro.state_dir
    paths = [p for p in state.iterdir() if p.name != "workspaces"]
    return paths + [state / "workspaces" / uuid for uuid in own_uuids]


def uuids(ukc: Ukc) -> set[str]:
    found = set()
    for rec in ukc.status()["sessions"].values():
        inst = rec.get("instance") or {}
        if inst.get("uuid"):
            found.add(inst["uuid"])
    return found


@pytest.fixture
def leaky(ukc: Ukc, canaries: Canaries) -> Ukc:
    ukc.extra_env.update(UKC_TOKEN=canaries.token, CANARY_SECRET=canaries.secret)
    (ukc.project / "work").mkdir()
    (ukc.project / "work" / "input.txt").write_text("nothing secret here\n")
    return ukc


def test_a_secret_printed_in_two_writes_half_a_second_apart_never_reaches_the_terminal(
    leaky: Ukc, canaries: Canaries
) -> None:
    leaky.write_spec(session("split", command("two-writes", TWO_WRITES)))
    code, shown = on_terminal(leaky, "apply")
    assert code == 0, shown
    assert "two writes: ***" in shown
    assert_nowhere(canaries, texts=[shown], paths=[leaky.project])


def test_base64_hex_and_url_encoded_forms_of_a_secret_are_masked(
    leaky: Ukc, canaries: Canaries
) -> None:
    # a value with characters URL encoding changes, so that form differs from the value
    odd = Canaries(canaries.token, canaries.secret + "/?&= +")
    leaky.extra_env["CANARY_SECRET"] = odd.secret
    leaky.write_spec(session("encoded", command("encoded", ENCODED)))
    done = leaky.run("apply", check=0)
    lines = [line for line in done.stdout.splitlines() if line.startswith("[encoded] |")]
    assert len(lines) == 6 and all("***" in line for line in lines), done.stdout
    assert_nowhere(odd, texts=[done.stdout, done.stderr], paths=[leaky.project])
    raw = odd.secret.encode()
    for form in (raw.hex(), base64.b64encode(raw).decode()[:-4], urllib.parse.quote(odd.secret)):
        assert form not in done.stdout


def test_a_two_character_secret_is_masked_and_validate_warns_about_it(leaky: Ukc) -> None:
    leaky.extra_env["CANARY_SECRET"] = "Qz"
    leaky.write_spec(session("tiny", command("tiny", 'echo "[$SECRET]"; echo "<$SECRET>" >&2')))
    checked = leaky.run("validate", check=0)
    (warning,) = [line for line in checked.stderr.splitlines() if "warning" in line]
    assert "SECRET" in warning and "CANARY_SECRET" in warning and "Qz" not in warning
    done = leaky.run("apply", check=0)
    assert "[tiny] | [***]" in done.stdout and "[tiny] ! <***>" in done.stdout
    assert "Qz" not in done.stdout + done.stderr
    (record,) = leaky.status()["sessions"]["tiny"]["commands"]
    assert record["stdout"] == "[***]\n" and record["stderr"] == "<***>\n"
    for path in (leaky.project / ".ukc").rglob("*"):
        if path.is_file() and "keys" not in path.parts:
            assert b"[Qz]" not in path.read_bytes() and b"<Qz>" not in path.read_bytes()


def test_a_file_named_after_the_secret_is_masked_in_what_sync_back_reports(
    leaky: Ukc, canaries: Canaries
) -> None:
    # a name sync-back refuses (a control character in it): reported, so it must be masked
    leaky.write_spec(
        session(
            "names",
            command("name", "mkdir -p out && touch \"out/$SECRET$(printf '\\001')\""),
            extra="sync: {back: [out/]}\n",
        )
    )
    done = leaky.run("apply", check=0)
    assert "[names] refused from sandbox: out/***" in done.stdout, done.stdout
    (refused,) = leaky.status()["sessions"]["names"]["sync"]["rejected"]
    assert refused.startswith("out/***")
    assert_nowhere(canaries, texts=[done.stdout, done.stderr], paths=[leaky.project / ".ukc"])


def test_a_canary_secret_printed_every_way_reaches_no_output_file_log_or_argv(
    leaky: Ukc, canaries: Canaries, warm_dir: Path
) -> None:
    leaky.write_spec(
        "---\n".join(
            [
                session(
                    "leaks",
                    command("whole", 'echo "whole: $SECRET"; echo "to stderr: $SECRET" >&2'),
                    command("two-writes", TWO_WRITES),
                    command("byte-by-byte", BYTE_BY_BYTE),
                    command("encoded", ENCODED),
                    command("running", 'echo "running with $SECRET"; sleep 2.718'),
                ),
                session(
                    "fails",
                    command("fail", 'echo "fatal: credential $SECRET rejected" >&2; exit 3'),
                ),
                session(
                    "stuck",
                    command(
                        "stuck",
                        'echo "stuck with $SECRET"; printf %s "$SECRET"; sleep 60',
                        timeout="3s",
                    ),
                ),
                session(
                    "viahttp",
                    command("http", 'echo "http: $SECRET"; echo "$SECRET" >&2; sleep 2.719'),
                    command("http-encoded", ENCODED),
                    extra="exec: http\n",
                ),
            ]
        ),
        name="sessions.yaml",
    )
    leaky.write_spec(session("watched", command("two-writes", TWO_WRITES)), name="watched.yaml")
    texts: list[str] = []

    def run(*args: str, check: int | None) -> subprocess.CompletedProcess[str]:
        done = leaky.run(*args, check=check, timeout=300)
        texts.extend([done.stdout, done.stderr])
        return done

    run("validate", "sessions.yaml", check=0)
    run("plan", "sessions.yaml", check=0)
    with CmdlineWatch().running() as argv:
        applied = run("apply", "sessions.yaml", check=1)
    # the scan overlapped both sleeping commands (ssh and http), so it saw what ran then
    assert argv.saw("sleep 2.718") and argv.saw("sleep 2.719")
    assert "[leaks] | whole: ***" in applied.stdout
    assert "[leaks] | two writes: ***" in applied.stdout
    assert "[viahttp] | http: ***" in applied.stdout
    assert "[fails] ! fatal: credential *** rejected" in applied.stdout
    sessions = leaky.status()["sessions"]
    assert [c["exit_code"] for c in sessions["leaks"]["commands"]] == [0] * 5
    assert [c["exit_code"] for c in sessions["viahttp"]["commands"]] == [0, 0]
    assert sessions["fails"]["commands"][0]["exit_code"] == 3
    assert sessions["stuck"]["commands"][0]["timed_out"] is True
    own = uuids(leaky)

    run("status", "sessions.yaml", check=0)
    run("status", "sessions.yaml", "--output", "json", check=0)
    run("plan", "sessions.yaml", "--output", "json", check=0)
    run("apply", "sessions.yaml", "--output", "json", check=1)  # the failed ones run again

    watcher = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "watch", "watched.yaml", "--down"],
        cwd=leaky.project,
        env=leaky.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    watched: list[str] = []
    reader = threading.Thread(
        target=lambda: watched.extend(watcher.stdout or ()),
        daemon=True,
    )
    reader.start()
    deadline = time.monotonic() + 180
    while not any(re.search(r"\] pass \d+ done", line) for line in list(watched)):
        assert watcher.poll() is None, "".join(watched)
        assert time.monotonic() < deadline, "".join(watched)
        time.sleep(0.1)
    own |= uuids(leaky)
    watcher.send_signal(signal.SIGINT)
    assert watcher.wait(timeout=120) == 0
    reader.join(10)
    texts.append("".join(watched))
    assert "[watched] | two writes: ***" in texts[-1]

    assert_nowhere(canaries, texts=texts)  # what ukc printed
    assert_nowhere(canaries, texts=sorted(argv.seen))  # host command lines
    assert_nowhere(canaries, paths=[leaky.project, warm_dir, *state_files(leaky, own)])
    run("delete", "sessions.yaml", check=0)
    assert_nowhere(canaries, texts=texts[-2:], paths=[leaky.project])
