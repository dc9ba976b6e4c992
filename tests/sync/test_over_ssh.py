"""The sync engine through the real transport: paramiko SSH behind a TLS front, to sshd.

Uses the suite's throwaway CA, TLS forwarder and sshd (session fixtures).
The "sandbox" paths are plain tmp dirs on this machine, reached through sshd.
"""

from __future__ import annotations

import os
from pathlib import Path

from reconciler.sync.engine import pull, push
from reconciler.sync.options import SyncOptions
from reconciler.transport.sshclient import SshShell
from reconciler.transport.tls import Dialer
from tests.support.synctree import REMOTE_PYTHON, snapshot, write
from tests.support.tls_sshd import FQDN, Sshd


def test_push_then_no_change_then_pull_through_tls_and_ssh(
    dialer: Dialer,
    sshd: Sshd,
    tmp_path: Path,
) -> None:
    local, remote = tmp_path / "local", tmp_path / "remote"
    for i in range(200):
        write(local / f"d{i % 7}/f{i}.txt", f"file {i}\n" * (i + 1))
    write(local / "big.bin", os.urandom(5 << 20), 0o600)
    os.symlink("d0/f0.txt", local / "link")
    (tmp_path / "boot").write_text("ssh-boot\n")
    opts = SyncOptions(
        local_root=local,
        state_dir=tmp_path / "state",
        back=("out/",),
        remote_root=str(remote),
        remote_state_dir=str(tmp_path / "rstate"),
        boot_id_paths=(str(tmp_path / "boot"),),
        remote_python=REMOTE_PYTHON,
    )
    with SshShell.connect(dialer, FQDN, key_path=sshd.client_key, user=sshd.user) as shell:
        first = push(shell, opts, instance_uuid="u")
        assert first.files_sent == 201
        assert snapshot(remote) == snapshot(local)
        again = push(shell, opts, instance_uuid="u")
        assert (again.bytes_sent, again.remote_scanned) == (0, False)
        write(remote / "out/result.bin", os.urandom(3 << 20))
        result = pull(shell, opts)
        assert (result.files_written, result.rejected) == (1, [])
    assert (local / "out/result.bin").read_bytes() == (remote / "out/result.bin").read_bytes()
