"""The TLS edge and the CA with real sandboxes: the original workflow's clients get through."""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.local.ca import CertificateAuthority
from reconciler.local.edge import Route
from tests.support.sandbox_harness import APP_DOMAIN, EdgeHarness, needs_metro_tools
from tests.support.waiting import eventually

pytestmark = [needs_metro_tools, pytest.mark.metro]

ALPHA = "edge-alpha-uuid"


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeHarness]:
    h = EdgeHarness(tmp_path_factory.mktemp("edge"))
    h.start(ALPHA, "alpha")
    yield h
    h.close()


class TestSsh:
    def test_ssh_through_the_strict_openssl_proxy_logs_in_as_root_in_root_home(
        self, harness: EdgeHarness
    ) -> None:
        out = harness.ssh("alpha", "id -u; whoami; pwd; hostname")
        assert out.returncode == 0, out.stderr
        # the hostname is the instance uuid: nothing host-visible carries its name
        assert out.stdout.split() == ["0", "root", "/root", ALPHA]

    def test_rsync_delete_into_workspace_mirrors_the_source_tree(
        self, harness: EdgeHarness, tmp_path: Path
    ) -> None:
        src = tmp_path / "src"
        (src / "sub").mkdir(parents=True)
        (src / "a.txt").write_text("alpha\n")
        (src / "sub" / "b.bin").write_bytes(os.urandom(300_000))
        stale = harness.runtime.workspace(ALPHA) / "stale.txt"
        stale.write_text("to be deleted")
        fqdn = harness.fqdn("alpha")
        out = harness.rsync(f"{src}/", f"root@{fqdn}:/workspace/", "alpha")
        assert out.returncode == 0, out.stderr
        ws = harness.runtime.workspace(ALPHA)
        assert not stale.exists()
        assert (ws / "a.txt").read_text() == "alpha\n"
        assert (ws / "sub" / "b.bin").read_bytes() == (src / "sub" / "b.bin").read_bytes()

    def test_an_unknown_name_on_2222_is_closed_without_an_ssh_banner(
        self, harness: EdgeHarness
    ) -> None:
        out = subprocess.run(
            ["openssl", "s_client", "-quiet", "-connect", f"127.0.0.1:{harness.p2222}",
             "-servername", f"nobody.{APP_DOMAIN}", "-CAfile", str(harness.ca.cert_path)],
            capture_output=True, timeout=20, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert b"SSH-2.0" not in out.stdout


class TestExecApi:
    def test_a_command_answers_200_with_stdout_stderr_and_code(self, harness: EdgeHarness) -> None:
        code, body = harness.curl(
            "alpha", "/exec", "-H", "Content-Type: application/json",
            "-d", json.dumps({"cmd": "pwd; echo err >&2; exit 7"}),
        )  # fmt: skip
        assert code == 200
        assert json.loads(body) == {"stdout": "/workspace\n", "stderr": "err\n", "code": 7}

    def test_invalid_json_is_answered_with_400(self, harness: EdgeHarness) -> None:
        code, body = harness.curl("alpha", "/exec", "-d", "{not json")
        assert (code, json.loads(body)) == (400, {"error": "invalid json"})

    def test_a_non_string_cmd_is_answered_with_400(self, harness: EdgeHarness) -> None:
        code, body = harness.curl("alpha", "/exec", "-d", json.dumps({"cmd": ["ls"]}))
        assert (code, json.loads(body)) == (400, {"error": '"cmd" must be a string'})

    def test_a_wrong_path_or_method_is_answered_with_404(self, harness: EdgeHarness) -> None:
        assert harness.curl("alpha", "/run", "-d", "{}") == (404, '{"error": "not found"}')
        assert harness.curl("alpha", "/exec") == (404, '{"error": "not found"}')

    def test_a_spawn_error_is_answered_with_500(self, harness: EdgeHarness) -> None:
        code, body = harness.curl("alpha", "/exec", "-d", json.dumps({"cmd": "echo \u0000"}))
        assert code == 500
        assert "null byte" in json.loads(body)["error"]

    def test_an_unknown_name_on_443_gets_the_service_not_found_page(
        self, harness: EdgeHarness
    ) -> None:
        code, body = harness.curl("nobody", "/exec", "-d", "{}")
        assert code == 404
        assert "Service not found" in body


class TestRouting:
    def test_the_sni_name_and_public_port_reach_resolve(self, harness: EdgeHarness) -> None:
        harness.curl("alpha", "/exec", "-d", json.dumps({"cmd": "true"}))
        assert (harness.fqdn("alpha"), 443) in harness.resolved

    def test_each_connection_reports_plus_one_then_minus_one_activity(
        self, harness: EdgeHarness
    ) -> None:
        # why: the previous test's connection may still be closing on the edge side
        assert eventually(lambda: sum(d for _, d in harness.activity) == 0, 5.0)
        before = len(harness.activity)
        harness.curl("alpha", "/exec", "-d", json.dumps({"cmd": "true"}))
        assert eventually(lambda: len(harness.activity) >= before + 2, 5.0)
        assert harness.activity[before:] == [(ALPHA, 1), (ALPHA, -1)]

    def test_should_drop_closes_the_connection_before_any_tls(self, harness: EdgeHarness) -> None:
        harness.drop = True
        try:
            with socket.create_connection(("127.0.0.1", harness.p443), timeout=5) as s:
                s.sendall(b"\x16\x03\x01\x00\x05hello")
                assert eventually(lambda: _closed(s), 5.0)
        finally:
            harness.drop = False

    def test_open_port_is_idempotent_and_listed(self, harness: EdgeHarness) -> None:
        again = harness.lt.run(harness.edge.open_port(2222))
        assert again == harness.p2222
        assert harness.edge.ports == {2222: harness.p2222, 443: harness.p443}

    def test_a_connection_during_a_wake_is_retried_until_the_sandbox_answers(
        self, harness: EdgeHarness
    ) -> None:
        uuid = "edge-sleepy-uuid"
        harness.start(uuid, "sleepy")
        harness.lt.run(harness.runtime.stop(uuid))

        async def wake() -> None:
            await harness.runtime.start(uuid, env={"PUBKEY": harness.pubkey})

        harness.wakers[uuid] = wake
        try:
            code, body = harness.curl("sleepy", "/exec", "-d", json.dumps({"cmd": "hostname"}))
            assert (code, json.loads(body)["stdout"]) == (200, uuid + "\n")
        finally:
            harness.lt.run(harness.runtime.destroy(uuid))

    def test_a_route_to_a_sandbox_that_never_comes_up_closes_the_client(
        self, harness: EdgeHarness
    ) -> None:
        harness.routes[(harness.fqdn("ghost"), 443)] = Route("edge-ghost-uuid", 8080)
        code, _ = harness.curl("ghost", "/exec", "-d", "{}")
        assert code == 0  # curl saw the connection closed, no HTTP answer


def _closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


class TestClose:
    def test_close_cuts_live_connections_and_stops_listening(self, tmp_path: Path) -> None:
        h = EdgeHarness(tmp_path)
        try:
            h.start("edge-close-uuid", "closing")
            ctx = ssl.create_default_context(cafile=str(h.ca.cert_path))
            raw = socket.create_connection(("127.0.0.1", h.p2222), timeout=10)
            with ctx.wrap_socket(raw, server_hostname=h.fqdn("closing")) as tls:
                assert tls.recv(7) == b"SSH-2.0"
                h.lt.run(h.edge.close())
                assert eventually(lambda: _tls_closed(tls), 5.0)
            assert h.edge.ports == {}
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", h.p2222), timeout=2).close()
        finally:
            h.close()


def _tls_closed(s: ssl.SSLSocket) -> bool:
    s.settimeout(0.5)
    try:
        while s.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except (ssl.SSLError, OSError):
        return True


class TestTls:
    def test_python_verifies_the_edge_against_the_metro_ca_by_name(
        self, harness: EdgeHarness
    ) -> None:
        ctx = ssl.create_default_context(cafile=str(harness.ca.cert_path))
        with (
            socket.create_connection(("127.0.0.1", harness.p2222), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname=harness.fqdn("alpha")) as tls,
        ):
            assert tls.recv(7) == b"SSH-2.0"

    @pytest.mark.filterwarnings("ignore::DeprecationWarning")
    def test_tls_below_1_2_is_refused(self, harness: EdgeHarness) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        with (
            socket.create_connection(("127.0.0.1", harness.p2222), timeout=10) as raw,
            pytest.raises(ssl.SSLError),
        ):
            ctx.wrap_socket(raw, server_hostname=harness.fqdn("alpha"))


class TestCertificateAuthority:
    def test_the_ca_is_created_once_and_reloaded_unchanged(self, tmp_path: Path) -> None:
        first = CertificateAuthority.load_or_create(tmp_path / "ca", APP_DOMAIN)
        pem = first.cert_path.read_bytes()
        second = CertificateAuthority.load_or_create(tmp_path / "ca", APP_DOMAIN)
        assert second.cert_path.read_bytes() == pem

    def test_private_keys_are_0600(self, tmp_path: Path) -> None:
        ca = CertificateAuthority.load_or_create(tmp_path / "ca", APP_DOMAIN)
        for key in (ca.key_path, ca.leaf_key_path):
            assert stat.S_IMODE(key.stat().st_mode) == 0o600

    def test_a_new_app_domain_reissues_the_leaf_under_the_same_ca(self, tmp_path: Path) -> None:
        CertificateAuthority.load_or_create(tmp_path / "ca", APP_DOMAIN)
        ca = CertificateAuthority.load_or_create(tmp_path / "ca", "other.example")
        leaf = ca.leaf_cert_path.read_text()
        out = subprocess.run(
            ["openssl", "verify", "-CAfile", str(ca.cert_path), "-verify_hostname",
             "x.other.example", "/dev/stdin"],
            input=leaf, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
