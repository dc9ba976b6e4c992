"""`exec: plugin` end to end on the local metro: commands and sync through the sandbox plugin
API, the same cases an SSH session passes, an instance with no public port, and no key."""

from __future__ import annotations

import json
import os
import random
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.cloud.api import UkcApi
from reconciler.cloud.model import CreateRequest
from reconciler.cloud.trust import Reach
from reconciler.local.daemon import MetroInfo
from reconciler.transport import plugin
from reconciler.transport.base import Credentials, Target
from tests.support.ukc import Ukc
from tests.support.waiting import eventually

pytestmark = pytest.mark.metro

SPEC = """\
name: plug
directory: ./work
exec: plugin
commands:
  - name: build
    run: mkdir -p out && tr a-z A-Z < input.txt > out/upper.txt && echo built
  - name: count
    run: wc -c < input.txt > out/count.txt; echo counted >&2
sync:
  exclude: ["*.tmp"]
  back: ["out/"]
"""


def _project(ukc: Ukc, spec: str = SPEC) -> None:
    work = ukc.project / "work"
    (work / "lib").mkdir(parents=True)
    (work / "input.txt").write_text("hello world\n")
    (work / "lib" / "a.txt").write_text("library\n")
    (work / "scratch.tmp").write_text("never sent\n")
    ukc.write_spec(spec)


def _session(ukc: Ukc) -> dict[str, Any]:
    return ukc.status()["sessions"]["plug"]  # type: ignore[no-any-return]


def _instance(ukc: Ukc) -> dict[str, Any]:
    (inst,) = [i for i in ukc.instances() if i["name"].endswith("-plug")]
    return inst


def _plugin_commands(ukc: Ukc, uuid: str) -> list[dict[str, Any]]:
    """What the plugin tells anyone holding the token about the commands it ran."""
    base = f"/v1/instances/{uuid}/plugins/sandbox"
    with ukc.api() as client:
        # an apply leaves the instance suspended: started first, as the vendor's SDK has
        # users do before the plugin is used again (a no-op on a running instance)
        client.put("/v1/instances/start", json=[{"uuid": uuid, "timeout_s": 30}])
        ids = client.get(f"{base}/commands").json()["data"]["commands"]
        return [client.get(f"{base}/commands/{cid}").json()["data"] for cid in ids]


def test_a_plugin_session_creates_syncs_runs_and_brings_back_with_no_port_and_no_key(
    ukc: Ukc,
) -> None:
    _project(ukc)
    proc = ukc.run("apply", "session.yaml", check=0)
    assert "built" in proc.stdout and "counted" in proc.stdout
    rec = _session(ukc)
    assert rec["phase"] == "Ready"
    assert [(c["name"], c["exit_code"]) for c in rec["commands"]] == [("build", 0), ("count", 0)]
    inst = rec["instance"]
    assert inst["fqdn"] is None and inst["pin"] == f"uuid:{inst['uuid']}"
    assert (ukc.project / "work" / "out" / "upper.txt").read_text() == "HELLO WORLD\n"
    assert (ukc.project / "work" / "out" / "count.txt").read_text().strip() == "12"
    ws = ukc.workspace(inst["uuid"])
    assert (ws / "lib" / "a.txt").read_text() == "library\n"
    assert not (ws / "scratch.tmp").exists()
    # nothing on the edge: no service group, only the sandbox plugin; no key was made
    wire = _instance(ukc)
    assert not (wire.get("service_group") or {}).get("services")
    assert [p["name"] for p in wire["plugins"]] == ["sandbox"]
    assert "ukc.exec=plugin" in wire["tags"]
    assert not (ukc.project / ".ukc" / "keys").exists() or not any(
        (ukc.project / ".ukc" / "keys").iterdir()
    )


def test_a_second_plugin_apply_plans_nothing_and_a_changed_file_goes_alone(ukc: Ukc) -> None:
    _project(ukc)
    ukc.run("apply", "session.yaml", check=0)
    first = _session(ukc)
    plan = ukc.run("plan", "session.yaml", "--detailed-exitcode", check=0).stdout
    assert plan.strip().endswith("No changes. Sessions match their specs.")
    out = json.loads(ukc.run("apply", "session.yaml", "--output", "json", check=0).stdout)
    assert out["groups"][0]["changes_made"] is False
    (ukc.project / "work" / "input.txt").write_text("changed text\n")
    ukc.run("apply", "session.yaml", check=0)
    rec = _session(ukc)
    assert rec["instance"]["uuid"] == first["instance"]["uuid"]
    assert rec["sync"]["last_files_sent"] == 1 and rec["sync"]["remote_scanned"] is False
    assert (ukc.project / "work" / "out" / "upper.txt").read_text() == "CHANGED TEXT\n"


def test_a_failed_and_a_timed_out_plugin_command_are_recorded_and_the_outputs_still_come_home(
    ukc: Ukc,
) -> None:
    marker = f"{os.getpid() % 1000 + 4000}.25"
    _project(
        ukc,
        SPEC.replace(
            "  - name: count\n",
            "  - name: boom\n    run: echo broken pipe dream >&2; exit 3\n  - name: count\n",
        ),
    )
    proc = ukc.run("apply", "session.yaml", check=1)
    assert "boom" in proc.stderr and "exited 3" in proc.stderr
    rec = _session(ukc)
    by_name = {c["name"]: c for c in rec["commands"]}
    assert rec["phase"] == "Failed" and by_name["boom"]["exit_code"] == 3
    assert "broken pipe dream" in by_name["boom"]["stderr"]
    assert (ukc.project / "work" / "out" / "upper.txt").read_text() == "HELLO WORLD\n"

    ukc.write_spec(
        SPEC.replace(
            "  - name: count\n",
            f"  - name: slow\n    run: echo started; sleep {marker} & sleep {marker}\n"
            "    timeout: 2s\n  - name: count\n",
        )
    )
    proc = ukc.run("apply", "session.yaml", check=1)
    assert "timed out after 2s" in proc.stderr
    slow = {c["name"]: c for c in _session(ukc)["commands"]}["slow"]
    assert slow["timed_out"] is True and slow["exit_code"] is None
    assert "started" in slow["stdout"]

    # the command and the child it left in the background are gone
    def gone() -> bool:
        found = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True)
        return found.returncode == 1

    assert eventually(gone, timeout_s=10)


def test_secrets_and_the_metro_token_reach_no_status_no_terminal_and_no_plugin_record(
    ukc: Ukc,
) -> None:
    canary = "canary-plug1n-secret-9c1d"
    _project(
        ukc,
        SPEC.replace("sync:\n", "secret_env:\n  TOKEN: E2E_CANARY\nsync:\n").replace(
            "wc -c < input.txt > out/count.txt",
            'echo "$TOKEN" | wc -c > out/count.txt; echo "token is $TOKEN"',
        ),
    )
    ukc.extra_env["E2E_CANARY"] = canary
    proc = ukc.run("apply", "session.yaml", check=0)
    assert (ukc.project / "work" / "out" / "count.txt").read_text().strip() == str(len(canary) + 1)
    token = ukc.metro.token
    for needle in (canary, token):
        assert needle not in proc.stdout + proc.stderr
        for path in (ukc.project / ".ukc").rglob("*"):
            if path.is_file():
                assert needle.encode() not in path.read_bytes(), path
    # the plugin keeps no command (nor its output, in the sandbox's memory) after the apply
    assert _plugin_commands(ukc, _session(ukc)["instance"]["uuid"]) == []


def test_the_plugin_route_refuses_a_request_without_the_metro_token(ukc: Ukc) -> None:
    _project(ukc)
    ukc.run("apply", "session.yaml", check=0)
    uuid = _session(ukc)["instance"]["uuid"]
    before = _plugin_commands(ukc, uuid)
    url = f"{ukc.metro.api_url}/v1/instances/{uuid}/plugins/sandbox/commands"
    body = {"cmd": "touch /workspace/pwned"}
    for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": "Basic x"}):
        assert httpx.post(url, json=body, headers=headers, timeout=30).status_code == 401
    assert _plugin_commands(ukc, uuid) == before
    assert not (ukc.workspace(uuid) / "pwned").exists()


def test_delete_removes_a_plugin_sessions_instance(ukc: Ukc) -> None:
    _project(ukc)
    ukc.run("apply", "session.yaml", check=0)
    name = _session(ukc)["instance"]["name"]
    ukc.run("delete", "session.yaml", check=0)
    assert name not in [i["name"] for i in ukc.instances()]


def test_a_plugin_process_carries_binary_streams_both_ways_waits_and_is_killed(
    metro: MetroInfo,
) -> None:
    api = UkcApi(metro.api_url, metro.token, metro="local")
    name = f"plugin-streams-{os.getpid()}"
    inst = api.create_instance(
        CreateRequest(
            name, "ukc/local-sandbox:latest", {}, ["ukc-test"], plugins=plugin.KIND.plugins
        )
    )
    try:
        target = Target(name, None, Reach(ssl.create_default_context()), inst.uuid, api)
        transport = plugin.KIND.connect(target, Credentials(Path("/x")), pin=None, deadline_s=60)
        data = random.Random(7).randbytes(5 * 1024 * 1024 + 13)
        proc = transport.start("cat; printf done >&2")
        sizes = [1, 100, 65536, 3 * 1024 * 1024, 1024 * 1024]

        def feed() -> None:
            at = 0
            for size in sizes * 4:
                proc.write(data[at : at + size])
                at += size
            proc.write(data[at:])
            proc.close_stdin()

        feeder = threading.Thread(target=feed)
        feeder.start()
        got = b"".join(iter(lambda: proc.read(1 << 20), b""))
        feeder.join()
        assert got == data
        assert proc.read_stderr() == b"done" and proc.wait(30) == 0

        sleeper = transport.start("sleep 60")
        with pytest.raises(TimeoutError):
            sleeper.wait(0.3)
        sleeper.kill()
        assert sleeper.read() == b""
        transport.close()
        with ukc_client(metro) as client:
            base = f"/v1/instances/{inst.uuid}/plugins/sandbox/commands"
            assert client.get(base).json()["data"]["commands"] == []
    finally:
        api.delete_instance(name, uuid=inst.uuid)
        api.close()


def ukc_client(metro: MetroInfo) -> httpx.Client:
    return httpx.Client(
        base_url=metro.api_url, headers={"Authorization": f"Bearer {metro.token}"}, timeout=30
    )


def test_exec_ssh_on_pipes_and_logs_reach_a_plugin_session(ukc: Ukc) -> None:
    _project(ukc, SPEC.replace("sync:\n", "secret_env: {API_KEY: PLUG_EXEC_SECRET}\nsync:\n"))
    secret = "s3cret-plug-exec-77d0"
    ukc.extra_env["PLUG_EXEC_SECRET"] = secret
    ukc.run("apply", "session.yaml", check=0)
    proc = ukc.run("exec", "plug", "--", 'echo "key $API_KEY"; cat input.txt; exit 5')
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout == "key ***\nhello world\n" and secret not in proc.stdout + proc.stderr
    script = subprocess.run(
        [sys.executable, "-m", "reconciler", "ssh", "plug"],
        cwd=ukc.project,
        env=ukc.env(),
        input="pwd\nexit 4\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert script.returncode == 4 and script.stdout.strip().endswith("/workspace"), script.stderr
    logs = ukc.run("logs", "plug", check=0).stdout
    assert "== command build (exit 0" in logs and "built" in logs


def test_what_a_plugin_sandbox_sends_back_is_checked_as_over_ssh(ukc: Ukc) -> None:
    victim = ukc.project / "victim.txt"
    victim.write_text("precious\n")
    _project(
        ukc,
        f"""\
name: plug
directory: ./work
exec: plugin
commands:
  - name: evil
    run: |
      mkdir -p out && echo ok > out/fine.txt
      ln -s {victim} out/link-to-victim
      ln -s /etc out/etc-dir
      mkfifo out/pipe
sync:
  back: ["out/"]
""",
    )
    proc = ukc.run("apply", "session.yaml", check=0)
    out = ukc.project / "work" / "out"
    assert (out / "fine.txt").read_text() == "ok\n" and victim.read_text() == "precious\n"
    assert not (out / "link-to-victim").is_symlink() and not (out / "etc-dir").exists()
    assert not (out / "pipe").exists()
    assert len(_session(ukc)["sync"]["rejected"]) >= 3 and "refused from sandbox" in proc.stdout


def test_switching_between_ssh_and_plugin_brings_outputs_home_through_the_old_transport(
    ukc: Ukc,
) -> None:
    _project(ukc, SPEC.replace("exec: plugin\n", ""))
    ukc.run("apply", "session.yaml", check=0)
    ssh_uuid = _session(ukc)["instance"]["uuid"]
    assert [s["port"] for s in _instance(ukc)["service_group"]["services"]] == [2222]
    ukc.write_spec(SPEC)
    planned = ukc.run("plan", "session.yaml", check=0).stdout
    assert "exec changed from ssh to plugin" in planned
    assert "outputs come home before the replacement" in planned
    ukc.run("apply", "session.yaml", check=0)
    rec = _session(ukc)
    assert rec["instance"]["uuid"] != ssh_uuid and rec["phase"] == "Ready"
    assert not (_instance(ukc).get("service_group") or {}).get("services")
    assert (ukc.project / "work" / "out" / "upper.txt").read_text() == "HELLO WORLD\n"
    ukc.write_spec(SPEC.replace("exec: plugin\n", ""))
    ukc.run("apply", "session.yaml", check=0)
    assert _session(ukc)["instance"]["uuid"] != rec["instance"]["uuid"]
    assert (
        _session(ukc)["instance"]["pin"].startswith("SHA256:") or _session(ukc)["phase"] == "Ready"
    )
