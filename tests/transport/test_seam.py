"""The transport seam: one registration per `exec`, credentials per session, and a transport
over a plain shell (the local stand-in for a sandbox)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from reconciler.errors import UsageError
from reconciler.spec.models import EXEC_NAMES
from reconciler.transport import select, ssh
from reconciler.transport.base import Credentials
from reconciler.transport.commands import ShellTransport
from reconciler.transport.local_shell import LocalShell


def test_every_exec_a_spec_accepts_is_a_registered_transport_of_that_name() -> None:
    for name in EXEC_NAMES:
        kind = select.kind_for(name)
        assert kind.name == name
        assert kind.credentials_noun


def test_an_exec_no_transport_is_registered_for_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(UsageError, match=r"exec 'carrier-pigeon' .*\(ssh, http, plugin\)"):
        select.kind_for("carrier-pigeon")


def test_forgetting_a_sessions_credentials_leaves_other_sessions_alone(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("web", "web.pub", "web-2", "web-2.pub", "api.pub"):
        (keys / name).write_text(name)
    Credentials(keys / "web").forget()
    assert sorted(p.name for p in keys.iterdir()) == ["api.pub", "web-2", "web-2.pub"]
    Credentials(keys / "gone").forget()  # nothing there: nothing to do


def test_the_ssh_transport_makes_one_key_and_sends_only_its_public_half(tmp_path: Path) -> None:
    creds = Credentials(tmp_path / "keys" / "web")
    assert not ssh.KIND.credentials_present(creds)
    first = ssh.KIND.create_fields(creds)
    assert ssh.KIND.credentials_present(creds)
    assert stat.S_IMODE(creds.path.stat().st_mode) == 0o600
    public = first.env["PUBKEY"]
    assert public.startswith("ssh-ed25519 ") and "PRIVATE" not in public
    assert ssh.KIND.create_fields(creds).env == first.env  # the key outlives a replacement
    assert [(s.port, s.handlers) for s in first.services] == [(2222, ("tls",))]


def test_a_shell_transport_runs_commands_and_carries_byte_streams(tmp_path: Path) -> None:
    transport = ShellTransport("local", LocalShell(cwd=tmp_path), pin="p")
    out: list[bytes] = []
    err: list[bytes] = []
    try:
        result = transport.run(
            'printf "%s" "$GREETING"; echo oops >&2; exit 3',
            env={"GREETING": "hello"},
            cwd=str(tmp_path),
            timeout_s=30,
            on_stdout=out.append,
            on_stderr=err.append,
        )
        assert (result.exit_code, b"".join(out), b"".join(err)) == (3, b"hello", b"oops\n")
        proc = transport.start("cat")
        proc.write(b"\x00bytes\xff")
        proc.close_stdin()
        assert proc.read() == b"\x00bytes\xff"
        assert proc.wait(10) == 0
        assert transport.active and transport.pin == "p" and transport.kind == "local"
    finally:
        transport.close()


def test_the_warm_preload_loads_every_transports_late_modules_and_a_plain_import_does_not() -> None:
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from reconciler.transport import select\n"
        "before = 'paramiko' in sys.modules\n"
        "select.preload()\n"
        "print(before, 'reconciler.transport.sshclient' in sys.modules,"
        " 'reconciler.transport.http' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["False", "True", "True"]
