"""The in-sandbox agent's sandbox plugin API , spoken over its unix socket."""

from __future__ import annotations

import base64
import marshal
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.local.sandbox import launch
from reconciler.local.sandbox.agent import boot, envpipe, options
from reconciler.local.sandbox.agent.commands import parse_signal
from tests.support.sandbox_harness import EdgeHarness, needs_metro_tools

pytestmark = [needs_metro_tools, pytest.mark.metro]

UUID = "agent-plugin-uuid"


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeHarness]:
    h = EdgeHarness(tmp_path_factory.mktemp("agent"))
    h.start(UUID, "plugin", env={"GREETING": "hello"})
    yield h
    h.close()


@pytest.fixture(scope="module")
def api(harness: EdgeHarness) -> Iterator[httpx.Client]:
    transport = httpx.HTTPTransport(uds=str(harness.runtime.plugin_socket(UUID)))
    with httpx.Client(transport=transport, base_url="http://sandbox", timeout=30) as client:
        yield client


def _start(api: httpx.Client, cmd: str | list[str], **extra: Any) -> str:
    r = api.post("/commands", json={"cmd": cmd, **extra})
    assert r.status_code == 200, r.text
    cid: str = r.json()["data"]["uuid"]
    return cid


def _finish(api: httpx.Client, cid: str) -> dict[str, Any]:
    assert api.post(f"/commands/{cid}/wait").status_code == 200
    info: dict[str, Any] = api.get(f"/commands/{cid}").json()["data"]
    return info


def _logs(api: httpx.Client, cid: str, **body: Any) -> dict[str, Any]:
    r = api.request("GET", f"/commands/{cid}/logs", json=body or None)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()["data"]
    return data


class TestCommands:
    def test_the_readiness_probe_lists_commands_in_a_success_envelope(
        self, api: httpx.Client
    ) -> None:
        r = api.get("/commands")
        assert r.status_code == 200
        assert r.json()["status"] == "success"
        assert isinstance(r.json()["data"]["commands"], list)

    def test_a_shell_line_runs_in_workspace_with_the_instance_env(self, api: httpx.Client) -> None:
        cid = _start(api, "pwd; echo $GREETING; echo oops >&2; exit 3")
        info = _finish(api, cid)
        assert info["exitcode"] == 3
        assert info["cmdline"] == "pwd; echo $GREETING; echo oops >&2; exit 3"
        logs = _logs(api, cid)
        assert base64.b64decode(logs["stdout"]) == b"/workspace\nhello\n"
        assert base64.b64decode(logs["stderr"]) == b"oops\n"
        assert (logs["stdout_available"], logs["stderr_available"]) == (17, 5)
        assert cid in api.get("/commands").json()["data"]["commands"]

    def test_an_argv_command_gets_its_cwd_and_env(self, api: httpx.Client) -> None:
        cid = _start(api, ["sh", "-c", 'echo "$X" "$PWD"'], cwd="/tmp", env={"X": "y"})
        assert _finish(api, cid)["exitcode"] == 0
        assert base64.b64decode(_logs(api, cid)["stdout"]) == b"y /tmp\n"

    def test_a_missing_program_or_empty_argv_is_answered_with_400(self, api: httpx.Client) -> None:
        assert api.post("/commands", json={"cmd": ["/no/such/program"]}).status_code == 400
        assert api.post("/commands", json={"cmd": []}).status_code == 400

    def test_logs_honour_offsets_and_limits(self, api: httpx.Client) -> None:
        cid = _start(api, "printf 0123456789")
        _finish(api, cid)
        logs = _logs(api, cid, stdout={"offset": 3, "limit": 4}, stderr={"offset": 0})
        assert base64.b64decode(logs["stdout"]) == b"3456"
        assert logs["stdout_available"] == 10

    def test_stdin_is_fed_and_closed_with_eof(self, api: httpx.Client) -> None:
        cid = _start(api, "cat")
        data = base64.b64encode(b"abc").decode()
        assert api.post(f"/commands/{cid}/stdin", json={"data": data}).status_code == 200
        r = api.post(f"/commands/{cid}/stdin", json={"data": "", "eof": True})
        assert r.status_code == 200
        assert _finish(api, cid)["exitcode"] == 0
        assert base64.b64decode(_logs(api, cid)["stdout"]) == b"abc"
        again = api.post(f"/commands/{cid}/stdin", json={"data": data})
        assert again.status_code == 400

    def test_bad_base64_on_stdin_is_answered_with_400(self, api: httpx.Client) -> None:
        cid = _start(api, "cat")
        try:
            assert api.post(f"/commands/{cid}/stdin", json={"data": "!!"}).status_code == 400
        finally:
            api.post(f"/commands/{cid}/stdin", json={"data": "", "eof": True})
            _finish(api, cid)

    def test_an_unknown_command_is_404_with_an_empty_body(self, api: httpx.Client) -> None:
        r = api.get("/commands/00000000-0000-0000-0000-000000000000")
        assert (r.status_code, r.content) == (404, b"")


class TestWaitAndSignals:
    def test_wait_timeout_answers_408_while_running_and_sigterm_gives_minus_15(
        self, api: httpx.Client
    ) -> None:
        cid = _start(api, "sleep 30")
        t0 = time.monotonic()
        r = api.post(f"/commands/{cid}/wait_timeout", json={"timeout_s": 0.2})
        assert r.status_code == 408
        assert r.json()["status"] == "error"
        assert time.monotonic() - t0 < 5
        assert api.post(f"/commands/{cid}/signal", json={"signal": "TERM"}).status_code == 200
        r = api.post(f"/commands/{cid}/wait_timeout", json={"timeout_s": 10})
        assert r.status_code == 200
        assert api.get(f"/commands/{cid}").json()["data"]["exitcode"] == -15

    def test_a_signal_by_number_or_sig_name_is_delivered(self, api: httpx.Client) -> None:
        for sig in (2, "SIGINT"):
            cid = _start(api, "sleep 30")
            assert api.post(f"/commands/{cid}/signal", json={"signal": sig}).status_code == 200
            assert _finish(api, cid)["exitcode"] == -2

    def test_an_unknown_signal_or_bad_duration_is_answered_with_400(
        self, api: httpx.Client
    ) -> None:
        cid = _start(api, "true")
        assert api.post(f"/commands/{cid}/signal", json={"signal": "BOGUS"}).status_code == 400
        r = api.post(f"/commands/{cid}/wait_timeout", json={"timeout_s": "soon"})
        assert r.status_code == 400

    def test_delete_is_refused_while_running_and_then_forgets_the_command(
        self, api: httpx.Client
    ) -> None:
        cid = _start(api, "sleep 30")
        assert api.delete(f"/commands/{cid}").status_code == 409
        api.post(f"/commands/{cid}/signal", json={"signal": 9})
        _finish(api, cid)
        assert api.delete(f"/commands/{cid}").status_code == 200
        assert api.get(f"/commands/{cid}").status_code == 404


@pytest.fixture(scope="module")
def cid(api: httpx.Client) -> str:
    """A finished command whose stdout is `abcdefghij`."""
    command = _start(api, "printf abcdefghij")
    _finish(api, command)
    return command


class TestRawLogs:
    def test_the_whole_stream_is_raw_octets(self, api: httpx.Client, cid: str) -> None:
        r = api.get(f"/commands/{cid}/logs/raw/stdout")
        assert (r.status_code, r.content) == (200, b"abcdefghij")
        assert r.headers["content-type"] == "application/octet-stream"

    def test_a_range_is_answered_with_206_and_content_range(
        self, api: httpx.Client, cid: str
    ) -> None:
        r = api.get(f"/commands/{cid}/logs/raw/stdout", headers={"Range": "bytes=2-4"})
        assert (r.status_code, r.content) == (206, b"cde")
        assert r.headers["content-range"] == "bytes 2-4/10"
        r = api.get(f"/commands/{cid}/logs/raw/stdout", headers={"Range": "bytes=-3"})
        assert (r.status_code, r.content) == (206, b"hij")

    def test_an_unsatisfiable_range_is_416(self, api: httpx.Client, cid: str) -> None:
        r = api.get(f"/commands/{cid}/logs/raw/stdout", headers={"Range": "bytes=50-"})
        assert r.status_code == 416
        assert r.headers["content-range"] == "bytes */10"

    def test_deleted_logs_are_gone_with_410(self, api: httpx.Client) -> None:
        cid = _start(api, "echo x")
        _finish(api, cid)
        assert api.delete(f"/commands/{cid}/logs").status_code == 200
        assert api.delete(f"/commands/{cid}/logs").status_code == 200  # idempotent
        assert api.get(f"/commands/{cid}/logs").status_code == 410
        assert api.get(f"/commands/{cid}/logs/raw/stdout").status_code == 410


class TestFiles:
    def test_write_append_read_and_read_raw_round_trip(
        self, api: httpx.Client, harness: EdgeHarness
    ) -> None:
        assert api.post("/fs/mkdir", json={"path": "/workspace/d/e", "parents": True}).is_success
        path = "/workspace/d/e/f.txt"
        w = {"path": path, "append": False, "encoding": "utf-8", "data": "héllo "}
        assert api.post("/fs/write", json=w).status_code == 200
        more = base64.b64encode(b"\x00\xff").decode()
        w2 = {"path": path, "append": True, "encoding": "base64", "data": more}
        assert api.post("/fs/write", json=w2).status_code == 200
        expected = "héllo ".encode() + b"\x00\xff"
        r = api.post("/fs/read", json={"path": path})
        assert base64.b64decode(r.json()["data"]["contents"]) == expected
        raw = api.post("/fs/read_raw", json={"path": path})
        assert (raw.content, raw.headers["content-type"]) == (expected, "application/octet-stream")
        assert (harness.runtime.workspace(UUID) / "d/e/f.txt").read_bytes() == expected

    def test_writing_to_a_directory_is_a_500_naming_os_error_21(self, api: httpx.Client) -> None:
        w = {"path": "/workspace", "append": False, "encoding": "utf-8", "data": "x"}
        r = api.post("/fs/write", json=w)
        assert r.status_code == 500
        assert r.json()["message"] == "Is a directory (os error 21)"

    def test_bad_encoding_or_base64_is_400_and_a_missing_file_is_404(
        self, api: httpx.Client
    ) -> None:
        w = {"path": "/workspace/x", "append": False, "encoding": "rot13", "data": "x"}
        assert api.post("/fs/write", json=w).status_code == 400
        w = {"path": "/workspace/x", "append": False, "encoding": "base64", "data": "@@"}
        assert api.post("/fs/write", json=w).status_code == 400
        assert api.post("/fs/read_raw", json={"path": "/workspace/nope"}).status_code == 404
        assert api.post("/fs/read", json={"path": "/workspace/nope"}).status_code == 500

    def test_upload_into_a_directory_uses_the_filename(self, api: httpx.Client) -> None:
        body = {
            "path": "/workspace/up/",
            "filename": "u.bin",
            "parents": True,
            "encoding": "base64",
            "data": base64.b64encode(b"UP").decode(),
        }
        assert api.post("/fs/upload", json=body).status_code == 200
        r = api.post("/fs/read_raw", json={"path": "/workspace/up/u.bin"})
        assert r.content == b"UP"

    def test_an_unknown_route_is_404(self, api: httpx.Client) -> None:
        assert api.post("/fs/chmod", json={"path": "/workspace"}).status_code == 404
        assert api.get("/exec").status_code == 404


class TestSignalNames:
    @pytest.mark.parametrize(
        ("value", "number"),
        [(15, 15), ("15", 15), ("TERM", 15), ("SIGTERM", 15), ("int", 2), ("KILL", 9)],
    )
    def test_a_known_signal_is_parsed_to_its_number(self, value: object, number: int) -> None:
        assert parse_signal(value) == number

    @pytest.mark.parametrize("value", ["BOGUS", "SIG_DFL", "", 0, 9999, True, None, 1.5])
    def test_anything_else_is_rejected(self, value: object) -> None:
        assert parse_signal(value) is None


def test_the_agents_start_imports_no_http_server_until_an_api_is_called() -> None:
    # why it matters: http.server (with email, ssl, http.client) was half of every sandbox's
    # start; the APIs listen from boot and load it at their first connection
    agent_dir = Path(boot.__file__).parent
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import agent.boot; "
        "print(sorted(m for m in ('http.server', 'email', 'ssl', 'typing', 'argparse', 'json', "
        "'re', 'subprocess', 'uuid') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe, str(agent_dir.parent)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "[]"


def test_the_agents_start_imports_neither_socket_signal_threading_nor_contextlib() -> None:
    # why it matters: with them (and the enum, functools and collections they load) the
    # agent's imports were ~60% of its CPU to the ready line, paid by every sandbox boot
    main = Path(boot.__file__).with_name("__main__.py")
    # -X importtime names every module the run imports (on stderr), entry point included
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-X", "importtime", str(main), "--bogus", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2  # the agent ran: its bad arguments were refused
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "agent.boot" in imported
    heavy = {"socket", "signal", "threading", "contextlib", "enum", "functools", "collections"}
    assert not heavy & imported, sorted(heavy & imported)


def test_the_exec_api_answers_its_first_connection_made_the_moment_it_listens() -> None:
    listener = boot.tcp_listener(0)
    port = listener.getsockname()[1]
    server = threading.Thread(
        target=boot._serve_when_asked, args=(listener, boot._exec_server), daemon=True
    )
    server.start()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET /nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert conn.recv(100).startswith(b"HTTP/1.1 404")


def test_the_launcher_imports_neither_json_nor_typing_nor_signal() -> None:
    # why it matters: the launcher starts once per sandbox boot, its imports were most of it
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); import launch; "
        "print(sorted(m for m in ('json', 're', 'typing', 'signal', 'enum') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe, str(Path(launch.__file__).parent)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "[]"


def test_a_plan_that_is_not_a_marshalled_dict_fails_the_launch_with_code_125_and_one_line() -> None:
    for junk in (b"{not marshal", b"", marshal.dumps(["a", "list"])):
        r, w = os.pipe()
        os.write(w, junk)
        os.close(w)
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-S", launch.__file__, str(r)],
                capture_output=True,
                text=True,
                pass_fds=(r,),
                timeout=30,
            )
        finally:
            os.close(r)
        assert done.returncode == launch.EXIT_LAUNCH_FAILED, junk
        assert done.stderr.startswith("launch: ") and done.stderr.count("\n") == 1, done.stderr


class TestOptions:
    def test_the_runtimes_options_are_read_with_their_types_and_defaults(self) -> None:
        fds = ["--status-fd", "3", "--plugin-fd", "4", "--relay-fd", "5", "--env-fd", "6"]
        opts = options.parse(
            [*fds, "--host-key", "/run/ukc-host/k", "--ssh-delay", "0.3", "--max-procs", "512"]
        )
        assert (opts.status_fd, opts.plugin_fd, opts.relay_fd, opts.env_fd) == (3, 4, 5, 6)
        assert (opts.host_key, opts.ssh_delay, opts.max_procs) == ("/run/ukc-host/k", 0.3, 512)
        assert (opts.key_delay, opts.max_data) == (0.0, 0)

    @pytest.mark.parametrize(
        ("argv", "says"),
        [
            (["--bogus", "1"], "unknown or repeated option '--bogus'"),
            (["--status-fd", "3", "--status-fd", "4"], "unknown or repeated option '--status-fd'"),
            (["--status-fd"], "option --status-fd needs a value"),
            (["--status-fd", "three"], "option --status-fd: 'three' is not int"),
            (["--status-fd", "3"], "missing --plugin-fd, --relay-fd, --env-fd, --host-key"),
        ],
    )
    def test_a_wrong_command_line_is_refused_naming_the_option(
        self, argv: list[str], says: str
    ) -> None:
        with pytest.raises(ValueError) as err:
            options.parse(argv)
        assert str(err.value) == says

    def test_the_agent_given_a_wrong_command_line_exits_2_saying_why_on_the_console(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert boot.main(["--bogus", "1"]) == 2
        assert (
            capsys.readouterr().err
            == "agent: bad arguments: unknown or repeated option '--bogus'\n"
        )


class TestEnvPipe:
    def test_an_env_goes_through_the_pipe_unchanged(self) -> None:
        env = {
            "PUBKEY": "ssh-ed25519 AAAA k",
            "EMPTY": "",
            "UNI": "h\u00e9 \u2603 a=b\nc",
            "RAW": "\udcff",
        }
        assert envpipe.decode(envpipe.encode(env)) == env

    @pytest.mark.parametrize(
        "env", [{"A=B": "x"}, {"": "x"}, {"A\0B": "x"}, {"A": "x\0LD_PRELOAD\0/evil.so"}]
    )
    def test_a_name_or_value_no_environment_can_hold_is_refused(self, env: dict[str, str]) -> None:
        with pytest.raises(ValueError, match="env variable"):
            envpipe.encode(env)

    @pytest.mark.parametrize("data", [b"A\0", b"A\0x", b"A\0x\0B\0"])
    def test_a_pipe_that_is_not_whole_pairs_is_refused(self, data: bytes) -> None:
        with pytest.raises(ValueError, match="key, value pairs"):
            envpipe.decode(data)


def test_a_program_the_agent_starts_gets_default_signals_and_none_of_its_descriptors(
    tmp_path: Path,
) -> None:
    # as subprocess.Popen gave sshd: SIGPIPE and SIGXFSZ back to default, no fd beyond 2
    out = tmp_path / "out"
    probe = (
        "import os, sys; sys.path.insert(0, sys.argv[1]); from agent.boot import Child; "
        "r, w = os.pipe(); os.set_inheritable(r, True); os.set_inheritable(w, True); "
        "c = Child(['/bin/sh', '-c', 'grep SigIgn /proc/self/status; ls /proc/self/fd; "
        "read x; echo stdin=$x'], {'PATH': '/bin'}); print(c.wait())"
    )
    with out.open("w") as sink:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", probe, str(Path(boot.__file__).parent.parent)],
            stdout=sink,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
        )
    assert done.returncode == 0, done.stderr
    lines = out.read_text().split("\n")
    ignored = int(lines[0].split()[1], 16)
    assert not ignored & (1 << (13 - 1)) and not ignored & (1 << (25 - 1))  # SIGPIPE, SIGXFSZ
    # fds 0-2 and the one ls opens to list them; stdin is /dev/null (read finds nothing)
    assert sorted(int(x) for x in lines[1:5]) == [0, 1, 2, 3]
    assert lines[5:] == ["stdin=", "0", ""]


def test_the_boot_id_is_a_random_version_4_uuid() -> None:
    import uuid

    ids = {boot.boot_id() for _ in range(100)}
    assert len(ids) == 100
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestSshdReady:
    def test_sshds_ready_message_ends_the_wait_for_it_to_listen(self, tmp_path: Path) -> None:
        path = str(tmp_path / "notify")
        notify = boot.notify_socket(path)
        assert notify is not None
        send = (
            "import socket, sys; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
            "s.sendto(b'READY=1\\nSTATUS=up', sys.argv[1]); import time; time.sleep(5)"
        )
        child = boot.Child([sys.executable, "-c", send, path], {})
        try:
            started = time.monotonic()
            assert boot._wait_accepting(_unused_port(), child, started + 10, notify)
            assert time.monotonic() - started < 4  # the message, not the child's exit
        finally:
            child.signal(9)
            child.wait()
            notify.close()

    def test_a_ready_message_from_another_process_than_sshd_is_not_taken(
        self, tmp_path: Path
    ) -> None:
        path = str(tmp_path / "notify")
        notify = boot.notify_socket(path)
        assert notify is not None
        child = boot.Child(["/bin/sleep", "5"], {})
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as other:
                other.sendto(b"READY=1", path)
            assert not boot._wait_accepting(_unused_port(), child, time.monotonic() + 0.5, notify)
        finally:
            child.signal(9)
            child.wait()
            notify.close()

    def test_while_sshd_may_still_say_it_is_ready_the_tcp_table_is_read_seldom(
        self, tmp_path: Path
    ) -> None:
        notify = boot.notify_socket(str(tmp_path / "notify"))
        assert notify is not None
        looks: list[int] = []

        def listening(port: int) -> bool:
            looks.append(port)
            return False

        child = boot.Child(["/bin/sleep", "5"], {})
        try:
            window = boot.LISTEN_POLL_NOTIFIED_S * 1.5
            assert not boot._wait_accepting(1, child, time.monotonic() + window, notify, listening)
            # one look at the table in the window, not one every 50 ms
            assert len(looks) == 1
        finally:
            child.signal(9)
            child.wait()
            notify.close()

    def test_an_sshd_that_never_says_it_is_ready_is_still_found_listening(
        self, tmp_path: Path
    ) -> None:
        notify = boot.notify_socket(str(tmp_path / "notify"))
        assert notify is not None
        child = boot.Child(["/bin/sleep", "5"], {})
        try:
            with socket.socket() as listener:
                listener.bind(("127.0.0.1", 0))
                listener.listen(1)
                port = listener.getsockname()[1]
                assert boot._wait_accepting(port, child, time.monotonic() + 5, notify)
        finally:
            child.signal(9)
            child.wait()
            notify.close()

    def test_without_a_ready_message_a_listening_port_ends_the_wait(self) -> None:
        child = boot.Child(["/bin/sleep", "5"], {})
        try:
            with socket.socket() as listener:
                listener.bind(("127.0.0.1", 0))
                listener.listen(1)
                port = listener.getsockname()[1]
                assert boot._wait_accepting(port, child, time.monotonic() + 5, None)
        finally:
            child.signal(9)
            child.wait()
