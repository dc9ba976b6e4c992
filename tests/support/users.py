"""Another local user, for attacks that a second account on the same host would try.

Tests that need one run as root (as CI does) and drop to `nobody` with `setpriv`; elsewhere
they are skipped with the reason.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Sequence

import pytest

__all__ = ["OTHER_USER", "need_other_user", "run_as_other_user"]

OTHER_USER = "nobody"


def need_other_user() -> pwd.struct_passwd:
    """The other account, or skip: only root can become it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another local user")
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    try:
        return pwd.getpwnam(OTHER_USER)
    except KeyError:
        pytest.skip(f"no user {OTHER_USER!r} on this machine")


def run_as_other_user(
    argv: Sequence[str], *, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `argv` as `nobody` with no supplementary groups and a minimal environment."""
    user = need_other_user()
    base = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"}
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--clear-groups",
            "--",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, **(env or {})},
        cwd="/",
    )
