"""The `plugin` transport against a sandbox plugin kept in memory (a small fake of
`CloudApi.plugin_request` with hostile knobs), and `UkcApi.plugin_request` on the wire."""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from reconciler.cloud.api import UkcApi
from reconciler.cloud.model import CloudApi, PluginReply
from reconciler.cloud.trust import Reach
from reconciler.errors import AuthError, RemoteError, SandboxNotReadyError, TransportError
from reconciler.transport import plugin
from reconciler.transport.base import Credentials, Target

UUID = "5f4f39a7-295d-415f-bfca-12b477590ac3"
COMMAND = "0b7c1e2d-3f40-4a5b-8c6d-7e8f90a1b2c3"
TOKEN = "tok-CANARY-plugin-4e1f"


def _json(status: int, data: object = None, message: str | None = None) -> PluginReply:
    body: dict[str, object] = {"status": "success" if status < 400 else "error", "data": data}
    if message is not None:
        body["message"] = message
    return PluginReply(status, json.dumps(body).encode())


class FakePlugin:
    """One instance's sandbox plugin running one command that printed `stdout` and `stderr`
    and exited `exitcode`. Knobs make it answer as a hostile or a booting sandbox would."""

    metro = "fake"

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.stdout = b""
        self.stderr = b""
        self.exitcode: object = 0
        self.stdin = bytearray()
        #: the id the plugin says it gave the command it started
        self.command_id: object = COMMAND
        #: probes answered 503 before the plugin is up
        self.booting = 0
        #: the answer every request gets instead of the real one (status, message)
        self.failing: tuple[int, str] | None = None
        #: bytes a log answer adds before what was asked for (a wrong range)
        self.range_shift = 0
        #: the command runs until its input ends (as `sh` reading a script does)
        self.reads_stdin = False
        self.stdin_ended = False

    def plugin_request(
        self,
        uuid: str,
        name: str,
        method: str,
        path: str,
        *,
        body: object = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 30.0,
        max_bytes: int,
    ) -> PluginReply:
        assert (uuid, name) == (UUID, "sandbox")
        if isinstance(body, bytes):
            body = json.loads(body)
        self.requests.append((method, path, body))
        if path == "commands" and method == "GET":
            if self.booting:
                self.booting -= 1
                return PluginReply(503, b"")
            return _json(200, {"commands": []})
        if self.failing is not None:
            return _json(self.failing[0], None, self.failing[1])
        if path == "commands" and method == "POST":
            return _json(200, {"uuid": self.command_id})
        rest = path.removeprefix(f"commands/{COMMAND}")
        if rest == "/stdin":
            assert isinstance(body, dict)
            self.stdin += base64.b64decode(body["data"])
            self.stdin_ended = self.stdin_ended or body["eof"]
            return _json(200)
        if rest.startswith("/logs/raw/"):
            data = self.stdout if rest.endswith("stdout") else self.stderr
            assert headers is not None
            first, last = map(int, headers["range"].removeprefix("bytes=").split("-"))
            if first >= len(data):
                return PluginReply(416, b"", f"bytes */{len(data)}")
            last = min(last, len(data) - 1)
            first += self.range_shift
            return PluginReply(206, data[first : last + 1], f"bytes {first}-{last}/{len(data)}")
        running = self.reads_stdin and not self.stdin_ended
        if rest == "/wait_timeout":
            return _json(408) if running else _json(200)
        if rest == "":
            return _json(200, {"uuid": COMMAND, "exitcode": None if running else self.exitcode})
        return _json(200)

    def paths(self) -> list[str]:
        return [path for _, path, _ in self.requests]


def _target(fake: FakePlugin) -> Target:
    return Target(
        "ukc-demo",
        None,
        Reach(ssl.create_default_context()),
        UUID,
        cast(CloudApi, fake),
    )


def _kind() -> plugin.PluginKind:
    return plugin.PluginKind(sleep=lambda s: None)


def _connect(fake: FakePlugin) -> Any:
    return _kind().connect(_target(fake), Credentials(Path("/nonexistent")), pin=None, deadline_s=5)


def test_a_process_reads_all_its_output_then_its_end_and_its_exit_status() -> None:
    fake = FakePlugin()
    fake.stdout, fake.stderr, fake.exitcode = b"out" * 1000, b"err", -15
    proc = _connect(fake).start("cat")
    assert b"".join(iter(lambda: proc.read(1000), b"")) == b"out" * 1000
    assert proc.read_stderr() == b"err" and proc.read_stderr() == b""
    assert proc.wait(5) == 128 + 15  # a signal's death reads as a shell reports it


def test_stdin_goes_in_pieces_each_under_the_plugins_body_limit_the_end_with_the_last() -> None:
    fake = FakePlugin()
    proc = _connect(fake).start("cat")
    data = bytes(range(256)) * (5 * 4096 + 17)
    proc.write(data)
    proc.close_stdin()
    assert bytes(fake.stdin) == data
    sent = [body for method, path, body in fake.requests if path.endswith("/stdin")]
    assert len(sent) > 5 and [body["eof"] for body in sent] == [False] * (len(sent) - 1) + [True]
    assert max(len(json.dumps(body)) for body in sent) < 2 * 1024 * 1024


def test_a_session_commands_environment_goes_over_stdin_never_into_the_plugins_request() -> None:
    fake = FakePlugin()
    fake.reads_stdin = True
    canary = "canary-env-over-stdin-61b2"
    result = _connect(fake).run(
        "echo hi",
        env={"TOKEN": canary},
        cwd="/workspace",
        timeout_s=30,
        on_stdout=lambda b: None,
        on_stderr=lambda b: None,
    )
    assert result.exit_code == 0
    assert canary.encode() in bytes(fake.stdin)  # the command gets it, from its stdin
    (start,) = [body for method, path, body in fake.requests if path == "commands" and body]
    assert canary not in json.dumps(start) and set(start) == {"cmd"}


def test_a_finished_process_is_forgotten_by_the_plugin_at_the_next_start_or_the_close() -> None:
    fake = FakePlugin()
    shell = _connect(fake).shell
    first = shell.start("true")
    assert first.wait(5) == 0
    second = shell.start("true")
    assert second.wait(5) == 0
    shell.close()
    deletes = [(m, p) for m, p, _ in fake.requests if m == "DELETE"]
    assert deletes == [("DELETE", f"commands/{COMMAND}")] * 2


def test_a_command_id_that_is_not_a_uuid_never_becomes_part_of_a_request_path() -> None:
    fake = FakePlugin()
    fake.command_id = "../../../../v1/instances/victim"
    with pytest.raises(RemoteError, match="not a uuid"):
        _connect(fake).start("true")
    assert not any(".." in path for path in fake.paths())


def test_a_log_answer_for_another_range_than_asked_is_refused() -> None:
    fake = FakePlugin()
    fake.stdout, fake.range_shift = b"0123456789" * 10, 3
    proc = _connect(fake).start("cat")
    with pytest.raises(RemoteError, match="another range"):
        proc.read()


def test_sandbox_text_in_an_error_is_one_printable_bounded_line() -> None:
    fake = FakePlugin()
    fake.failing = (500, "\x1b]0;owned\x07\x1b[2J" + "A" * 10_000 + "\nfake prompt $ ")
    transport = _connect(fake)
    with pytest.raises(RemoteError) as err:
        transport.start("true")
    text = str(err.value)
    assert text.isprintable() and len(text) < 400 and "\x1b" not in text


def test_a_pin_naming_another_instance_is_refused_before_any_request() -> None:
    fake = FakePlugin()
    other = "uuid:00000000-0000-4000-8000-000000000000"
    creds = Credentials(Path("/nonexistent"))
    with pytest.raises(RemoteError, match="not the sandbox recorded"):
        _kind().connect(_target(fake), creds, pin=other, deadline_s=5)
    with pytest.raises(RemoteError, match="not the sandbox recorded"):
        _kind().reopen(_target(fake), creds, pin=other)
    assert fake.requests == []
    assert _kind().reopen(_target(fake), creds, pin=f"uuid:{UUID}").pin == f"uuid:{UUID}"


def test_a_booting_plugin_is_waited_for_and_one_that_never_comes_up_is_not_ready() -> None:
    fake = FakePlugin()
    fake.booting = 3
    assert _connect(fake).pin == f"uuid:{UUID}"
    assert fake.paths() == ["commands"] * 4
    fake.booting = 10**9
    clock = iter(range(1000))
    kind = plugin.PluginKind(sleep=lambda s: None, monotonic=lambda: float(next(clock)))
    with pytest.raises(SandboxNotReadyError, match="not ready after 5s"):
        kind.connect(_target(fake), Credentials(Path("/x")), pin=None, deadline_s=5)


def test_a_plugin_that_keeps_failing_ends_a_read_or_a_wait_with_an_error_not_a_hang() -> None:
    fake = FakePlugin()
    proc = _connect(fake).start("cat")
    fake.failing = (502, "bad gateway")
    with pytest.raises(RemoteError, match="http 502"):
        proc.read()
    with pytest.raises(RemoteError, match="http 502"):
        proc.wait(5)


def test_an_exit_code_that_is_not_a_number_is_not_taken_for_one() -> None:
    fake = FakePlugin()
    fake.exitcode = True
    proc = _connect(fake).start("true")
    with pytest.raises(RemoteError, match="no exit code"):
        proc.wait(5)


def test_a_killed_process_is_signalled_and_forgotten_once() -> None:
    fake = FakePlugin()
    fake.exitcode = None
    proc = _connect(fake).start("sleep 100")
    proc.kill()
    proc.kill()
    assert [(m, p) for m, p, _ in fake.requests[2:]] == [
        ("POST", f"commands/{COMMAND}/signal"),
        ("DELETE", f"commands/{COMMAND}/logs"),
        ("POST", f"commands/{COMMAND}/wait_timeout"),
        ("DELETE", f"commands/{COMMAND}"),
    ]
    assert proc.read() == b""


# ---- UkcApi.plugin_request on the wire


def _api(handler: Any) -> UkcApi:
    return UkcApi(
        "https://api.fake.test", TOKEN, metro="fake", transport=httpx.MockTransport(handler)
    )


def test_a_plugin_request_is_sent_to_the_instances_plugin_route_with_the_token() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(206, content=b"abc", headers={"content-range": "bytes 0-2/3"})

    reply = _api(handler).plugin_request(
        UUID,
        "sandbox",
        "GET",
        "commands/x/logs/raw/stdout",
        headers={"range": "bytes=0-9"},
        max_bytes=10,
    )
    assert reply == PluginReply(206, b"abc", "bytes 0-2/3")
    request = seen[0]
    assert request.url.path == f"/v1/instances/{UUID}/plugins/sandbox/commands/x/logs/raw/stdout"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["range"] == "bytes=0-9"
    # a body already encoded goes as it is
    _api(handler).plugin_request(UUID, "sandbox", "POST", "x", body=b'{"a":1}', max_bytes=10)
    assert seen[-1].content == b'{"a":1}'
    assert seen[-1].headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("uuid", "name", "path"),
    [
        (UUID, "sandbox", "commands/../../../instances"),
        (UUID, "sandbox", "commands/%2e%2e/x"),
        (UUID, "sandbox", "/v1/instances"),
        (UUID, "sandbox", "commands?delete=1"),
        ("../other", "sandbox", "commands"),
        (UUID, "../..", "commands"),
    ],
)
def test_a_plugin_request_that_would_leave_the_plugin_route_is_never_sent(
    uuid: str, name: str, path: str
) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={})

    with pytest.raises(ValueError, match="not a plugin route"):
        _api(handler).plugin_request(uuid, name, "DELETE", path, max_bytes=100)
    assert seen == []


def test_a_plugin_answer_over_its_bound_is_cut_off_without_being_read_whole() -> None:
    given: list[int] = []

    def endless() -> Iterator[bytes]:
        for _ in range(4096):
            given.append(1)
            yield b"x" * 65536

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=endless())

    with pytest.raises(TransportError, match="answer over 1048576 bytes"):
        _api(handler).plugin_request(UUID, "sandbox", "POST", "fs/read_raw", max_bytes=1 << 20)
    assert len(given) <= 17


def test_a_refused_token_on_a_plugin_route_is_an_auth_error_that_does_not_carry_it() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"message": f"bad token {TOKEN}"})

    with pytest.raises(AuthError) as err:
        _api(handler).plugin_request(UUID, "sandbox", "GET", "commands", max_bytes=100)
    assert TOKEN not in str(err.value) and TOKEN not in repr(err.value)
