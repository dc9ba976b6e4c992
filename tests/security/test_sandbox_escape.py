"""Attacks by the sandbox on the host, and what sandboxes leave behind on the host.

The attacker is the code a session runs: each probe is a session command run by `ukc apply`
over ssh through the edge of a real local metro, exactly as a user's command runs. What the
attack may not reach is checked from the host (file contents, modes, `/proc`).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from reconciler.local import daemon as metro_daemon
from reconciler.local.behaviour import BootOptions
from reconciler.local.daemon import MetroInfo
from reconciler.local.sandbox.runtime import DEFAULT_MAX_PIDS
from reconciler.local.state.records import STOP_CODE_OUT_OF_MEMORY, STOP_REASON_KERNEL
from tests.support.nonroot import NonRootRuntime
from tests.support.sandbox_harness import needs_metro_tools
from tests.support.sandboxes import cmdline, proc_ids, sandbox_pids
from tests.support.ukc import Ukc
from tests.support.users import run_as_other_user
from tests.support.waiting import eventually

pytestmark = [needs_metro_tools, pytest.mark.metro]

# the account lines of the sandbox's own (generated) /etc/shadow
OWN_SHADOW = {"root:*:19000:0:99999:7:::", "sshd:*:19000:0:99999:7:::"}


def probe(ukc: Ukc, run: str, name: str = "probe", **spec: Any) -> dict[str, Any]:
    """Apply a session whose one command is `run`; its command record from status.json."""
    (ukc.project / "work").mkdir(exist_ok=True)
    body = {"name": name, "directory": "./work", **spec, "commands": [{"name": "p", "run": run}]}
    ukc.write_spec(yaml.safe_dump(body, sort_keys=False), f"{name}.yaml")
    ukc.run("apply", f"{name}.yaml")
    record: dict[str, Any] = ukc.status()["sessions"][name]
    return record


def command_output(record: dict[str, Any]) -> str:
    commands = record.get("commands") or []
    assert commands, f"the probe did not run: {json.dumps(record)[:2000]}"
    return str(commands[0].get("stdout") or "") + str(commands[0].get("stderr") or "")


def instance(ukc: Ukc, uuid: str) -> dict[str, Any]:
    with ukc.api() as client:
        item: dict[str, Any] = client.get(f"/v1/instances/{uuid}").json()["data"]["instances"][0]
    return item


#: what `account_attack` prints when a step of it worked
ACCOUNT_ATTACK_WINS = {
    f"{word}-{name}"
    for word in ("WROTE", "REMOUNTED", "CHMOD", "CHOWNED", "REPLACED", "UNMOUNTED")
    for name in ("passwd", "group")
}


def account_attack(evil: str) -> str:
    """Shell commands by which a sandbox tries to add the account `evil` to the `/etc/passwd`
    and `/etc/group` it shares with every sandbox of its daemon; each step that works prints
    a word of `ACCOUNT_ATTACK_WINS`."""
    return " ".join(
        f"echo '{evil}:x:0:0::/:/bin/sh' >> /etc/{f} && echo WROTE-{f}; "
        f"mount -o remount,bind,rw /etc/{f} && echo REMOUNTED-{f}; "
        f"chmod 0666 /etc/{f} && echo CHMOD-{f}; "
        f"chown 0:0 /etc/{f} 2>/dev/null && echo CHOWNED-{f}; "
        f"cp /etc/{f} /tmp/{f} && echo '{evil}:x:0:' >> /tmp/{f} && "
        f"mv -f /tmp/{f} /etc/{f} && echo REPLACED-{f}; "
        f"umount /etc/{f} && echo UNMOUNTED-{f}; "
        for f in ("passwd", "group")
    )


class TestHostFiles:
    def test_a_sandbox_cannot_read_the_hosts_shadow_files_or_ssh_host_keys(self, ukc: Ukc) -> None:
        secrets_on_host = [Path("/etc/shadow"), Path("/etc/gshadow")]
        secrets_on_host += sorted(Path("/etc/ssh").glob("ssh_host_*_key"))
        lines = {
            line
            for path in secrets_on_host
            if path.exists()
            for line in path.read_text().splitlines()
            if len(line) > 8 and line not in OWN_SHADOW
        }
        assert lines, "no host secret to protect on this machine"
        out = command_output(
            probe(
                ukc,
                "cat /etc/gshadow /etc/ssh/ssh_host_*_key; umount /etc/shadow; cat /etc/shadow; "
                "cat /proc/1/root/etc/shadow; true",
            )
        )
        assert "Permission denied" in out
        leaked = [line for line in lines if line in out]
        assert not leaked, f"{len(leaked)} line(s) of host secrets read by the sandbox"

    def test_a_sandbox_can_neither_remount_nor_write_the_hosts_etc_and_usr(self, ukc: Ukc) -> None:
        marker = f"ukc-escape-{secrets.token_hex(6)}"
        targets = [Path("/etc") / marker, Path("/usr") / marker, Path("/") / marker]
        try:
            out = command_output(
                probe(
                    ukc,
                    f"mount -o remount,bind,rw /etc && echo REMOUNTED-etc; "
                    f"mount -o remount,bind,rw /usr && echo REMOUNTED-usr; "
                    f"touch /etc/{marker} && echo WROTE-etc; "
                    f"touch /usr/{marker} && echo WROTE-usr; "
                    f"touch /{marker} && echo WROTE-root; "
                    f"unshare -Urm sh -c 'mount -o remount,bind,rw /etc && echo NESTED'; "
                    f"touch /workspace/ok /tmp/ok && echo PRIVATE-OK; true",
                )
            )
            assert "PRIVATE-OK" in out, out
            for word in ("REMOUNTED", "WROTE", "NESTED"):
                assert word not in out, out
            assert not any(t.exists() for t in targets)
        finally:
            for t in targets:
                t.unlink(missing_ok=True)

    def test_a_sandbox_root_cannot_change_the_passwd_and_group_every_sandbox_shares(
        self, ukc: Ukc
    ) -> None:
        evil = f"evil{secrets.token_hex(4)}"
        attack = account_attack(evil)
        out = command_output(probe(ukc, attack + "id -u; true", name="attacker"))
        assert "0" in out.splitlines(), out  # the attack ran as the sandbox's root
        assert not ACCOUNT_ATTACK_WINS & set(out.split()), out
        shared = ukc.metro.state_dir / "accounts"
        for name in ("passwd", "group"):
            st = (shared / name).stat()
            assert evil not in (shared / name).read_text()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.geteuid(), 0o644)
        seen = command_output(probe(ukc, "cat /etc/passwd /etc/group", name="bystander"))
        assert seen == (shared / "passwd").read_text() + (shared / "group").read_text()
        assert evil not in seen


class TestHostIdentity:
    def test_every_process_of_a_sandbox_runs_as_a_non_root_host_uid_of_its_own(
        self, ukc: Ukc
    ) -> None:
        uids: dict[str, set[int]] = {}
        for name in ("first", "second"):
            record = probe(ukc, "sleep 120 >/dev/null 2>&1 & echo started", name=name)
            assert "started" in command_output(record)
            pids = sandbox_pids(ukc.workspace(record["instance"]["uuid"]))
            assert any(cmdline(p) == ["sleep", "120"] for p in pids)
            assert len(pids) >= 5  # bwrap monitor and pid 1, agent, sshd, sleep
            ids = {p: proc_ids(p) for p in pids}
            for pid, found in ids.items():
                assert found, f"pid {pid} vanished"
                assert 0 not in found["Uid"] + found["Gid"], (pid, cmdline(pid), found)
            uids[name] = {u for found in ids.values() for u in found["Uid"]}
        assert not uids["first"] & uids["second"]


class TestLimits:
    BOMB = """\
import os
n = 0
try:
    while n < 3000:
        if os.fork() == 0:
            os.execv("/bin/sleep", ["sleep", "20"])
        n += 1
    print("forked", n)
except OSError as exc:
    print("refused after", n, exc.strerror)
"""

    def test_a_fork_bomb_is_stopped_by_the_task_limit_and_the_host_survives(self, ukc: Ukc) -> None:
        (ukc.project / "work").mkdir()
        (ukc.project / "work" / "bomb.py").write_text(self.BOMB)
        # suspend: false: the instance must still be running after the bomb, not asleep
        record = probe(ukc, "python3 bomb.py", memory_mb=2048, suspend=False)
        out = command_output(record)
        assert "refused after" in out, out
        forked = int(out.split("refused after", 1)[1].split()[0])
        assert 0 < forked < DEFAULT_MAX_PIDS
        pids = sandbox_pids(ukc.workspace(record["instance"]["uuid"]))
        assert len(pids) <= DEFAULT_MAX_PIDS + 1  # + the bwrap monitor outside the namespace
        # the host and the metro carry on
        assert subprocess.run(["true"], check=False).returncode == 0
        assert instance(ukc, record["instance"]["uuid"])["state"] == "running"

    def test_a_memory_hog_stops_the_instance_with_the_out_of_memory_stop_code(
        self, ukc: Ukc
    ) -> None:
        record = probe(
            ukc,
            "python3 -c 'x = bytearray(1024 << 20); print(\"allocated\")'",
            memory_mb=64,
        )
        uuid = record["instance"]["uuid"]
        assert "allocated" not in command_output(record)
        assert eventually(lambda: instance(ukc, uuid)["state"] == "stopped", 30, 0.1)
        item = instance(ukc, uuid)
        assert (item["stop_reason"], item["stop_code"]) == (
            STOP_REASON_KERNEL,
            STOP_CODE_OUT_OF_MEMORY,
        )
        assert item["stop_code"] == 0x000C7F04
        assert "exit_code" not in item


SCAN = """\
import os
# why: the needles come in this process's own environment, which the scan skips
needles = [n.encode() for n in os.environ["NEEDLES"].split()]
for pid in os.listdir("/proc"):
    if not pid.isdigit() or int(pid) == os.getpid():
        continue
    for what in ("cmdline", "environ"):
        try:
            with open(f"/proc/{pid}/{what}", "rb") as f:
                data = f.read()
        except OSError:
            continue
        for n in needles:
            if n in data:
                print(pid, what, data.replace(b"\\0", b" ")[:200])
"""


class TestNames:
    def test_no_host_process_readable_by_another_user_names_the_session(self, ukc: Ukc) -> None:
        session = "hidden" + secrets.token_hex(5)
        (ukc.project / "work").mkdir()
        body = {
            "name": session,
            "directory": "./work",
            "commands": [{"name": "wait", "run": "sleep 25"}],
        }
        ukc.write_spec(yaml.safe_dump(body, sort_keys=False), "s.yaml")
        apply = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "apply", "s.yaml"],
            cwd=ukc.project,
            env=ukc.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:

            def running_command() -> bool:
                mine = [i for i in ukc.instances() if i["name"].endswith(session)]
                return bool(mine) and any(
                    cmdline(p)[-1:] == ["sleep 25"] or cmdline(p) == ["sleep", "25"]
                    for p in sandbox_pids(ukc.workspace(mine[0]["uuid"]))
                )

            assert eventually(running_command, 90, 0.1), "the session command never ran"
            name = next(i["name"] for i in ukc.instances() if i["name"].endswith(session))
            scan = run_as_other_user(
                ["/usr/bin/python3", "-c", SCAN], env={"NEEDLES": f"{session} {name}"}
            )
            assert scan.returncode == 0, scan.stderr
            assert scan.stdout == "", scan.stdout
        finally:
            apply.communicate(timeout=180)


class TestNonRootDaemon:
    def test_a_sandbox_of_a_non_root_daemon_has_no_capabilities_and_no_user_namespaces(
        self, tmp_path: Path
    ) -> None:
        with NonRootRuntime(tmp_path) as daemon:
            out = daemon.ssh(
                "grep -E '^Cap(Prm|Eff|Bnd|Amb)' /proc/self/status; "
                "unshare -Ur true && echo NESTED; id -u"
            )
            caps = dict(line.split(":") for line in out.stdout.splitlines() if ":" in line)
            assert {k: int(v, 16) for k, v in caps.items()} == {
                "CapPrm": 0, "CapEff": 0, "CapBnd": 0, "CapAmb": 0
            }, out.stdout  # fmt: skip
            assert "NESTED" not in out.stdout
            assert out.stdout.splitlines()[-1] == str(daemon.uid)

    def test_a_non_root_daemons_sandbox_cannot_change_the_account_files_its_daemon_shares(
        self, tmp_path: Path
    ) -> None:
        # why here too: these files are the sandbox's own uid's, so only the read-only
        # binds stand between it and every other sandbox of its daemon
        evil = f"evil{secrets.token_hex(4)}"
        with NonRootRuntime(tmp_path) as daemon:
            shared = daemon.root / "state" / "accounts"
            before = {name: (shared / name).read_text() for name in ("passwd", "group")}
            out = daemon.ssh(account_attack(evil) + "cat /etc/passwd /etc/group")
            assert out.returncode == 0, out.stderr
            assert not ACCOUNT_ATTACK_WINS & set(out.stdout.split()), out.stdout
            assert evil not in out.stdout
            for name in ("passwd", "group"):
                st = (shared / name).stat()
                assert (shared / name).read_text() == before[name]
                assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (daemon.uid, 0o644)

    def test_a_non_root_daemons_sandbox_cannot_write_more_than_memory_mb_into_its_workspace(
        self, tmp_path: Path
    ) -> None:
        # the attacker fills /workspace, which lives in RAM on UKC (memory_mb bounds it)
        boot = BootOptions(workspace_in_memory=True)
        with NonRootRuntime(tmp_path, boot=boot, memory_mb=32) as daemon:
            out = daemon.ssh(
                "dd if=/dev/zero of=/workspace/fill bs=1M count=64 2>&1; echo dd=$?; "
                "du -sm /workspace/fill"
            )
            assert "No space left on device" in out.stdout, out.stdout + out.stderr
            assert "dd=0" not in out.stdout
            assert int(out.stdout.splitlines()[-1].split()[0]) <= 32, out.stdout
            # and nothing of it reached the host's disk
            assert not daemon.workspace.exists() or list(daemon.workspace.iterdir()) == []


class TestLeftovers:
    def test_destroying_a_sandbox_leaves_a_symlinked_host_files_mode_alone(
        self, tmp_path: Path
    ) -> None:
        with NonRootRuntime(tmp_path) as daemon:
            victim = daemon.root / "victim"
            victim.write_text("the daemon user's own file\n")
            os.chown(victim, daemon.uid, -1)
            victim.chmod(0o644)
            out = daemon.ssh(
                f"mkdir /workspace/trap && ln -s {victim} /workspace/trap/link && "
                f"chmod 0500 /workspace/trap && echo planted"
            )
            assert out.stdout.strip() == "planted", out.stderr
            daemon.destroy()
            assert not daemon.workspace.exists()
            assert stat.S_IMODE(victim.stat().st_mode) == 0o644

    def test_no_workspace_of_a_deleted_instance_survives_delete_or_local_stop(
        self, tmp_path: Path
    ) -> None:
        state = tmp_path / "metro"
        info: MetroInfo = metro_daemon.ensure_running(state)
        try:
            ukc = Ukc(tmp_path / "project", info, {})
            ukc.project.mkdir()
            uuids = {}
            for name in ("gone", "stopped"):
                uuids[name] = probe(ukc, "echo hi > here.txt", name=name)["instance"]["uuid"]
                assert (state / "workspaces" / uuids[name] / "here.txt").exists()

            def left(uuid: str) -> list[Path]:
                return [p for p in (state / "workspaces" / uuid, state / "sandboxes" / uuid)
                        if p.exists()]  # fmt: skip

            ukc.run("delete", "gone.yaml", check=0)
            assert eventually(lambda: not left(uuids["gone"]), 20, 0.1), left(uuids["gone"])
            # a delete answered just before the metro stops: its teardown must still finish
            ukc.run("delete", "stopped.yaml", check=0)
            ukc.run("local", "stop", check=0)
            assert left(uuids["stopped"]) == []
        finally:
            metro_daemon.stop(state)


class TestInstanceEnv:
    def test_the_instance_env_reaches_the_sandbox_but_no_process_on_the_host_side(
        self, metro: MetroInfo, tmp_path: Path
    ) -> None:
        # the dynamic loader writes a trace file for every process that starts with this env
        out = tmp_path / "ld"
        out.mkdir()
        out.chmod(0o777)
        trace = str(out / "trace")
        env = {"LD_DEBUG": "files", "LD_DEBUG_OUTPUT": trace, "PUBKEY": "x"}
        with httpx.Client(
            base_url=metro.api_url, headers={"Authorization": f"Bearer {metro.token}"}, timeout=60
        ) as client:
            name = f"envprobe-{secrets.token_hex(4)}"
            body = {
                "name": name,
                "image": "ukc/local-sandbox:latest",
                "env": env,
                "plugins": [{"name": "sandbox"}],
                "autostart": True,
                "timeout_s": 30,
            }
            item = client.post("/v1/instances", json=body).json()["data"]["instances"][0]
            try:
                assert item["state"] == "running", item
                plugin = f"/v1/instances/{item['uuid']}/plugins/sandbox"
                started = client.post(f"{plugin}/commands", json={"cmd": "echo $LD_DEBUG_OUTPUT"})
                cid = started.json()["data"]["uuid"]
                assert client.post(f"{plugin}/commands/{cid}/wait").status_code == 200
                logs = client.request("GET", f"{plugin}/commands/{cid}/logs").json()["data"]
                # the command itself ran with it (and traced its own loading to stdout)
                assert base64.b64decode(logs["stdout"]).decode().endswith("\n" + trace + "\n")
                assert list(out.iterdir()) == []
            finally:
                client.request("DELETE", "/v1/instances", json=[{"name": name}])
