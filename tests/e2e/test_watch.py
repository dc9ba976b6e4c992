"""`ukc watch` end to end: a real watcher process, real file edits, the local metro."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.ukc import Ukc
from tests.support.watching import WatchProcess

pytestmark = pytest.mark.metro

SPEC = """\
name: live
directory: ./work
commands:
  - name: build
    run: mkdir -p out && cat input.txt > out/copy.txt
sync:
  back: ["out/"]
"""


@pytest.fixture
def project(ukc: Ukc) -> Ukc:
    work = ukc.project / "work"
    work.mkdir()
    (work / "input.txt").write_text("v1\n")
    ukc.write_spec(SPEC)
    return ukc


@pytest.fixture
def watch(project: Ukc) -> Iterator[Callable[..., WatchProcess]]:
    started: list[WatchProcess] = []

    def start(*args: str) -> WatchProcess:
        w = WatchProcess(project, *args)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


def status(ukc: Ukc) -> dict:  # type: ignore[type-arg]
    return json.loads((ukc.project / ".ukc" / "status.json").read_text())  # type: ignore[no-any-return]


def ready(ukc: Ukc) -> bool:
    try:
        return bool(status(ukc)["sessions"]["live"]["phase"] == "Ready")
    except (FileNotFoundError, KeyError, ValueError):
        return False


def test_an_edit_is_synced_and_the_command_reruns(
    project: Ukc, watch: Callable[..., WatchProcess]
) -> None:
    w = watch("session.yaml")
    w.wait_for(lambda: ready(project) and w.passes() >= 1)
    copy = project.project / "work" / "out" / "copy.txt"
    assert copy.read_text() == "v1\n"
    (project.project / "work" / "input.txt").write_text("v2\n")
    w.wait_for(lambda: copy.exists() and copy.read_text() == "v2\n", timeout=30)
    uuid = status(project)["sessions"]["live"]["instance"]["uuid"]
    assert (project.workspace(uuid) / "input.txt").read_text() == "v2\n"


def test_an_edit_reaches_a_plugin_session_and_its_command_reruns(
    project: Ukc, watch: Callable[..., WatchProcess]
) -> None:
    project.write_spec(SPEC + "exec: plugin\n")
    w = watch("session.yaml")
    w.wait_for(lambda: ready(project) and w.passes() >= 1)
    copy = project.project / "work" / "out" / "copy.txt"
    assert copy.read_text() == "v1\n"
    (project.project / "work" / "input.txt").write_text("v2\n")
    w.wait_for(lambda: copy.exists() and copy.read_text() == "v2\n", timeout=30)
    rec = status(project)["sessions"]["live"]
    assert rec["instance"]["fqdn"] is None
    assert (project.workspace(rec["instance"]["uuid"]) / "input.txt").read_text() == "v2\n"


def test_a_burst_of_500_writes_makes_one_or_two_passes(
    project: Ukc, watch: Callable[..., WatchProcess]
) -> None:
    w = watch("session.yaml")
    w.wait_for(lambda: ready(project) and w.passes() >= 1)
    time.sleep(0.5)
    before = w.passes()
    burst = project.project / "work" / "burst"
    burst.mkdir()
    for i in range(500):
        (burst / f"f{i:03d}.txt").write_text(f"{i}\n")
    uuid = status(project)["sessions"]["live"]["instance"]["uuid"]
    target = project.workspace(uuid) / "burst" / "f499.txt"
    w.wait_for(target.exists, timeout=30)
    # A pass re-plans until nothing is left, so it may absorb the rest of the burst itself;
    # count once the watcher is idle and has stayed idle for a while.
    # (a pass may be followed by exactly one follow-up for events that arrived meanwhile).
    made = w.settle() - before
    assert 1 <= made <= 2, w.output()
    assert len(list((project.workspace(uuid) / "burst").iterdir())) == 500


def test_sync_back_does_not_wake_the_watcher(
    project: Ukc, watch: Callable[..., WatchProcess]
) -> None:
    w = watch("session.yaml")
    w.wait_for(lambda: ready(project) and w.passes() >= 1)
    (project.project / "work" / "input.txt").write_text("v3\n")
    copy = project.project / "work" / "out" / "copy.txt"
    w.wait_for(lambda: copy.read_text() == "v3\n", timeout=30)
    # The edit itself may make one follow-up pass (truncate, then write); let it finish.
    settled = w.settle()
    time.sleep(2.5)
    assert w.passes() == settled, w.output()
    assert "pass" in w.output() and w.passes() <= 4


def test_a_spec_edit_adds_and_with_prune_removes_sessions(
    project: Ukc, watch: Callable[..., WatchProcess]
) -> None:
    w = watch("session.yaml", "--prune")
    w.wait_for(lambda: ready(project))
    project.write_spec(SPEC + "---\nname: extra\ndirectory: ./work\ncommands: ['true']\n")
    w.wait_for(
        lambda: status(project)["sessions"].get("extra", {}).get("phase") == "Ready", timeout=60
    )
    extra = status(project)["sessions"]["extra"]["instance"]["name"]
    assert extra in [i["name"] for i in project.instances()]
    project.write_spec(SPEC)
    w.wait_for(lambda: status(project)["sessions"]["extra"]["phase"] == "Deleted", timeout=60)
    assert extra not in [i["name"] for i in project.instances()]


def test_an_instance_deleted_out_of_band_is_recreated_within_one_resync(
    project: Ukc, watch: Callable[..., WatchProcess]
) -> None:
    w = watch("session.yaml", "--resync", "2")
    w.wait_for(lambda: ready(project))
    old = status(project)["sessions"]["live"]["instance"]
    with project.api() as client:
        client.request("DELETE", "/v1/instances", json=[{"name": old["name"]}])
    w.wait_for(
        lambda: (
            status(project)["sessions"]["live"]["instance"]["uuid"] != old["uuid"]
            and ready(project)
        ),
        timeout=60,
    )


def test_ctrl_c_leaves_a_valid_status_and_the_session_running(
    project: Ukc, watch: Callable[..., WatchProcess]
) -> None:
    w = watch("session.yaml")
    w.wait_for(lambda: ready(project))
    (project.project / "work" / "input.txt").write_text("v9\n")
    time.sleep(0.05)
    code = w.stop()
    assert code == 0, w.output()
    doc = status(project)
    assert doc["sessions"]["live"]["phase"] in ("Ready", "Progressing")
    name = doc["sessions"]["live"]["instance"]["name"]
    assert name in [i["name"] for i in project.instances()]
    assert os.path.exists(project.project / ".ukc" / "keys" / "live")


def test_ctrl_c_while_idle_says_it_stops_without_claiming_a_pass_runs(
    project: Ukc, watch: Callable[..., WatchProcess]
) -> None:
    w = watch("session.yaml")
    w.settle()
    assert w.stop() == 0, w.output()
    assert "[watch] stopping" in w.output()
    assert "finishing the running pass" not in w.output(), w.output()


def test_down_deletes_the_sessions_on_exit(
    project: Ukc, watch: Callable[..., WatchProcess]
) -> None:
    w = watch("session.yaml", "--down")
    w.wait_for(lambda: ready(project))
    name = status(project)["sessions"]["live"]["instance"]["name"]
    assert w.stop() == 0
    assert name not in [i["name"] for i in project.instances()]


def test_an_edit_after_the_instance_was_stopped_behind_our_back_still_arrives(
    project: Ukc, watch: Callable[..., WatchProcess]
) -> None:
    w = watch("session.yaml")
    w.wait_for(lambda: ready(project) and w.passes() >= 1)
    name = status(project)["sessions"]["live"]["instance"]["name"]
    with project.api() as client:
        client.put("/v1/instances/stop", json=[{"name": name}])
        client.request(
            "GET", "/v1/instances/wait", json=[{"name": name, "state": "stopped", "timeout_s": 20}]
        )
    (project.project / "work" / "input.txt").write_text("after stop\n")
    copy = project.project / "work" / "out" / "copy.txt"
    w.wait_for(lambda: copy.read_text() == "after stop\n", timeout=60)
    uuid = status(project)["sessions"]["live"]["instance"]["uuid"]
    assert (project.workspace(uuid) / "input.txt").read_text() == "after stop\n"


def test_a_fixed_spec_clears_the_failure_the_broken_one_put_in_the_header(
    project: Ukc, watch: Callable[..., WatchProcess]
) -> None:
    w = watch("session.yaml")
    w.wait_for(lambda: ready(project))
    project.write_spec(SPEC + "bogus: 1\n")
    w.wait_for(lambda: "spec not reloaded" in w.output())
    project.write_spec(SPEC)
    w.wait_for(lambda: "[watch] specs valid again: reloaded" in w.output())
