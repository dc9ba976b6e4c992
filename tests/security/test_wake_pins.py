"""A session left suspended is woken by `ukc exec`/`ukc ssh`, and a wake may move
`start_count`: the woken sandbox is then held to the host key recorded for the instance. An
instance that instead came back from a cold boot (someone stopped and started it: new host
keys, an empty /workspace) is not reached and its new key is not learnt."""

from __future__ import annotations

import time

import pytest

from tests.support.ukc import Ukc

pytestmark = pytest.mark.metro


def test_a_sandbox_cold_booted_behind_a_suspended_session_is_not_reached_by_exec(
    ukc: Ukc,
) -> None:
    (ukc.project / "work").mkdir()
    ukc.write_spec("name: napper\ndirectory: ./work\ncommands: ['true']\n")
    ukc.run("apply", "session.yaml", check=0)
    rec = ukc.status()["sessions"]["napper"]["instance"]
    # the attacker (anyone with the account's token) cold-boots the instance: a stop and a
    # start give it new host keys while ukc's record still names the old boot
    with ukc.api() as client:
        client.put("/v1/instances/stop", json=[{"uuid": rec["uuid"]}]).raise_for_status()
        client.request(
            "GET",
            "/v1/instances/wait",
            json=[{"uuid": rec["uuid"], "state": "stopped", "timeout_s": 30}],
        ).raise_for_status()
        client.put(
            "/v1/instances/start", json=[{"uuid": rec["uuid"], "timeout_s": 30}]
        ).raise_for_status()
    time.sleep(1.0)  # sshd and its new key are up
    proc = ukc.run("exec", "napper", "--", "touch /workspace/reached")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "differs from the expected" in proc.stderr, proc.stderr
    assert not (ukc.workspace(rec["uuid"]) / "reached").exists()
    after = ukc.status()["sessions"]["napper"]["instance"]
    assert after["pin"] == rec["pin"], "no new host key was learnt"
