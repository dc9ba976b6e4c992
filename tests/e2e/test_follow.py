"""`ukc follow` against the local metro: commits that add, change, break and remove specs are
followed in order, a broken one prunes nothing, suspend holds it, SIGTERM stops it cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.gitrepo import Repo
from tests.support.ukc import Ukc
from tests.support.waiting import eventually

pytestmark = pytest.mark.metro


def spec(name: str, word: str) -> str:
    return (
        f"name: {name}\n"
        "directory: ./work\n"
        "commands:\n"
        f"  - name: say\n    run: mkdir -p out && echo {word} > out/{name}.txt\n"
        "sync:\n  exclude: [out/]\n  back: [out/]\n"
    )


class Follow:
    def __init__(self, ukc: Ukc, repo: Repo) -> None:
        self.ukc = ukc
        self.repo = repo
        self.state = ukc.project / "follow-state"
        self.specs = self.state / "checkout" / "specs"

    def args(self, *extra: str) -> list[str]:
        return [
            "follow",
            str(self.repo.path),
            "--path",
            "specs",
            "--state-dir",
            str(self.state),
            *extra,
        ]

    def once(self, *extra: str, check: int | None = 0) -> subprocess.CompletedProcess[str]:
        return self.ukc.run(*self.args("--once", *extra), check=check)

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.specs / ".ukc" / "status.json").read_text())
        return data


@pytest.fixture
def follow(ukc: Ukc, tmp_path: Path) -> Iterator[Follow]:
    following = Follow(ukc, Repo(tmp_path / "repo"))
    yield following
    # leave nothing running: the instances the followed specs made
    status_file = following.specs / ".ukc" / "status.json"
    if status_file.exists():
        recorded = json.loads(status_file.read_text())["sessions"].values()
        doomed = [{"name": s["instance"]["name"]} for s in recorded if s.get("instance")]
        if doomed:
            with ukc.api() as client:
                client.request("DELETE", "/v1/instances", json=doomed)


def names(ukc: Ukc) -> set[str]:
    return {i["name"] for i in ukc.instances()}


def test_commits_that_add_change_break_and_remove_specs_are_followed_in_order(
    follow: Follow, ukc: Ukc
) -> None:
    repo = follow.repo
    work = {"specs/work/in.txt": "x\n"}
    added = repo.commit(
        "add", {**work, "specs/a.yaml": spec("a", "one"), "specs/b.yaml": spec("b", "one")}
    )
    out = follow.once("--prune")
    assert f"revision {added[:12]} of main: applying" in out.stdout
    status = follow.status()
    assert status["source"]["revision"] == added and status["source"]["ref"] == "main"
    assert status["source"]["url"] == str(repo.path) and status["source"]["path"] == "specs"
    assert status["last_applied_revision"] == status["last_attempted_revision"] == added
    assert {n: s["phase"] for n, s in status["sessions"].items()} == {"a": "Ready", "b": "Ready"}
    a_instance = status["sessions"]["a"]["instance"]["name"]
    b_instance = status["sessions"]["b"]["instance"]["name"]
    assert (follow.specs / "work" / "out" / "a.txt").read_text() == "one\n"

    again = follow.once("--prune")
    assert "applying" not in again.stdout, "an applied revision is not applied again"

    changed = repo.commit("change", {"specs/a.yaml": spec("a", "two")})
    follow.once("--prune")
    status = follow.status()
    assert status["last_applied_revision"] == changed
    assert (follow.specs / "work" / "out" / "a.txt").read_text() == "two\n"

    broken = repo.commit(
        "remove a, break b",
        {"specs/b.yaml": spec("b", "one") + "imgae: typo\n"},
        remove=("specs/a.yaml",),
    )
    out = follow.once("--prune", check=1)
    assert "nothing pruned" in out.stdout and "imgae" in out.stdout
    status = follow.status()
    assert status["last_attempted_revision"] == broken
    assert status["last_applied_revision"] == changed == status["source"]["revision"]
    assert "b.yaml" in status["last_attempt_error"] and "imgae" in status["last_attempt_error"]
    assert {a_instance, b_instance} <= names(ukc), "a broken revision pruned a session"

    fixed = repo.commit("fix b", {"specs/b.yaml": spec("b", "three")})
    follow.once("--prune")
    status = follow.status()
    assert status["last_applied_revision"] == fixed and status["last_attempt_error"] == ""
    assert status["sessions"]["a"]["phase"] == "Deleted"
    assert status["sessions"]["b"]["phase"] == "Ready"
    assert a_instance not in names(ukc) and b_instance in names(ukc)
    assert (follow.specs / "work" / "out" / "b.txt").read_text() == "three\n"
    history = [(r["revision"], r["outcome"]) for r in status["revisions"]]
    assert history == [
        (added, "applied"),
        (changed, "applied"),
        (broken, "broken"),
        (fixed, "applied"),
    ]
    assert "imgae" in status["revisions"][2]["error"]
    shown = ukc.run("status", str(follow.specs), check=0).stdout
    assert f"source: {repo.path} main specs at {fixed[:12]}, applied " in shown
    recorded = json.loads(ukc.run("status", str(follow.specs), "-o", "json", check=0).stdout)
    (source,) = recorded["sources"].values()
    assert source["last_applied_revision"] == source["source"]["revision"] == fixed


def test_a_suspended_follower_applies_nothing_until_resumed(follow: Follow, ukc: Ukc) -> None:
    first = follow.repo.commit(
        "add", {"specs/work/in.txt": "x\n", "specs/a.yaml": spec("a", "one")}
    )
    follow.once()
    ukc.run(*follow.args("--suspend"), check=0)
    second = follow.repo.commit("change", {"specs/a.yaml": spec("a", "two")})
    out = follow.once()
    assert "suspended" in out.stdout
    assert follow.status()["last_applied_revision"] == first
    ukc.run(*follow.args("--resume"), check=0)
    follow.once()
    assert follow.status()["last_applied_revision"] == second


def test_a_path_that_leads_outside_the_repository_applies_nothing(
    follow: Follow, ukc: Ukc, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evil.yaml").write_text(spec("evil", "x"))
    follow.repo.commit("link", symlinks={"specs": str(outside)})
    out = follow.once(check=1)
    assert "leads outside the repository" in out.stdout
    assert not any("evil" in n for n in names(ukc))


def test_sigterm_stops_a_running_follower_cleanly(follow: Follow, ukc: Ukc) -> None:
    sha = follow.repo.commit("add", {"specs/work/in.txt": "x\n", "specs/a.yaml": spec("a", "one")})
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", *follow.args("--interval", "1s")],
        cwd=ukc.project,
        env=ukc.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert eventually(
            lambda: (
                (follow.specs / ".ukc" / "status.json").exists()
                and follow.status()["last_applied_revision"] == sha
            ),
            timeout_s=120,
            interval_s=0.2,
        )
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "stopping" in out and "stopped" in out


def test_a_revision_that_removes_every_spec_prunes_nothing_without_allow_empty(
    follow: Follow, ukc: Ukc
) -> None:
    follow.repo.commit("add", {"specs/work/in.txt": "x\n", "specs/a.yaml": spec("a", "one")})
    follow.once("--prune")
    instance = follow.status()["sessions"]["a"]["instance"]["name"]
    emptied = follow.repo.commit("remove all", remove=("specs/a.yaml",))
    out = follow.once("--prune", check=1)
    assert "refusing to prune" in out.stdout
    assert instance in names(ukc)
    assert follow.status()["last_attempted_revision"] == emptied


def test_sigterm_during_an_apply_stops_its_command_and_records_the_revision_unapplied(
    follow: Follow, ukc: Ukc
) -> None:
    slow = (
        "name: slow\ndirectory: ./work\ncommands:\n"
        "  - name: wait\n    run: echo started; sleep 120; echo finished\n"
    )
    sha = follow.repo.commit("add", {"specs/work/in.txt": "x\n", "specs/slow.yaml": slow})
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", *follow.args("--interval", "1s")],
        cwd=ukc.project,
        env=ukc.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        assert eventually(lambda: any("started" in ln for ln in lines), 120, 0.1), lines
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        took = time.monotonic() - stopped_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    out = "".join(lines)
    assert proc.returncode == 0, out
    assert took < 30, f"the command was not stopped ({took:.0f} s)"
    assert "finished" not in out
    status = follow.status()
    assert status["sessions"]["slow"]["phase"] == "Interrupted"
    assert status["last_applied_revision"] == ""
    assert status["revisions"][-1]["revision"] == sha
    assert status["revisions"][-1]["outcome"] == "failed"
    assert "interrupted" in status["revisions"][-1]["error"]


def test_the_applied_revision_is_applied_again_at_resync_and_a_deleted_instance_returns(
    follow: Follow, ukc: Ukc
) -> None:
    sha = follow.repo.commit("add", {"specs/work/in.txt": "x\n", "specs/a.yaml": spec("a", "one")})
    follow.once()
    instance = follow.status()["sessions"]["a"]["instance"]["name"]
    with ukc.api() as client:
        client.request("DELETE", "/v1/instances", json=[{"name": instance}])
    assert eventually(lambda: instance not in names(ukc), 30, 0.2)

    quiet = follow.once("--resync", "off")
    assert "resyncing" not in quiet.stdout and instance not in names(ukc)
    time.sleep(1.1)
    out = follow.once("--resync", "1s")
    assert f"revision {sha[:12]} of main: current; resyncing" in out.stdout
    assert instance in names(ukc)
    status = follow.status()
    assert [(r["revision"], r["outcome"]) for r in status["revisions"]] == [(sha, "applied")]
    assert status["last_attempted_at"] >= status["source"]["applied_at"]
    assert "resyncing" not in follow.once().stdout, "the default resync waits 10 minutes"


def test_the_default_state_directory_names_a_local_repository_by_its_real_path(
    follow: Follow, ukc: Ukc
) -> None:
    follow.repo.commit("add", {"specs/a.yaml": "name: a\n"})
    env = {"XDG_STATE_HOME": str(ukc.project / "xdg")}
    ukc.extra_env.update(env)
    relative = os.path.relpath(follow.repo.path, ukc.project)
    said = ukc.run("follow", relative, "--path", "specs", "--suspend", check=0).stdout
    again = ukc.run("follow", str(follow.repo.path), "--path", "specs", "--resume", check=0)
    assert said.split(": ", 1)[1] == again.stdout.split(": ", 1)[1]
    assert again.stdout.startswith("resumed: ")
