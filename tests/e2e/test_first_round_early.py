"""Sessions whose instances are made in one apply: each session's first round (its own look,
its plan, its sync and commands) starts as soon as its own instance is up, not once every
instance made ahead is (an apply in this process, against the test metro; one session's
boot is held by a reporter, so the order is forced, not timed)."""

from __future__ import annotations

import threading

import pytest

from reconciler.cloud.metros import MetroRegistry
from reconciler.reconcile.desired import Group, load_groups
from reconciler.reconcile.events import Event, RecordingReporter
from reconciler.reconcile.loop import apply_group, delete_group
from tests.support.ukc import Ukc

pytestmark = pytest.mark.metro

#: how long a held session waits for the other one before it goes on regardless
HOLD_S = 20.0


def _group(ukc: Ukc, env: dict[str, str], slow_image: str = "") -> Group:
    """Sessions `quick` and `slow`, a few files and one command each; `slow_image`: the
    image `slow` asks for (one the metro does not have fails its create)."""
    docs = []
    for name in ("quick", "slow"):
        tree = ukc.project / name
        tree.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            (tree / f"f{i}.txt").write_text(f"{name} {i}\n")
        image = f"image: {slow_image}\n" if name == "slow" and slow_image else ""
        docs.append(f"name: {name}\ndirectory: ./{name}\ncommands: ['cat *.txt | wc -l']\n{image}")
    spec = ukc.write_spec("---\n".join(docs), "fan.yaml")
    return load_groups([spec], env)[0]


class HeldSlow(RecordingReporter):
    """Holds session `slow` at the event `hold(event)` picks (on its own worker thread) until
    session `quick` starts its command, or `HOLD_S`; `quick_first` says which ended it."""

    def __init__(self, hold: str) -> None:
        super().__init__()
        self.hold = hold
        self.quick_ran = threading.Event()
        self.quick_first: bool | None = None

    def event(self, event: Event) -> None:
        super().event(event)
        if (
            event.session == "quick"
            and event.kind == "action"
            and event.text.startswith("run command")
        ):
            self.quick_ran.set()
        if (
            event.session == "slow"
            and self.quick_first is None
            and event.kind == self.hold.split(":")[0]
            and event.text.startswith(self.hold.split(":", 1)[1])
        ):
            self.quick_first = self.quick_ran.wait(HOLD_S)


def test_a_session_whose_instance_is_up_runs_its_command_before_another_instance_is_up(
    ukc: Ukc, env: dict[str, str], metros: MetroRegistry
) -> None:
    """`slow` is held before its wait for its instance: `quick`'s whole first round (look,
    plan, sync, command) runs meanwhile, and both converge."""
    group = _group(ukc, env)
    reporter = HeldSlow("action:wait until")
    result = apply_group(group, metros=metros, reporter=reporter, environ=env)
    try:
        assert result.ok, result.failed
        assert reporter.quick_first, "quick's command waited for slow's instance"
        doc = ukc.status()
        for name in ("quick", "slow"):
            rec = doc["sessions"][name]
            assert rec["phase"] == "Ready", rec
            assert [c["stdout"] for c in rec["commands"]] == ["3\n"], rec["commands"]
            assert {"create_s", "ready_s", "sync_s", "commands_s"} <= set(rec["timings"])
        # what apply reports it did, once per session: made, waited for, synced, run
        for splan in result.plan.sessions:
            kinds = [type(a).__name__ for a in splan.actions]
            assert kinds == ["CreateInstance", "WaitReady", "SyncUp", "RunCommand"], kinds
        # each command ran once, and the apply took its rounds to say so
        assert {o.session: o.ran_commands for o in result.outcomes.values()} == {
            "quick": 1,
            "slow": 1,
        }
    finally:
        delete_group(group, metros=metros, reporter=RecordingReporter(), environ=env)


def test_a_session_whose_create_fails_does_not_hold_up_the_other_sessions_rounds(
    ukc: Ukc, env: dict[str, str], metros: MetroRegistry
) -> None:
    """`slow` asks for an image the metro lacks: its failure is held until `quick` ran its
    command. `quick` converges, `slow` is recorded failed; the status file says both."""
    group = _group(ukc, env, slow_image="ukc-e2e-no-such-image:latest")
    reporter = HeldSlow("failed:")
    result = apply_group(group, metros=metros, reporter=reporter, environ=env)
    try:
        assert not result.ok
        assert set(result.failed) == {"slow"}, result.failed
        assert reporter.quick_first, "quick's command waited for slow's failed create"
        doc = ukc.status()
        quick, slow = doc["sessions"]["quick"], doc["sessions"]["slow"]
        assert quick["phase"] == "Ready", quick
        assert [c["stdout"] for c in quick["commands"]] == ["3\n"]
        assert slow["phase"] == "Failed", slow
        assert slow["message"] == result.failed["slow"]
        assert not slow["commands"]
    finally:
        delete_group(group, metros=metros, reporter=RecordingReporter(), environ=env)
