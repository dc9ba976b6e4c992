"""The warm process: a per-user fork server that keeps ukc's modules imported.

Why: a one-shot `ukc apply` spends ~0.25 s importing pydantic, paramiko, cryptography, httpx and
click before it does anything, which is most of an apply that sends ten files. The warm process
imports them once; each command is a `fork()` of it, so it starts with everything loaded and
with no state from any other command (a fresh copy of a process that never ran one).

Who uses it: `launcher` (the `ukc` entry point) asks it to run `apply`, `plan`, `status`,
`delete` and `validate`, and starts it in the background when none answers. Opt out with
`UKC_WARM=0`; `ukc warm status|stop` inspect and stop it.

Protocol (a Unix socket in a private 0700 directory; both ends check the peer's uid):
  client → server: u32 length + JSON {argv, cwd, env, umask, streams}, with the client's
      stdin/stdout/stderr attached as SCM_RIGHTS, so output goes straight to the client's
      terminal or pipe and `isatty()` is the truth.
  server: if its code changed since it started it answers b"S" (stale) and exits; else it
      forks. The child answers b"R" and waits for b"G" (go): a client that gave up before
      the go never gets a command run behind its back.
  client → child: one byte per signal the client receives (SIGINT, SIGTERM, SIGHUP), which the
      child raises on itself; EOF means the client died, and the child kills itself at once,
      as the in-process command would have died with it.
  child → client: b"X" + i32 exit code, then it exits.
This module's top level imports only the standard library pieces a client needs; the server's
imports happen in `serve`.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import os
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "WARM_COMMANDS",
    "fingerprint",
    "request_stop",
    "run",
    "socket_path",
    "spawn",
    "start",
    "status",
    "wait_ready",
]

#: the commands worth a warm start (short ones); `watch` and `local` run in-process
WARM_COMMANDS = frozenset({"apply", "plan", "status", "delete", "validate"})
#: the server exits after this long without a command (UKC_WARM_IDLE_S overrides)
IDLE_S = 900.0
#: signals a client passes on to its command
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: the only environment the server itself starts with: each command gets the client's own
_SERVER_ENV = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONDONTWRITEBYTECODE",
    "VIRTUAL_ENV",
    "XDG_RUNTIME_DIR",
    "UKC_WARM_DIR",
    "UKC_WARM_IDLE_S",
)
_MAX_REQUEST = 4 << 20
_HANDSHAKE_S = 5.0


# -- where ---------------------------------------------------------------------------------


def _private_dir(environ: dict[str, str] | os._Environ[str]) -> Path | None:
    """The socket directory, created 0700; None when it is not ours alone (never trust it)."""
    configured = environ.get("UKC_WARM_DIR")
    if configured:
        base = Path(configured)
    elif environ.get("XDG_RUNTIME_DIR"):
        base = Path(environ["XDG_RUNTIME_DIR"]) / "ukc"
    else:
        base = Path("/tmp") / f"ukc-{os.getuid()}"
    try:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(base)
    except OSError:
        return None
    # why: the socket carries the client's environment (tokens included); a directory another
    # user created or can write could hold their listener under our socket's name
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return base


def socket_path(environ: dict[str, str] | os._Environ[str] | None = None) -> Path | None:
    """This interpreter's and this installation's server socket (None: no safe place)."""
    base = _private_dir(os.environ if environ is None else environ)
    if base is None:
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    # why not the real path: venvs link to one base interpreter; sys.prefix tells them apart
    key = hashlib.sha256(f"{sys.executable}\0{sys.prefix}\0{here}".encode()).hexdigest()
    return base / f"warm-{key[:12]}.sock"


def fingerprint() -> str:
    """Changes when ukc's code, the interpreter or an installed package changes."""
    h = hashlib.sha256(f"{sys.executable}\0{sys.version}".encode())
    here = Path(__file__).resolve().parent
    for path in sorted(here.rglob("*.py")):
        with contextlib.suppress(OSError):
            st = path.stat()
            h.update(f"{path}\0{st.st_mtime_ns}\0{st.st_size}\n".encode())
    # why: `pip install` adds and removes dist-info directories, which changes the mtime of
    # the directory they live in; a server must not keep running an upgraded library's old code
    for entry in sys.path:
        with contextlib.suppress(OSError):
            h.update(f"{entry}\0{os.stat(entry).st_mtime_ns}\n".encode())
    return h.hexdigest()


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(_HANDSHAKE_S)
    try:
        sock.connect(str(path))
        if _peer_uid(sock) != os.getuid():
            raise OSError("warm server runs as another user")
    except OSError:
        sock.close()
        return None
    return sock


# -- client --------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _streams() -> dict[str, list[str | None]]:
    out: dict[str, list[str | None]] = {}
    for name in ("stdin", "stdout", "stderr"):
        stream = getattr(sys, name)
        out[name] = [getattr(stream, "encoding", None), getattr(stream, "errors", None)]
    return out


def run(argv: Sequence[str], path: Path) -> int | None:
    """Run `ukc argv` in the warm server at `path`: its exit code, or None when no server took
    it (none listening, stale, or it failed before the command started: run it here instead).
    """
    sock = _connect(path)
    if sock is None:
        return None
    request = {
        "op": "run",
        "argv": list(argv),
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "umask": _umask(),
        "streams": _streams(),
    }
    payload = json.dumps(request, separators=(",", ":")).encode("utf-8", "surrogateescape")
    try:
        fds = array.array("i", [0, 1, 2])
        head = struct.pack(">I", len(payload))
        sock.sendmsg([head], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
        sock.sendall(payload)
        if _recv_exact(sock, 1) != b"R":
            raise EOFError("stale (b'S') or refused: nothing ran")
        sock.sendall(b"G")
    except (OSError, EOFError):
        sock.close()
        return None
    return _follow(sock)


def _follow(sock: socket.socket) -> int:
    """Pass signals on to the running command and wait for its exit code."""
    sock.settimeout(None)
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        with contextlib.suppress(OSError):
            sock.send(bytes([signum]))

    for sig in FORWARDED:
        signal.signal(sig, forward)
    try:
        tail = bytearray()
        while len(tail) < 5:
            chunk = sock.recv(5 - len(tail))
            if not chunk:
                break
            tail += chunk
    finally:
        for sig in FORWARDED:
            default = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
            signal.signal(sig, default)
    if len(tail) == 5 and tail[:1] == b"X":
        code: int = struct.unpack(">i", bytes(tail[1:]))[0]
        return code
    if received:
        # the command died of a signal we passed on: die of it too, as it would have here
        signal.signal(received[-1], signal.SIG_DFL)
        os.kill(os.getpid(), received[-1])
    sys.stderr.write("ukc: the warm process running this command ended without an exit code\n")
    return 1


def spawn(path: Path, environ: dict[str, str] | os._Environ[str] | None = None) -> None:
    """Start a server for `path` in the background (it replaces any older one)."""
    import subprocess  # only on this, the slow path

    source = os.environ if environ is None else environ
    env = {k: v for k, v in source.items() if k in _SERVER_ENV}
    with contextlib.suppress(OSError):
        # why -P and cwd "/": `-m` would put the caller's directory first on sys.path, and a
        # project's own `yaml.py` or `click.py` would then shadow the real one in every command
        log = os.open(path.with_suffix(".log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            subprocess.Popen(
                [sys.executable, "-P", "-m", "reconciler.warm", "serve", str(path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,  # only the server's own failures; commands write to their caller
                env=env,
                cwd="/",
                start_new_session=True,
                close_fds=True,
            )
        finally:
            os.close(log)


def wait_ready(path: Path, timeout_s: float = 60) -> dict[str, Any]:
    """Wait until the server at `path` answers; its status. TimeoutError if it does not."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = status(path)
        if info is not None:
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"the warm process for {path} did not answer within {timeout_s} s")
        time.sleep(0.05)


def start(environ: dict[str, str] | os._Environ[str] | None = None, timeout_s: float = 60) -> Path:
    """Start the server `environ` points at (UKC_WARM_DIR...), wait until it answers, and
    return its socket: what benches and test suites do before they time `ukc`."""
    path = socket_path(environ)
    if path is None:
        raise RuntimeError("no private directory for the warm process (see UKC_WARM_DIR)")
    spawn(path, environ)
    wait_ready(path, timeout_s)
    return path


def _ask(path: Path, op: str) -> dict[str, Any] | None:
    sock = _connect(path)
    if sock is None:
        return None
    try:
        payload = json.dumps({"op": op}).encode()
        sock.sendall(struct.pack(">I", len(payload)) + payload)
        n = struct.unpack(">I", _recv_exact(sock, 4))[0]
        answer = json.loads(_recv_exact(sock, min(n, 1 << 16)))
    except (OSError, EOFError, ValueError):
        return None
    finally:
        sock.close()
    return answer if isinstance(answer, dict) else None


def status(path: Path) -> dict[str, Any] | None:
    """The server's pid, uptime, commands run and freshness; None if none answers."""
    return _ask(path, "status")


def request_stop(path: Path) -> bool:
    """Ask the server to exit (commands it already started finish); False if none answered."""
    return _ask(path, "stop") is not None


# -- server --------------------------------------------------------------------------------


class _Server:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = time.monotonic()
        self.last = self.started
        self.served = 0
        self.print = fingerprint()
        self.idle_s = float(os.environ.get("UKC_WARM_IDLE_S") or IDLE_S)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        self.listener.bind(str(tmp))
        self.listener.listen(64)
        # why: a rename replaces an older server's socket atomically; that server notices its
        # path is gone and exits, while clients always find a listening socket
        os.replace(tmp, path)
        self.inode = os.stat(path).st_ino

    def still_ours(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self.inode
        except OSError:
            return False

    def loop(self) -> None:
        self.listener.settimeout(min(60.0, self.idle_s))
        while True:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                if time.monotonic() - self.last > self.idle_s or not self.still_ours():
                    return
                continue
            except InterruptedError:
                continue
            try:
                if not self.handle(conn):
                    return
            finally:
                conn.close()

    def handle(self, conn: socket.socket) -> bool:
        """Serve one connection; False when the server should exit."""
        conn.settimeout(_HANDSHAKE_S)
        fds: list[int] = []
        try:
            if _peer_uid(conn) != os.getuid():
                return True
            head, fds = _recv_with_fds(conn)
            n = struct.unpack(">I", head)[0]
            if n > _MAX_REQUEST:
                return True
            request = json.loads(_recv_exact(conn, n).decode("utf-8", "surrogateescape"))
        except (OSError, EOFError, ValueError, struct.error):
            _close_all(fds)
            return True
        op = request.get("op") if isinstance(request, dict) else None
        if op != "run":
            _close_all(fds)
            return self.admin(conn, str(op))
        self.last = time.monotonic()
        fresh = fingerprint() == self.print and self.still_ours()
        if not fresh or len(fds) != 3:
            _close_all(fds)
            with contextlib.suppress(OSError):
                conn.sendall(b"S")
            return fresh  # a stale server exits; its client starts a new one
        pid = os.fork()
        if pid == 0:
            self.listener.close()
            _child(conn, fds, request)  # never returns
        self.served += 1
        _close_all(fds)
        return True

    def admin(self, conn: socket.socket, op: str) -> bool:
        answer: dict[str, Any] = {
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "idle_s": round(time.monotonic() - self.last, 1),
            "commands": self.served,
            "fresh": fingerprint() == self.print,
        }
        payload = json.dumps(answer).encode()
        with contextlib.suppress(OSError):
            conn.sendall(struct.pack(">I", len(payload)) + payload)
        return op != "stop"

    def close(self) -> None:
        if self.still_ours():
            with contextlib.suppress(OSError):
                self.path.unlink()
        self.listener.close()


def _recv_with_fds(conn: socket.socket) -> tuple[bytes, list[int]]:
    """The 4-byte header and any descriptors sent with it."""
    fds = array.array("i")
    msg, ancdata, _flags, _addr = conn.recvmsg(4, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    got = list(fds)
    if len(msg) < 4:
        try:
            msg += _recv_exact(conn, 4 - len(msg))
        except BaseException:
            _close_all(got)
            raise
    return msg, got


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _child(conn: socket.socket, fds: list[int], request: dict[str, Any]) -> None:
    """In the forked child: become the client's command, run it, report its exit code."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.setsid()  # why: the server's group and session are not this command's
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        _close_all([fd for fd in fds if fd > 2])
        _rebind_streams(request.get("streams") or {})
        os.chdir(request["cwd"])
        os.umask(int(request.get("umask", 0o022)))
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in dict(request["env"]).items()})
        argv = [str(a) for a in request["argv"]]
        sys.argv = ["ukc", *argv]
        conn.sendall(b"R")
        if _recv_exact(conn, 1) != b"G":
            os._exit(1)
        conn.settimeout(None)
        _watch_client(conn)
        code = _run_cli(argv)
    except BaseException:  # the client runs it itself if it never got b"R"
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(OSError):
            conn.sendall(b"X" + struct.pack(">i", code))
        os._exit(code)


def _run_cli(argv: list[str]) -> int:
    from reconciler.cli import main

    try:
        main(argv)
    except SystemExit as done:
        if done.code is None:
            return 0
        if isinstance(done.code, int):
            return done.code
        sys.stderr.write(f"{done.code}\n")
        return 1
    return 0


def _watch_client(conn: socket.socket) -> None:
    """A thread that raises the client's signals here, and ends us if the client dies."""
    import threading

    allowed = {int(s) for s in FORWARDED}

    def watch() -> None:
        while True:
            try:
                data = conn.recv(16)
            except OSError:
                data = b""
            if not data:
                os.kill(os.getpid(), signal.SIGKILL)
                return
            for signum in data:
                if signum in allowed:
                    os.kill(os.getpid(), signum)

    threading.Thread(target=watch, name="warm-client", daemon=True).start()


def _rebind_streams(streams: dict[str, Any]) -> None:
    """New sys.std* objects over fds 0-2 with the client's encodings (line-buffered on a tty)."""

    def spec(name: str, default_errors: str) -> tuple[str | None, str]:
        value = streams.get(name) or [None, None]
        encoding = value[0] if isinstance(value[0], str) else None
        errors = value[1] if isinstance(value[1], str) else default_errors
        return encoding, errors

    enc, err = spec("stdin", "strict")
    sys.stdin = open(0, encoding=enc, errors=err, closefd=False)  # noqa: SIM115
    enc, err = spec("stdout", "strict")
    sys.stdout = open(  # noqa: SIM115
        1, "w", encoding=enc, errors=err, closefd=False, buffering=-1
    )
    enc, err = spec("stderr", "backslashreplace")
    sys.stderr = open(  # noqa: SIM115
        2, "w", encoding=enc, errors=err, closefd=False, buffering=1
    )


def _preload() -> None:
    """Import what commands use, and build what every command would build, once: each fork
    starts with it."""
    import reconciler.applying
    import reconciler.backends.ssh
    import reconciler.cli
    import reconciler.deleting
    import reconciler.executor
    import reconciler.local.daemon
    import reconciler.metro
    import reconciler.reporting
    import reconciler.sync.engine  # noqa: F401
    from reconciler.backends.ukc import UkcApi, verifying_context

    # why: a first client imports its lazy parts (httpcore, h11); the CA bundle is the
    # remote metros' (SSL_CERT_FILE/SSL_CERT_DIR, which a command may set, build their own)
    UkcApi("http://127.0.0.1:9", None, metro="warm").close()
    verifying_context(None, None)


def serve(path: Path) -> None:
    """Run the server until it is idle, replaced, stale or asked to stop."""
    sys.modules.setdefault("invoke", None)  # type: ignore[arg-type]  # see cli.main
    _preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    server = _Server(path)
    try:
        server.loop()
    finally:
        server.close()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "serve":
        sys.exit("usage: python -m reconciler.warm serve SOCKET")
    serve(Path(sys.argv[2]))
