"""The sandbox's /etc: links into the host's, listed once and listed again when it changes."""

from __future__ import annotations

import os
import time
from pathlib import Path

from reconciler.local.sandbox.bwrap import HOST_ETC, _etc_links


def _links(options: list[str]) -> dict[str, str]:
    assert len(options) % 3 == 0 and set(options[::3]) <= {"--symlink"}
    return {at: target for target, at in zip(options[1::3], options[2::3], strict=True)}


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def _etc(tmp_path: Path) -> Path:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "hosts").write_text("127.0.0.1 localhost\n")
    (etc / "passwd").write_text("host accounts\n")
    os.symlink("../usr/share/zoneinfo/UTC", etc / "localtime")
    return etc


def test_every_host_entry_but_the_sandboxs_own_account_files_is_linked(tmp_path: Path) -> None:
    etc = _etc(tmp_path)
    _age(etc, 60)
    assert _links(_etc_links(str(etc))) == {
        "/etc/hosts": f"{HOST_ETC}/hosts",
        "/etc/localtime": "../usr/share/zoneinfo/UTC",  # a link keeps its own target
    }


def test_an_entry_added_to_the_host_etc_is_linked_at_the_next_boot(tmp_path: Path) -> None:
    etc = _etc(tmp_path)
    _age(etc, 60)
    first = _etc_links(str(etc))
    assert _etc_links(str(etc)) == first  # unchanged: the listing is reused
    (etc / "resolv.conf").write_text("nameserver 10.0.0.1\n")
    os.unlink(etc / "localtime")
    os.symlink("../usr/share/zoneinfo/Europe/Paris", etc / "localtime")
    _age(etc, 30)
    links = _links(_etc_links(str(etc)))
    assert links["/etc/resolv.conf"] == f"{HOST_ETC}/resolv.conf"
    assert links["/etc/localtime"] == "../usr/share/zoneinfo/Europe/Paris"


def test_a_listing_of_a_directory_changed_a_moment_ago_is_not_reused(tmp_path: Path) -> None:
    # why it matters: an mtime moves in clock ticks, so a second change in the tick of the
    # listing can leave the directory's mtime as it was when it was listed
    etc = _etc(tmp_path)
    listed_at = etc.stat().st_mtime_ns
    assert "/etc/resolv.conf" not in _links(_etc_links(str(etc)))
    (etc / "resolv.conf").write_text("nameserver 10.0.0.1\n")
    os.utime(etc, ns=(listed_at, listed_at))  # the same tick: the mtime did not move
    assert "/etc/resolv.conf" in _links(_etc_links(str(etc)))
