"""The warm process: commands forked from a process that has ukc imported, run as the client.

Each test starts its own warm process in its own private directory, and runs `ukc` as a real
process (`python -m reconciler`), the way a user's shell does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.cli import warm, warmclient
from reconciler.sync.inotify import Inotify

SPEC = "name: hello\nimage: base:latest\ndirectory: .\n"


@pytest.fixture
def warm_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    sockets = tmp_path / "sockets"
    sockets.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if not k.startswith("UKC_")}
    env["UKC_WARM_DIR"] = str(sockets)
    yield env
    path = warm.socket_path(env)
    if path is not None:
        warm.request_stop(path)


def start_server(env: dict[str, str]) -> tuple[Path, dict[str, Any]]:
    path = warm.start(env, timeout_s=30)
    return path, warm.wait_ready(path, timeout_s=30)


def ukc(
    env: dict[str, str], cwd: Path, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reconciler", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def commands_run(path: Path) -> int:
    info = warm.status(path)
    assert info is not None
    return int(info["commands"])


def test_a_short_command_runs_in_the_warm_process_in_the_clients_directory_and_exit_code(
    warm_env: dict[str, str], tmp_path: Path
) -> None:
    path, _ = start_server(warm_env)
    project = tmp_path / "project"
    project.mkdir()
    (project / "session.yaml").write_text(SPEC)
    ok = ukc(warm_env, project, "validate")
    assert ok.returncode == 0, ok.stderr
    assert "ok  hello  (" in ok.stdout and "1 session(s) valid" in ok.stdout
    (project / "session.yaml").write_text(SPEC + "bogus: 1\n")
    bad = ukc(warm_env, project, "validate")
    assert bad.returncode == 2
    assert "bogus" in bad.stderr and "session.yaml:4" in bad.stderr
    assert commands_run(path) == 2


def test_each_command_sees_its_own_clients_environment(
    warm_env: dict[str, str], tmp_path: Path
) -> None:
    path, _ = start_server(warm_env)
    (tmp_path / "session.yaml").write_text(SPEC + "bogus: 1\n")
    plain = ukc(warm_env, tmp_path, "validate")
    debug = ukc({**warm_env, "UKC_DEBUG": "1"}, tmp_path, "validate")
    again = ukc(warm_env, tmp_path, "validate")
    assert "Traceback" not in plain.stderr
    assert "Traceback" in debug.stderr  # UKC_DEBUG reached that command only
    assert "Traceback" not in again.stderr
    assert commands_run(path) == 3


def test_without_a_warm_process_the_command_runs_here_and_starts_one_for_next_time(
    warm_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "session.yaml").write_text(SPEC)
    first = ukc(warm_env, tmp_path, "validate")
    assert first.returncode == 0 and "1 session(s) valid" in first.stdout
    path = warm.socket_path(warm_env)
    assert path is not None
    warm.wait_ready(path, timeout_s=30)  # started by the first command
    second = ukc(warm_env, tmp_path, "validate")
    assert second.returncode == 0 and commands_run(path) == 1


def test_ukc_warm_0_runs_every_command_here(warm_env: dict[str, str], tmp_path: Path) -> None:
    path, _ = start_server(warm_env)
    (tmp_path / "session.yaml").write_text(SPEC)
    done = ukc({**warm_env, "UKC_WARM": "0"}, tmp_path, "validate")
    assert done.returncode == 0
    assert commands_run(path) == 0


def test_a_stale_warm_process_hands_the_command_back_and_exits(
    warm_env: dict[str, str], tmp_path: Path
) -> None:
    # A directory on the server's sys.path stands for an upgraded package: it changes.
    extra = tmp_path / "site"
    extra.mkdir()
    env = {**warm_env, "PYTHONPATH": os.pathsep.join(filter(None, [str(extra), sys.path[0]]))}
    path, info = start_server(env)
    assert info["fresh"] is True
    (extra / "new_package.py").write_text("")
    assert warm.run(["validate"], path) is None
    deadline = time.monotonic() + 10
    while warm.status(path) is not None:
        assert time.monotonic() < deadline, "the stale warm process did not exit"
        time.sleep(0.05)


def test_a_warm_process_running_a_copy_of_ukc_is_stale_once_a_module_of_it_changes(
    warm_env: dict[str, str], tmp_path: Path
) -> None:
    """A module edited after the server's first command (whose fingerprint it then no
    longer computes unless its watches heard something) hands the next command back."""
    copy = tmp_path / "code"
    shutil.copytree(
        Path(warm.__file__).resolve().parents[1],
        copy / "reconciler",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    env = {**warm_env, "PYTHONPATH": str(copy)}
    # the copy's server has a socket of its own (another installation): the copy names it
    where = "from reconciler.cli import warm; print(warm.socket_path())"
    named = subprocess.run(
        [sys.executable, "-P", "-c", where], env=env, capture_output=True, text=True, check=True
    )
    path = Path(named.stdout.strip())
    (tmp_path / "session.yaml").write_text(SPEC)
    assert ukc(env, tmp_path, "validate").returncode == 0  # starts it
    warm.wait_ready(path, timeout_s=30)
    try:
        assert ukc(env, tmp_path, "validate").returncode == 0
        assert ukc(env, tmp_path, "validate").returncode == 0
        assert commands_run(path) == 2
        module = copy / "reconciler" / "sync" / "diff.py"
        module.write_text(module.read_text() + "\n# edited\n")
        assert warm.run(["validate"], path) is None
        deadline = time.monotonic() + 10
        while warm.status(path) is not None:
            assert time.monotonic() < deadline, "the stale warm process did not exit"
            time.sleep(0.05)
    finally:
        warm.request_stop(path)


def test_the_code_watch_says_maybe_only_after_the_code_or_the_path_changed(
    tmp_path: Path,
) -> None:
    ino = Inotify.open()
    if ino is None:
        pytest.skip("no inotify here")
    package = tmp_path / "pkg"
    (package / "sub" / "__pycache__").mkdir(parents=True)
    (package / "sub" / "m.py").write_text("")
    site = tmp_path / "site"
    site.mkdir()
    missing = tmp_path / "lib.zip"
    entries = [str(site), str(missing)]
    watch = warm.CodeWatch(ino, package, entries)
    try:
        assert watch.maybe_changed()  # nothing compared yet
        assert not watch.maybe_changed()
        (package / "sub" / "__pycache__" / "m.cpython.pyc").write_bytes(b"")
        assert not watch.maybe_changed()  # what a command compiles costs it nothing
        changes = [
            lambda: (package / "sub" / "m.py").write_text("x = 1\n"),
            lambda: os.utime(package / "sub" / "m.py", ns=(1, 1)),
            lambda: (package / "new").mkdir(),
            lambda: (package / "new" / "n.py").write_text(""),  # under a directory made since
            lambda: (site / "lib-1.0.dist-info").mkdir(),
            lambda: missing.write_bytes(b""),
        ]
        for change in changes:
            change()
            assert watch.maybe_changed()
            assert not watch.maybe_changed()
    finally:
        ino.close()


def test_a_warm_commands_client_leaves_with_its_exit_code_and_no_teardown(
    warm_env: dict[str, str], tmp_path: Path
) -> None:
    """Nothing runs in the client after the command's exit code came (an atexit handler of a
    `sitecustomize` stands for the interpreter's teardown: ~3.5 ms of every command)."""
    site = tmp_path / "site"
    site.mkdir()
    mark = tmp_path / "torn-down"
    (site / "sitecustomize.py").write_text(
        f"import atexit\natexit.register(lambda: open({str(mark)!r}, 'a').close())\n"
    )
    here = str(Path(warm.__file__).resolve().parents[2])  # this ukc, not another on the path
    env = {**warm_env, "PYTHONPATH": os.pathsep.join([str(site), here])}
    path, _ = start_server(env)
    (tmp_path / "session.yaml").write_text(SPEC)
    ok = ukc(env, tmp_path, "validate")
    failed = ukc(env, tmp_path, "validate", "nowhere.yaml")
    assert commands_run(path) == 2
    assert ok.returncode == 0 and "1 session(s) valid" in ok.stdout
    assert failed.returncode == 2, failed
    assert not mark.exists()
    done = ukc({**env, "UKC_WARM": "0"}, tmp_path, "validate")  # the teardown, for contrast
    assert done.returncode == 0 and mark.exists()


def test_a_socket_directory_others_can_enter_is_never_used(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    assert warm.socket_path({"UKC_WARM_DIR": str(shared)}) is None
    private = tmp_path / "private"
    found = warm.socket_path({"UKC_WARM_DIR": str(private)})
    assert found is not None and found.parent == private
    assert private.stat().st_mode & 0o777 == 0o700


def test_the_socket_directory_is_the_runtime_dir_then_the_temp_dir_then_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = Path(tempfile.mkdtemp(prefix="ukcw"))  # short: socket paths hold 107 bytes
    try:
        (base / "run").mkdir(mode=0o700)
        env = {"XDG_RUNTIME_DIR": str(base / "run"), "TMPDIR": str(base), "HOME": str(base)}
        assert warmclient.locate(env) == (str(base / "run" / "ukc"), "")
        del env["XDG_RUNTIME_DIR"]
        taken = base / f"ukc-{os.getuid()}"
        assert warmclient.locate(env) == (str(taken), "")
        taken.chmod(0o755)
        found, warning = warmclient.locate(env)
        assert found == str(base / ".cache" / "ukc" / "warm")
        assert str(taken) in warning and "mode 755" in warning and found in warning
        monkeypatch.chdir(base)
        assert warmclient.locate({"UKC_WARM_DIR": "rel"})[0] == str(base / "rel")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_directory_too_long_for_a_unix_socket_is_refused_with_a_reason() -> None:
    long_dir = "/tmp/" + "d" * 80
    found, warning = warmclient.locate({"UKC_WARM_DIR": long_dir})
    assert found is None and "too long a path for a unix socket" in warning
    assert not os.path.exists(long_dir)


def test_a_client_that_never_says_go_gets_nothing_run(
    warm_env: dict[str, str], tmp_path: Path
) -> None:
    path, _ = start_server(warm_env)
    project = tmp_path / "empty"
    project.mkdir()
    request = {
        "op": "run",
        "argv": ["apply", "--prune", "--allow-empty"],
        "cwd": str(project),
        "env": warm_env,
        "umask": 0o022,
        "streams": {},
    }
    payload = json.dumps(request).encode()
    null = os.open(os.devnull, os.O_RDWR)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        fds = struct.pack("3i", null, null, null)
        sock.sendmsg(
            [struct.pack(">I", len(payload))], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
        )
        sock.sendall(payload)
        assert sock.recv(1) == b"R"  # then the child's pid, and it waits for b"G"
    os.close(null)
    time.sleep(0.5)
    # `apply --prune --allow-empty` in an empty directory writes .ukc/status.json: it never
    # started
    assert not (project / ".ukc").exists()
    done = ukc(warm_env, project, "apply", "--prune", "--allow-empty")
    assert done.returncode == 0 and (project / ".ukc" / "status.json").exists()


class HangingApi:
    """A TCP listener that accepts and never answers: a command talking to it blocks."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.accepted = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.accepted.set()

    def peer_closed(self, timeout: float) -> bool:
        conn = self.conns[-1]
        conn.settimeout(timeout)
        try:
            while conn.recv(4096):
                pass
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def hanging_api() -> Iterator[HangingApi]:
    api = HangingApi()
    yield api
    api.close()


def blocked_apply(env: dict[str, str], project: Path, api: HangingApi) -> subprocess.Popen[str]:
    project.mkdir()
    (project / "session.yaml").write_text(
        SPEC.replace("image:", f"metro: http://127.0.0.1:{api.port}\nimage:")
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "apply"],
        cwd=project,
        env={**env, "UKC_TOKEN": "t0ken", "UKC_METRO_ALLOW": f"http://127.0.0.1:{api.port}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert api.accepted.wait(30), "apply never reached the API"
    return proc


def test_ctrl_c_at_the_client_interrupts_the_warm_command(
    warm_env: dict[str, str], tmp_path: Path, hanging_api: HangingApi
) -> None:
    path, _ = start_server(warm_env)
    proc = blocked_apply(warm_env, tmp_path / "p", hanging_api)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert commands_run(path) == 1


def test_a_killed_client_takes_its_warm_command_with_it(
    warm_env: dict[str, str], tmp_path: Path, hanging_api: HangingApi
) -> None:
    start_server(warm_env)
    proc = blocked_apply(warm_env, tmp_path / "p", hanging_api)
    proc.kill()
    proc.wait()
    # the command's connection to the API closes: the process holding it is gone
    assert hanging_api.peer_closed(timeout=10)


def test_stop_ends_the_warm_process_and_the_cli_says_so(
    warm_env: dict[str, str], tmp_path: Path
) -> None:
    path, info = start_server(warm_env)
    shown = ukc({**warm_env, "UKC_WARM": "0"}, tmp_path, "warm", "status")
    assert shown.returncode == 0 and f"pid {info['pid']}" in shown.stdout
    stopped = ukc({**warm_env, "UKC_WARM": "0"}, tmp_path, "warm", "stop")
    assert "warm process stopped" in stopped.stdout
    assert warm.status(path) is None
    after = ukc({**warm_env, "UKC_WARM": "0"}, tmp_path, "warm", "status")
    assert after.returncode == 3 and "not running" in after.stdout


def test_a_module_in_the_callers_directory_never_shadows_a_library_in_the_warm_process(
    warm_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "click.py").write_text("raise SystemExit('shadowed')\n")
    monkeypatch.chdir(tmp_path)
    path, info = start_server(warm_env)  # it imports click while starting
    assert info["fresh"] is True
    log = path.with_suffix(".log")
    assert "shadowed" not in log.read_text()


def test_the_clients_request_encoding_is_what_json_dumps_writes() -> None:
    from reconciler.cli.warmclient import _dumps

    request = {
        "op": "run",
        "argv": ["apply", "spec dir/s.yaml", "--prune"],
        "cwd": "/home/\u00e9l\u00e8ve/\udcff-not-utf8",
        "env": {"LANG": "C.UTF-8", "QUOTE": 'a"b\\c\n\t\x00', "EMOJI": "\U0001f600"},
        "umask": 18,
        "streams": {"stdin": ["utf-8", "strict"], "stdout": [None, None]},
        "flags": [True, False],
    }
    assert _dumps(request) == json.dumps(request, separators=(",", ":"))
    assert json.loads(_dumps(request)) == request


def test_the_warm_process_has_the_output_models_of_apply_and_plan_built_before_any_command() -> (
    None
):
    # every command is a fork of the server: what the server imported, no command imports again
    probe = (
        "import sys\n"
        "from reconciler.cli import warm\n"
        "before = 'reconciler.cli.apply_output' in sys.modules\n"
        "warm._preload()\n"
        "print(before, 'reconciler.cli.apply_output' in sys.modules,"
        " 'reconciler.cli.plan_output' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["False", "True", "True"]


def test_the_warm_process_has_the_sync_helpers_payload_packed_before_any_command() -> None:
    # packing it (zlib level 9 of ~40 KB) was 5-20 ms of every syncing command, between its
    # list and its sync helper's start
    probe = (
        "from reconciler.cli import warm\n"
        "from reconciler.sync import remote\n"
        "before = 'packed_source' in vars(remote.program())\n"
        "warm._preload()\n"
        "print(before, 'packed_source' in vars(remote.program()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["False", "True"]


def test_the_warm_process_loads_what_a_first_api_request_would_before_any_command() -> None:
    # httpx loads httpcore, h11 and anyio when a client is made, and socket the idna codec at
    # a connect by name: ~20 ms of every apply's and delete's first request before the create
    lazy = ("httpcore", "h11", "anyio", "encodings.idna")
    probe = (
        "import sys\n"
        "from reconciler.cli import warm\n"
        f"lazy = {lazy!r}\n"
        "before = any(m in sys.modules for m in lazy)\n"
        "warm._preload()\n"
        "print(before, *[m for m in lazy if m not in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["False"]


def test_a_metro_request_after_the_warm_preload_imports_no_module() -> None:
    # the request itself, not a list of names: any module a command's first list imports,
    # every command imports again (httpcore and h11 were ~45 ms of CPU on the list's thread
    # while the scan ran, so the list ended after the scan and the prefetch waited for it)
    probe = (
        "import sys, threading\n"
        "from http.server import BaseHTTPRequestHandler, HTTPServer\n"
        "class H(BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        '        body = b\'{"status": "success", "data": {"instances": []}}\'\n'
        "        self.send_response(200)\n"
        "        self.send_header('content-type', 'application/json')\n"
        "        self.send_header('content-length', str(len(body)))\n"
        "        self.end_headers()\n"
        "        self.wfile.write(body)\n"
        "    def log_message(self, *args):\n"
        "        pass\n"
        "server = HTTPServer(('127.0.0.1', 0), H)\n"
        "threading.Thread(target=server.serve_forever, daemon=True).start()\n"
        "from reconciler.cli import warm\n"
        "warm._preload()\n"
        "from reconciler.cloud.api import UkcApi\n"
        "api = UkcApi(f'http://127.0.0.1:{server.server_port}', 't', metro='local')\n"
        "before = set(sys.modules)\n"
        "found = api.list_instances(['ukc.project=p'])\n"
        "print(found, sorted(set(sys.modules) - before))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["[]", "[]"]


def test_a_scans_done_reaches_the_keeper_without_the_command_waiting_for_an_answer(
    tmp_path: Path,
) -> None:
    """The server answers its connections in the order they came, so a command need not wait
    for the answer to "done" (~1.5 ms of each scan): here a server that never answers."""
    path = tmp_path / "keeper.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    got: list[dict[str, Any]] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            n = struct.unpack(">I", warmclient.recv_exact(conn, 4))[0]
            got.append(json.loads(warmclient.recv_exact(conn, n)))
            conn.recv(1)  # never answers: waits until the client hangs up

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        started = time.monotonic()
        warm._KeeperClient(path).done("/state", 7, [1, 2])
        assert time.monotonic() - started < warmclient.HANDSHAKE_S / 2
        server.join(timeout=10)
        assert got == [{"op": "tree-done", "state_dir": "/state", "token": 7, "ident": [1, 2]}]
    finally:
        listener.close()
