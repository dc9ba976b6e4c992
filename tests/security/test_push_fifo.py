"""A fifo put in a file's place between the scan and the push.

Whoever can write in the local tree (a tool, a collaborator's script, a command of the
session) can swap a file for a fifo after ukc listed it. Opened for reading, a fifo waits for
a writer that never comes: the push would hang with the session's connection open. The push
opens local files with O_NONBLOCK and sends only regular files, over both sync paths.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.errors import SyncError
from reconciler.sync.engine import push, scan_local
from reconciler.transport.local_shell import LocalShell
from tests.support.synctree import NO_PYTHON, Site, snapshot, write


@pytest.fixture(params=["python", "shell"])
def site(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Site]:
    """A local tree and an empty "sandbox"; "shell": one without python3 (the tar path)."""
    (tmp_path / "local").mkdir()
    (tmp_path / "sandbox" / "workspace").mkdir(parents=True)
    boot = tmp_path / "sandbox" / "boot_id"
    boot.write_text("boot-1\n")
    shell = LocalShell()
    extra = {"remote_python": NO_PYTHON} if request.param == "shell" else {}
    yield Site(
        base=tmp_path,
        local=tmp_path / "local",
        remote=tmp_path / "sandbox" / "workspace",
        state=tmp_path / "state",
        remote_state=tmp_path / "sandbox" / "run" / "ukc-sync",
        boot=boot,
        shell=shell,
        **extra,  # type: ignore[arg-type]
    )
    shell.close()


# without the guard the push waits in open() for a writer: the timeout fails the test
@pytest.mark.timeout(60)
def test_fifos_swapped_in_for_a_small_and_a_big_file_after_the_scan_do_not_block_the_push(
    site: Site,
) -> None:
    write(site.local / "small.txt", "small and batched")
    write(site.local / "big.bin", os.urandom(400_000))  # sent on its own, not in a batch
    write(site.local / "other.txt", "lands")
    local = scan_local(site.opts())
    for name in ("small.txt", "big.bin"):
        (site.local / name).unlink()
        os.mkfifo(site.local / name)
    # the first error named: the python path sends big files after the batches, tar in order
    first = "small.txt" if site.remote_python != NO_PYTHON else "big.bin"
    with pytest.raises(SyncError, match=rf"2 errors \({first}: changed while it was being sent"):
        push(site.shell, site.opts(), instance_uuid="u1", local=local)
    # nothing of the fifos reached the sandbox under their names
    assert not (site.remote / "small.txt").exists()
    assert not (site.remote / "big.bin").exists()
    # the next push scans afresh: fifos are not part of a source tree
    (site.local / "small.txt").unlink()
    (site.local / "big.bin").unlink()
    push(site.shell, site.opts(), instance_uuid="u1")
    assert snapshot(site.remote) == snapshot(site.local)
