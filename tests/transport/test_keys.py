"""A session's random SSH key: its public half is never a new key while the private one lives."""

from __future__ import annotations

import stat
from pathlib import Path

from reconciler.transport.keys import ensure_keypair


def test_a_public_half_lost_beside_its_private_key_is_derived_again_not_replaced(
    tmp_path: Path,
) -> None:
    # a power loss may leave the .pub empty (it is not fsynced): an instance created with
    # the key must still accept the session, so the same key is kept
    path = tmp_path / "keys" / "web"
    first = ensure_keypair(path)
    private = path.read_bytes()
    pub = path.with_name("web.pub")
    pub.write_text("")
    assert ensure_keypair(path) == first
    assert pub.read_text() == first + "\n"
    pub.unlink()
    assert ensure_keypair(path) == first
    assert path.read_bytes() == private
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_private_key_cut_short_before_its_first_use_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "web"
    first = ensure_keypair(path)
    path.write_bytes(path.read_bytes()[:40])  # a kill while it was first written
    path.with_name("web.pub").unlink()
    line = ensure_keypair(path)
    assert line.startswith("ssh-ed25519 ") and line != first
    assert line.endswith(" ukc-web")
    assert path.with_name("web.pub").read_text() == line + "\n"
