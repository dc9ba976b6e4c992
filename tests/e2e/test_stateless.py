"""Stateless apply: a runner without the first one's `.ukc/` (a CI runner, a fresh clone) with
the same `UKC_PROJECT` and `UKC_SESSION_SECRET` finds everything it needs in the cloud and in
the sandbox, and does nothing the first runner already did."""

from __future__ import annotations

import json
import secrets
import shutil
from pathlib import Path
from typing import Any

import pytest

from reconciler.local.daemon import MetroInfo
from reconciler.spec.models import EXEC_NAMES
from reconciler.status import sandboxjournal
from tests.support.ukc import Ukc

pytestmark = pytest.mark.metro

SPEC = """\
name: demo
directory: ./work
commands:
  - name: build
    run: mkdir -p out && tr a-z A-Z < input.txt > out/upper.txt && echo ran >> /tmp/runs
  - name: count
    run: wc -c < input.txt > out/count.txt && echo ran >> /tmp/runs
sync:
  back: ["out/"]
"""


class Runners:
    def __init__(self, metro: MetroInfo, root: Path) -> None:
        env = {
            "UKC_PROJECT": "stateless-" + secrets.token_hex(4),
            "UKC_SESSION_SECRET": secrets.token_hex(16),
        }
        self.a = Ukc(root / "a", metro, dict(env))
        self.b = Ukc(root / "b", metro, dict(env))
        work = self.a.project / "work"
        (work / "lib").mkdir(parents=True)
        (work / "input.txt").write_text("hello world\n")
        (work / "lib" / "a.txt").write_text("library\n")
        self.a.write_spec(SPEC)

    def clone(self) -> None:
        """b: a fresh clone of a's checkout (the sources only: no `.ukc/`, no outputs)."""
        shutil.copytree(
            self.a.project, self.b.project, ignore=shutil.ignore_patterns(".ukc", "out")
        )

    def instance(self) -> dict[str, Any]:
        name = self.a.status()["sessions"]["demo"]["instance"]["name"]
        found = [i for i in self.a.instances() if i["name"] == name]
        assert len(found) == 1
        return found[0]

    def journal(self) -> Path:
        uuid = self.instance()["uuid"]
        return self.a.workspace(uuid) / sandboxjournal.JOURNAL_PATH.removeprefix("/workspace/")

    def cleanup(self) -> None:
        with self.a.api() as client:
            project = next((p for p in (self.a.project / ".ukc",) if p.exists()), None)
            if project is None:
                return
            names = [
                s["instance"]["name"]
                for s in self.a.status()["sessions"].values()
                if s.get("instance")
            ]
            if names:
                client.request("DELETE", "/v1/instances", json=[{"name": n} for n in names])


@pytest.fixture
def runners(metro: MetroInfo, tmp_path: Path) -> Any:
    both = Runners(metro, tmp_path)
    yield both
    both.cleanup()


def comparable(status: dict[str, Any]) -> dict[str, Any]:
    """The status without times and the checkout's own paths."""
    status = json.loads(json.dumps(status))
    status.pop("updated_at", None)
    for rec in status["sessions"].values():
        rec.pop("spec_file", None)
        rec.pop("last_applied_at", None)
        for cond in rec["conditions"]:
            cond.pop("last_transition_time", None)
    return status


def flat(value: Any, path: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{path}.{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{path}[{i}]").items()}
    return {path: value}


def differences(mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """Each field where two status files differ, apart from times and the checkout's paths."""
    left, right = flat(comparable(mine)), flat(comparable(theirs))
    return [
        f"{key}: {left.get(key)!r} != {right.get(key)!r}"
        for key in sorted(left.keys() | right.keys())
        if left.get(key) != right.get(key)
    ]


@pytest.mark.parametrize("transport", EXEC_NAMES)
def test_a_fresh_clone_with_the_secret_plans_nothing_and_applies_as_a_no_op(
    runners: Runners, transport: str
) -> None:
    a, b = runners.a, runners.b
    a.write_spec(SPEC + f"exec: {transport}\n")
    a.run("apply", "session.yaml", check=0)
    a.run("apply", "session.yaml", check=0)  # a's own no-op apply: the status b must match
    before = runners.instance()
    workspace = a.workspace(before["uuid"])
    remote = {p.name: p.stat().st_mtime_ns for p in workspace.rglob("*") if p.is_file()}
    journal = runners.journal().read_bytes()
    runners.clone()

    b.run("plan", "--detailed-exitcode", "session.yaml", check=0)
    proc = b.run("apply", "--output", "json", "session.yaml", check=0)
    (result,) = json.loads(proc.stdout)["groups"]
    # no round of actions ran: no create, no replace, no file sent, no command run
    assert result["ok"] and result["rounds"] == 0, result
    assert runners.instance()["uuid"] == before["uuid"]
    # a's apply left the instance suspended; reading its journal woke it, and on a platform
    # where a wake moves `start_count` b records the new count (its boot marker proved the
    # same boot): that is the only difference
    now = runners.instance()["start_count"]
    moved = [
        d for d in differences(b.status(), a.status()) if d.split(":")[0].endswith("start_count")
    ]
    assert all(d.endswith(f": {now} != {before['start_count']}") for d in moved), moved
    rest = [d for d in differences(b.status(), a.status()) if d not in moved]
    assert rest == []
    # no file sent, no command run, the journal as a left it
    after = {p.name: p.stat().st_mtime_ns for p in workspace.rglob("*") if p.is_file()}
    assert after == remote
    assert runners.journal().read_bytes() == journal

    # the secret itself is nowhere: not in either runner's state, the sandbox, or the output
    secret = a.extra_env["UKC_SESSION_SECRET"].encode()
    places = [*(a.project / ".ukc").rglob("*"), *(b.project / ".ukc").rglob("*")]
    places += list(workspace.rglob("*"))
    assert not [p for p in places if p.is_file() and secret in p.read_bytes()]
    assert secret.decode() not in proc.stdout + proc.stderr

    # a spec edit committed and applied from b is current for a once a has the commit
    for tool in (a, b):
        (tool.project / "work" / "input.txt").write_text("hello again\n")
    b.run("apply", "session.yaml", check=0)
    assert (b.project / "work" / "out" / "upper.txt").read_text() == "HELLO AGAIN\n"
    a.run("plan", "--detailed-exitcode", "session.yaml", check=0)
    proc = a.run("apply", "session.yaml", check=0)
    assert "exited 0" not in proc.stdout and "synced" not in proc.stdout, proc.stdout


def test_a_journal_the_sandbox_forged_is_ignored_and_the_work_is_done_again(
    runners: Runners,
) -> None:
    a, b = runners.a, runners.b
    a.write_spec(SPEC.replace("wc -c < input.txt", "exit 3; wc -c < input.txt"))
    a.run("apply", "session.yaml", check=1)
    path = runners.journal()
    body = json.loads(path.read_bytes())
    # what a sandbox would write to have its failed command taken for a success
    for cmd in body["record"]["commands"]:
        cmd["exit_code"] = 0
        cmd["last_success_hash"] = cmd["input_hash"]
        cmd["instance_uuid"] = body["instance"]
    body["record"]["phase"] = "Ready"
    path.write_text(json.dumps(body))
    runners.clone()
    proc = b.run("apply", "session.yaml", check=1)
    assert "journal in the sandbox ignored: its seal does not match" in proc.stdout
    count = b.status()["sessions"]["demo"]["commands"][1]
    assert count["name"] == "count" and count["exit_code"] == 3 and not count["skipped"]


RACE_SPEC = """\
name: demo
env:
  GEN: "{gen}"
commands:
  - name: mark
    run: echo "ran $GEN" >> runs.log
"""


def test_two_runners_racing_never_both_act_and_the_loser_names_the_holder(
    runners: Runners,
) -> None:
    import random
    import re
    import subprocess
    import sys
    import time

    a, b = runners.a, runners.b
    a.write_spec(RACE_SPEC.format(gen=0))
    a.run("apply", "session.yaml", check=0)
    runners.clone()
    uuid = runners.instance()["uuid"]
    log = a.workspace(uuid) / "runs.log"
    rng = random.Random(13)
    for gen in range(1, 21):
        for tool in (a, b):
            tool.write_spec(RACE_SPEC.format(gen=gen))
        first, second = (a, b) if gen % 2 else (b, a)
        procs = []
        for tool in (first, second):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "reconciler", "apply", "session.yaml"],
                    cwd=tool.project,
                    env=tool.env(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            time.sleep(rng.uniform(0, 0.05))
        results = [(p.wait(timeout=180), *p.communicate()) for p in procs]
        codes = sorted(code for code, _out, _err in results)
        assert codes in ([0, 1], [0, 0]), results
        for code, out, err in results:
            if code == 1:
                assert re.search(r"being applied by \S+:pid\d+:[0-9a-f]{6}", err), (out, err)
        assert log.read_text().splitlines().count(f"ran {gen}") == 1, (gen, results)
    names = [i["name"] for i in a.instances()]
    assert names.count(runners.instance()["name"]) == 1
    assert not [n for n in names if n.startswith("ukc-lease-")]


def test_a_runner_whose_create_finds_the_instance_made_adopts_it_with_its_own_key(
    runners: Runners, tmp_path: Path
) -> None:
    # what a runner killed right after its create leaves behind: the instance with its own
    # nonce; b's list does not show it yet (the list lags), so b creates, finds the name
    # taken and adopts the instance, and must reach it with the key of *its* nonce
    from reconciler.cloud.api import UkcApi
    from reconciler.cloud.model import CreateRequest
    from reconciler.reconcile import identity, sessionkeys
    from reconciler.spec.models import DEFAULT_LOCAL_IMAGE
    from reconciler.transport import ssh
    from reconciler.transport.keys import ensure_derived_keypair

    b = runners.b
    runners.clone()
    env = b.extra_env
    project = identity.project_id(b.project, env)
    secret = env["UKC_SESSION_SECRET"]
    nonce = sessionkeys.new_nonce()
    seed = sessionkeys.seed(sessionkeys.key_root(secret, project), "demo", nonce)
    pub = ensure_derived_keypair(tmp_path / "elsewhere", seed)
    tags = [
        *identity.owner_tags(
            project,
            "demo",
            identity.instance_hash(DEFAULT_LOCAL_IMAGE, None),
            identity.owner_id_from_secret(secret, project),
        ),
        identity.transport_tag("ssh"),
        sessionkeys.key_tag(nonce),
    ]
    metro = b.metro
    with b.api() as client:
        client.post("/_local/faults", json={"list_lag": {"count": 1}}).raise_for_status()
    try:
        with UkcApi(metro.api_url, metro.token, metro="local") as api:
            made = api.create_instance(
                CreateRequest(
                    name=identity.instance_name(project, "demo"),
                    image=DEFAULT_LOCAL_IMAGE,
                    env={"PUBKEY": pub},
                    tags=tags,
                    services=ssh.KIND.services,
                )
            )
        proc = b.run("apply", "session.yaml")
    finally:
        with b.api() as client:
            client.post("/_local/faults", json={"reset": True}).raise_for_status()
        with b.api() as client:
            client.request("DELETE", "/v1/instances", json=[{"uuid": made.uuid}])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "adopted existing instance" in proc.stdout
    assert b.status()["sessions"]["demo"]["instance"]["uuid"] == made.uuid
    assert b.status()["sessions"]["demo"]["phase"] == "Ready"


def test_a_second_runner_waits_for_the_lease_then_finds_the_work_done(runners: Runners) -> None:
    import subprocess
    import sys
    import time

    a, b = runners.a, runners.b
    slow = SPEC.replace("echo ran >> /tmp/runs", "sleep 3")
    a.write_spec(slow)
    runners.clone()
    first = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "apply", "session.yaml"],
        cwd=a.project,
        env=a.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not any(i["name"].startswith("ukc-lease-") for i in a.instances()):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    waited = b.run("apply", "--lock-timeout", "120", "session.yaml", check=0)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, out + err
    assert "lease: waiting for " in waited.stdout and ":pid" in waited.stdout
    # b found a's journal: nothing ran twice
    assert "exited 0" not in waited.stdout and "synced" not in waited.stdout, waited.stdout


def test_a_fresh_clone_prunes_a_removed_session_of_its_spec_directory_only(
    runners: Runners,
) -> None:
    a, b = runners.a, runners.b
    (a.project / ".git").mkdir()  # a repository: spec directories are named by their path in it
    a.write_spec(SPEC + "---\nname: extra\n")
    other = a.project / "other"
    other.mkdir()
    (other / "session.yaml").write_text("name: third\n")
    a.run("apply", "session.yaml", check=0)
    a.run("apply", "other/session.yaml", check=0)
    runners.clone()
    b.write_spec(SPEC)  # the commit that removes session `extra`
    proc = b.run("plan", "session.yaml", check=0)
    assert "extra" in proc.stdout and "--prune" in proc.stdout, proc.stdout
    b.run("apply", "--prune", "session.yaml", check=0)
    project = a.status()["project"]
    mine = {i["name"] for i in a.instances() if f"ukc.project={project}" in i["tags"]}
    assert {n.rsplit("-", 1)[-1] for n in mine} == {"demo", "third"}, mine
    # a's other spec directory is its own: b's prune of this one left it alone
    with a.api() as client:
        client.request("DELETE", "/v1/instances", json=[{"name": n} for n in mine])


def test_a_fresh_clone_after_a_stateful_wake_that_moved_start_count_applies_as_a_no_op(
    runners: Runners,
) -> None:
    a, b = runners.a, runners.b
    a.run("apply", "session.yaml", check=0)
    uuid = runners.instance()["uuid"]
    before = runners.instance()["start_count"]
    with a.api() as client:
        client.put("/v1/instances/suspend", json=[{"uuid": uuid}]).raise_for_status()
        client.request(
            "GET", "/v1/instances/wait", json=[{"uuid": uuid, "state": "standby", "timeout_s": 30}]
        )
        client.put("/v1/instances/start", json=[{"uuid": uuid, "timeout_s": 30}])
    # the realistic metro counts a stateful wake as a start
    assert runners.instance()["start_count"] == before + 1
    runners.clone()
    proc = b.run("apply", "--output", "json", "session.yaml", check=0)
    (result,) = json.loads(proc.stdout)["groups"]
    # the journal names the boot before the wake; the marker in memory says it is the same
    assert result["ok"] and result["rounds"] == 0, result
    assert b.status()["sessions"]["demo"]["instance"]["start_count"] == before + 1


def test_a_fresh_clones_plan_leaves_a_suspended_instance_suspended_after_reading_its_journal(
    runners: Runners,
) -> None:
    a, b = runners.a, runners.b
    a.run("apply", "session.yaml", check=0)
    assert runners.instance()["state"] == "standby"
    runners.clone()
    # reading the journal needs the sandbox up; a plan changes nothing, so it puts it back
    proc = b.run("plan", "--detailed-exitcode", "session.yaml", check=0)
    assert runners.instance()["state"] == "standby", proc.stdout + proc.stderr
    # what the plan read is what the apply finds: nothing to do, and it stays asleep
    proc = b.run("apply", "--output", "json", "session.yaml", check=0)
    (result,) = json.loads(proc.stdout)["groups"]
    assert result["ok"] and result["rounds"] == 0, result
    assert runners.instance()["state"] == "standby"
