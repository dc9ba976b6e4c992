"""TTL end to end on the local metro: `status` and `plan` show an expired session (and change
nothing), `apply` deletes it, raising `ttl` renews it, and `watch` deletes it on a timer."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest

from tests.support.ukc import Ukc

pytestmark = pytest.mark.metro

# why autokill off: these pin down ukc's own ttl; by default the platform's autokill would
# also reclaim the idle (suspended) instance once down for the ttl (tests/e2e/test_platform_use)
SPEC = """\
name: short
directory: ./work
commands: ["echo hi"]
ttl: {ttl}
autokill: off
"""


def _session(ukc: Ukc) -> dict[str, Any]:
    return ukc.status()["sessions"]["short"]  # type: ignore[no-any-return]


def _names(ukc: Ukc) -> list[str]:
    return [i["name"] for i in ukc.instances()]


def test_status_and_plan_show_an_expired_session_apply_deletes_it_and_a_longer_ttl_renews(
    ukc: Ukc,
) -> None:
    (ukc.project / "work").mkdir()
    ukc.write_spec(SPEC.format(ttl="2s"))
    ukc.run("apply", "session.yaml", check=0)
    name = _session(ukc)["instance"]["name"]
    time.sleep(2.5)

    shown = ukc.run("status", "session.yaml", check=0)
    assert "Expired" in shown.stdout and "`ukc apply`" in shown.stdout, shown.stdout
    plan = ukc.run("plan", "session.yaml", "--detailed-exitcode", check=2)
    assert "session short: Expired: its ttl of 2s passed at" in plan.stdout, plan.stdout
    assert f"- delete instance {name}" in plan.stdout, plan.stdout
    # both only looked
    assert _session(ukc)["phase"] == "Ready" and name in _names(ukc)

    ukc.run("apply", "session.yaml", check=0)
    assert _session(ukc)["phase"] == "Expired" and name not in _names(ukc)
    plan = ukc.run("plan", "session.yaml", "--detailed-exitcode", check=0)
    assert "change the spec (e.g. raise `ttl`)" in plan.stdout, plan.stdout

    ukc.write_spec(SPEC.format(ttl="1h"))
    ukc.run("apply", "session.yaml", check=0)
    assert _session(ukc)["phase"] == "Ready" and name in _names(ukc)
    assert "Expired" not in ukc.run("status", "session.yaml", check=0).stdout


def test_watch_deletes_a_session_when_its_ttl_passes_not_at_the_next_resync(ukc: Ukc) -> None:
    (ukc.project / "work").mkdir()
    ukc.write_spec(SPEC.format(ttl="4s"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "watch", "session.yaml", "--resync", "600"],
        cwd=ukc.project,
        env=ukc.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        name = ""
        while time.monotonic() < deadline and not name:
            try:
                if _session(ukc)["phase"] == "Ready":
                    name = _session(ukc)["instance"]["name"]
            except (FileNotFoundError, KeyError, ValueError):
                pass
            time.sleep(0.1)
        assert name, "watch never converged"
        expires = _session(ukc)["expires_at"]
        # the ttl is 4 s; the resync is 10 minutes away: only the timer can delete it now
        # why both: the platform shows the instance gone (deleting) before the delete returns
        # and the status file records it
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            name in _names(ukc) or _session(ukc)["phase"] != "Expired"
        ):
            time.sleep(0.2)
        assert name not in _names(ukc), f"not deleted by {expires}"
        assert _session(ukc)["phase"] == "Expired"
    finally:
        proc.send_signal(2)
        out, _ = proc.communicate(timeout=60)
    assert "ttl passed: deleting the session" in out, out
