"""Another local user owns a directory above the local metro's state dir, and steers `ukc`.

The victim runs `ukc` with a HOME (or XDG_STATE_HOME) that another account owns: `sudo -E`
from that account's shell, or a shared CI home. The attacker (`nobody`, `tests.support.users`)
owns everything above the state dir, so it can put whatever it likes at
`~/.local/state/ukc/local`, or swap it after `ukc` checked it. Here it plants a symlink to a
root-owned, world-writable sticky directory (as /tmp is) where it wrote a `metro.json` and a
`token` naming its own fake metro, and runs that fake metro with the command line a daemon for
that directory has. A `ukc` that trusted the state dir sent its requests there (and then the
user's files and secrets, through the fake metro's "sandboxes"), and made the shared directory
0700 on its way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.local import daemon as metro_daemon
from tests.support.listener import RECORDING_HANDLER
from tests.support.users import need_other_user
from tests.support.waiting import eventually

#: the attacker's fake metro, run as `nobody` by the system python; argv[1] is the shared dir,
#: argv[2] its log of every request it got; argv[3:] the command line of a daemon for that dir
FAKE_METRO = (
    r"""
import http.server, json, os, sys
shared, LOG = sys.argv[1], sys.argv[2]


def data_for(path):
    return {"pid": os.getpid()} if path.startswith("/_local") else {"instances": []}
"""
    + RECORDING_HANDLER
    + r"""
server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
with open(os.path.join(shared, "token"), "w") as f:
    f.write("mallorys-token\n")
info = {
    "api_url": f"http://127.0.0.1:{server.server_port}",
    "ca": "/etc/ssl/certs/ca-certificates.crt",  # any certificate file will do
    "app_domain": "local.ukc.localhost",
    "edge_host": "127.0.0.1",
    "edge_ports": {},
    "pid": os.getpid(),
}
with open(os.path.join(shared, "metro.json"), "w") as f:
    json.dump(info, f)
server.serve_forever()
"""
)

SPEC = "name: victim\ndirectory: .\nenv:\n  WHERE: the users project\n"


@pytest.fixture
def base() -> Iterator[Path]:
    need_other_user()
    path = Path(tempfile.mkdtemp(prefix="ukcsd"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _as_nobody(argv: list[str]) -> list[str]:
    user = need_other_user()
    return [
        "setpriv",
        f"--reuid={user.pw_uid}",
        f"--regid={user.pw_gid}",
        "--clear-groups",
        "--",
        *argv,
    ]


def test_a_state_dir_under_another_users_home_never_leads_ukc_to_that_users_fake_metro(
    base: Path,
) -> None:
    user = need_other_user()
    shared = base / "shared"  # root's, world-writable and sticky: as /tmp is
    shared.mkdir()
    shared.chmod(0o1777)
    home = base / "home"  # the attacker's
    (home / ".local" / "state" / "ukc").mkdir(parents=True)
    for path in (home, home / ".local", home / ".local" / "state", home / ".local/state/ukc"):
        os.chown(path, user.pw_uid, user.pw_gid)
    subprocess.run(
        _as_nobody(["ln", "-s", str(shared), str(home / ".local/state/ukc/local")]), check=True
    )
    log = home / "requests.log"
    subprocess.run(_as_nobody(["touch", str(log)]), check=True)
    fake = subprocess.Popen(
        _as_nobody(
            [
                "/usr/bin/python3",
                "-c",
                FAKE_METRO,
                str(shared),
                str(log),
                # the command line of a daemon started for that dir
                "reconciler.local",
                "serve",
                "--state-dir",
                str(shared),
            ]
        ),
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
    )
    try:
        assert eventually(lambda: (shared / "metro.json").exists(), timeout_s=10)
        project = base / "project"
        project.mkdir()
        (project / "session.yaml").write_text(SPEC)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("UKC_", "XDG_"))}
        env.update(HOME=str(home), UKC_WARM="0")
        proc = subprocess.run(
            [sys.executable, "-m", "reconciler", "apply", "session.yaml"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        time.sleep(0.2)
        got = log.read_text()
        assert got == "", f"the attacker's metro was asked: {got[:500]}"
        assert proc.returncode != 0
        assert "state dir" in proc.stderr, proc.stderr
        assert shared.stat().st_mode & 0o7777 == 0o1777
    finally:
        fake.kill()
        fake.wait()
        shared.chmod(0o1777)


def test_a_state_dir_that_another_user_could_swap_later_is_refused_before_any_daemon_starts(
    base: Path,
) -> None:
    user = need_other_user()
    home = base / "home"  # the attacker's, with nothing planted yet: it would swap later
    home.mkdir()
    os.chown(home, user.pw_uid, user.pw_gid)
    project = base / "project"
    project.mkdir()
    (project / "session.yaml").write_text(SPEC)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UKC_", "XDG_"))}
    env.update(HOME=str(home), UKC_WARM="0")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "reconciler", "apply", "session.yaml"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        metro_daemon.stop(home / ".local" / "state" / "ukc" / "local")  # one it started
    assert proc.returncode != 0
    assert f"which belongs to uid {user.pw_uid}" in proc.stderr, proc.stderr
    assert not (home / ".local" / "state" / "ukc" / "local" / "metro.json").exists()


def test_the_directories_ukc_makes_above_a_new_state_dir_pass_its_own_check_under_umask_002(
    tmp_path: Path,
) -> None:
    state = tmp_path / "made" / "by" / "ukc" / "state"
    old = os.umask(0o002)
    try:
        metro_daemon.private_dir(state)
    finally:
        os.umask(old)
    for made in (state, *state.parents):
        if made == tmp_path:
            break
        assert made.stat().st_mode & 0o777 == 0o700, made
