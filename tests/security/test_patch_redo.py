"""A sandbox that asks for files again: the answer to a patch built from remembered digests.

When our push record is trusted, a big file's edit is sent as the blocks that differ from the
digests this side remembers of what it pushed, and the helper may answer that its copy was not
that one (`redo`): the client then sends the file whole. That list is the sandbox's word. It
must never make the client send a file it did not patch so, nor send one twice, nor go round
forever: the push stops with an error that says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from reconciler.errors import RemoteError
from reconciler.sync.options import SyncOptions
from reconciler.sync.push import push
from reconciler.transport.local_shell import LocalShell
from tests.support.hostile_helper import fake_python
from tests.support.synctree import REMOTE_PYTHON

_LIAR = """
    import threading
    # read everything the client sends (it must never block on a full pipe), answer blindly
    threading.Thread(target=lambda: sys.stdin.buffer.read(), daemon=True).start()
    frame({"boot_id": "b", "fresh": True, "has_record": True, "record": RECORD, "empty": False})
    flush()
    for _ in range(1000):
        frame({"errors": [], "error_count": 0, "written": 1, "bytes": 1, "redo": REDO})
    flush()
    time.sleep(30)
"""


def _pushed_once(tmp_path: Path, shell: LocalShell) -> tuple[dict[str, object], dict[str, object]]:
    """A big and a small file pushed by the real helper (boot "b"); then the big one edited.
    The options' arguments and the record the sandbox keeps."""
    local, remote, run = tmp_path / "local", tmp_path / "remote", tmp_path / "run"
    local.mkdir()
    (local / "big.bin").write_bytes(os.urandom(2 << 20))
    (local / "small.txt").write_text("small")
    (tmp_path / "boot").write_text("b\n")
    args: dict[str, object] = {
        "local_root": local,
        "state_dir": tmp_path / "state",
        "remote_root": str(remote),
        "remote_state_dir": str(run),
        "boot_id_paths": (str(tmp_path / "boot"),),
    }
    push(shell, SyncOptions(**args, remote_python=REMOTE_PYTHON), instance_uuid="u")  # type: ignore[arg-type]
    record = json.loads((run / "record.json").read_text())
    with open(local / "big.bin", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"edited")
    return args, record


@pytest.mark.parametrize(
    ("redo", "named"),
    [
        (["small.txt"], "a file that was not patched"),
        (["../../etc/passwd"], "a path outside the tree"),
        (["big.bin"], "the patched file, again and again"),
    ],
)
def test_a_sandbox_asking_again_for_files_is_refused_unless_it_names_a_patch_once(
    tmp_path: Path, redo: list[str], named: str
) -> None:
    shell = LocalShell()
    try:
        args, record = _pushed_once(tmp_path, shell)
        body = f"    RECORD = {record!r}\n    REDO = {redo!r}\n" + _LIAR
        liar = fake_python(tmp_path / "sandbox-bin", body)
        opts = SyncOptions(**args, remote_python=liar, idle_timeout_s=10.0)  # type: ignore[arg-type]
        with pytest.raises(RemoteError, match=r"asks again for 1 files that were not sent as "):
            push(shell, opts, instance_uuid="u")
    finally:
        shell.close()
