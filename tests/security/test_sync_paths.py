"""Path tricks against the sync: ignore rules that would send ukc's own state (the session
keys) into the sandbox, `.ukcignore` files that are not what they seem, and sync-back entries
aimed at a `.ukc` directory.

The user's tree may hold anything a collaborator or a tool put there, so `.ukcignore` is input
to distrust as well: a rule may not undo the `.ukc/` exclusion, and the file is read only as a
small regular file.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.errors import SyncHaltedError
from reconciler.sync.ignore import MAX_IGNORE_BYTES
from reconciler.sync.manifest import scan_local
from reconciler.sync.options import SyncOptions
from reconciler.sync.pull import pull
from reconciler.sync.push import push
from reconciler.sync.remote import encode_frame
from reconciler.transport.local_shell import LocalShell
from tests.support.canary import Canaries, assert_nowhere
from tests.support.hostile_helper import fake_python, run_in_child
from tests.support.synctree import REMOTE_PYTHON
from tests.support.ukc import Ukc

KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA-canary-key\n"


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, Path, LocalShell]]:
    """A local root holding ukc state (keys) at the top and in a nested project, and an
    empty "sandbox" root."""
    local, remote = tmp_path / "local", tmp_path / "sandbox"
    for state in (local / ".ukc", local / "sub" / "project" / ".ukc"):
        (state / "keys").mkdir(parents=True)
        (state / "keys" / "web").write_text(KEY)
        (state / "status.json").write_text("{}")
    (local / "src.py").write_text("print('hi')\n")
    remote.mkdir()
    shell = LocalShell()
    yield local, remote, shell
    shell.close()


def _opts(tmp: Path, local: Path, remote: Path, **kw: object) -> SyncOptions:
    args: dict[str, object] = {
        "local_root": local,
        "state_dir": tmp / "state",
        "remote_root": str(remote),
        "remote_state_dir": str(tmp / "rstate"),
        "boot_id_paths": (str(tmp / "boot"),),
        "remote_python": REMOTE_PYTHON,
    }
    args.update(kw)
    return SyncOptions(**args)  # type: ignore[arg-type]


def _everything(root: Path) -> tuple[list[str], bytes]:
    """Every path under `root` and all file contents, concatenated."""
    paths, blob = [], b""
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            paths.append(str(p.relative_to(root)))
            if p.is_file() and not p.is_symlink():
                blob += p.read_bytes()
    return sorted(paths), blob


RULES = [
    "!.ukc/",
    "!.ukc/**",
    "!**/.ukc/**",
    "!sub/project/.ukc/",
    "!/.ukc/keys/web",
]


@pytest.mark.parametrize("source", [".ukcignore", "sync.exclude"])
@pytest.mark.parametrize("rule", RULES)
def test_no_ignore_rule_sends_ukc_state_into_the_sandbox(
    tree: tuple[Path, Path, LocalShell], tmp_path: Path, source: str, rule: str
) -> None:
    local, remote, shell = tree
    if source == ".ukcignore":
        (local / ".ukcignore").write_text(f"*.log\n{rule}\n")
        opts = _opts(tmp_path, local, remote)
    else:
        opts = _opts(tmp_path, local, remote, exclude=("*.log", rule))
    push(shell, opts, instance_uuid="u")
    paths, blob = _everything(remote)
    assert [p for p in paths if ".ukc" in p.split("/") or p.endswith(".ukc")] == []
    assert b"canary-key" not in blob
    assert "src.py" in paths


def test_a_ukcignore_that_is_a_symlink_to_dev_zero_is_refused_without_reading_it(
    tmp_path: Path,
) -> None:
    local = tmp_path / "local"
    local.mkdir()
    (local / "a.txt").write_text("a")
    os.symlink("/dev/zero", local / ".ukcignore")
    # a child with 1 GiB of address space: reading /dev/zero to its end fails it there
    out = run_in_child(
        "push",
        {"local_root": str(local), "state_dir": str(tmp_path / "state")},
        limits={"RLIMIT_AS": 1 << 30},
        timeout=120,
    )
    assert out.get("error") == (
        f"SyncHaltedError: {local}/.ukcignore is a symbolic link; ukc reads it only as a "
        "regular file (nothing was sent)"
    ), out


@pytest.mark.timeout(60)
def test_a_ukcignore_that_is_a_fifo_is_refused_without_waiting_for_a_writer(
    tmp_path: Path,
) -> None:
    local = tmp_path / "local"
    local.mkdir()
    os.mkfifo(local / ".ukcignore")
    with pytest.raises(SyncHaltedError, match=r"\.ukcignore is not a regular file \(a fifo\)"):
        scan_local(SyncOptions(local_root=local, state_dir=tmp_path / "state"))


def test_a_ukcignore_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    local = tmp_path / "local"
    (local / ".ukcignore").mkdir(parents=True)
    with pytest.raises(SyncHaltedError, match=r"is not a regular file \(a directory\)"):
        scan_local(SyncOptions(local_root=local, state_dir=tmp_path / "state"))


def test_an_oversized_ukcignore_is_refused_with_its_size(tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    line = b"# " + b"x" * 1021 + b"\n"  # 1 KiB lines of comment
    (local / ".ukcignore").write_bytes(line * 1024 + b"*.tmp\n")
    with pytest.raises(SyncHaltedError) as err:
        scan_local(SyncOptions(local_root=local, state_dir=tmp_path / "state"))
    assert str(err.value) == (
        f"{local}/.ukcignore is {MAX_IGNORE_BYTES + 6} bytes, more than the {MAX_IGNORE_BYTES} "
        "byte limit for ignore files; nothing was sent"
    )


def test_a_ukcignore_symlinked_to_a_file_outside_the_tree_is_refused_and_never_shown(
    ukc: Ukc, canaries: Canaries, tmp_path: Path
) -> None:
    # e.g. a collaborator's "ignore file" pointing at a secret of the user running ukc:
    # parsed as rules, its lines could reach messages (an invalid pattern is quoted)
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text(f"{canaries.secret}\n[\n")
    os.symlink(secret, ukc.project / ".ukcignore")
    ukc.write_spec("name: linked\n")
    proc = ukc.run("apply", "session.yaml")
    assert proc.returncode != 0
    assert ".ukcignore is a symbolic link; ukc reads it only as a regular file" in (
        proc.stdout + proc.stderr
    )
    assert_nowhere(canaries, texts=[proc.stdout, proc.stderr], paths=[ukc.project / ".ukc"])
    status = ukc.status()["sessions"].get("linked", {})
    assert status.get("instance") is None  # nothing was created for a tree we cannot read


def test_a_real_sandbox_never_receives_the_session_keys_whatever_the_ignore_rules(
    ukc: Ukc,
) -> None:
    (ukc.project / ".ukcignore").write_text("!.ukc/\n!.ukc/**\n!**/.ukc/**\n")
    ukc.write_spec(
        """\
        name: keys
        sync:
          exclude: ["!.ukc/", "!.ukc/keys/keys"]
        """
    )
    ukc.run("apply", "session.yaml", check=0, timeout=600)
    key = (ukc.project / ".ukc" / "keys" / "keys").read_text()
    body = "".join(line for line in key.splitlines() if not line.startswith("-----"))
    uuid = ukc.status()["sessions"]["keys"]["instance"]["uuid"]
    paths, blob = _everything(ukc.workspace(uuid))
    assert "session.yaml" in paths
    assert [p for p in paths if ".ukc" in p.split("/")] == []
    assert body[:40].encode() not in blob


def _stream(*frames: bytes) -> str:
    """A stand-in interpreter body that writes these raw bytes."""
    return f"OUT.write({b''.join(frames)!r})\n"


def test_a_sync_back_entry_inside_a_nested_ukc_directory_is_refused(tmp_path: Path) -> None:
    local = tmp_path / "local"
    (local / "out" / "proj" / ".ukc" / "keys").mkdir(parents=True)
    (local / "out" / "proj" / ".ukc" / "keys" / "web").write_text(KEY)
    data = b"ssh-ed25519 AAAA attacker"

    def file_entry(path: str) -> bytes:
        head = {"path": path, "type": "f", "size": len(data), "mode": 0o600, "mtime_ns": 1}
        return encode_frame(head) + struct.pack(">I", len(data)) + data + struct.pack(">I", 0)

    body = _stream(
        encode_frame({"boot_id": "b", "fresh": False, "has_record": False}),
        file_entry("out/proj/.ukc/keys/web"),
        file_entry("out/.ukc/authorized"),
        encode_frame({"end": True, "errors": 0, "missing": []}),
    )
    opts = SyncOptions(
        local_root=local,
        state_dir=tmp_path / "state",
        back=("out/",),
        remote_python=fake_python(tmp_path / "bin", body),
    )
    shell = LocalShell()
    try:
        result = pull(shell, opts)
    finally:
        shell.close()
    assert [re.sub(r": .*", "", r) for r in result.rejected] == [
        "out/proj/.ukc/keys/web",
        "out/.ukc/authorized",
    ]
    assert all(r.endswith("inside .ukc/ (ukc's state)") for r in result.rejected)
    assert (local / "out" / "proj" / ".ukc" / "keys" / "web").read_text() == KEY
    assert not (local / "out" / ".ukc").exists()
