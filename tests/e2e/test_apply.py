"""`ukc apply/plan/status/delete` end to end on the local metro, as a user runs them."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import jsonschema
import pytest

from tests.support.ukc import Ukc

pytestmark = pytest.mark.metro

SPEC = """\
name: demo
directory: ./work
commands:
  - name: build
    run: mkdir -p out && tr a-z A-Z < input.txt > out/upper.txt
  - name: count
    run: wc -c < input.txt > out/count.txt
env:
  GREETING: hi
sync:
  exclude: ["*.tmp"]
  back: ["out/"]
"""


def make_project(ukc: Ukc, spec: str = SPEC) -> None:
    work = ukc.project / "work"
    (work / "lib").mkdir(parents=True)
    (work / "input.txt").write_text("hello world\n")
    (work / "lib" / "a.txt").write_text("library\n")
    (work / "scratch.tmp").write_text("never sent\n")
    ukc.write_spec(spec)


def session(ukc: Ukc, name: str = "demo") -> dict:  # type: ignore[type-arg]
    return ukc.status()["sessions"][name]  # type: ignore[no-any-return]


def test_apply_creates_syncs_runs_brings_back_and_writes_a_ready_status(ukc: Ukc) -> None:
    make_project(ukc)
    proc = ukc.run("apply", "session.yaml", check=0)
    assert "[demo]" in proc.stdout
    rec = session(ukc)
    assert rec["phase"] == "Ready"
    inst = rec["instance"]
    assert inst["uuid"] and inst["fqdn"] and inst["state"] in ("running", "standby")
    assert inst["metro"] == "local"
    assert [(c["name"], c["exit_code"], c["skipped"]) for c in rec["commands"]] == [
        ("build", 0, False),
        ("count", 0, False),
    ]
    assert all(c["started_at"] and c["finished_at"] for c in rec["commands"])
    assert {c["type"]: c["status"] for c in rec["conditions"]}["Ready"] == "True"
    assert rec["timings"]["create_s"] > 0
    # outputs came home, inputs went up, excluded files did not
    assert (ukc.project / "work" / "out" / "upper.txt").read_text() == "HELLO WORLD\n"
    ws = ukc.workspace(inst["uuid"])
    assert (ws / "lib" / "a.txt").read_text() == "library\n"
    assert not (ws / "scratch.tmp").exists()
    key = ukc.project / ".ukc" / "keys" / "demo"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    names = [i["name"] for i in ukc.instances()]
    assert inst["name"] in names


def test_a_second_apply_plans_nothing_and_does_nothing(ukc: Ukc) -> None:
    make_project(ukc)
    made = json.loads(ukc.run("apply", "session.yaml", "--output", "json", check=0).stdout)
    assert made["groups"][0]["changes_made"] is True and made["groups"][0]["rounds"] >= 1
    assert [s["verdict"] for s in made["groups"][0]["plan"]["sessions"]] == ["create"]
    first = session(ukc)
    assert (
        ukc.run("plan", "session.yaml", "--detailed-exitcode", check=0)
        .stdout.strip()
        .endswith("No changes. Sessions match their specs.")
    )
    out = json.loads(ukc.run("apply", "session.yaml", "--output", "json", check=0).stdout)
    schema = json.loads((Path(__file__).parents[2] / "docs" / "apply.schema.json").read_text())
    jsonschema.validate(out, schema, cls=jsonschema.Draft202012Validator)
    group = out["groups"][0]
    assert group["changes_made"] is False and group["rounds"] == 0 and out["ok"] is True
    # the plan inside has the shape of `ukc plan --output json`'s groups
    assert [s["verdict"] for s in group["plan"]["sessions"]] == ["up_to_date"]
    second = session(ukc)
    assert second["instance"]["uuid"] == first["instance"]["uuid"]
    assert [c["skipped"] for c in second["commands"]] == [True, True]
    assert second["sync"] == first["sync"]


def test_changing_one_file_sends_only_it_and_reruns_the_commands_on_the_same_instance(
    ukc: Ukc,
) -> None:
    make_project(ukc)
    ukc.run("apply", "session.yaml", check=0)
    uuid = session(ukc)["instance"]["uuid"]
    (ukc.project / "work" / "input.txt").write_text("changed text\n")
    plan = ukc.run("plan", "session.yaml", "--detailed-exitcode", check=2).stdout
    assert "send 1 file(s)" in plan and "input.txt" in plan
    ukc.run("apply", "session.yaml", check=0)
    rec = session(ukc)
    assert rec["instance"]["uuid"] == uuid
    assert rec["sync"]["last_files_sent"] == 1
    assert rec["sync"]["remote_scanned"] is False
    assert [c["skipped"] for c in rec["commands"]] == [False, False]
    assert (ukc.project / "work" / "out" / "upper.txt").read_text() == "CHANGED TEXT\n"


def test_changing_one_command_reruns_only_that_command_and_sends_no_file(ukc: Ukc) -> None:
    make_project(ukc)
    ukc.run("apply", "session.yaml", check=0)
    sync_before = session(ukc)["sync"]
    ukc.write_spec(SPEC.replace("wc -c < input.txt", "wc -w < input.txt"))
    ukc.run("apply", "session.yaml", check=0)
    rec = session(ukc)
    assert [(c["name"], c["skipped"]) for c in rec["commands"]] == [
        ("build", True),
        ("count", False),
    ]
    assert rec["sync"]["last_synced_at"] == sync_before["last_synced_at"]
    assert (ukc.project / "work" / "out" / "count.txt").read_text().strip() == "2"


def test_a_failing_command_exits_1_records_failed_and_keeps_the_sandbox(ukc: Ukc) -> None:
    make_project(
        ukc,
        SPEC.replace(
            "  - name: count\n",
            "  - name: boom\n    run: echo broken pipe dream >&2; exit 3\n  - name: count\n",
        ),
    )
    proc = ukc.run("apply", "session.yaml", check=1)
    assert "boom" in proc.stderr and "exited 3" in proc.stderr
    rec = session(ukc)
    assert rec["phase"] == "Failed"
    by_name = {c["name"]: c for c in rec["commands"]}
    assert by_name["boom"]["exit_code"] == 3
    assert "broken pipe dream" in by_name["boom"]["stderr"]
    assert "count" not in by_name or by_name["count"]["skipped"]
    assert rec["instance"]["name"] in [i["name"] for i in ukc.instances()]


def test_delete_removes_the_instance_and_the_key(ukc: Ukc) -> None:
    make_project(ukc)
    ukc.run("apply", "session.yaml", check=0)
    name = session(ukc)["instance"]["name"]
    ukc.run("delete", "session.yaml", check=0)
    assert name not in [i["name"] for i in ukc.instances()]
    assert not (ukc.project / ".ukc" / "keys" / "demo").exists()
    assert session(ukc)["phase"] == "Deleted"
    # deleting again is harmless
    ukc.run("delete", "session.yaml", check=0)


def test_an_instance_deleted_out_of_band_is_recreated_and_fully_resynced(ukc: Ukc) -> None:
    make_project(ukc)
    ukc.run("apply", "session.yaml", check=0)
    old = session(ukc)["instance"]
    with ukc.api() as client:
        client.request("DELETE", "/v1/instances", json=[{"name": old["name"]}])
    plan = ukc.run("plan", "session.yaml").stdout
    # the platform's autokill may also have reclaimed it: the plan says both
    assert "deleted out of band" in plan
    ukc.run("apply", "session.yaml", check=0)
    new = session(ukc)["instance"]
    assert new["uuid"] != old["uuid"] and new["name"] == old["name"]
    assert (ukc.workspace(new["uuid"]) / "lib" / "a.txt").exists()
    assert session(ukc)["phase"] == "Ready"


def test_a_stopped_instance_is_started_and_resynced(ukc: Ukc) -> None:
    make_project(ukc)
    ukc.run("apply", "session.yaml", check=0)
    name = session(ukc)["instance"]["name"]
    with ukc.api() as client:
        client.put("/v1/instances/stop", json=[{"name": name}])
        client.request(
            "GET", "/v1/instances/wait", json=[{"name": name, "state": "stopped", "timeout_s": 20}]
        )
    plan = ukc.run("plan", "session.yaml").stdout
    assert "start instance" in plan
    ukc.run("apply", "session.yaml", check=0)
    assert session(ukc)["instance"]["state"] in ("running", "standby")


def test_prune_deletes_only_removed_sessions_and_refuses_an_empty_or_broken_spec_set(
    ukc: Ukc,
) -> None:
    work = ukc.project / "work"
    work.mkdir()
    (work / "f.txt").write_text("x\n")
    specs = ukc.project / "specs"
    specs.mkdir()
    outside = "directory: ../work\nallow_directory_outside_spec_dir: true\n"
    (specs / "a.yaml").write_text(f"name: alpha\n{outside}commands: ['true']\n")
    (specs / "b.yaml").write_text(f"name: beta\n{outside}commands: ['true']\n")
    ukc.run("apply", "specs", check=0)
    status_file = specs / ".ukc" / "status.json"
    beta = json.loads(status_file.read_text())["sessions"]["beta"]["instance"]["name"]
    (specs / "b.yaml").unlink()
    ukc.run("apply", "specs", check=0)
    assert beta in [i["name"] for i in ukc.instances()], "without --prune nothing is deleted"
    # a broken spec stops everything, prune included
    (specs / "c.yaml").write_text("name: Bad Name\n")
    assert ukc.run("apply", "specs", "--prune").returncode == 2
    assert beta in [i["name"] for i in ukc.instances()]
    (specs / "c.yaml").unlink()
    ukc.run("apply", "specs", "--prune", check=0)
    assert beta not in [i["name"] for i in ukc.instances()]
    assert json.loads(status_file.read_text())["sessions"]["beta"]["phase"] == "Deleted"
    # an empty spec set never prunes by default
    (specs / "a.yaml").unlink()
    proc = ukc.run("apply", "specs", "--prune")
    assert proc.returncode == 2 and "--allow-empty" in proc.stderr
    alpha = json.loads(status_file.read_text())["sessions"]["alpha"]["instance"]["name"]
    assert alpha in [i["name"] for i in ukc.instances()]
    ukc.run("apply", "specs", "--prune", "--allow-empty", check=0)
    assert alpha not in [i["name"] for i in ukc.instances()]


def test_exec_http_runs_commands_through_the_image_exec_api(ukc: Ukc) -> None:
    make_project(ukc, SPEC + "exec: http\n")
    ukc.run("apply", "session.yaml", check=0)
    rec = session(ukc)
    assert rec["phase"] == "Ready"
    assert (ukc.project / "work" / "out" / "upper.txt").read_text() == "HELLO WORLD\n"


def test_secret_values_reach_the_command_but_never_the_status_or_the_terminal(ukc: Ukc) -> None:
    canary = "canary-5ecret-value-7f3a"
    make_project(
        ukc,
        SPEC.replace("env:\n", "secret_env:\n  TOKEN: E2E_CANARY\nenv:\n").replace(
            "wc -c < input.txt > out/count.txt",
            'echo "$TOKEN" | wc -c > out/count.txt; echo "token is $TOKEN"',
        ),
    )
    ukc.extra_env["E2E_CANARY"] = canary
    proc = ukc.run("apply", "session.yaml", check=0)
    assert canary not in proc.stdout + proc.stderr
    assert canary not in (ukc.project / ".ukc" / "status.json").read_text()
    assert (ukc.project / "work" / "out" / "count.txt").read_text().strip() == str(len(canary) + 1)
    for path in (ukc.project / ".ukc").rglob("*"):
        if path.is_file() and "keys" not in path.parts:
            assert canary.encode() not in path.read_bytes(), path


def test_a_missing_secret_variable_fails_the_session_in_one_line_naming_file_and_line(
    ukc: Ukc,
) -> None:
    make_project(ukc, SPEC + "secret_env:\n  TOKEN: E2E_NOT_SET_ANYWHERE\n")
    proc = ukc.run("apply", "session.yaml", check=1)
    assert "session.yaml:14: secret_env.TOKEN" in proc.stderr
    assert "E2E_NOT_SET_ANYWHERE" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_remote_metro_without_a_token_is_a_one_line_error_naming_the_variable(ukc: Ukc) -> None:
    make_project(ukc, SPEC + "metro: fra\nimage: org/sandbox:latest\n")
    proc = ukc.run("plan", "session.yaml", check=2)
    assert "UKC_TOKEN" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_second_applier_on_the_same_status_file_is_told_who_holds_the_lock(ukc: Ukc) -> None:
    import fcntl

    make_project(ukc)
    lock = ukc.project / ".ukc" / "status.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, b"pid 4242 on ci since now", 0)
        proc = ukc.run("apply", "session.yaml", check=1)
        assert "pid 4242" in proc.stderr
    finally:
        os.close(fd)


def test_a_lost_key_replaces_the_unreachable_instance_and_converges(ukc: Ukc) -> None:
    import shutil

    make_project(ukc)
    ukc.run("apply", "session.yaml", check=0)
    old = session(ukc)["instance"]
    shutil.rmtree(ukc.project / ".ukc" / "keys")
    plan = ukc.run("plan", "session.yaml").stdout
    assert "ssh key" in plan
    ukc.run("apply", "session.yaml", check=0)
    new = session(ukc)["instance"]
    assert new["uuid"] != old["uuid"] and session(ukc)["phase"] == "Ready"
    assert [i["name"] for i in ukc.instances()].count(new["name"]) == 1
    assert "ssh key" in plan


def test_with_the_project_secret_a_lost_ukc_directory_keeps_the_instance(ukc: Ukc) -> None:
    import shutil

    # the project's secret proves ownership and derives the key without `.ukc/`
    ukc.extra_env["UKC_SESSION_SECRET"] = "e2e-secret-0123456789abcdef"
    make_project(ukc)
    ukc.run("apply", "session.yaml", check=0)
    old = session(ukc)["instance"]
    shutil.rmtree(ukc.project / ".ukc")
    plan = ukc.run("plan", "session.yaml").stdout
    assert "ssh key" not in plan and "create instance" not in plan
    ukc.run("apply", "session.yaml", check=0)
    assert session(ukc)["instance"]["uuid"] == old["uuid"]
    assert session(ukc)["phase"] == "Ready"
