"""Attacks on instance ownership: another checkout of the same project must not be able to
delete, replace, adopt or use our instance, whatever it runs.

Two real checkouts (two project directories) share `UKC_PROJECT` and a session name, as two
CI pipelines or two clones of one repository do; the names and project/session tags they
compute are identical. Only the owner id (from `UKC_SESSION_SECRET`, else the checkout's own
`.ukc/owner`) tells them apart. Each test checks the first checkout's instance afterwards:
same uuid, same tags.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.local.daemon import MetroInfo
from reconciler.reconcile import identity
from reconciler.spec.models import DEFAULT_LOCAL_IMAGE
from tests.support.ukc import Ukc

SPEC = "name: test\ncommands: ['echo hi > out.txt']\n"


class Checkouts:
    def __init__(self, metro: MetroInfo, root: Path) -> None:
        self.project_name = "ci-" + secrets.token_hex(4)
        env = {"UKC_PROJECT": self.project_name}
        self.a = Ukc(root / "a", metro, dict(env))
        self.b = Ukc(root / "b", metro, dict(env))
        for tool in (self.a, self.b):
            tool.project.mkdir()
            tool.write_spec(SPEC)
        self.project = identity.project_id(root, env)
        self.name = identity.instance_name(self.project, "test")

    def instance(self, name: str | None = None) -> dict[str, Any] | None:
        wanted = name or self.name
        return next((i for i in self.a.instances() if i["name"] == wanted), None)

    def cleanup(self) -> None:
        with self.a.api() as client:
            mine = [i for i in self.a.instances() if f"ukc.project={self.project}" in i["tags"]]
            if mine:
                client.request("DELETE", "/v1/instances", json=[{"uuid": i["uuid"]} for i in mine])


@pytest.fixture
def two(metro: MetroInfo, tmp_path: Path) -> Iterator[Checkouts]:
    checkouts = Checkouts(metro, tmp_path)
    yield checkouts
    checkouts.cleanup()


def first_checkout_applied(two: Checkouts) -> dict[str, Any]:
    two.a.run("apply", "session.yaml", check=0)
    inst = two.instance()
    assert inst is not None
    return inst


def assert_untouched(two: Checkouts, before: dict[str, Any]) -> None:
    after = two.instance()
    assert after is not None, "the first checkout's instance was deleted"
    assert (after["uuid"], sorted(after["tags"])) == (before["uuid"], sorted(before["tags"]))


def assert_refused(proc: subprocess.CompletedProcess[str], two: Checkouts, uuid: str) -> None:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    output = proc.stdout + proc.stderr
    assert f"instance {two.name} (uuid {uuid}) on metro local is not provably" in output


def test_a_second_checkouts_apply_leaves_the_first_checkouts_instance_alone(
    two: Checkouts,
) -> None:
    before = first_checkout_applied(two)
    proc = two.b.run("apply", "session.yaml")
    assert_untouched(two, before)
    assert_refused(proc, two, before["uuid"])
    assert "another owner" in proc.stderr
    # the first checkout still owns a working session
    assert "up to date" in two.a.run("plan", "session.yaml", check=0).stdout
    plan = two.b.run("plan", "session.yaml")
    assert plan.returncode == 1 and "session test: refused: instance" in plan.stdout
    assert "Refused: 1 session(s)" in plan.stdout and "No changes" not in plan.stdout


def test_a_second_checkouts_spec_change_that_would_replace_leaves_the_instance_alone(
    two: Checkouts,
) -> None:
    before = first_checkout_applied(two)
    two.b.write_spec(SPEC + "memory_mb: 256\n")
    proc = two.b.run("apply", "session.yaml")
    assert_untouched(two, before)
    assert_refused(proc, two, before["uuid"])


def test_a_second_checkouts_delete_leaves_the_instance_alone(two: Checkouts) -> None:
    before = first_checkout_applied(two)
    proc = two.b.run("delete", "session.yaml")
    assert_untouched(two, before)
    assert_refused(proc, two, before["uuid"])
    two.a.run("delete", "session.yaml", check=0)
    assert two.instance() is None


def test_a_second_checkouts_ttl_does_not_expire_the_first_checkouts_instance(
    two: Checkouts,
) -> None:
    before = first_checkout_applied(two)
    two.b.write_spec(SPEC + "ttl: 1s\n")
    time.sleep(1.5)
    proc = two.b.run("apply", "session.yaml")
    assert_untouched(two, before)
    assert_refused(proc, two, before["uuid"])


def test_a_second_checkouts_prune_leaves_an_instance_it_once_had_under_that_name_alone(
    two: Checkouts,
) -> None:
    # b had session `test` (so it is in b's inventory); its instance went away out of band,
    # and a made its own under the same name
    two.b.run("apply", "session.yaml", check=0)
    ours = two.instance()
    assert ours is not None
    with two.b.api() as client:
        client.request("DELETE", "/v1/instances", json=[{"uuid": ours["uuid"]}])
    before = first_checkout_applied(two)
    two.b.write_spec("name: other\n")
    proc = two.b.run("apply", "--prune", "session.yaml")
    assert_untouched(two, before)
    assert_refused(proc, two, before["uuid"])


def test_a_create_colliding_with_another_checkouts_new_instance_does_not_adopt_it(
    two: Checkouts,
) -> None:
    # a creates its instance right after b listed (the list lags behind the create), so b's
    # create finds the name taken: what a lost create answer looks like too
    with two.b.api() as client:
        client.post("/_local/faults", json={"list_lag": {"count": 1}})
        tags = identity.owner_tags(two.project, "test", "0" * 12, secrets.token_hex(16))
        body = {
            "name": two.name,
            "image": DEFAULT_LOCAL_IMAGE,
            "env": {"PUBKEY": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJx8 a@elsewhere"},
            "tags": tags,
            "autostart": True,
        }
        created = client.post("/v1/instances", json=body).json()
    assert created["status"] == "success"
    before = {"uuid": created["data"]["instances"][0]["uuid"], "tags": tags}
    proc = two.b.run("apply", "session.yaml")
    assert_untouched(two, before)
    assert_refused(proc, two, before["uuid"])
    recorded = two.b.status()["sessions"]["test"].get("instance") or {}
    assert recorded.get("uuid") != before["uuid"], "b adopted a's instance"


def test_an_instance_without_an_owner_tag_that_we_never_recorded_is_left_alone(
    two: Checkouts,
) -> None:
    # what an older ukc in another checkout (or anyone picking the tags) leaves behind
    tags = [t for t in identity.owner_tags(two.project, "test", "0" * 12, "x") if "owner" not in t]
    with two.b.api() as client:
        body = {"name": two.name, "image": DEFAULT_LOCAL_IMAGE, "env": {}, "tags": tags}
        client.post("/v1/instances", json=body)
    before = two.instance()
    assert before is not None
    proc = two.b.run("apply", "session.yaml")
    assert_untouched(two, before)
    assert_refused(proc, two, before["uuid"])
    assert "no ukc.owner tag" in proc.stderr


def test_an_older_ukcs_instance_this_checkout_recorded_is_still_its_own(two: Checkouts) -> None:
    before = first_checkout_applied(two)
    owner_tag = next(t for t in before["tags"] if t.startswith("ukc.owner="))
    with two.a.api() as client:  # as an older ukc made it: no owner tag
        client.patch(
            "/v1/instances",
            json=[{"name": two.name, "prop": "tags", "op": "del", "value": [owner_tag]}],
        )
    assert "up to date" in two.a.run("plan", "session.yaml", check=0).stdout
    assert_refused(two.b.run("delete", "session.yaml"), two, before["uuid"])
    two.a.run("delete", "session.yaml", check=0)
    assert two.instance() is None


def test_an_older_ukcs_instance_whose_uuid_another_checkout_journaled_is_not_its_own(
    two: Checkouts,
) -> None:
    # an older ukc journaled the uuid of any instance it saw under its name before its first
    # connection (which then failed: its key was not that instance's); no host key recorded
    before = first_checkout_applied(two)
    owner_tag = next(t for t in before["tags"] if t.startswith("ukc.owner="))
    with two.a.api() as client:
        client.patch(
            "/v1/instances",
            json=[{"name": two.name, "prop": "tags", "op": "del", "value": [owner_tag]}],
        )
    before = two.instance()
    assert before is not None
    journal = {
        "phase": "Failed",
        "metro": "local",
        "instance": {"name": two.name, "uuid": before["uuid"], "metro": "local"},
    }
    state = two.b.project / ".ukc"
    state.mkdir()
    (state / "status.json").write_text(json.dumps({"version": 1, "sessions": {"test": journal}}))
    proc = two.b.run("delete", "session.yaml")
    assert_untouched(two, before)
    assert_refused(proc, two, before["uuid"])


def test_watch_in_a_second_checkout_leaves_the_instance_alone_also_with_prune_and_down(
    two: Checkouts,
) -> None:
    before = first_checkout_applied(two)
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "watch", "--prune", "--down", "session.yaml"],
        cwd=two.b.project,
        env=two.b.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        lines.append(line)
        if "pass 1 done" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert_untouched(two, before)
    assert "pass 1 done (all): failed" in output
    assert f"instance {two.name} (uuid {before['uuid']}) on metro local is not provably" in output
    assert proc.returncode == 1


def test_checkouts_sharing_the_session_secret_are_both_owners(two: Checkouts) -> None:
    secret = secrets.token_hex(16)
    two.a.extra_env["UKC_SESSION_SECRET"] = secret
    two.b.extra_env["UKC_SESSION_SECRET"] = secret
    before = first_checkout_applied(two)
    assert any(t.startswith("ukc.key=") for t in before["tags"])
    # b has no .ukc/ at all (a fresh CI runner): it derives the instance's key from the secret
    plan = two.b.run("plan", "session.yaml").stdout
    assert f"delete instance {two.name}" not in plan and "create instance" not in plan
    two.b.run("apply", "session.yaml", check=0)
    assert_untouched(two, before)
    two.b.run("delete", "session.yaml", check=0)
    assert before["uuid"] and two.instance() is None


@pytest.mark.parametrize("b_secret", ["another", "none"])
def test_a_checkout_without_the_session_secret_can_neither_use_nor_delete_the_instance(
    two: Checkouts, b_secret: str
) -> None:
    two.a.extra_env["UKC_SESSION_SECRET"] = secrets.token_hex(16)
    if b_secret == "another":
        two.b.extra_env["UKC_SESSION_SECRET"] = secrets.token_hex(16)
    before = first_checkout_applied(two)
    for verb in ("apply", "delete"):
        proc = two.b.run(verb, "session.yaml")
        assert_refused(proc, two, before["uuid"])
        output = proc.stdout + proc.stderr
        assert "another owner" in output and "UKC_SESSION_SECRET" in output
    assert_untouched(two, before)
    # nor is a key of that instance left on b's side to try
    keys = two.b.project / ".ukc" / "keys"
    assert not keys.exists() or not any(keys.iterdir())


def test_a_short_session_secret_is_refused_without_being_shown(two: Checkouts) -> None:
    two.b.extra_env["UKC_SESSION_SECRET"] = "ci"
    proc = two.b.run("plan", "session.yaml", check=2)
    assert "UKC_SESSION_SECRET is 2 characters" in proc.stderr
    assert "'ci'" not in proc.stderr


def test_the_owner_file_is_private_and_the_status_file_names_no_owner_id(
    two: Checkouts,
) -> None:
    before = first_checkout_applied(two)
    owner = two.a.project / ".ukc" / "owner"
    assert owner.stat().st_mode & 0o777 == 0o600
    owner_id = owner.read_text().strip()
    assert f"ukc.owner={owner_id}" in before["tags"]
    assert owner_id not in json.dumps(two.a.status())
