"""Many sessions in one apply: `--concurrency` bounds the sessions worked on, and a session
that only waits for its sandbox to boot does not hold one of those places."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.ukc import Ukc

pytestmark = pytest.mark.metro

SESSION = """\
name: {name}
directory: ./{name}
commands: ['cat *.txt']
"""


@pytest.fixture
def slow_sshd(ukc: Ukc) -> Iterator[Ukc]:
    with ukc.api() as client:
        client.post("/_local/behaviour", json={"ssh_delay_s": 2.0}).raise_for_status()
    yield ukc
    with ukc.api() as client:
        client.post("/_local/behaviour", json={"preset": "realistic"}).raise_for_status()


def test_a_session_waiting_for_its_sandbox_to_boot_lets_the_next_session_start(
    slow_sshd: Ukc,
) -> None:
    names = ("fa", "fb", "fc")
    for name in names:
        (slow_sshd.project / name).mkdir()
        (slow_sshd.project / name / "in.txt").write_text(f"{name}\n")
    slow_sshd.write_spec("---\n".join(SESSION.format(name=n) for n in names), "fan.yaml")
    proc = slow_sshd.run("apply", "--concurrency", "1", "fan.yaml", check=0)
    lines = proc.stdout.splitlines()
    creates = [i for i, line in enumerate(lines) if "] create instance " in line]
    synced = [i for i, line in enumerate(lines) if "] synced: " in line]
    assert len(creates) == 3 and len(synced) == 3, proc.stdout
    # one place: every instance was asked for while the first session still waited for its
    # sshd (2 s), not one session after the other
    assert max(creates) < min(synced), proc.stdout
    doc = slow_sshd.status()
    assert {doc["sessions"][n]["phase"] for n in names} == {"Ready"}
    assert {doc["sessions"][n]["commands"][0]["stdout"] for n in names} == {f"{n}\n" for n in names}
