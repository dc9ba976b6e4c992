"""The command line as a new user meets it, end to end on the local metro: a status CI can
read, errors that name what exists, and an empty spec set that creates nothing."""

from __future__ import annotations

import json
import time

import pytest

from tests.support.ukc import Ukc

pytestmark = pytest.mark.metro

TWO = """\
name: calc
directory: ./work
ttl: 2h
commands:
  - name: test
    run: "true"
---
name: other
directory: ./work
commands: ["true"]
"""


def two_sessions(ukc: Ukc) -> None:
    (ukc.project / "work").mkdir()
    ukc.write_spec(TWO, "calc.yaml")
    ukc.write_spec("name: solo\ndirectory: ./work\ncommands: ['exit 4']\n", "solo.yaml")


def test_status_of_one_spec_file_shows_its_sessions_under_headers_with_age_and_ttl(
    ukc: Ukc,
) -> None:
    two_sessions(ukc)
    ukc.run("apply", "calc.yaml", check=0)
    text = ukc.run("status", "calc.yaml", check=0).stdout.splitlines()
    assert text[0].split() == ["NAME", "PHASE", "AGE", "TTL", "LEFT", "LAST", "APPLY", "INSTANCE"]
    rows = {line.split()[0]: line.split() for line in text[1:] if not line.startswith(" ")}
    assert set(rows) == {"calc", "other"}, "solo.yaml's session is not asked for"
    assert rows["calc"][1] == "Ready" and rows["calc"][3].startswith(("1h5", "2h00m"))
    assert rows["other"][3] == "-", "no ttl, no TTL left"
    one = ukc.run("status", "calc.yaml", "--session", "other", "-o", "json", check=0)
    doc = json.loads(one.stdout)
    assert [s["name"] for s in doc["sessions"]] == ["other"]
    assert doc["sessions"][0]["age_s"] is not None and doc["sessions"][0]["age_s"] >= 0


def test_every_apply_records_when_it_ran(ukc: Ukc) -> None:
    two_sessions(ukc)
    ukc.run("apply", "calc.yaml", check=0)
    first = ukc.status()["sessions"]["calc"]["last_applied_at"]
    assert first is not None
    time.sleep(1.1)
    ukc.run("apply", "calc.yaml", check=0)  # nothing to do: still an apply
    assert ukc.status()["sessions"]["calc"]["last_applied_at"] > first


def test_status_exit_code_says_ready_failed_or_not_yet(ukc: Ukc) -> None:
    two_sessions(ukc)
    assert ukc.run("status", "calc.yaml", "--exit-code").returncode == 3  # never applied
    ukc.run("apply", "calc.yaml", check=0)
    ukc.run("status", "calc.yaml", "--exit-code", check=0)
    ukc.run("apply", "solo.yaml", check=1)
    ukc.run("status", ".", "--exit-code", check=1)
    assert ukc.run("status", "solo.yaml").returncode == 0, "without --exit-code: 0"


@pytest.mark.parametrize("command", ["apply", "status", "delete"])
def test_a_session_option_naming_no_session_is_an_error_naming_the_known_ones(
    ukc: Ukc, command: str
) -> None:
    two_sessions(ukc)
    proc = ukc.run(command, "calc.yaml", "--session", "nosuch")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no session 'nosuch'" in proc.stderr and "known sessions: calc, other" in proc.stderr
    assert not (ukc.project / ".ukc").exists()


@pytest.mark.parametrize("command", ["apply", "plan", "status", "delete", "validate", "watch"])
def test_an_empty_spec_directory_is_an_error_and_creates_nothing(ukc: Ukc, command: str) -> None:
    (ukc.project / "specs").mkdir()
    proc = ukc.run(command, "specs")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no session specs in specs" in proc.stderr
    assert not (ukc.project / "specs" / ".ukc").exists()


def test_an_unknown_metro_is_reported_as_unknown_with_the_known_codes(ukc: Ukc) -> None:
    ukc.write_spec("name: red\nmetro: mars\n")
    for command in ("validate", "plan", "apply"):
        proc = ukc.run(command, "session.yaml")
        assert proc.returncode == 2
        assert "session.yaml:2: metro: unknown metro 'mars'" in proc.stderr, proc.stderr
        assert "fra, dal" in proc.stderr
        assert "no image" not in proc.stderr and "token" not in proc.stderr
