"""One-shot commands forked by the warm process reuse the SSH connection an earlier one kept
(`transport.links`) — and never one to a suspended, deleted or replaced instance.

Which connection a command ran over is what the sandbox's sshd says: `$SSH_CONNECTION` names
the client's end of the TCP connection (the metro edge's), one per SSH connection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reconciler.cli import warm, warmclient
from tests.support.ukc import Ukc
from tests.support.waiting import eventually

SPEC = """\
name: web
directory: ./tree
suspend: {suspend}
commands:
  - mkdir -p out; echo "$SSH_CONNECTION" >> out/conn.txt
sync:
  back: ["out/"]
"""


def setup(ukc: Ukc, suspend: str = "false") -> Path:
    tree = ukc.project / "tree"
    tree.mkdir(exist_ok=True)
    (tree / "a.txt").write_text("a\n")
    ukc.write_spec(SPEC.format(suspend=suspend))
    return tree


def connections(tree: Path) -> list[str]:
    return (tree / "out" / "conn.txt").read_text().splitlines()


def kept_sockets() -> set[Path]:
    """The sockets of kept connections in the suite's warm directory (an earlier test's
    may still be there, for its idle time)."""
    found = warmclient.socket_path()
    assert found is not None
    return {p for p in Path(found).parent.iterdir() if p.name.startswith("k")}


def own_instance(ukc: Ukc) -> dict[str, Any]:
    """This test's instance, of the ones the suite's metro lists."""
    name = ukc.status()["sessions"]["web"]["instance"]["name"]
    [inst] = [i for i in ukc.instances() if i["name"] == name]
    return inst


def apply_with_edit(ukc: Ukc, tree: Path, text: str) -> None:
    (tree / "a.txt").write_text(text)
    ukc.run("apply", "session.yaml", check=0)


def forked() -> int:
    """How many commands the warm process has forked."""
    found = warmclient.socket_path()
    assert found is not None
    info = warm.status(Path(found))
    assert info is not None
    return int(info["commands"])


def test_one_shot_applies_after_the_first_run_over_the_connection_it_kept(ukc: Ukc) -> None:
    tree = setup(ukc)
    before = forked()
    ukc.run("apply", "session.yaml", check=0)
    apply_with_edit(ukc, tree, "b\n")
    apply_with_edit(ukc, tree, "c\n")
    # each was a command of the warm process (one run in the caller keeps nothing)
    assert forked() - before == 3
    seen = connections(tree)
    assert len(seen) == 3
    assert len(set(seen)) == 1, seen  # one SSH (and TLS) connection for three applies


def test_a_suspended_instance_keeps_no_connection_open(ukc: Ukc) -> None:
    tree = setup(ukc)
    others = kept_sockets()
    ukc.run("apply", "session.yaml", check=0)
    assert kept_sockets() - others  # kept for the next apply
    # the next apply has no sync to do, only the suspend the spec now asks for
    ukc.write_spec(SPEC.format(suspend="true"))
    out = ukc.run("apply", "session.yaml", check=0).stdout
    assert "suspended instance" in out
    assert kept_sockets() - others == set()
    # the metro is the suite's: an earlier test's instance may still be listed beside ours
    assert eventually(lambda: own_instance(ukc)["state"] == "standby", 15)
    assert own_instance(ukc)["state"] == "standby"  # no connection held it up, nor woke it
    apply_with_edit(ukc, tree, "b\n")  # woken for work: a new connection
    assert kept_sockets() - others == set()  # and none kept after its suspend
    seen = connections(tree)
    assert len(seen) == 2 and seen[0] != seen[1]


def test_an_instance_replaced_under_the_same_name_is_reached_over_a_new_connection(
    ukc: Ukc,
) -> None:
    tree = setup(ukc)
    ukc.run("apply", "session.yaml", check=0)
    first = ukc.status()["sessions"]["web"]["instance"]
    # another memory size: the instance is replaced (deleted, then created anew)
    ukc.write_spec(SPEC.format(suspend="false") + "memory_mb: 512\n")
    apply_with_edit(ukc, tree, "b\n")
    second = ukc.status()["sessions"]["web"]["instance"]
    assert second["name"] == first["name"] and second["uuid"] != first["uuid"]
    # the sync-back mirrors the new sandbox's out/: one line, from a connection of its own
    assert len(connections(tree)) == 1
    apply_with_edit(ukc, tree, "c\n")  # and that one is kept for the next apply
    seen = connections(tree)
    assert len(seen) == 2 and seen[0] == seen[1]
