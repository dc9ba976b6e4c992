"""Another local user against someone's local metro: the edge, the API, the state dir, sockets.

The attacker is `nobody` on the same host (`tests.support.users`). It learns what any local
user can: listening ports from `/proc/net/tcp`, socket paths from `/proc/net/unix`, and the
instance name, which it is handed: host command lines no longer carry it, but names are
deterministic (`ukc-<project hash>-<session>`) and so guessable. The victim (root, the metro's
owner) runs `ukc apply` with a `secret_env` canary and a canary in `/workspace/.env`, and a
command that keeps running while the attacker tries, so a process environment would be there to
read.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reconciler.local.daemon import MetroInfo
from tests.support.canary import Canaries, assert_nowhere
from tests.support.ukc import Ukc
from tests.support.users import OTHER_USER, need_other_user, run_as_other_user
from tests.support.waiting import eventually

pytestmark = pytest.mark.metro

#: the attacker's own program, run as `nobody` by the system python (stdlib only)
ATTACK_EXEC = r"""
import concurrent.futures, json, os, subprocess, sys

domain, cmd = sys.argv[1], sys.argv[2]
names = set()
for pid in os.listdir("/proc"):
    if not pid.isdigit():
        continue
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    except OSError:
        continue
    if argv[0].endswith(b"bwrap") and b"--hostname" in argv:
        names.add(argv[argv.index(b"--hostname") + 1].decode())
ports = []
for line in open("/proc/net/tcp").read().splitlines()[1:]:
    f = line.split()
    ip, port = f[1].split(":")
    if f[3] == "0A" and ip == "0100007F":
        ports.append(int(port, 16))
wanted = sys.argv[3]


def attempt(port):
    host = f"{wanted}.{domain}"
    p = subprocess.run(
        ["curl", "-sk", "--connect-timeout", "5", "--max-time", "15",
         "--resolve", f"{host}:{port}:127.0.0.1", "-d", json.dumps({"cmd": cmd}),
         "-w", "\nHTTP %{http_code}", f"https://{host}:{port}/exec"],
        capture_output=True, text=True,
    )
    return {"port": port, "out": p.stdout, "err": p.stderr}


with concurrent.futures.ThreadPoolExecutor(16) as pool:
    results = list(pool.map(attempt, ports))
print(json.dumps({"names": sorted(names), "ports": ports, "results": results}))
"""

#: what the attacker runs inside once in: who am I, the secrets, a planted output, all envs
EVIL = (
    "id; cat /workspace/.env; mkdir -p /workspace/out; echo pwned > /workspace/out/evil.txt; "
    "for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f; done"
)

#: the victim's command: runs until the test releases it (or 120 s pass)
HOLD = (
    "i=0; while [ ! -e /workspace/release ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); "
    "done; mkdir -p out; echo done > out/done.txt"
)


@dataclass
class Victim:
    ukc: Ukc
    proc: subprocess.Popen[str]
    lines: list[str]
    instance: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.instance["name"])

    @property
    def fqdn(self) -> str:
        return str(self.instance["service_group"]["domains"][0]["fqdn"])

    def release(self) -> str:
        """Let the held command finish; the apply's whole output."""
        (self.ukc.workspace(self.instance["uuid"]) / "release").touch()
        self.proc.wait(timeout=180)
        return "".join(self.lines)


def _spec(exec_mode: str) -> str:
    return f"""\
    name: victim
    directory: ./work
    exec: {exec_mode}
    commands:
      - name: hold
        run: {json.dumps(HOLD)}
        timeout: 3m
    sync:
      back: ["out/"]
    secret_env: {{API_KEY: VICTIM_API_KEY}}
    """


@pytest.fixture
def victim(ukc: Ukc, canaries: Canaries, request: pytest.FixtureRequest) -> Iterator[Victim]:
    """`ukc apply` of a session whose command is running (held) while the test attacks."""
    need_other_user()
    exec_mode = getattr(request, "param", "ssh")
    work = ukc.project / "work"
    work.mkdir()
    (work / ".env").write_text(f"DB_PASSWORD={canaries.secret}\n")
    ukc.write_spec(_spec(exec_mode))
    ukc.extra_env["VICTIM_API_KEY"] = canaries.secret
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "apply", "."],
        cwd=ukc.project,
        env=ukc.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    running = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "run command 'hold'" in line:
                running.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert running.wait(120), "".join(lines)
        (inst,) = [i for i in ukc.instances() if i["name"].endswith("-victim")]
        yield Victim(ukc, proc, lines, inst)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _attack_exec(metro: MetroInfo, victim: Victim) -> dict[str, Any]:
    out = run_as_other_user(
        ["/usr/bin/python3", "-c", ATTACK_EXEC, metro.app_domain, EVIL, victim.name], timeout=180
    )
    assert out.returncode == 0, out.stderr
    data: dict[str, Any] = json.loads(out.stdout)
    # the attacker did find what it needs: the metro's edge ports
    assert {metro.edge_ports[2222], metro.edge_ports[443]} <= set(data["ports"])
    return data


def _assert_no_exec(data: dict[str, Any], canaries: Canaries, metro: MetroInfo) -> None:
    texts = [r["out"] + r["err"] for r in data["results"]]
    assert_nowhere(canaries, texts=texts)
    # why: other listeners of a shared machine (another test session's fake exec server) are
    # not this metro; what they answer says nothing about it
    ours = {*metro.edge_ports.values(), int(metro.api_url.rsplit(":", 1)[1])}
    ran = [r for r in data["results"] if r["port"] in ours and "uid=" in r["out"] + r["err"]]
    assert not ran, ran


def _assert_nothing_planted(victim: Victim) -> None:
    output = victim.release()
    assert victim.proc.returncode == 0, output
    assert (victim.ukc.project / "work" / "out" / "done.txt").exists()
    assert not (victim.ukc.project / "work" / "out" / "evil.txt").exists()
    assert not (victim.ukc.workspace(victim.instance["uuid"]) / "out" / "evil.txt").exists()


def _edge_result(data: dict[str, Any], port: int) -> str:
    (found,) = [r for r in data["results"] if r["port"] == port]
    return str(found["out"])


# ------------------------------------------------------------------ the edge


def test_another_user_cannot_run_commands_in_an_ssh_sessions_sandbox(
    metro: MetroInfo, victim: Victim, canaries: Canaries
) -> None:
    data = _attack_exec(metro, victim)
    _assert_no_exec(data, canaries, metro)
    # refused by the edge before routing (and behind it, the instance has no 443 service)
    assert "HTTP 403" in _edge_result(data, metro.edge_ports[443])
    _assert_nothing_planted(victim)


@pytest.mark.parametrize("victim", ["http"], indirect=True)
def test_another_user_cannot_use_the_exec_api_of_an_http_session(
    metro: MetroInfo, victim: Victim, canaries: Canaries
) -> None:
    data = _attack_exec(metro, victim)
    _assert_no_exec(data, canaries, metro)
    answer = _edge_result(data, metro.edge_ports[443])
    assert "HTTP 403" in answer
    assert "serves only its owner" in answer
    _assert_nothing_planted(victim)


def test_an_ssh_sessions_instance_publishes_no_port_443(
    ukc: Ukc, metro: MetroInfo, canaries: Canaries
) -> None:
    (ukc.project / "work").mkdir()
    ukc.write_spec('name: plain\ndirectory: ./work\ncommands: ["true"]\n')
    ukc.run("apply", ".", check=0)
    (inst,) = [i for i in ukc.instances() if i["name"].endswith("-plain")]
    services = inst["service_group"]["services"]
    assert [(s["port"], s["destination_port"], s["handlers"]) for s in services] == [
        (2222, 2222, ["tls"])
    ]
    assert "ukc.exec=ssh" in inst["tags"]


#: every process's command line and (where readable) environment on the host
SCAN_PROCESSES = r"""
import os, sys
for pid in os.listdir("/proc"):
    for part in ("cmdline", "environ"):
        try:
            sys.stdout.buffer.write(open(f"/proc/{pid}/{part}", "rb").read() + b"\n")
        except OSError:
            pass
"""


@pytest.mark.parametrize("victim", ["ssh", "http"], indirect=True)
def test_another_user_finds_no_secret_in_any_process_on_the_host(
    victim: Victim, canaries: Canaries
) -> None:
    # while the command runs (with the secret in its environment inside the sandbox); the
    # controller says "run command" a moment before the sandbox starts it, so scan until the
    # scan does see the victim's command running, and every scan must be clean
    scans: list[str] = []

    def scan_sees_the_command() -> bool:
        out = run_as_other_user(["/usr/bin/python3", "-c", SCAN_PROCESSES], timeout=120)
        assert out.returncode == 0, out.stderr
        scans.append(out.stdout)
        return "sleep\x000.1" in out.stdout

    assert eventually(scan_sees_the_command, timeout_s=60, interval_s=0.5), scans[-1][-2000:]
    assert_nowhere(canaries, texts=scans)
    _assert_nothing_planted(victim)


@pytest.mark.parametrize("victim", ["http"], indirect=True)
def test_a_command_sent_to_the_exec_api_is_on_no_host_command_line(
    metro: MetroInfo, victim: Victim, canaries: Canaries
) -> None:
    # the owner's own request, as the original workflow's exec script sends one: the secret is
    # in `cmd`, and the command runs for a while
    url = f"https://{victim.fqdn}:{metro.edge_ports[443]}/exec"
    body = json.dumps({"cmd": f"TOKEN='{canaries.secret}'; sleep 4; echo ${{#TOKEN}}"})
    owner = subprocess.Popen(
        ["curl", "-sS", "--cacert", str(metro.ca_path),
         "--resolve", f"{victim.fqdn}:{metro.edge_ports[443]}:127.0.0.1", "-d", "@-", url],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert owner.stdin is not None
    owner.stdin.write(body)
    owner.stdin.close()
    # why scans until one sees it, not one after a fixed wait: the command may start late
    scans: list[str] = []

    def scan_sees_the_command_or_it_ended() -> bool:
        out = run_as_other_user(["/usr/bin/python3", "-c", SCAN_PROCESSES], timeout=120)
        assert out.returncode == 0, out.stderr
        scans.append(out.stdout)
        return "sleep\x004" in out.stdout or owner.poll() is not None

    assert eventually(scan_sees_the_command_or_it_ended, timeout_s=60, interval_s=0.2)
    assert owner.stdout is not None
    answer = json.loads(owner.stdout.read())
    owner.wait(timeout=60)
    assert answer["stdout"] == f"{len(canaries.secret)}\n"  # it did run, with the secret
    assert any("sleep\x004" in scan for scan in scans), "no scan saw the command running"
    assert_nowhere(canaries, texts=scans)
    _assert_nothing_planted(victim)


def _s_client(port: int, fqdn: str, *extra: str) -> list[str]:
    # stdin stays open 3 s: long enough for a banner, then s_client sees EOF and quits
    return [
        "sh", "-c",
        f"sleep 3 | timeout 20 openssl s_client -quiet -no_ign_eof -connect 127.0.0.1:{port} "
        f"-servername {fqdn} {' '.join(extra)} 2>&1",
    ]  # fmt: skip


def test_another_user_gets_no_ssh_banner_from_the_2222_edge_port(
    metro: MetroInfo, victim: Victim
) -> None:
    attacker = run_as_other_user(_s_client(metro.edge_ports[2222], victim.fqdn))
    assert "SSH-2.0" not in attacker.stdout
    # the owner's own openssl s_client (the original workflow's ProxyCommand) still gets in
    owner = subprocess.run(
        _s_client(metro.edge_ports[2222], victim.fqdn, "-CAfile", str(metro.ca_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "SSH-2.0-OpenSSH" in owner.stdout
    victim.release()


@pytest.mark.parametrize("victim", ["http"], indirect=True)
def test_the_owners_curl_still_reaches_an_http_sessions_exec_api(
    metro: MetroInfo, victim: Victim
) -> None:
    out = subprocess.run(
        ["curl", "-sS", "--cacert", str(metro.ca_path),
         "--resolve", f"{victim.fqdn}:{metro.edge_ports[443]}:127.0.0.1",
         "-d", json.dumps({"cmd": "id -u"}), f"https://{victim.fqdn}:{metro.edge_ports[443]}/exec"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert json.loads(out.stdout) == {"stdout": "0\n", "stderr": "", "code": 0}, out.stderr
    assert victim.release()
    assert victim.proc.returncode == 0


def test_a_refused_user_is_named_in_the_daemon_log(metro: MetroInfo, victim: Victim) -> None:
    run_as_other_user(_s_client(metro.edge_ports[2222], victim.fqdn))
    user = need_other_user()
    # one line per user a minute: the line may be an earlier test's refusal of the same user
    expected = f"from uid {user.pw_uid} ({OTHER_USER}): this local metro serves only its owner"
    log = metro.state_dir / "daemon.log"
    deadline = time.monotonic() + 10
    while expected not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert expected in log.read_text()
    victim.release()


# ------------------------------------------------------------------ the other doors

#: the attacker tries every local listener as the platform API, without a token
ATTACK_API = r"""
import json, urllib.error, urllib.request
ports = []
for line in open("/proc/net/tcp").read().splitlines()[1:]:
    f = line.split()
    ip, port = f[1].split(":")
    if f[3] == "0A" and ip == "0100007F":
        ports.append(int(port, 16))
answers = {}
for port in ports:
    for path in ("/v1/instances", "/_local/status"):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
                answers[f"{port}{path}"] = [r.status, r.read(4096).decode("latin-1")]
        except urllib.error.HTTPError as e:
            answers[f"{port}{path}"] = [e.code, e.read(4096).decode("latin-1")]
        except Exception as e:
            answers[f"{port}{path}"] = [0, type(e).__name__]
print(json.dumps(answers))
"""


def test_the_platform_api_answers_401_to_another_user_and_its_token_is_unreadable(
    metro: MetroInfo, victim: Victim, canaries: Canaries
) -> None:
    out = run_as_other_user(["/usr/bin/python3", "-c", ATTACK_API], timeout=180)
    assert out.returncode == 0, out.stderr
    answers = json.loads(out.stdout)
    api_port = metro.api_url.rsplit(":", 1)[1]
    for path in ("/v1/instances", "/_local/status"):
        status, body = answers[f"{api_port}{path}"]
        assert status == 401, body
        assert victim.name not in body
    token = run_as_other_user(["cat", str(metro.state_dir / "token")])
    assert token.returncode != 0
    assert metro.token not in token.stdout + token.stderr
    assert_nowhere(canaries, texts=[out.stdout, token.stdout])
    _assert_nothing_planted(victim)


def _parents_reachable(state_dir: Path) -> None:
    """Let another user walk down to `state_dir` (not into it), as the `metro` fixture does:
    a concurrent pytest session resets its shared base temp dir to 0700."""
    for parent in state_dir.parents:
        if parent == Path(parent.anchor):
            break
        parent.chmod(parent.stat().st_mode | 0o011)


def test_another_user_cannot_read_the_metro_state_dir_or_a_workspace(
    metro: MetroInfo, victim: Victim, canaries: Canaries
) -> None:
    _parents_reachable(metro.state_dir)
    # host command lines no longer show the workspace's path: hand it to the attacker anyway
    ws = victim.ukc.workspace(victim.instance["uuid"])
    sd = metro.state_dir
    targets = [
        ws / ".env", sd / "metro.json", sd / "token", sd / "ca.key", sd / "edge.key",
        sd / "daemon.log", sd / "instances.json",
    ]  # fmt: skip
    for target in targets:
        got = run_as_other_user(["cat", str(target)])
        assert got.returncode != 0, f"{OTHER_USER} read {target}"
        assert_nowhere(canaries, texts=[got.stdout])
    for directory in (sd, sd / "workspaces", ws):
        listing = run_as_other_user(["ls", "-a", str(directory)])
        assert listing.returncode != 0, f"{OTHER_USER} listed {directory}: {listing.stdout}"
    # nor can it plant anything the owner's next sync-back would bring home
    plant = run_as_other_user(["sh", "-c", f"mkdir -p {ws}/out; echo pwned > {ws}/out/evil.txt"])
    assert plant.returncode != 0
    _assert_nothing_planted(victim)


#: the attacker finds the sandboxes' unix sockets in /proc/net/unix and asks the relay for 8080
ATTACK_SOCKETS = r"""
import json, socket, sys
uuid = sys.argv[1]
paths = sorted({l.split()[-1] for l in open("/proc/net/unix").read().splitlines()[1:]
                if len(l.split()) >= 8 and uuid in l.split()[-1]})
tried = {}
for path in paths:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
        if path.endswith("relay.sock"):
            s.sendall(b"8080\n")
            s.recv(16)
            s.sendall(b'POST /exec HTTP/1.0\r\nContent-Length: 13\r\n\r\n{"cmd":"id"}\n')
        else:
            s.sendall(b"GET /commands HTTP/1.0\r\n\r\n")
        tried[path] = "connected: " + s.recv(4096).decode("latin-1")
    except OSError as e:
        tried[path] = f"refused: {e.strerror}"
    finally:
        s.close()
print(json.dumps(tried))
"""


def test_another_user_cannot_connect_to_a_sandboxs_relay_or_plugin_socket(
    victim: Victim, canaries: Canaries
) -> None:
    out = run_as_other_user(
        ["/usr/bin/python3", "-c", ATTACK_SOCKETS, victim.instance["uuid"]], timeout=60
    )
    assert out.returncode == 0, out.stderr
    tried = json.loads(out.stdout)
    assert {Path(p).name for p in tried} >= {"relay.sock", "plugin.sock"}, tried
    assert all(v.startswith("refused") for v in tried.values()), tried
    assert "uid=" not in out.stdout
    assert_nowhere(canaries, texts=[out.stdout])
    _assert_nothing_planted(victim)


def test_ukc_local_env_run_by_another_user_on_the_owners_state_dir_reveals_nothing(
    metro: MetroInfo,
) -> None:
    need_other_user()
    _parents_reachable(metro.state_dir)
    out = run_as_other_user(
        [sys.executable, "-m", "reconciler", "local", "env", "--json"],
        env={"UKC_LOCAL_STATE_DIR": str(metro.state_dir), "UKC_WARM": "0"},
    )
    assert out.returncode != 0
    assert metro.token not in out.stdout + out.stderr
    assert str(metro.edge_ports[2222]) not in out.stdout
    assert f"belongs to uid {metro.state_dir.stat().st_uid}, not to you" in out.stderr
