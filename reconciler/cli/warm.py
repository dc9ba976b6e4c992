"""The warm process: a per-user fork server that keeps ukc's modules imported.

Why: a one-shot `ukc apply` spends ~0.25 s importing pydantic, paramiko, cryptography, httpx and
click before it does anything, which is most of an apply that sends ten files. The warm process
imports them once; each command is a `fork()` of it, so it starts with everything loaded and
with no state from any other command (a fresh copy of a process that never ran one).

It runs `apply`, `plan`, `status`, `delete` and `validate`, and is started in the background
when none answers. Opt out with `UKC_WARM=0`; `ukc warm status|stop` inspect and stop it.

Protocol (a Unix socket in a private 0700 directory; both ends check the peer's uid):
  client → server: u32 length + JSON {argv, cwd, env, umask, streams}, with the client's
      stdin/stdout/stderr attached as SCM_RIGHTS, so output goes straight to the client's
      terminal or pipe and `isatty()` is the truth.
  server: if its code changed since it started it answers b"S" (stale) and exits; else it
      forks. The child answers b"R" + its pid and the server's (2 × i32) and waits for b"G"
      (go): a client that gave up before the go never gets a command run behind its back.
  client → child: the signals the client receives (SIGINT, SIGTERM, SIGHUP) go straight to the
      child through a pidfd (the kernel delivers them at once, and `interrupts.StopFlag` sees
      a SIGINT before the next action starts); without pidfds, one byte per signal, which the
      child raises on itself. EOF means the client died, and the child kills itself at once,
      as the in-process command would have died with it.
  child → client: b"X" + i32 exit code, then it exits — unless its command kept an SSH
      connection for the next commands (`transport.links`): it then closes the client's
      streams and stays behind as that connection's lender until it is idle.
The client half lives in `warmclient` (imported by every command, so it stays tiny); this
module is the server, `ukc warm status|stop`, and starting a server.
"""

from __future__ import annotations

import _socket
import array
import contextlib
import gc
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reconciler._util.atomic import sweep_dead_temps, temp_path
from reconciler._util.retry import RetryPolicy, poll
from reconciler.cli import warmclient
from reconciler.cli.warmclient import FORWARDED, HANDSHAKE_S, WARM_COMMANDS, recv_exact, run
from reconciler.sync import feed as sync_feed
from reconciler.sync.inotify import Inotify
from reconciler.sync.keeper import TreeKeeper
from reconciler.transport import links

__all__ = [
    "WARM_COMMANDS",
    "CodeWatch",
    "fingerprint",
    "request_stop",
    "run",
    "socket_path",
    "spawn",
    "start",
    "status",
    "wait_ready",
]

#: the server exits after this long without a command (UKC_WARM_IDLE_S overrides)
IDLE_S = 900.0
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


# -- where ---------------------------------------------------------------------------------


def socket_path(environ: dict[str, str] | os._Environ[str] | None = None) -> Path | None:
    """This interpreter's and this installation's server socket (None: no safe place)."""
    path = warmclient.socket_path(environ)
    return None if path is None else Path(path)


#: ukc's package directory: its code is what the fingerprint covers
_PACKAGE = Path(__file__).resolve().parents[1]


def fingerprint(package: Path = _PACKAGE, entries: Sequence[str] | None = None) -> str:
    """Changes when ukc's code, the interpreter or an installed package changes."""
    h = hashlib.sha256(f"{sys.executable}\0{sys.version}".encode())
    for path in sorted(package.rglob("*.py")):
        with contextlib.suppress(OSError):
            st = path.stat()
            h.update(f"{path}\0{st.st_mtime_ns}\0{st.st_size}\n".encode())
    # why: `pip install` adds and removes dist-info directories, which changes the mtime of
    # the directory they live in; a server must not keep running an upgraded library's old code
    for entry in sys.path if entries is None else entries:
        with contextlib.suppress(OSError):
            h.update(f"{entry}\0{os.stat(entry).st_mtime_ns}\n".encode())
    return h.hexdigest()


class CodeWatch:
    """Whether what `fingerprint` covers may have changed since it was last asked: inotify
    watches on the package's directories and on `sys.path`'s entries (their parents, for an
    entry that is no directory). why: `fingerprint` stats every module, ~4 ms of CPU and
    6-7 ms before each command's fork; with the watches it runs only after a change. A watch
    the kernel refuses, or a lost event queue, leaves the answer "maybe"."""

    def __init__(self, inotify: Inotify, package: Path, entries: Sequence[str]) -> None:
        self._inotify = inotify
        self._package = package
        self._entries = list(entries)
        self._maybe = True  # nothing compared yet
        self._blind = False

    def maybe_changed(self) -> bool:
        """True: compare fingerprints now (the watches are renewed first, so a change made
        after this answer is the next one's)."""
        self._inotify.pump()
        if not (self._maybe or self._blind):
            return False
        self._maybe = False
        self._blind = not self._arm()
        return True

    def _arm(self) -> bool:
        dirs = [self._package]
        dirs += (p for p in self._package.rglob("*") if "__pycache__" not in p.parts)
        places = [str(p) for p in dirs if p.is_dir() and not p.is_symlink()]
        for entry in self._entries:
            places.append(entry if os.path.isdir(entry) else os.path.dirname(entry) or ".")
        return all(self._inotify.watch(place, place, self) for place in places)

    # the watches' sink: any event is a maybe
    def note(self, rel: str) -> None:
        self._maybe = True

    def note_all(self) -> None:
        self._maybe = True

    def note_dir(self, rel: str) -> None:
        self._maybe = True


# -- starting and asking ----------------------------------------------------------------------


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
                [sys.executable, "-P", "-m", "reconciler.cli.warm", "serve", str(path)],
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
    info = poll(lambda _: status(path), policy=RetryPolicy.every(0.05, deadline_s=timeout_s))
    if info is None:
        raise TimeoutError(f"the warm process for {path} did not answer within {timeout_s} s")
    return info


def start(environ: dict[str, str] | os._Environ[str] | None = None, timeout_s: float = 60) -> Path:
    """Start the server `environ` points at (UKC_WARM_DIR...), wait until it answers, and
    return its socket: what benches and test suites do before they time `ukc`."""
    found, warning = warmclient.locate_socket(environ)
    if found is None:
        raise RuntimeError(warning or "no private directory for the warm process")
    path = Path(found)
    spawn(path, environ)
    wait_ready(path, timeout_s)
    return path


def _ask(path: Path, op: str) -> dict[str, Any] | None:
    sock = warmclient.connect(str(path))
    if sock is None:
        return None
    try:
        payload = json.dumps({"op": op}).encode()
        sock.sendall(struct.pack(">I", len(payload)) + payload)
        n = struct.unpack(">I", recv_exact(sock, 4))[0]
        answer = json.loads(recv_exact(sock, min(n, 1 << 16)))
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
        tmp = temp_path(path)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        self.listener.bind(str(tmp))
        self.listener.listen(64)
        # why: a rename replaces an older server's socket atomically; that server notices its
        # path is gone and exits, while clients always find a listening socket
        os.replace(tmp, path)
        sweep_dead_temps(path)  # sockets of servers killed before their rename
        self.inode = os.stat(path).st_ino
        # the trees its commands scanned, kept watched until the next command scans them
        ino = Inotify.open()
        self.keeper = TreeKeeper(ino) if ino is not None else None
        self.code = CodeWatch(ino, _PACKAGE, sys.path) if ino is not None else None

    def still_ours(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self.inode
        except OSError:
            return False

    def loop(self) -> None:
        # why every second with trees kept: the kernel queues 16,384 events, then drops them
        # (the next scan then walks)
        self.listener.settimeout(min(60.0, self.idle_s, 1.0 if self.keeper else 60.0))
        while True:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                if self.keeper is not None:
                    self.keeper.pump()
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
        conn.settimeout(HANDSHAKE_S)
        fds: list[int] = []
        try:
            if warmclient.peer_uid(conn) != os.getuid():
                return True
            head, fds = _recv_with_fds(conn)
            n = struct.unpack(">I", head)[0]
            if n > _MAX_REQUEST:
                return True
            request = json.loads(recv_exact(conn, n).decode("utf-8", "surrogateescape"))
        except (OSError, EOFError, ValueError, struct.error):
            _close_all(fds)
            return True
        op = request.get("op") if isinstance(request, dict) else None
        if op in ("tree-take", "tree-done"):
            _close_all(fds)
            answer = self.keeper.request(request) if self.keeper is not None else {}
            payload = json.dumps(answer).encode("utf-8", "surrogateescape")
            with contextlib.suppress(OSError):
                conn.sendall(struct.pack(">I", len(payload)) + payload)
            return True
        if op != "run":
            _close_all(fds)
            return self.admin(conn, str(op))
        self.last = time.monotonic()
        fresh = self.still_ours() and (
            (self.code is not None and not self.code.maybe_changed()) or fingerprint() == self.print
        )
        if not fresh or len(fds) != 3:
            _close_all(fds)
            with contextlib.suppress(OSError):
                conn.sendall(b"S")
            return fresh  # a stale server exits; its client starts a new one
        pid = os.fork()
        if pid == 0:
            self.listener.close()
            if self.keeper is not None:
                self.keeper.inotify.close()  # the server's: a command asks, never reads it
                sync_feed.use_keeper(_KeeperClient(self.path))
            _child(conn, fds, request, str(self.path.parent))  # never returns
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
            "trees_kept": len(self.keeper.trees) if self.keeper is not None else 0,
            # scans told what changed, and scans that had to walk
            "scans_named": self.keeper.named if self.keeper is not None else 0,
            "scans_walked": self.keeper.everything if self.keeper is not None else 0,
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


class _KeeperClient:
    """A command's way to the server's `TreeKeeper` (one short connection per question)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _send(self, request: dict[str, Any]) -> _socket.socket:
        sock = warmclient.connect(str(self.path))
        if sock is None:
            raise OSError("no warm process")
        try:
            sock.settimeout(HANDSHAKE_S)
            payload = json.dumps(request).encode("utf-8", "surrogateescape")
            sock.sendall(struct.pack(">I", len(payload)) + payload)
        except BaseException:
            sock.close()
            raise
        return sock

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        sock = self._send(request)
        try:
            n = struct.unpack(">I", recv_exact(sock, 4))[0]
            if n > _MAX_ANSWER:
                raise OSError("answer too long")
            answer = json.loads(recv_exact(sock, n).decode("utf-8", "surrogateescape"))
        except (EOFError, ValueError, struct.error) as exc:
            raise OSError(str(exc)) from None
        finally:
            sock.close()
        if not isinstance(answer, dict):
            raise OSError("malformed answer")
        return answer

    def take(
        self, state_dir: str, root: str, ident: list[int] | None, skip: Sequence[str] = ()
    ) -> tuple[int, set[str] | None]:
        got = self._call(
            {
                "op": "tree-take",
                "state_dir": state_dir,
                "root": root,
                "ident": ident,
                "skip": list(skip),
            }
        )
        token, paths = got.get("token"), got.get("paths")
        if type(token) is not int:
            raise OSError("malformed answer")
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            return token, None
        return token, set(paths)

    def done(self, state_dir: str, token: int, ident: list[int] | None) -> None:
        """Sent, not waited for (~1.5 ms of each scan): the server serves its connections
        one at a time, in the order they came, so whatever this command (or the next) asks
        after it is answered after it. A done that never arrives leaves the keeper naming
        those paths again."""
        request = {"op": "tree-done", "state_dir": state_dir, "token": token, "ident": ident}
        self._send(request).close()


#: the keeper's answers name changed paths (at most `keeper.MAX_PENDING` of them)
_MAX_ANSWER = 64 << 20


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
            msg += recv_exact(conn, 4 - len(msg))
        except BaseException:
            _close_all(got)
            raise
    return msg, got


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _child(conn: socket.socket, fds: list[int], request: dict[str, Any], directory: str) -> None:
    """In the forked child: become the client's command, run it, report its exit code, then
    lend the connections it kept (if any) until they are idle."""
    import threading

    code = 1
    detached = threading.Event()
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
        from reconciler.status import journal  # loaded by the server already (_preload)

        client = warmclient.peer_pid(conn)
        # the locks this command takes name its `ukc`: once that is gone, we are dying
        journal.set_client_pid(client if client > 0 else None)
        conn.sendall(b"R" + struct.pack(">ii", os.getpid(), os.getppid()))
        if recv_exact(conn, 1) != b"G":
            os._exit(1)
        conn.settimeout(None)
        _watch_client(conn, detached)
        # with the client's environment (UKC_LINK_IDLE_S), which the server never had
        links.enable(directory)
        code = _run_cli(argv)
    except BaseException:  # the client runs it itself if it never got b"R"
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        lender = links.lender()
        lending = lender is not None and lender.holding > 0
        if lending:
            # the client's streams are closed first: a caller reading our output to its
            # end (a pipe) must not wait for the lender
            _detach_streams()
            detached.set()  # the client exiting now is no reason to die
        with contextlib.suppress(OSError):
            conn.sendall(b"X" + struct.pack(">i", code))
        if lending and lender is not None:
            conn.close()
            with contextlib.suppress(BaseException):
                lender.serve()
        os._exit(code)


def _detach_streams() -> None:
    """Point fds 0-2 at /dev/null (the client's terminal or pipes are let go)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        with contextlib.suppress(OSError):
            os.dup2(null, fd)
    os.close(null)


#: the command line the child runs, named rather than imported: it imports this module
_COMMANDS = "reconciler.cli.main"


def _run_cli(argv: list[str]) -> int:
    import importlib

    try:
        importlib.import_module(_COMMANDS).main(argv)
    except SystemExit as done:
        if done.code is None:
            return 0
        if isinstance(done.code, int):
            return done.code
        sys.stderr.write(f"{done.code}\n")
        return 1
    return 0


def _watch_client(conn: socket.socket, detached: Any) -> None:
    """A thread that raises the client's signals here, and ends us if the client dies (not
    once `detached` is set: the command is over, and we only lend its connections)."""
    import threading

    allowed = {int(s) for s in FORWARDED}

    def watch() -> None:
        while True:
            try:
                data = conn.recv(16)
            except OSError:
                data = b""
            if not data:
                if not detached.is_set():
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
    import importlib

    # why: `apply` and `plan` import these when they print (pydantic builds their models:
    # ~8 ms of every command's CPU, measured as 15% of a warm 10-files apply under load)
    import reconciler.cli.apply_output
    import reconciler.cli.plan_output
    import reconciler.cli.render
    import reconciler.reconcile.execute
    import reconciler.reconcile.loop
    import reconciler.sync.engine  # noqa: F401
    from reconciler.cloud import metros
    from reconciler.sync import remote
    from reconciler.transport import select

    importlib.import_module(_COMMANDS)
    select.preload()
    metros.warm_up()
    # why: the sync helper's code object, compiled here once, is what every sandbox runs;
    # and its packed source, compressed when first sent (zlib level 9 of ~40 KB: 5-20 ms of
    # every syncing command, on the way from its list to its helper's start)
    remote.program().payload  # noqa: B018


def serve(path: Path) -> None:
    """Run the server until it is idle, replaced, stale or asked to stop."""
    sys.modules.setdefault("invoke", None)  # type: ignore[arg-type]  # see cli.main
    _preload()
    # why: every command is a fork of this process; frozen, the imported heap (~10^5 objects)
    # is never walked by a child's cyclic GC, nor its pages copied by the GC's writes
    gc.freeze()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    server = _Server(path)
    try:
        server.loop()
    finally:
        server.close()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "serve":
        sys.exit("usage: python -m reconciler.cli.warm serve SOCKET")
    serve(Path(sys.argv[2]))
