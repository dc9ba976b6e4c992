"""The backends end to end against the real local metro (bubblewrap sandboxes, TLS edge).

The same code paths as against UKC: only the base URL, the token, the address map of the
local FQDNs (`edge_address`) and the CA differ.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.cloud.api import UkcApi
from reconciler.cloud.model import CreateRequest, Service
from reconciler.cloud.trust import edge_address
from reconciler.local import daemon as metro_daemon
from reconciler.local.daemon import MetroInfo
from reconciler.transport.commands import run_command
from reconciler.transport.http import HttpExec
from reconciler.transport.keys import generate_keypair
from reconciler.transport.sshclient import wait_ssh_ready
from reconciler.transport.tls import Dialer

pytestmark = pytest.mark.metro


@pytest.fixture(scope="module")
def metro(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetroInfo]:
    try:
        metro_daemon.check_prerequisites()
    except Exception as err:  # bwrap/sshd missing: nothing to test against
        pytest.skip(f"local metro unavailable: {err}")
    state_dir = tmp_path_factory.mktemp("metro")
    info = metro_daemon.ensure_running(state_dir)
    try:
        yield info
    finally:
        metro_daemon.stop(state_dir)


def test_create_wait_ssh_run_exec_list_and_delete_on_the_local_metro(
    metro: MetroInfo, tmp_path: Path
) -> None:
    name = f"bk-{uuidlib.uuid4().hex[:8]}"
    tags = ["ukc", f"ukc.session={name}"]
    key = tmp_path / "key"
    pub = generate_keypair(key, name)
    dialer = Dialer.with_ca(metro.ca_path, edge_address(metro.edge_host, metro.edge_ports))
    with UkcApi(metro.api_url, metro.token, metro="local") as api:
        inst = api.create_instance(
            CreateRequest(
                name=name,
                image="ukc/local-sandbox:latest",
                env={"PUBKEY": pub},
                tags=tags,
                memory_mb=256,
                services=(Service(2222, 2222, ("tls",)), Service(443, 8080, ("tls", "http"))),
            )
        )
        try:
            assert inst.fqdn == f"{name}.{metro.app_domain}"
            ready = api.wait_instance(name, "running", 60)
            assert ready.state == "running"
            assert ready.uuid == inst.uuid
            assert [i.name for i in api.list_instances(tags)] == [name]

            with wait_ssh_ready(dialer, inst.fqdn, key_path=key, deadline_s=60) as shell:
                out: list[bytes] = []
                result = run_command(
                    shell,
                    'printf "%s in %s" "$SECRET_X" "$(pwd)"',
                    env={"SECRET_X": "v'1\n2"},
                    timeout_s=30,
                    on_stdout=out.append,
                    on_stderr=lambda b: None,
                )
                assert result.exit_code == 0, result.stderr_tail
                assert result.stdout_tail == "v'1\n2 in /workspace"

            with HttpExec(dialer) as http:
                got = http.run(inst.fqdn, "echo via-http; pwd", {"A": "b"})
                assert got.exit_code == 0, got.stderr_tail
                assert got.stdout_tail == "via-http\n/workspace\n"

            api.stop_instance(name)
            assert api.wait_instance(name, "stopped", 30).state == "stopped"
            api.start_instance(name)
            assert api.wait_instance(name, "running", 60).start_count == 2
        finally:
            assert api.delete_instance(name) is True
        assert api.get_instance(name) is None
        assert api.delete_instance(name) is False
        assert api.request_count > 0
