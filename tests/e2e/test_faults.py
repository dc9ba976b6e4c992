"""`ukc apply` against a misbehaving cloud and a hostile sandbox (local metro fault knobs)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ukc import Ukc

pytestmark = pytest.mark.metro

SPEC = """\
name: flaky
directory: ./work
commands:
  - name: make
    run: mkdir -p out && cp input.txt out/result.txt
sync:
  back: ["out/"]
"""


@pytest.fixture
def faults(ukc: Ukc) -> Iterator[Ukc]:
    yield ukc
    with ukc.api() as client:
        client.post("/_local/faults", json={"reset": True})


def set_faults(ukc: Ukc, body: dict) -> None:  # type: ignore[type-arg]
    with ukc.api() as client:
        client.post("/_local/faults", json=body).raise_for_status()


def make_project(ukc: Ukc, spec: str = SPEC) -> None:
    (ukc.project / "work").mkdir()
    (ukc.project / "work" / "input.txt").write_text("data\n")
    ukc.write_spec(spec)


def session(ukc: Ukc) -> dict:  # type: ignore[type-arg]
    return ukc.status()["sessions"]["flaky"]  # type: ignore[no-any-return]


def test_rate_limits_and_server_errors_are_retried_and_apply_still_converges(faults: Ukc) -> None:
    make_project(faults)
    set_faults(faults, {"rate_limit": {"count": 2, "retry_after": 1}})
    started = time.monotonic()
    faults.run("apply", "session.yaml", check=0)
    assert time.monotonic() - started >= 1.0, "Retry-After was not honoured"
    set_faults(faults, {"server_error": {"count": 2, "status": 503}})
    (faults.project / "work" / "input.txt").write_text("data 2\n")
    faults.run("apply", "session.yaml", check=0)
    assert session(faults)["phase"] == "Ready"
    assert (faults.project / "work" / "out" / "result.txt").read_text() == "data 2\n"


def test_a_list_that_lags_behind_the_create_never_makes_a_duplicate(faults: Ukc) -> None:
    make_project(faults)
    set_faults(faults, {"list_lag": {"count": 3}})
    faults.run("apply", "session.yaml", check=0)
    # The next apply's list still hides the instance: it plans a create, gets "name taken"
    # and adopts the instance it owns.
    faults.run("apply", "session.yaml", check=0)
    name = session(faults)["instance"]["name"]
    assert [i["name"] for i in faults.instances()].count(name) == 1
    assert session(faults)["phase"] == "Ready"


def test_a_persistent_outage_is_one_clear_line_and_exit_1(faults: Ukc) -> None:
    make_project(faults)
    set_faults(faults, {"server_error": {"count": 1000, "status": 502}})
    proc = faults.run("plan", "session.yaml", timeout=400)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "502" in lines[0], proc.stderr
    assert faults.metro.token not in proc.stderr


def test_ttl_expiry_deletes_the_session_and_it_stays_deleted(ukc: Ukc) -> None:
    make_project(ukc, SPEC + "ttl: 2s\n")
    ukc.run("apply", "session.yaml", check=0)
    name = session(ukc)["instance"]["name"]
    assert session(ukc)["expires_at"]
    time.sleep(2.5)
    ukc.run("apply", "session.yaml", check=0)
    assert session(ukc)["phase"] == "Expired"
    assert name not in [i["name"] for i in ukc.instances()]
    ukc.run("apply", "session.yaml", check=0)
    assert name not in [i["name"] for i in ukc.instances()], "an expired session came back"


def test_a_hostile_sandbox_cannot_write_outside_the_directory_on_sync_back(ukc: Ukc) -> None:
    victim = ukc.project / "victim.txt"
    victim.write_text("precious\n")
    evil = f"""\
name: flaky
directory: ./work
commands:
  - name: evil
    run: |
      mkdir -p out/sub && echo ok > out/fine.txt
      ln -s {victim} out/link-to-victim
      ln -s /etc out/etc-dir
      mkfifo out/pipe
      printf 'x' > "out/bad$(printf '\\033')name"
sync:
  back: ["out/"]
"""
    make_project(ukc, evil)
    before = {
        p: p.read_bytes() for p in ukc.project.rglob("*") if p.is_file() and ".ukc" not in p.parts
    }
    proc = ukc.run("apply", "session.yaml", check=0)
    assert (ukc.project / "work" / "out" / "fine.txt").read_text() == "ok\n"
    assert victim.read_text() == "precious\n"
    out = ukc.project / "work" / "out"
    assert not (out / "link-to-victim").exists() and not (out / "link-to-victim").is_symlink()
    assert not (out / "etc-dir").exists() and not (out / "pipe").exists()
    rejected = session(ukc)["sync"]["rejected"]
    assert len(rejected) >= 3, rejected
    assert "refused from sandbox" in proc.stdout
    for path, data in before.items():
        assert path.read_bytes() == data
    raw_status = (ukc.project / ".ukc" / "status.json").read_text()
    assert "\x1b" not in proc.stdout and "\\u001b" not in raw_status
    assert os.path.exists(Path("/etc/passwd"))
