"""A sandbox answers with JSON nested fifty thousand levels deep (`[[[[...`, 50 KB,
well inside every size cap), where a JSON value is expected: Python's
decoder then raises RecursionError, which no caller expected (they catch ValueError), and the
whole `ukc` run (every session of it) ended in an internal error instead of the one hostile
session failing.

The places: a sync helper frame (the sandbox can replace the helper and python3), the
`exec: http` server's answer, the plugin's envelope, the journal a sandbox keeps and the
record in a tar push's hello.
"""

from __future__ import annotations

from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from reconciler.cloud.model import PluginReply
from reconciler.errors import RemoteError
from reconciler.status.sandboxjournal import Binding, decode
from reconciler.sync.options import SyncOptions
from reconciler.sync.push import push
from reconciler.sync.tarpush import parse_hello
from reconciler.transport import plugin
from reconciler.transport.http import HttpExec
from reconciler.transport.local_shell import LocalShell
from tests.support.hostile_helper import fake_python
from tests.support.tls_sshd import FQDN, CaFiles, TlsForwarder, dialer_to, https_front

DEEP = b"[" * 50_000


def test_a_sync_helper_frame_nested_50000_deep_fails_the_sync_not_the_run(
    tmp_path: Path,
) -> None:
    local = tmp_path / "local"
    local.mkdir()
    body = f"""
        n = {len(DEEP)}
        OUT.write(struct.pack(">I", n) + b"[" * n)
        flush()
        time.sleep(3600)
    """
    opts = SyncOptions(
        local_root=local,
        state_dir=tmp_path / "state",
        remote_python=fake_python(tmp_path / "sandbox-bin", body),
        session="victim",
        idle_timeout_s=5.0,
    )
    shell = LocalShell()
    try:
        with pytest.raises(RemoteError, match="malformed"):
            push(shell, opts, instance_uuid="u")
    finally:
        shell.close()


class Deep(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(500)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(DEEP)))
        self.end_headers()
        self.wfile.write(DEEP)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def deep_exec(test_ca: CaFiles) -> Iterator[TlsForwarder]:
    with https_front(test_ca, Deep) as fwd:
        yield fwd


def test_an_exec_servers_answer_nested_50000_deep_fails_the_command_not_the_run(
    test_ca: CaFiles, deep_exec: TlsForwarder
) -> None:
    client = HttpExec.from_dialer(dialer_to(test_ca, deep_exec.port))
    with client, pytest.raises(RemoteError, match="http 500"):
        client.run(FQDN, "true", {})


def test_a_journal_nested_50000_deep_is_refused_as_not_json() -> None:
    binding = Binding(project="p", session="s", instance_uuid="u")
    assert decode(b"k" * 32, binding, DEEP) == (None, "not JSON")


def test_a_plugin_answer_nested_50000_deep_reads_as_no_envelope() -> None:
    assert plugin._envelope(PluginReply(500, DEEP, None)) == {}


def test_a_tar_push_hello_record_nested_4000_deep_reads_as_no_record() -> None:
    assert parse_hello(b"boot-1\0" + b"[" * 4000) == ("boot-1", None)
