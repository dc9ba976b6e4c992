"""A checkout (a pull request applied by CI) brings its own `.ukc/`, with links in it.

ukc writes the session's private key at `.ukc/keys/<session>` (after making `keys/` 0700),
journals and records under `.ukc/sync/<session>/`, its status file and owner id in `.ukc/`,
and removes a deleted session's key and sync dir whole. Git commits symlinks as they are, so
`.ukc/keys -> /etc` with a session named `passwd` replaced /etc/passwd with a private key and
made /etc 0700, as whoever ran `ukc` (root on many runners); `.ukc/status.lock -> /etc/passwd`
had the lock holder's line written over the start of /etc/passwd. The attacker's directory here is
a stand-in for /etc, with a file of the session's name in it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.ukc import Ukc

pytestmark = pytest.mark.metro

SPEC = "name: passwd\ndirectory: .\ncommands:\n  - name: c\n    run: echo hi\n"


@pytest.mark.parametrize(
    "link",
    [".ukc", ".ukc/keys", ".ukc/sync", ".ukc/sync/passwd", ".ukc/status.lock"],
)
def test_a_link_the_checkout_brings_in_ukc_is_never_written_through(
    ukc: Ukc, tmp_path: Path, link: str
) -> None:
    victim = tmp_path / "etc"  # what the link points at
    victim.mkdir(mode=0o755)
    (victim / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    victim.chmod(0o755)
    (ukc.project / link).parent.mkdir(parents=True, exist_ok=True)
    # the lock file's link names the file: ukc wrote its holder line over the file's start
    (ukc.project / link).symlink_to(victim / "passwd" if link.endswith(".lock") else victim)
    ukc.write_spec(SPEC)
    before = sorted(os.listdir(victim))
    for args in (
        ("apply", "session.yaml"),
        ("apply", "--prune", "session.yaml"),
        ("delete", "session.yaml"),
    ):
        proc = ukc.run(*args)
        assert proc.returncode != 0
        assert f"{ukc.project / link} is a symlink" in proc.stderr, proc.stderr
    assert sorted(os.listdir(victim)) == before
    assert (victim / "passwd").read_text() == "root:x:0:0::/root:/bin/sh\n"
    assert victim.stat().st_mode & 0o777 == 0o755
