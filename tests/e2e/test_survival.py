"""`ukc apply` survives what the real platform does and a kind emulator hid: asynchronous
deletes, retained `deleted` instances, a missing image, an sshd that is up after `running`
and takes the key later, and a cold boot with new host keys and an empty /workspace."""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Iterator
from typing import Any

import pytest

from reconciler.spec.models import DEFAULT_MEMORY_MB
from tests.support.ukc import Ukc

pytestmark = pytest.mark.metro

SPEC = """\
name: tough
directory: ./work
{extra}commands:
  - name: stamp
    run: mkdir -p out && cat input.txt > out/result.txt && echo run >> /workspace/runs.txt
sync:
  back: ["out/"]
"""


@pytest.fixture
def tough(ukc: Ukc) -> Iterator[Ukc]:
    (ukc.project / "work").mkdir()
    (ukc.project / "work" / "input.txt").write_text("data\n")
    ukc.write_spec(SPEC.format(extra=""))
    yield ukc
    behave(ukc, {"preset": "realistic"})


def behave(ukc: Ukc, body: dict[str, Any]) -> None:
    with ukc.api() as client:
        client.post("/_local/behaviour", json=body).raise_for_status()


def session(ukc: Ukc) -> dict[str, Any]:
    return ukc.status()["sessions"]["tough"]  # type: ignore[no-any-return]


def instance(ukc: Ukc, uuid: str) -> dict[str, Any] | None:
    with ukc.api() as client:
        items = client.get(f"/v1/instances/{uuid}").json()["data"]["instances"]
    return items[0] if items and items[0].get("status") == "success" else None


def test_an_instance_is_created_with_the_original_workflows_memory(tough: Ukc) -> None:
    tough.run("apply", "session.yaml", check=0)
    found = instance(tough, session(tough)["instance"]["uuid"])
    assert found is not None and found["memory_mb"] == DEFAULT_MEMORY_MB == 4096


def test_a_replace_waits_for_the_name_and_never_adopts_the_instance_being_deleted(
    tough: Ukc,
) -> None:
    behave(tough, {"delete_hold_s": 2.0, "retention_s": 60.0})
    tough.run("apply", "session.yaml", check=0)
    old = session(tough)["instance"]["uuid"]
    # memory is fixed at creation: the instance is replaced (delete + create, same name)
    tough.write_spec(SPEC.format(extra="memory_mb: 512\n"))
    tough.run("apply", "session.yaml", check=0)
    new = session(tough)["instance"]
    assert new["uuid"] != old
    assert session(tough)["phase"] == "Ready"
    found = instance(tough, new["uuid"])
    # a converged apply leaves it suspended (`suspend: true`)
    assert found is not None and found["state"] == "standby" and found["memory_mb"] == 512
    # the old one was deleted without retention (`dont_retain`): it is gone, not retained
    assert instance(tough, old) is None


def test_an_instance_deleted_out_of_band_and_retained_is_absent_and_its_name_awaited(
    tough: Ukc,
) -> None:
    behave(tough, {"delete_hold_s": 0.5, "retention_s": 4.0})
    tough.run("apply", "session.yaml", check=0)
    old = session(tough)["instance"]
    with tough.api() as client:
        # deleted by someone else, on an account that retains deleted instances
        client.request("DELETE", "/v1/instances", json=[{"uuid": old["uuid"]}]).raise_for_status()
    retained = instance(tough, old["uuid"])
    assert retained is not None and retained["state"] == "deleted"
    started = time.monotonic()
    proc = tough.run("apply", "session.yaml", check=0)
    assert time.monotonic() - started >= 2.0, "the name was free before the retention ended?"
    assert "adopted" not in proc.stdout + proc.stderr
    new = session(tough)["instance"]["uuid"]
    assert new != old["uuid"] and session(tough)["phase"] == "Ready"
    assert (tough.project / "work" / "out" / "result.txt").read_text() == "data\n"


def test_ukc_delete_answers_before_the_name_is_free_and_an_apply_right_after_adopts_nothing(
    tough: Ukc,
) -> None:
    behave(tough, {"delete_hold_s": 2.0})
    tough.run("apply", "session.yaml", check=0)
    old = session(tough)["instance"]["uuid"]
    tough.run("delete", "session.yaml", check=0)
    # a final delete does not wait for the name: the instance is still on its way out
    dying = instance(tough, old)
    assert dying is not None and dying["state"] == "deleted", dying
    assert session(tough)["phase"] == "Deleted"
    proc = tough.run("apply", "session.yaml", check=0)
    said = proc.stdout + proc.stderr
    # the dying instance is neither adopted nor taken for the session's (to replace it)
    assert "adopted" not in said and "delete instance" not in said, said
    assert "create instance" in said, said
    new = session(tough)["instance"]["uuid"]
    assert new != old and session(tough)["phase"] == "Ready"
    assert (tough.project / "work" / "out" / "result.txt").read_text() == "data\n"
    found = instance(tough, new)
    assert found is not None and found["state"] == "standby", found
    # the command ran on the new instance, not on the one being deleted
    [stamp] = session(tough)["commands"]
    assert stamp["instance_uuid"] == new and stamp["exit_code"] == 0
    assert instance(tough, old) is None


def test_an_apply_right_after_ukc_delete_never_takes_the_dying_instance_even_read_as_live(
    tough: Ukc,
) -> None:
    """A platform may report an instance being deleted as `stopping` (force-stopped first),
    not `deleted`: this checkout's record of the delete still says it is on its way out."""
    behave(tough, {"delete_hold_s": 2.0})
    tough.run("apply", "session.yaml", check=0)
    old = session(tough)["instance"]["uuid"]
    tough.run("delete", "session.yaml", check=0)
    with tough.api() as client:
        client.post("/_local/faults", json={"deleting_live": {"count": 1000}}).raise_for_status()
    try:
        dying = instance(tough, old)
        assert dying is not None and dying["state"] == "stopping", dying
        proc = tough.run("apply", "session.yaml", check=0)
    finally:
        with tough.api() as client:
            client.post("/_local/faults", json={"reset": True}).raise_for_status()
    said = proc.stdout + proc.stderr
    assert "adopted" not in said and "delete instance" not in said, said
    assert "start instance" not in said and "create instance" in said, said
    new = session(tough)["instance"]["uuid"]
    assert new != old and session(tough)["phase"] == "Ready"
    [stamp] = session(tough)["commands"]
    assert stamp["instance_uuid"] == new and stamp["exit_code"] == 0
    assert instance(tough, old) is None


def test_a_missing_image_fails_within_seconds_with_the_platforms_stop_code(tough: Ukc) -> None:
    behave(tough, {"known_images_only": True})
    tough.write_spec(SPEC.format(extra="image: nobody/no-such-image:1\n"))
    started = time.monotonic()
    proc = tough.run("apply", "session.yaml")
    took = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr
    assert took < 20, f"apply waited {took:.0f} s for an image that does not exist"
    assert "NOMEDIUM" in proc.stderr and "image not found" in proc.stderr, proc.stderr
    ready = next(c for c in session(tough)["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "BootFailed" and "NOMEDIUM" in ready["message"]


def test_an_sshd_that_listens_late_and_takes_the_key_later_is_waited_for(tough: Ukc) -> None:
    behave(tough, {"ssh_delay_s": 1.0, "key_delay_s": 3.0})
    tough.run("apply", "session.yaml", check=0)
    assert session(tough)["phase"] == "Ready"
    assert (tough.project / "work" / "out" / "result.txt").read_text() == "data\n"


def test_a_cold_boot_relearns_the_host_key_and_runs_the_commands_again(tough: Ukc) -> None:
    behave(tough, {"host_keys_per_boot": True})
    tough.run("apply", "session.yaml", check=0)
    first = session(tough)
    pin = first["instance"]["pin"]
    with tough.api() as client:
        client.put("/v1/instances/stop", json=[{"uuid": first["instance"]["uuid"]}])
        client.request(
            "GET",
            "/v1/instances/wait",
            json=[{"uuid": first["instance"]["uuid"], "state": "stopped", "timeout_s": 30}],
        )
    proc = tough.run("apply", "session.yaml", check=0)
    after = session(tough)
    assert after["instance"]["uuid"] == first["instance"]["uuid"]
    assert after["instance"]["start_count"] == first["instance"]["start_count"] + 1
    assert after["instance"]["pin"] != pin
    assert "host key is learned anew" in proc.stdout + proc.stderr
    stamp = next(c for c in after["commands"] if c["name"] == "stamp")
    # why not started_at: both runs can fall in the same second
    assert next(c for c in first["commands"])["start_count"] == first["instance"]["start_count"]
    assert stamp["start_count"] == after["instance"]["start_count"]


MINIMAL = """\
name: tough
directory: ./work
image: ukc/local-minimal:latest
commands:
  - name: make
    run: {run}
sync:
  back: ["out/"]
  back_delete: true
"""


def test_an_image_without_python3_brings_its_outputs_back_through_find_and_tar(
    tough: Ukc,
) -> None:
    # the original workflow's image: sh, coreutils, findutils, tar, no python3
    make = (
        "mkdir -p out/sub && cat input.txt > out/result.txt && printf '#!/bin/sh\\n' > "
        "out/sub/run.sh && chmod 0777 out/sub/run.sh && echo bye > out/old.txt && "
        "ln -s /etc/passwd out/link"
    )
    tough.write_spec(MINIMAL.format(run=json.dumps(make)))
    first = tough.run("apply", "session.yaml", check=0)
    out = tough.project / "work" / "out"
    assert (out / "result.txt").read_text() == "data\n"
    assert (out / "sub/run.sh").read_text() == "#!/bin/sh\n"
    assert stat.S_IMODE((out / "sub/run.sh").stat().st_mode) == 0o755
    assert (out / "old.txt").read_text() == "bye\n"
    assert not (out / "link").exists() and not (out / "link").is_symlink()
    assert "refused from sandbox: out/link: symlink (never followed or written)" in (
        first.stdout + first.stderr
    )
    # the sandbox changes one output and deletes another: the change comes back, the
    # deletion is mirrored (the file came from this sandbox), the rest is not sent again
    again = "rm out/old.txt && echo v2 > out/result.txt"
    tough.write_spec(MINIMAL.format(run=json.dumps(again)))
    second = tough.run("apply", "session.yaml", check=0)
    assert (out / "result.txt").read_text() == "v2\n"
    assert not (out / "old.txt").exists()
    assert (out / "sub/run.sh").exists()
    text = second.stdout + second.stderr
    assert "brought back 1 file(s)" in text, text
    assert "removed here, deleted in the sandbox: out/old.txt" in text, text


def test_an_image_without_python3_converges_over_the_shell_path(tough: Ukc) -> None:
    # it used to fail naming the missing python3; the sync now takes shell+tar there
    tough.write_spec(SPEC.format(extra="image: ukc/local-minimal:latest\n"))
    proc = tough.run("apply", "session.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tough.project / "work" / "out" / "result.txt").read_text() == "data\n"
    ready = next(c for c in session(tough)["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Converged"), ready


COUNTING = """\
name: tough
directory: ./work
{extra}commands:
  - name: count
    run: mkdir -p out && echo run >> out/runs.txt
sync:
  back: ["out/"]
"""


def volumes(ukc: Ukc) -> list[dict[str, Any]]:
    with ukc.api() as client:
        return client.get("/v1/volumes").json()["data"]["volumes"]  # type: ignore[no-any-return]


def cold_boot(ukc: Ukc, uuid: str) -> None:
    with ukc.api() as client:
        client.put("/v1/instances/stop", json=[{"uuid": uuid}])
        client.request(
            "GET", "/v1/instances/wait", json=[{"uuid": uuid, "state": "stopped", "timeout_s": 30}]
        )


def test_a_session_with_a_volume_keeps_its_workspace_across_a_cold_boot_and_delete_removes_it(
    tough: Ukc,
) -> None:
    tough.write_spec(COUNTING.format(extra="workspace:\n  volume: 64MiB\n"))
    tough.run("apply", "session.yaml", check=0)
    first = session(tough)["instance"]
    found = instance(tough, first["uuid"])
    assert found is not None
    [mount] = found["volumes"]
    assert mount["at"] == "/workspace"
    [vol] = [v for v in volumes(tough) if v["uuid"] == mount["uuid"]]
    assert vol["size_mb"] == 64
    assert "ukc.session=tough" in vol["tags"]
    on_host = tough.metro.state_dir / "volumes" / vol["uuid"]
    assert (on_host / "out" / "runs.txt").read_text() == "run\n"
    cold_boot(tough, first["uuid"])
    # the stop dropped nothing: the files are on the volume, not in the instance's memory
    assert (on_host / "out" / "runs.txt").read_text() == "run\n"
    tough.run("apply", "session.yaml", check=0)
    after = session(tough)
    assert after["instance"]["uuid"] == first["uuid"]
    assert after["instance"]["start_count"] == first["start_count"] + 1
    # its outputs survived the cold boot, so the command is not run again
    [count] = after["commands"]
    assert count["start_count"] == first["start_count"]
    assert (on_host / "out" / "runs.txt").read_text() == "run\n"
    assert (on_host / "input.txt").read_text() == "data\n"
    tough.run("delete", "session.yaml", check=0)
    deadline = time.monotonic() + 30
    while any(v["uuid"] == vol["uuid"] for v in volumes(tough)):
        assert time.monotonic() < deadline, "the session's volume outlived ukc delete"
        time.sleep(0.1)
    assert not on_host.exists()


def test_a_session_without_a_volume_loses_its_workspace_in_a_cold_boot(tough: Ukc) -> None:
    tough.write_spec(COUNTING.format(extra=""))
    tough.run("apply", "session.yaml", check=0)
    first = session(tough)["instance"]
    assert instance(tough, first["uuid"])["volumes"] == []  # type: ignore[index]
    cold_boot(tough, first["uuid"])
    assert not (tough.workspace(first["uuid"]) / "out" / "runs.txt").exists()
    tough.run("apply", "session.yaml", check=0)
    after = session(tough)
    [count] = after["commands"]
    # the outputs went with the memory: the command ran again, on the new boot
    assert count["start_count"] == after["instance"]["start_count"] == first["start_count"] + 1
    assert (tough.project / "work" / "out" / "runs.txt").read_text() == "run\n"


def test_delete_also_removes_a_kept_volume_of_the_session_and_never_anothers(
    tough: Ukc,
) -> None:
    tough.run("apply", "session.yaml", check=0)
    found = instance(tough, session(tough)["instance"]["uuid"])
    assert found is not None
    ours = [t for t in found["tags"] if t.startswith(("ukc", "ukc."))]
    foreign = [t for t in ours if not t.startswith("ukc.owner=")] + ["ukc.owner=" + "f" * 32]
    with tough.api() as client:
        # as a platform that kept the volume (persistent) or a create half done would leave it
        for name, tags in (("kept-ws", ours), ("planted-ws", foreign)):
            r = client.post("/v1/volumes", json={"name": name, "size_mb": 8, "tags": tags})
            assert r.json()["status"] == "success", r.text
    tough.run("delete", "session.yaml", check=0)
    left = {v["name"] for v in volumes(tough)}
    assert "kept-ws" not in left
    assert "planted-ws" in left
    with tough.api() as client:
        client.request("DELETE", "/v1/volumes", json=[{"name": "planted-ws"}])


def wake_statefully(ukc: Ukc, uuid: str) -> None:
    """Suspend the instance (a session's standby is stateful: memory kept), then wake it."""
    with ukc.api() as client:
        client.put("/v1/instances/suspend", json=[{"uuid": uuid}]).raise_for_status()
        client.request(
            "GET", "/v1/instances/wait", json=[{"uuid": uuid, "state": "standby", "timeout_s": 30}]
        )
        client.put("/v1/instances/start", json=[{"uuid": uuid, "timeout_s": 30}])
        client.request(
            "GET", "/v1/instances/wait", json=[{"uuid": uuid, "state": "running", "timeout_s": 30}]
        )


@pytest.mark.parametrize("image", ["", "ukc/local-minimal:latest"])
def test_a_stateful_wake_that_moves_start_count_neither_resyncs_nor_reruns(
    tough: Ukc, image: str
) -> None:
    # the marker is POSIX sh only: it works on an image without python3 too
    behave(tough, {"wake_moves_start_count": True})
    tough.write_spec(COUNTING.format(extra=f"image: {image}\n" if image else ""))
    tough.run("apply", "session.yaml", check=0)
    first = session(tough)
    uuid = first["instance"]["uuid"]
    wake_statefully(tough, uuid)
    woken = instance(tough, uuid)
    assert woken is not None and woken["start_count"] == first["instance"]["start_count"] + 1
    plan = tough.run("plan", "session.yaml")
    assert "sync" not in plan.stdout.lower() and "count" not in plan.stdout, plan.stdout
    proc = tough.run("apply", "session.yaml", check=0)
    assert "boot marker intact" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    after = session(tough)
    # memory was kept: the command's output is still there and it did not run again
    assert (tough.workspace(uuid) / "out" / "runs.txt").read_text() == "run\n"
    assert after["commands"][0]["started_at"] == first["commands"][0]["started_at"]
    assert after["sync"]["last_synced_at"] == first["sync"]["last_synced_at"]
    # the record now names the boot the platform counts, and the host key was not relearnt
    assert after["instance"]["start_count"] == woken["start_count"]
    assert after["sync"]["start_count"] == woken["start_count"]
    assert after["instance"]["pin"] == first["instance"]["pin"]
    assert "learned anew" not in proc.stdout + proc.stderr


def test_a_cold_boot_behind_ukcs_back_is_seen_from_inside_and_resyncs_and_reruns(
    tough: Ukc,
) -> None:
    # the same host key after the cold boot: only the marker can tell it from a wake
    behave(tough, {"host_keys_per_boot": False})
    tough.write_spec(COUNTING.format(extra=""))
    tough.run("apply", "session.yaml", check=0)
    first = session(tough)
    uuid = first["instance"]["uuid"]
    cold_boot(tough, uuid)
    with tough.api() as client:
        client.put("/v1/instances/start", json=[{"uuid": uuid, "timeout_s": 30}])
    proc = tough.run("apply", "session.yaml", check=0)
    assert "boot marker gone" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    after = session(tough)
    [count] = after["commands"]
    assert (
        count["start_count"]
        == after["instance"]["start_count"]
        == first["instance"]["start_count"] + 1
    )
    assert after["sync"]["remote_scanned"] is True
    assert (tough.workspace(uuid) / "input.txt").read_text() == "data\n"
    assert (tough.workspace(uuid) / "out" / "runs.txt").read_text() == "run\n"
