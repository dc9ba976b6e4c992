"""A session on `ukc/local-minimal:latest` (the original workflow's image: sshd, rsync, tar,
sh, coreutils and findutils, the /exec server, and no python3) works as on an image with
python3: sync (shell+tar), commands, sync-back, a no-change apply, `ukc watch`, `plan -v`."""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.local.daemon import MetroInfo
from tests.support.ukc import Ukc
from tests.support.watching import WatchProcess

pytestmark = pytest.mark.metro

SPEC = """\
name: mini
image: ukc/local-minimal:latest
directory: ./d
commands:
  - name: count
    run: mkdir -p out && cat *.txt | wc -c > out/n.txt && ls > out/ls.txt
sync:
  exclude: ["out/"]
  back: ["out/"]
"""


@pytest.fixture
def mini(ukc: Ukc) -> Ukc:
    d = ukc.project / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("hello\n")
    (d / "b.txt").write_text("bye\n")
    (d / "sub" / "deep.txt").write_text("deep\n")
    ukc.write_spec(SPEC)
    return ukc


def out(ukc: Ukc, name: str) -> str:
    return (ukc.project / "d" / "out" / name).read_text()


def session(ukc: Ukc) -> dict[str, Any]:
    return ukc.status()["sessions"]["mini"]  # type: ignore[no-any-return]


def test_a_session_on_an_image_without_python3_syncs_runs_and_brings_back(mini: Ukc) -> None:
    proc = mini.run("apply", "session.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "python3" not in proc.stdout + proc.stderr
    assert out(mini, "n.txt").strip() == "10"
    assert out(mini, "ls.txt").split() == ["a.txt", "b.txt", "out", "sub"]
    assert session(mini)["phase"] == "Ready"


def test_a_change_and_a_delete_arrive_and_a_no_change_apply_sends_nothing(mini: Ukc) -> None:
    mini.run("apply", "session.yaml", check=0)
    (mini.project / "d" / "a.txt").write_text("hello again\n")
    (mini.project / "d" / "b.txt").unlink()
    proc = mini.run("apply", "session.yaml", check=0)
    assert "1 file(s) sent" in proc.stdout and "1 deleted" in proc.stdout, proc.stdout
    assert "remote scanned" not in proc.stdout  # the remote record was trusted
    assert out(mini, "n.txt").strip() == "12"
    assert out(mini, "ls.txt").split() == ["a.txt", "out", "sub"]
    again = mini.run("apply", "session.yaml", check=0)
    assert "sync" not in again.stdout.replace("sync path", ""), again.stdout
    assert "run command" not in again.stdout, again.stdout


def test_plan_verbose_names_the_shell_path_once_it_is_known(mini: Ukc) -> None:
    before = mini.run("plan", "-v", "session.yaml").stdout
    assert "sync path: not known until first contact" in before, before
    mini.run("apply", "session.yaml", check=0)
    after = mini.run("plan", "-v", "session.yaml", check=0).stdout
    assert "sync path: shell+tar" in after, after


def test_plan_verbose_names_the_python_helper_on_an_image_with_python3(mini: Ukc) -> None:
    mini.write_spec(SPEC.replace("ukc/local-minimal:latest", "ukc/local-sandbox:latest"))
    mini.run("apply", "session.yaml", check=0)
    after = mini.run("plan", "-v", "session.yaml", check=0).stdout
    assert "sync path: python helper" in after, after


@pytest.fixture
def watcher(mini: Ukc) -> Iterator[WatchProcess]:
    w = WatchProcess(mini, "session.yaml")
    yield w
    w.stop()


def test_watch_brings_one_edit_through(mini: Ukc, watcher: WatchProcess) -> None:
    status = mini.project / ".ukc" / "status.json"

    def ready() -> bool:
        try:
            doc = json.loads(status.read_text())
        except (FileNotFoundError, ValueError):
            return False
        return bool(doc.get("sessions", {}).get("mini", {}).get("phase") == "Ready")

    watcher.wait_for(lambda: ready() and watcher.passes() >= 1)
    n = mini.project / "d" / "out" / "n.txt"
    assert n.read_text().strip() == "10"
    (mini.project / "d" / "a.txt").write_text("hello hello hello\n")
    watcher.wait_for(lambda: _read(n) == "22", timeout=30)
    assert "python3" not in watcher.output()


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


def test_commands_over_the_exec_server_work_too(mini: Ukc) -> None:
    mini.write_spec(SPEC + "exec: http\n")
    proc = mini.run("apply", "session.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out(mini, "n.txt").strip() == "10"


def test_a_fresh_runner_with_the_session_secret_finds_the_work_done(
    metro: MetroInfo, tmp_path: Path
) -> None:
    env = {
        "UKC_PROJECT": "mini-" + secrets.token_hex(4),
        "UKC_SESSION_SECRET": secrets.token_hex(16),
    }
    first, fresh = Ukc(tmp_path / "a", metro, dict(env)), Ukc(tmp_path / "b", metro, dict(env))
    d = first.project / "d"
    d.mkdir(parents=True)
    (d / "a.txt").write_text("hello\n")
    (d / "b.txt").write_text("bye\n")
    first.write_spec(SPEC)
    try:
        first.run("apply", "session.yaml", check=0)
        shutil.copytree(first.project, fresh.project, ignore=shutil.ignore_patterns(".ukc", "out"))
        proc = fresh.run("apply", "session.yaml", check=0)
        assert "status rebuilt from the sandbox's journal" in proc.stdout, proc.stdout
        assert "run command" not in proc.stdout and "synced" not in proc.stdout, proc.stdout
        # no push record of its own: an edit scans the remote, whose other files hash equal
        (fresh.project / "d" / "a.txt").write_text("hello from b\n")
        proc = fresh.run("apply", "session.yaml", check=0)
        assert "synced: 1 file(s) sent (13 B), 0 deleted" in proc.stdout, proc.stdout
        assert (fresh.project / "d" / "out" / "n.txt").read_text().strip() == "17"
    finally:
        names = [s["instance"]["name"] for s in first.status()["sessions"].values()]
        with first.api() as client:
            client.request("DELETE", "/v1/instances", json=[{"name": n} for n in names])


def test_a_cold_boot_that_lost_the_workspace_is_synced_and_run_again(mini: Ukc) -> None:
    mini.run("apply", "session.yaml", check=0)
    uuid = session(mini)["instance"]["uuid"]
    with mini.api() as client:
        client.put("/v1/instances/stop", json=[{"uuid": uuid}])
        client.request(
            "GET", "/v1/instances/wait", json=[{"uuid": uuid, "state": "stopped", "timeout_s": 30}]
        )
    (mini.project / "d" / "out" / "n.txt").unlink()
    proc = mini.run("apply", "session.yaml", check=0)
    # /workspace lived in memory: the new boot's record is gone, the scan finds it empty
    assert "synced: 3 file(s) sent" in proc.stdout and "remote scanned" in proc.stdout, proc.stdout
    assert "run command 'count'" in proc.stdout, proc.stdout
    assert out(mini, "n.txt").strip() == "10"
    assert session(mini)["instance"]["uuid"] == uuid
