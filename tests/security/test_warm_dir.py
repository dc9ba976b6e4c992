"""Another local user against the warm process: its directory, its socket, its clients.

The attacker is `nobody` (`tests.support.users`), acting the way a second account on the
machine can: it creates the per-user temp directory name first, runs its own listener where
our client would look, and connects to our server. Every test uses its own TMPDIR, HOME and
warm directory under its temp dir; the real /tmp and the suite's warm process are untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.cli import warm
from tests.support.canary import Canaries, assert_nowhere
from tests.support.users import need_other_user, run_as_other_user

SPEC = "name: hello\nimage: base:latest\ndirectory: .\n"
#: the attacker's interpreter: the system one, which any user can run (the venv's is under /root)
ATTACKER_PYTHON = "/usr/bin/python3"


def reachable_by_others(path: Path, top: Path) -> None:
    """Let other users traverse from `top` down to `path`."""
    for parent in [path, *path.parents]:
        parent.chmod(parent.stat().st_mode | 0o011)
        if parent == top:
            break


@pytest.fixture
def base() -> Iterator[Path]:
    """A short private directory (socket paths are limited to 107 bytes; pytest's are long)."""
    need_other_user()
    path = Path(tempfile.mkdtemp(prefix="ukcw"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def home(base: Path) -> Iterator[dict[str, str]]:
    """A clean environment: private TMPDIR (sticky, world-writable like /tmp) and HOME."""
    reachable_by_others(base, base)
    tmp = base / "tmp"
    tmp.mkdir()
    tmp.chmod(0o1777)
    home = base / "home"
    home.mkdir(mode=0o700)
    project = base / "project"
    project.mkdir()
    (project / "session.yaml").write_text(SPEC)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("UKC_", "XDG_")) and k not in ("TMPDIR", "HOME")
    }
    env.update(TMPDIR=str(tmp), HOME=str(home))
    yield env
    path = warm.socket_path(env)
    if path is not None:
        warm.request_stop(path)


def ukc(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def squat(path: Path, mode: str) -> None:
    done = run_as_other_user(["mkdir", "-m", mode, str(path)])
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("owner", "mode", "why"),
    [
        ("other", "700", "belongs to uid"),
        ("other", "1777", "belongs to uid"),
        ("self", "777", "can be entered by other users"),
    ],
)
def test_a_temp_directory_taken_first_is_refused_with_a_warning_and_the_warm_process_moves_home(
    home: dict[str, str], base: Path, owner: str, mode: str, why: str
) -> None:
    taken = Path(home["TMPDIR"]) / f"ukc-{os.getuid()}"
    if owner == "other":
        squat(taken, mode)
    else:
        taken.mkdir()
        taken.chmod(int(mode, 8))
    project = base / "project"
    first = ukc(home, project, "validate")
    assert first.returncode == 0, first.stderr
    warnings = [line for line in first.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, first.stderr
    assert str(taken) in warnings[0] and why in warnings[0]
    fallback = Path(home["HOME"]) / ".cache" / "ukc" / "warm"
    assert f"uses {fallback}" in warnings[0]

    path = warm.socket_path(home)
    assert path is not None and path.parent == fallback
    assert fallback.stat().st_mode & 0o777 == 0o700
    warm.wait_ready(path, timeout_s=60)  # started by the first command
    second = ukc(home, project, "validate")
    assert second.returncode == 0 and "1 session(s) valid" in second.stdout
    info = warm.status(path)
    assert info is not None and info["commands"] == 1  # the second command ran warm
    assert os.listdir(taken) == []  # nothing of ours went into the other user's directory


def test_with_every_directory_refused_commands_run_here_and_the_warning_says_so(
    home: dict[str, str], base: Path
) -> None:
    squat(Path(home["TMPDIR"]) / f"ukc-{os.getuid()}", "777")
    cache = Path(home["HOME"]) / ".cache" / "ukc"
    cache.mkdir(parents=True)
    reachable_by_others(cache, base)
    cache.chmod(0o777)
    squat(cache / "warm", "700")
    done = ukc(home, base / "project", "validate")
    assert done.returncode == 0 and "1 session(s) valid" in done.stdout
    (warning,) = [line for line in done.stderr.splitlines() if "warning" in line]
    assert "commands run without the warm process" in warning
    assert warm.socket_path(home) is None


IMPOSTOR = r"""
import os, socket, sys, time
sock_path, record, accepts, ready, stop = sys.argv[1:6]
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sock_path)
os.chmod(sock_path, 0o777)
listener.listen(8)
listener.settimeout(0.2)
open(ready, "w").close()
deadline = time.monotonic() + 120
while time.monotonic() < deadline and not os.path.exists(stop):
    try:
        conn, _ = listener.accept()
    except socket.timeout:
        continue
    with open(accepts, "a") as f:
        f.write("accepted\n")
    conn.settimeout(2)
    got = b""
    try:
        while len(got) < 1 << 20:
            data = conn.recv(65536)
            if not data:
                break
            got += data
            conn.sendall(b"S")  # "stale": a client that talks gets sent home
    except OSError:
        pass
    with open(record, "ab") as f:
        f.write(got)
    conn.close()
"""


def test_the_warm_client_never_talks_to_a_listener_run_by_another_user(
    home: dict[str, str], base: Path, canaries: Canaries
) -> None:
    lair = base / "attacker"
    lair.mkdir()
    lair.chmod(0o777)
    script = lair / "impostor.py"
    script.write_text(IMPOSTOR)
    script.chmod(0o644)
    files = {name: lair / name for name in ("fake.sock", "record", "accepts", "ready", "stop")}
    env = {**home, "UKC_WARM_DIR": str(base / "warm"), "UKC_TOKEN": canaries.token}
    env["CANARY_SECRET"] = canaries.secret
    (base / "warm").mkdir(mode=0o700)
    path = warm.socket_path(env)
    assert path is not None

    attacker = threading.Thread(
        target=run_as_other_user,
        args=([ATTACKER_PYTHON, str(script), *(str(f) for f in files.values())],),
        kwargs={"timeout": 150},
        daemon=True,
    )
    attacker.start()
    deadline = time.monotonic() + 30
    while not files["ready"].exists():
        assert time.monotonic() < deadline, "the impostor did not start"
        time.sleep(0.05)
    # the other user's listener, under the name our client looks for (as if the directory
    # check had been beaten): only the peer's uid can tell it from ours
    os.rename(files["fake.sock"], path)
    try:
        done = ukc(env, base / "project", "validate")
    finally:
        files["stop"].touch()
        attacker.join(30)
        warm.request_stop(path)  # the real one the client started after refusing the impostor
    assert done.returncode == 0 and "1 session(s) valid" in done.stdout, done.stderr
    assert files["accepts"].read_text().count("accepted") >= 1  # the client did reach it
    assert files["record"].read_bytes() == b""  # and sent nothing: no argv, env, cwd or fds
    assert_nowhere(canaries, paths=[lair])


INTRUDER = r"""
import array, json, os, socket, struct, sys
path = sys.argv[1]
results = {}
def attempt(name, request, fds):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(path)
    except OSError as err:
        results[name] = "connect: " + type(err).__name__
        return
    payload = json.dumps(request).encode()
    got = b""
    try:
        sock.sendmsg(
            [struct.pack(">I", len(payload))],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [],
        )
        sock.sendall(payload)
        while True:
            data = sock.recv(4096)
            if not data:
                break
            got += data
            if got[:1] == b"R":
                sock.sendall(b"G")
    except OSError:
        pass  # a reset is fine: what counts is whether anything came back
    results[name] = got.decode("latin-1")
r, w = os.pipe()
attempt("run", {"op": "run", "argv": ["status", "--output", "json"], "cwd": "/",
                "env": {"PATH": "/usr/bin:/bin"}, "umask": 18}, [r, w, w])
attempt("stop", {"op": "stop"}, [])
attempt("status", {"op": "status"}, [])
os.close(w)
results["output"] = os.read(r, 65536).decode("latin-1")
print(json.dumps(results))
"""


def intrude(script: Path, path: Path) -> dict[str, str]:
    done = run_as_other_user([ATTACKER_PYTHON, str(script), str(path)], timeout=60)
    assert done.returncode == 0, done.stderr
    result: dict[str, str] = json.loads(done.stdout)
    return result


def test_the_warm_server_serves_no_other_user_even_one_that_reaches_its_socket(
    home: dict[str, str], base: Path
) -> None:
    sockets = base / "warm"
    sockets.mkdir(mode=0o700)
    env = {**home, "UKC_WARM_DIR": str(sockets)}
    path = warm.start(env, timeout_s=60)
    script = base / "intruder.py"
    script.write_text(INTRUDER)
    script.chmod(0o644)
    try:
        # the first wall: the private directory keeps the other user away from the socket
        walled = intrude(script, path)
        assert walled["run"].startswith("connect: PermissionError"), walled

        # the second: a directory opened by mistake still serves no one but its own user
        sockets.chmod(0o711)
        path.chmod(0o777)
        opened = intrude(script, path)
        assert opened == {"run": "", "stop": "", "status": "", "output": ""}, opened
        info = warm.status(path)
        assert info is not None, "another user's stop request stopped the warm process"
        assert info["commands"] == 0
    finally:
        warm.request_stop(path)
