"""Another local user answers for a local metro daemon that is gone, and collects its token.

A daemon that did not stop cleanly (a reboot, the OOM killer, a kill -9) leaves `metro.json`
naming its pid and its loopback port, and the API token stays in the state dir (one token for
every later daemon). Ports are anyone's to bind, and pids come round again: the attacker
(`nobody`, `tests.support.users`) binds the recorded port and gets a process of its own at the
recorded pid (by forking until the kernel hands it out; here the test writes the pid its
process got into the record, which is what pid reuse amounts to), with the command line a
daemon for that state dir has. With the token it could drive every sandbox of the victim's
metro through the API (the plugin route runs commands there).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.local import daemon as metro_daemon
from tests.support.listener import RECORDING_HANDLER
from tests.support.users import need_other_user
from tests.support.waiting import eventually

pytestmark = pytest.mark.metro

#: the attacker's listener on the dead daemon's port, run as `nobody` by the system python; it
#: logs every request, and answers as a daemon would. argv[1]: where it says its port and pid
LISTENER = (
    r"""
import http.server, json, os, sys
out = sys.argv[1]
LOG = out + ".log"


def data_for(path):
    return {"pid": os.getpid(), "instances": []}
"""
    + RECORDING_HANDLER
    + r"""
server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
with open(out + ".tmp", "w") as f:
    json.dump({"port": server.server_port, "pid": os.getpid()}, f)
os.rename(out + ".tmp", out)
server.serve_forever()
"""
)


@pytest.fixture
def base() -> Iterator[Path]:
    need_other_user()
    path = Path(tempfile.mkdtemp(prefix="ukcst"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("command", [["plan", "session.yaml"], ["local", "status"]])
def test_a_stale_metro_record_never_sends_the_token_to_whoever_took_the_port_and_the_pid(
    base: Path, command: list[str]
) -> None:
    user = need_other_user()
    state = base / "state"  # the victim's: private, as ukc makes it
    state.mkdir(mode=0o700)
    token = "local-metro-token-" + os.urandom(8).hex()
    (state / "token").write_text(token + "\n")
    (state / "token").chmod(0o600)
    drop = base / "attacker"
    drop.mkdir()
    os.chown(drop, user.pw_uid, user.pw_gid)
    said = drop / "where.json"
    argv = ["/usr/bin/python3", "-c", LISTENER, str(said)]
    attacker = subprocess.Popen(
        [
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--clear-groups",
            "--",
            *argv,
            # the command line of a daemon for the victim's state dir
            "reconciler.local",
            "serve",
            "--state-dir",
            str(state),
        ],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )
    try:
        assert eventually(said.exists, timeout_s=10)
        where = json.loads(said.read_text())
        # what the dead daemon left, now naming the attacker's pid and port
        (state / "metro.json").write_text(
            json.dumps(
                {
                    "api_url": f"http://127.0.0.1:{where['port']}",
                    "ca": str(state / "ca" / "ca.pem"),
                    "app_domain": "local.ukc.localhost",
                    "edge_host": "127.0.0.1",
                    "edge_ports": {},
                    "pid": where["pid"],
                }
            )
        )
        project = base / "project"
        project.mkdir()
        (project / "session.yaml").write_text("name: victim\ndirectory: .\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("UKC_")}
        env.update(UKC_LOCAL_STATE_DIR=str(state), UKC_WARM="0")
        subprocess.run(
            [sys.executable, "-m", "reconciler", *command],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        log = Path(str(said) + ".log")
        got = log.read_text() if log.exists() else ""
        assert token not in got, f"the attacker's listener got the token: {got[:300]}"
        assert got == "", f"the attacker's listener was asked: {got[:300]}"
    finally:
        attacker.kill()
        attacker.wait()
        metro_daemon.stop(state)  # a daemon the command started in the attacker's place
