"""Attacks on where a session's files live: a spec (from a pull request) aims `directory`, or
a symlink in the checkout, at a place outside the spec's tree, so that the sandbox receives
what is there and `sync.back` plants files in it (an `authorized_keys`, say).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.ukc import Ukc

PLANT = (
    "sync:\n  back: [.ssh]\n"
    "commands: ['mkdir -p .ssh && echo attacker-key >> .ssh/authorized_keys']\n"
)


@pytest.fixture
def victim(ukc: Ukc) -> Path:
    """A directory beside the checkout, as a home directory is beside a clone in it."""
    home = ukc.project.parent / "victim_home"
    home.mkdir()
    (home / "private.txt").write_text("not for the sandbox\n")
    return home


def assert_victim_untouched(victim: Path) -> None:
    assert sorted(p.name for p in victim.iterdir()) == ["private.txt"]


@pytest.mark.parametrize("command", ["validate", "plan", "apply"])
def test_a_directory_climbing_out_of_the_spec_dir_is_refused_at_its_line(
    ukc: Ukc, victim: Path, command: str
) -> None:
    ukc.write_spec("name: hello\ndirectory: ../victim_home\n" + PLANT)
    proc = ukc.run(command, "session.yaml")
    assert_victim_untouched(victim)
    assert proc.returncode == 2
    assert "session.yaml:2: directory:" in proc.stderr
    assert "allow_directory_outside_spec_dir" in proc.stderr
    assert not (ukc.project / ".ukc" / "status.json").exists()


def test_a_directory_far_above_resolves_and_is_refused(ukc: Ukc) -> None:
    ukc.write_spec("name: hello\ndirectory: ../../../../../../../..\n")
    proc = ukc.run("validate", "session.yaml", check=2)
    assert "resolves to '/'" in proc.stderr


def test_a_directory_reached_through_a_symlink_in_the_checkout_is_refused(
    ukc: Ukc, victim: Path
) -> None:
    os.symlink("../victim_home", ukc.project / "work")
    ukc.write_spec("name: hello\ndirectory: work\n" + PLANT)
    proc = ukc.run("apply", "session.yaml")
    assert_victim_untouched(victim)
    assert proc.returncode == 2
    assert "session.yaml:2: directory:" in proc.stderr
    assert f"resolves to '{victim}'" in proc.stderr


def test_an_explicit_opt_in_allows_a_directory_outside(ukc: Ukc, victim: Path) -> None:
    ukc.write_spec(
        "name: hello\ndirectory: ../victim_home\nallow_directory_outside_spec_dir: true\n"
    )
    ukc.run("validate", "session.yaml", check=0)


def test_sync_back_does_not_write_through_a_symlinked_subdirectory_of_the_tree(
    ukc: Ukc, victim: Path
) -> None:
    # the directory is inside, but its `out` is a symlink to the victim: the sandbox makes a
    # real `out/` and the pull must not follow the local link
    os.symlink("../victim_home", ukc.project / "out")
    ukc.write_spec(
        "name: hello\nsync:\n  back: [out]\n"
        "commands: ['rm -rf out && mkdir out && echo attacker-key > out/authorized_keys']\n"
    )
    proc = ukc.run("apply", "session.yaml")
    assert_victim_untouched(victim)
    assert (ukc.project / "out").is_symlink()
    assert "authorized_keys" in proc.stdout + proc.stderr  # reported, not written
