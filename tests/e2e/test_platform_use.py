"""What ukc takes from the platform, end to end on the local metro: the platform's autokill
reclaims a session nobody runs ukc for any more, a converged apply leaves its instance
suspended (the next one wakes it with /workspace intact), `watch` does not, and a fan-out the
account's quota cannot hold is refused before anything is created."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.ukc import Ukc

pytestmark = pytest.mark.metro


def _session(ukc: Ukc, name: str) -> dict[str, Any]:
    return ukc.status()["sessions"][name]  # type: ignore[no-any-return]


def _instance(ukc: Ukc, name: str) -> dict[str, Any] | None:
    return next((i for i in ukc.instances() if i["name"] == name), None)


def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not within {timeout}s"
        time.sleep(0.1)


def test_a_session_whose_controller_died_is_reclaimed_by_autokill_and_made_anew_saying_why(
    ukc: Ukc,
) -> None:
    (ukc.project / "work").mkdir()
    ukc.write_spec("name: idle\ndirectory: ./work\ncommands: ['echo hi > hi.txt']\nautokill: 1s\n")
    ukc.run("apply", "session.yaml", check=0)
    first = _session(ukc, "idle")["instance"]
    made = _instance(ukc, first["name"])
    assert made is not None and made["autokill"] == {"time_ms": 1000}
    # the controller "dies": no ukc runs; the suspended instance is down for 1 s
    _until(lambda: _instance(ukc, first["name"]) is None, 20, "the platform's reclaim")

    plan = ukc.run("plan", "session.yaml", check=0).stdout
    assert "reclaimed by the platform (autokill: deleted once down for 1s)" in plan, plan
    ukc.run("apply", "session.yaml", check=0)
    again = _session(ukc, "idle")
    assert again["instance"]["uuid"] != first["uuid"] and again["phase"] == "Ready"
    (created,) = [c for c in again["conditions"] if c["type"] == "InstanceCreated"]
    assert "autokill" in created["message"], created


def test_apply_leaves_the_instance_suspended_and_the_next_apply_wakes_it_with_workspace_intact(
    ukc: Ukc,
) -> None:
    work = ukc.project / "work"
    work.mkdir()
    (work / "in.txt").write_text("one\n")
    ukc.write_spec(
        """\
        name: nap
        directory: ./work
        commands:
          - name: setup
            run: od -An -N8 -tx8 /dev/urandom | tr -d ' ' > mark.txt
            inputs: []
          - name: show
            run: mkdir -p out && cat mark.txt in.txt > out/seen.txt
            inputs: ["in.txt"]
        sync:
          back: ["out/"]
        """
    )
    plan = ukc.run("plan", "session.yaml", check=0).stdout
    assert "then: suspend 1 instance(s) once converged (nap;" in plan, plan
    ukc.run("apply", "session.yaml", check=0)
    rec = _session(ukc, "nap")
    name, boots = rec["instance"]["name"], rec["instance"]["start_count"]
    mark = (work / "out" / "seen.txt").read_text().splitlines()[0]
    inst = _instance(ukc, name)
    assert inst is not None and inst["state"] == "standby", inst
    assert rec["instance"]["state"] == "standby"

    (work / "in.txt").write_text("two\n")
    out = ukc.run("apply", "session.yaml", check=0)
    seen = (work / "out" / "seen.txt").read_text().splitlines()
    assert seen == [mark, "two"], "the command found /workspace as the first apply left it"
    rec = _session(ukc, "nap")
    assert [c["skipped"] for c in rec["commands"]] == [True, False], out.stderr
    # the wake may move start_count (the metro's `wake_moves_start_count`): the boot
    # marker told it from a cold boot, so nothing was sent in full or run again
    assert rec["instance"]["start_count"] >= boots
    assert "full sync" not in out.stdout and "boot marker intact" in out.stdout, out.stdout
    inst = _instance(ukc, name)
    assert inst is not None and inst["state"] == "standby"

    # `ukc exec` reaches a suspended session too (a start wakes it)
    shown = ukc.run("exec", "nap", "--", "cat mark.txt", check=0).stdout
    assert shown.strip() == mark


def test_a_session_that_says_suspend_false_stays_up_after_apply(ukc: Ukc) -> None:
    (ukc.project / "work").mkdir()
    ukc.write_spec("name: awake\ndirectory: ./work\ncommands: ['true']\nsuspend: false\n")
    plan = ukc.run("plan", "session.yaml", check=0).stdout
    assert "then: suspend" not in plan
    ukc.run("apply", "session.yaml", check=0)
    inst = _instance(ukc, _session(ukc, "awake")["instance"]["name"])
    # a session's scale-to-zero cooldown is 5 s: right after apply it still runs
    assert inst is not None and inst["state"] == "running", inst


def test_watch_does_not_suspend_the_sessions_it_watches(ukc: Ukc) -> None:
    (ukc.project / "work").mkdir()
    ukc.write_spec("name: watched\ndirectory: ./work\ncommands: ['true']\n")
    watch = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "watch", "session.yaml", "--resync", "600"],
        cwd=ukc.project,
        env=ukc.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def ready() -> bool:
            try:
                return _session(ukc, "watched")["phase"] == "Ready"
            except (FileNotFoundError, KeyError, ValueError):
                return False

        _until(ready, 60, "the first pass")
        inst = _instance(ukc, _session(ukc, "watched")["instance"]["name"])
        # a session's scale-to-zero cooldown is 5 s: right after the pass it still runs
        assert inst is not None and inst["state"] == "running", inst
    finally:
        watch.send_signal(signal.SIGINT)
        out, _ = watch.communicate(timeout=60)
    assert "suspended instance" not in out, out


QUOTA_SPEC = "".join(
    f"{'---' if i else ''}\nname: fan{i}\ndirectory: ./work\nmemory_mb: 256\n" for i in range(3)
)


def test_a_fan_out_past_the_instance_quota_is_refused_before_anything_is_created(
    ukc: Ukc,
) -> None:
    (ukc.project / "work").mkdir()
    ukc.write_spec(QUOTA_SPEC)
    with ukc.api() as client:
        used = client.get("/v1/users/quotas").json()["data"]["quotas"][0]["used"]["instances"]
        client.post("/_local/quotas", json={"instances": used + 2}).raise_for_status()
        try:
            plan = ukc.run("plan", "session.yaml", check=0)
            assert "apply would refuse:" in plan.stdout + plan.stderr
            proc = ukc.run("apply", "session.yaml", check=1)
            assert "3 instance(s), 2 left" in proc.stderr, proc.stderr
            assert "Nothing was created" in proc.stderr
            mine = [i for i in ukc.instances() if i["name"].split("-")[-1].startswith("fan")]
            assert mine == []
        finally:
            client.post("/_local/quotas", json={"instances": 5000}).raise_for_status()
    ukc.run("apply", "session.yaml", check=0)
