"""`HttpExec` against a real /exec server (like the image's) behind the TLS forwarder."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar

import pytest

from reconciler.errors import RemoteError, SpecError, TransportError
from reconciler.transport.http import HttpExec, build_exec_cmd, stage_env, unstage_env
from reconciler.transport.local_shell import LocalShell
from reconciler.transport.tls import Dialer
from tests.support.listener import RecordingMetro
from tests.support.tls_sshd import FQDN, CaFiles, TlsForwarder, dialer_to, https_front


class ExecHandler(BaseHTTPRequestHandler):
    """The skill's contract: POST /exec {"cmd"} → sh -lc → {"stdout","stderr","code"}."""

    #: a canned answer (status, raw body) for the next request, for hostile-server tests
    canned: ClassVar[list[tuple[int, bytes]]] = []
    seen: ClassVar[list[dict[str, Any]]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("content-length", 0)))
        self.seen.append({"path": self.path, "host": self.headers.get("host"), "raw": raw})
        if self.canned:
            self._send(*self.canned.pop(0))
            return
        if self.path != "/exec":
            self._send(404, b'{"error": "not found"}')
            return
        try:
            cmd = json.loads(raw)["cmd"]
        except (ValueError, KeyError):
            self._send(400, b'{"error": "invalid json"}')
            return
        if not isinstance(cmd, str):
            self._send(400, b'{"error": "\\"cmd\\" must be a string"}')
            return
        proc = subprocess.run(["sh", "-lc", cmd], capture_output=True, check=False)
        body = {
            "stdout": proc.stdout.decode(errors="replace"),
            "stderr": proc.stderr.decode(errors="replace"),
            "code": proc.returncode,
        }
        self._send(200, json.dumps(body).encode())


@pytest.fixture(scope="module")
def exec_front(test_ca: CaFiles) -> Iterator[TlsForwarder]:
    with https_front(test_ca, ExecHandler) as fwd:
        yield fwd


@pytest.fixture
def http_exec(test_ca: CaFiles, exec_front: TlsForwarder) -> Iterator[HttpExec]:
    ExecHandler.canned.clear()
    ExecHandler.seen.clear()
    with HttpExec.from_dialer(dialer_to(test_ca, exec_front.port)) as client:
        yield client


class TestRun:
    def test_output_exit_code_env_and_cwd_arrive(
        self, http_exec: HttpExec, tmp_path: object
    ) -> None:
        env = {"GREETING": "it's\nhere", "X": "$(id)"}
        got: list[bytes] = []
        result = http_exec.run(
            FQDN,
            'printf "%s|%s|" "$GREETING" "$X"; pwd; echo oops >&2; exit 5',
            env,
            cwd=str(tmp_path),
            on_stdout=got.append,
        )
        assert result.exit_code == 5
        assert result.stdout_tail == f"it's\nhere|$(id)|{tmp_path}\n"
        assert result.stderr_tail == "oops\n"
        assert got == [result.stdout_tail.encode()]
        assert ExecHandler.seen[0]["host"] == FQDN
        assert ExecHandler.seen[0]["path"] == "/exec"

    def test_a_dialer_and_its_context_configure_it_like_the_ssh_path(
        self, test_ca: CaFiles, exec_front: TlsForwarder
    ) -> None:
        dialer = dialer_to(test_ca, exec_front.port)
        with HttpExec(dialer, dialer.ssl_context) as client:
            assert client.run(FQDN, "echo hi", {}, cwd="/").stdout_tail == "hi\n"

    def test_an_edge_on_this_machine_is_dialed_directly_whatever_proxy_the_environment_names(
        self, test_ca: CaFiles, exec_front: TlsForwarder, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # the local metro's edge is on this machine's loopback: a proxy cannot reach it, and
        # before this the command failed with ConnectError behind one
        proxy = RecordingMetro()
        try:
            for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
                monkeypatch.setenv(variable, proxy.url)
            with HttpExec.from_dialer(dialer_to(test_ca, exec_front.port)) as client:
                assert client.run(FQDN, "echo hi", {}, cwd="/").stdout_tail == "hi\n"
            assert proxy.requests == []
        finally:
            proxy.close()

    def test_the_cmd_has_the_documented_shape(self) -> None:
        cmd = build_exec_cmd("make test", {"A": "1 2"}, "/workspace", None)
        assert cmd == "cd /workspace && export A='1 2' && (make test)"
        with pytest.raises(SpecError):
            build_exec_cmd("true", {"A-B": "x"}, "/", None)

    def test_another_shell_gets_the_command_as_one_quoted_argument(self) -> None:
        cmd = build_exec_cmd("echo ${PIPESTATUS[0]}", {}, "/workspace", None, shell="bash")
        assert cmd == "cd /workspace && bash -c 'echo ${PIPESTATUS[0]}'"
        timed = build_exec_cmd("true", {}, "/w", 5, shell="/bin/zsh")
        assert timed.endswith("exec timeout -k 5 5 /bin/zsh -c '(true)'"), timed

    def test_a_timeout_stops_the_command_and_reports_timed_out(self, http_exec: HttpExec) -> None:
        result = http_exec.run(FQDN, "sleep 30; echo late", {}, cwd="/tmp", timeout_s=1)
        assert result.timed_out is True
        assert result.exit_code is None
        assert result.duration_s < 10


class TestStagedEnvironment:
    """Env values go through a private file written over the shell, not through the API."""

    def test_values_reach_the_command_but_never_the_request_and_the_file_is_gone(
        self, http_exec: HttpExec, tmp_path: object
    ) -> None:
        value = "s3cret-" + "x" * 20 + "'$(id)"
        shell = LocalShell()
        path = stage_env(shell, {"TOKEN": value})
        assert os.stat(path).st_mode & 0o777 == 0o600
        result = http_exec.run(FQDN, 'printf "%s" "$TOKEN"', {}, cwd=str(tmp_path), env_file=path)
        assert result.exit_code == 0 and result.stdout_tail == value
        raw = ExecHandler.seen[0]["raw"]
        assert b"s3cret" not in raw and path.encode() in raw
        assert not os.path.exists(path)  # sourced, then removed before the command ran

    def test_an_unused_staged_file_is_removed_and_a_failed_source_runs_nothing(
        self, http_exec: HttpExec
    ) -> None:
        shell = LocalShell()
        path = stage_env(shell, {"A": "1"})
        unstage_env(shell, path)
        assert not os.path.exists(path)
        result = http_exec.run(FQDN, "echo ran", {}, cwd="/", env_file=path)
        assert result.exit_code != 0 and "ran" not in result.stdout_tail


class TestHostileOrBrokenServer:
    @pytest.mark.parametrize(
        ("status", "body", "match"),
        [
            (400, b'{"error": "invalid json"}', "http 400: invalid json"),
            (404, b'{"error": "not found"}', "http 404: not found"),
            (500, b'{"error": "spawn failed"}', "http 500: spawn failed"),
            (500, b"<html>", "http 500$"),
            (200, b"[1, 2]", "not a json object"),
            (200, b'{"stdout": 1, "stderr": "", "code": 0}', "string stdout"),
            (200, b'{"stdout": "", "stderr": "", "code": true}', "exit code"),
            (200, b'{"stdout": "", "stderr": "", "code": 70000}', "exit code"),
        ],
    )
    def test_bad_answers_are_remote_errors(
        self, http_exec: HttpExec, status: int, body: bytes, match: str
    ) -> None:
        ExecHandler.canned.append((status, body))
        with pytest.raises(RemoteError, match=match):
            http_exec.run(FQDN, "true", {})

    def test_a_gateway_timeout_says_the_command_may_still_run_and_is_not_retried(
        self, http_exec: HttpExec
    ) -> None:
        ExecHandler.canned.append((504, b"<html>504 Gateway Time-out</html>"))
        with pytest.raises(RemoteError, match="gateway cut the request") as err:
            http_exec.run(FQDN, "sleep 100", {})
        assert err.value.retryable is False and "exec: ssh" in str(err.value)

    def test_an_error_message_never_echoes_a_secret_value(self, http_exec: HttpExec) -> None:
        ExecHandler.canned.append((500, b'{"error": "cannot run export K=hunter2-secret"}'))
        with pytest.raises(RemoteError) as err:
            http_exec.run(FQDN, "true", {"K": "hunter2-secret"})
        assert "hunter2-secret" not in str(err.value)

    def test_an_error_message_cannot_carry_escape_sequences_to_the_terminal(
        self, http_exec: HttpExec
    ) -> None:
        # the image's exec server is the sandbox's: its message becomes the session's failure,
        # printed by apply (FAILED: ...) and by every later status (OSC 52 sets the clipboard)
        ExecHandler.canned.append(
            (500, b'{"error": "boom\\u001b]52;c;Y3VybCBldmlsIHwgc2g=\\u0007\\u001b[2J\\u202eend"}')
        )
        with pytest.raises(RemoteError) as err:
            http_exec.run(FQDN, "true", {})
        message = str(err.value)
        assert "boom" in message and "end" in message
        assert not any(c in message for c in "\x1b\x07\u202e"), repr(message)

    def test_an_oversized_answer_is_refused(
        self, test_ca: CaFiles, exec_front: TlsForwarder
    ) -> None:
        dialer = dialer_to(test_ca, exec_front.port)
        client = HttpExec(dialer.ssl_context, dialer.address, max_body_bytes=1000)
        ExecHandler.canned.append((200, b'{"stdout": "' + b"x" * 5000 + b'"}'))
        with client, pytest.raises(RemoteError, match="exceeds 1000 bytes"):
            client.run(FQDN, "true", {})

    def test_the_certificate_is_verified_against_the_fqdn(
        self, test_ca: CaFiles, exec_front: TlsForwarder
    ) -> None:
        client = HttpExec.from_dialer(dialer_to(test_ca, exec_front.port))
        with client, pytest.raises(TransportError, match="certificate rejected") as err:
            client.run("box1.not-our-domain.test", "true", {})
        assert err.value.retryable is False

    def test_an_untrusted_ca_is_refused(self, exec_front: TlsForwarder) -> None:
        dialer = Dialer.with_ca(None, lambda f, p: ("127.0.0.1", exec_front.port))
        with HttpExec.from_dialer(dialer) as client, pytest.raises(TransportError):
            client.run(FQDN, "true", {})
