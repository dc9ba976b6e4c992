"""Connections a finished command keeps for the next ones (commands forked by the warm process).

Why: every one-shot `ukc apply` is a fresh fork of the warm process, and its SSH connection
(a TLS and an SSH handshake, and sshd's start in the sandbox: ~70 ms of a 10-files apply under
load) died with it. paramiko's state cannot cross a fork, so the command that opened a
connection keeps it: once its caller has the exit code, the forked child stays behind as a
*lender* (standard streams closed, nothing else running) for `IDLE_S` without a process on it,
and the next command *borrows* it: it asks the lender, over a Unix socket in the warm process's
private 0700 directory (peer uid checked both ways), to start a process on that connection, and
the process's streams are relayed as frames.

What makes two connections the same: `LinkKey` — session, status file, instance uuid and boot
(`start_count`), the pinned host key, the key file and a digest of its bytes, fqdn and
transport. The lender serves only a request naming its whole key; the socket is named by the
key's digest, so a child looking for another session's or instance's connection (a replaced
instance with the same name has another uuid and host key) finds nothing.

When a kept connection goes: `IDLE_S` after the last process over it ended (a connection
through the edge counts as traffic: it holds off scale-to-zero that long at most), when it
dies, when a borrower fails with it (`RelayShell.close` discards; only the pool's end of a
command keeps it, `release`), and at once for every lender when the instance is suspended,
replaced or deleted (`drop_session`).

The command line of a started process crosses the socket (never argv or a log); session
environments and secrets travel on the process's stdin as over SSH.

Spares: a borrower may mark a command as one that does nothing before its stdin says so (the
sync helper's bootstrap waits for its program: `RelayShell.spare`). When such a relayed
process ends, the lender starts the same command again and keeps it waiting; the next
borrower starting that command gets it, interpreter already up (tens of ms of a sandbox's CPU
at every push otherwise). Never for any other command: a session command would run.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import selectors
import socket
import struct
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from reconciler._util.unixsock import peer_uid, recv_exact
from reconciler.errors import RemoteError, TransportError
from reconciler.transport.base import RemoteProcess, Transport

__all__ = [
    "IDLE_S",
    "Lender",
    "LinkKey",
    "RelayShell",
    "borrow",
    "drop_session",
    "enable",
    "hand_over",
    "key_for",
    "lender",
]

#: how long a kept connection waits for the next command (UKC_LINK_IDLE_S; 0: keep none)
IDLE_S = 10.0
#: how long asking a lender may take (it answers from memory, or after opening a channel)
_ASK_S = 5.0
_START_S = 60.0
_MAX_REQUEST = 1 << 20
#: relayed reads: as large as the SSH channel's packets, so a frame carries one or more
_CHUNK = 256 * 1024
#: what a borrower buffers of a stream nobody reads yet (the SSH window's size)
_BUFFER = 16 * 1024 * 1024
#: the kernel's send buffer of each side of a relayed process's socket (capped by
#: net.core.wmem_max). why: at the default (~200 KiB, under two frames) the writer blocked in
#: every frame until the reader took it, and the reader waited for the writer to wake again:
#: a 2k push's borrower sat in its writes for 0.45 s of 0.6, and its lender waited for frames
#: half of its time; a few MB queued let each side work while the other does
_SOCKET_BUFFER = 4 * 1024 * 1024
_HEAD = struct.Struct(">cI")


@dataclass(frozen=True)
class LinkKey:
    """Everything a kept connection must match to be handed to a command."""

    session: str
    status_path: str
    uuid: str
    start_count: int | None
    pin: str
    key_path: str
    #: sha256 of the key file's bytes: a key made anew (the session's keys were forgotten)
    #: is another identity
    key_digest: str
    fqdn: str
    kind: str

    def name(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True).encode()
        return _prefix(self.status_path, self.session) + hashlib.sha256(text).hexdigest()[:20]


def _prefix(status_path: str, session: str) -> str:
    """What the sockets of one session's kept connections are named with (any instance)."""
    who = hashlib.sha256(f"{status_path}\0{session}".encode()).hexdigest()[:12]
    # why short: a Unix socket's path has 107 bytes, the warm directory takes most of them
    return f"k{who}"


def key_for(
    *,
    session: str,
    status_path: Path | str,
    uuid: str,
    start_count: int | None,
    pin: str | None,
    key_path: Path,
    fqdn: str | None,
    kind: str,
) -> LinkKey | None:
    """The key of a connection, or None when it cannot be kept (no pin, no key file)."""
    if not pin or not fqdn or not uuid or kind != "ssh":
        return None
    try:
        with open(key_path, "rb") as f:
            digest = hashlib.sha256(b"ukc-link\0" + f.read(1 << 16)).hexdigest()
    except OSError:
        return None
    return LinkKey(
        session=session,
        status_path=str(status_path),
        uuid=uuid,
        start_count=start_count,
        pin=pin,
        key_path=str(key_path),
        key_digest=digest,
        fqdn=fqdn,
        kind=kind,
    )


# -- this process's place -----------------------------------------------------------------

_state: dict[str, Any] = {"dir": None, "lender": None}


def enable(directory: str | None, idle_s: float | None = None) -> None:
    """Let this process borrow and lend through `directory` (the warm process's private
    directory; a forked command calls this). None turns both off."""
    if idle_s is None:
        idle_s = float(os.environ.get("UKC_LINK_IDLE_S") or IDLE_S)
    on = directory is not None and idle_s > 0
    _state["dir"] = directory if on else None
    _state["lender"] = Lender(directory, idle_s) if on and directory is not None else None


def lender() -> Lender | None:
    got: Lender | None = _state["lender"]
    return got


def _directory() -> str | None:
    got: str | None = _state["dir"]
    return got


def hand_over(transport: Transport, key: LinkKey | None) -> bool:
    """At the end of a command: keep `transport` for the next one (True), or leave it to the
    caller to close (False)."""
    shell = getattr(transport, "shell", None)
    if isinstance(shell, RelayShell):
        if shell.active:
            shell.release()
            return True
        return False
    keeper = lender()
    if keeper is None or key is None or transport.kind != "ssh" or not transport.active:
        return False
    return keeper.lend(key, transport)


def borrow(key: LinkKey | None) -> Transport | None:
    """A kept connection with exactly `key`, as a transport whose processes are relayed;
    None when no lender holds one (the caller connects itself)."""
    directory = _directory()
    if key is None or directory is None:
        return None
    from reconciler.transport.commands import ShellTransport

    path = os.path.join(directory, key.name())
    try:
        sock = _ask(path, {"op": "hello", "key": asdict(key)})
        try:
            ok = recv_exact(sock, 1) == b"+"
        finally:
            sock.close()
    except OSError:
        return None
    if not ok:
        return None
    return ShellTransport(key.kind, RelayShell(path, key), pin=key.pin)


def drop_session(status_path: Path | str, session: str) -> None:
    """End every kept connection of `session` (its instance is being suspended, replaced or
    deleted: a connection kept open would keep a sandbox up, or wake it)."""
    directory = _directory()
    if directory is None:
        return
    pattern = os.path.join(glob.escape(directory), _prefix(str(status_path), session) + "*")
    request = {"op": "drop", "session": session, "status_path": str(status_path)}
    for path in glob.glob(pattern):
        with contextlib.suppress(OSError, EOFError):
            sock = _ask(path, request)
            try:
                recv_exact(sock, 1)
            finally:
                sock.close()


# -- wire ------------------------------------------------------------------------------------


def _deep_send_buffer(sock: socket.socket) -> None:
    """Let `sock` queue `_SOCKET_BUFFER` bytes before a send blocks (as far as the system
    allows: only a slower relay otherwise)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)


def _ask(path: str, request: dict[str, Any], timeout: float = _ASK_S) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        if peer_uid(sock) != os.getuid():
            raise OSError("a lender runs as another user")
        payload = json.dumps(request).encode()
        sock.sendall(struct.pack(">I", len(payload)) + payload)
    except BaseException:
        sock.close()
        raise
    return sock


def _recv_request(sock: socket.socket) -> dict[str, Any] | None:
    try:
        n = struct.unpack(">I", recv_exact(sock, 4))[0]
        if n > _MAX_REQUEST:
            return None
        request = json.loads(recv_exact(sock, n))
    except (OSError, EOFError, ValueError, struct.error):
        return None
    return request if isinstance(request, dict) else None


class _Frames:
    """Typed frames on a stream socket: one byte of type, u32 length, payload."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send = threading.Lock()

    def send(self, kind: bytes, data: bytes = b"") -> None:
        with self._send:
            if len(data) <= 4096:
                self.sock.sendall(_HEAD.pack(kind, len(data)) + data)
            else:
                self.sock.sendall(_HEAD.pack(kind, len(data)))
                self.sock.sendall(data)

    def recv(self) -> tuple[bytes, bytes] | None:
        """The next frame; None at the end of the stream."""
        try:
            kind, n = _HEAD.unpack(recv_exact(self.sock, _HEAD.size))
            return kind, self._body(n) if n else b""
        except (OSError, EOFError, struct.error):
            return None

    def _body(self, n: int) -> bytes:
        """`n` bytes read straight into one buffer (a frame's data is up to `_CHUNK`, and the
        lender relays every byte a push sends: two copies, not three, and no piece objects).
        A longer frame is read as it comes (its length is only the peer's word)."""
        if n > _CHUNK:
            return recv_exact(self.sock, n)
        body = bytearray(n)
        with memoryview(body) as view:
            got = 0
            while got < n:
                k = self.sock.recv_into(view[got:])
                if not k:
                    raise EOFError(f"peer closed after {got} of {n} bytes")
                got += k
        return bytes(body)


# -- the borrower's side ---------------------------------------------------------------------


class RelayProcess:
    """A process started on a lender's connection (a `RemoteProcess`)."""

    def __init__(self, sock: socket.socket, where: str) -> None:
        self._frames = _Frames(sock)
        self._where = where
        self._cond = threading.Condition()
        self._out = bytearray()
        self._err = bytearray()
        self._out_eof = False
        self._err_eof = False
        self._code: int | None = None
        self._ended = threading.Event()
        self._killed = False
        self.bytes_in = 0
        self.bytes_out = 0
        threading.Thread(target=self._demux, name="link-relay", daemon=True).start()

    def _demux(self) -> None:
        while True:
            frame = self._frames.recv()
            with self._cond:
                if frame is None:
                    self._out_eof = self._err_eof = True
                    self._cond.notify_all()
                    break
                kind, data = frame
                if kind == b"x" and len(data) == 4:
                    self._code = struct.unpack(">i", data)[0]
                    self._out_eof = self._err_eof = True
                    self._cond.notify_all()
                    break
                target = self._out if kind == b"o" else self._err if kind == b"r" else None
                if target is None:
                    continue
                if not data:
                    if kind == b"o":
                        self._out_eof = True
                    else:
                        self._err_eof = True
                else:
                    # the lender's reads stop when ours do: nobody reading means no more frames
                    while len(target) > _BUFFER and not self._killed:
                        self._cond.wait(1.0)
                    target += data
                    self.bytes_in += len(data)
                self._cond.notify_all()
        self._ended.set()
        with contextlib.suppress(OSError):
            self._frames.sock.close()

    def write(self, data: bytes) -> None:
        try:
            self._frames.send(b"d", bytes(data))
        except OSError as err:
            raise RemoteError(f"ssh {self._where}: stdin write failed ({err})") from None
        self.bytes_out += len(data)

    def close_stdin(self) -> None:
        with contextlib.suppress(OSError):
            self._frames.send(b"e")

    def _read(self, buf: bytearray, which: str, n: int) -> bytes:
        with self._cond:
            while not buf and not getattr(self, which):
                self._cond.wait()
            data = bytes(buf[:n])
            del buf[:n]
            self._cond.notify_all()
            return data

    def read(self, n: int = 65536) -> bytes:
        return self._read(self._out, "_out_eof", n)

    def read_stderr(self, n: int = 65536) -> bytes:
        return self._read(self._err, "_err_eof", n)

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise TimeoutError(f"ssh {self._where}: process still running after {timeout} s")
        # as paramiko's: -1 when the process ended without a status (its channel closed)
        return -1 if self._code is None else self._code

    def kill(self) -> None:
        with self._cond:
            self._killed = True
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            self._frames.send(b"k")
        with contextlib.suppress(OSError):
            self._frames.sock.shutdown(socket.SHUT_RDWR)


class RelayShell:
    """A lender's connection, seen from a borrowing command (a `RemoteShell`)."""

    def __init__(self, path: str, key: LinkKey) -> None:
        self._path = path
        self.key = key
        self.fqdn = key.fqdn
        self.host_key_fingerprint = key.pin
        self.healthy = True
        self._open = True
        #: commands that wait for their stdin before doing anything (see the module's doc)
        self._spares: set[str] = set()

    def spare(self, command: str) -> None:
        """`command` does nothing before it reads its stdin: the lender may start it ahead
        for the next command's use."""
        self._spares.add(command)

    def __repr__(self) -> str:
        return f"RelayShell(fqdn={self.fqdn!r}, host_key={self.host_key_fingerprint!r})"

    @property
    def active(self) -> bool:
        return self._open and self.healthy

    def start(self, command: str) -> RemoteProcess:
        if not self.active:
            raise TransportError(f"ssh {self.fqdn}: the kept connection was given up")
        try:
            sock = _ask(
                self._path,
                {
                    "op": "start",
                    "key": asdict(self.key),
                    "command": command,
                    "spare": command in self._spares,
                },
                timeout=_START_S,
            )
        except OSError as err:
            self.healthy = False
            raise TransportError(f"ssh {self.fqdn}: cannot start a process ({err})") from None
        try:
            answer = recv_exact(sock, 1)
        except (OSError, EOFError) as err:
            sock.close()
            self.healthy = False
            raise TransportError(f"ssh {self.fqdn}: cannot start a process ({err})") from None
        if answer != b"+":
            sock.close()
            self.healthy = False
            raise TransportError(f"ssh {self.fqdn}: cannot start a process (connection lost)")
        sock.settimeout(None)
        _deep_send_buffer(sock)
        return RelayProcess(sock, self.fqdn)

    def release(self) -> None:
        """Done with it, as a command that converged is: the lender keeps it."""
        self._open = False

    def close(self) -> None:
        """Done with it after a failure: the lender drops the connection too."""
        if not self._open:
            return
        self._open = False
        with contextlib.suppress(OSError, EOFError):
            sock = _ask(self._path, {"op": "discard", "key": asdict(self.key)})
            try:
                recv_exact(sock, 1)
            finally:
                sock.close()


# -- the lender's side ----------------------------------------------------------------------


@dataclass
class _Held:
    key: LinkKey
    transport: Transport
    listener: socket.socket
    path: str
    inode: int
    busy: int = 0
    last: float = 0.0
    #: processes started ahead, waiting for their stdin, by command
    spares: dict[str, RemoteProcess] = field(default_factory=dict)


class Lender:
    """The connections this process keeps for others after its own command ended."""

    def __init__(self, directory: str, idle_s: float) -> None:
        self.directory = directory
        self.idle_s = idle_s
        self._held: dict[str, _Held] = {}
        self._lock = threading.Lock()
        #: requests being answered; `serve` returns only once they are (see there)
        self._answering = 0
        self._answered = threading.Condition(self._lock)

    @property
    def holding(self) -> int:
        with self._lock:
            return len(self._held)

    def lend(self, key: LinkKey, transport: Transport) -> bool:
        """Offer `transport` under `key` from now on (the socket is there before our
        command's caller hears the exit code); False when it cannot be."""
        path = os.path.join(self.directory, key.name())
        # not under the session's prefix: `drop_session` never asks a socket not yet ours
        tmp = os.path.join(self.directory, f"t{os.getpid()}")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            listener.bind(tmp)
            listener.listen(16)
            os.replace(tmp, path)  # an older lender of the same key sees it gone and quits
            inode = os.stat(path).st_ino
        except OSError:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return False
        held = _Held(key, transport, listener, path, inode, last=time.monotonic())
        with self._lock:
            old = self._held.pop(path, None)
            self._held[path] = held
        if old is not None:
            self._retire(old)
        return True

    def _retire(self, held: _Held) -> None:
        with self._lock:
            spares = list(held.spares.values())
            held.spares.clear()
        for process in spares:
            with contextlib.suppress(Exception):
                process.kill()
        with contextlib.suppress(OSError):
            if os.stat(held.path).st_ino == held.inode:
                os.unlink(held.path)
        with contextlib.suppress(OSError):
            held.listener.close()
        with contextlib.suppress(Exception):
            held.transport.close()

    def _expired(self, now: float) -> list[_Held]:
        """What to give up now: idle too long, dead, or taken over by another lender."""
        out = []
        with self._lock:
            for path, held in list(self._held.items()):
                try:
                    ours = os.stat(path).st_ino == held.inode
                except OSError:
                    ours = False
                idle = held.busy == 0 and now - held.last > self.idle_s
                if idle or not ours or not held.transport.active:
                    out.append(self._held.pop(path))
        return out

    def serve(self) -> None:
        """Answer borrowers until nothing is held any more and no request is being answered.

        Why wait for the answers: the caller exits at once, and a drop that had taken the last
        connection off the list was cut short there, before it closed the connection and
        removed its socket (the next command found a socket nobody answered)."""
        with selectors.DefaultSelector() as sel:
            while True:
                for held in self._expired(time.monotonic()):
                    with contextlib.suppress(KeyError, ValueError):
                        sel.unregister(held.listener)
                    self._retire(held)
                with self._lock:
                    current = dict(self._held)
                if not current:
                    self._await_answers(_ASK_S)
                    return
                registered = {k.fileobj for k in sel.get_map().values()}
                for held in current.values():
                    if held.listener not in registered:
                        sel.register(held.listener, selectors.EVENT_READ, held.path)
                for sk, _ in sel.select(timeout=min(1.0, self.idle_s)):
                    with contextlib.suppress(OSError):
                        conn, _ = sk.fileobj.accept()  # type: ignore[union-attr]
                        self._answer(conn, str(sk.data))

    def _answer(self, conn: socket.socket, path: str) -> None:
        """Answer `conn` on a thread of its own, counted until it is done."""
        with self._lock:
            self._answering += 1
        try:
            threading.Thread(target=self._serve_one, args=(conn, path), daemon=True).start()
        except BaseException:
            self._answered_one()
            conn.close()
            raise

    def _answered_one(self) -> None:
        with self._answered:
            self._answering -= 1
            self._answered.notify_all()

    def _await_answers(self, timeout: float) -> None:
        """Until no request is being answered, or `timeout` (a relay stuck on a borrower that
        stopped reading: its connection is closed already, and the process's exit ends it)."""
        with self._answered:
            self._answered.wait_for(lambda: self._answering == 0, timeout)

    def _serve_one(self, conn: socket.socket, path: str) -> None:
        try:
            conn.settimeout(_ASK_S)
            if peer_uid(conn) != os.getuid():
                return
            request = _recv_request(conn)
            if request is None:
                return
            op = request.get("op")
            if op == "drop":
                self._drop_session(str(request.get("status_path")), str(request.get("session")))
                conn.sendall(b"+")
                return
            with self._lock:
                held = self._held.get(path)
            if held is None or request.get("key") != asdict(held.key):
                conn.sendall(b"-")
                return
            if op == "discard":
                self._discard(path)
                conn.sendall(b"+")
            elif op == "hello":
                conn.sendall(b"+" if held.transport.active else b"-")
            elif op == "start" and isinstance(request.get("command"), str):
                self._relay(conn, held, request["command"], request.get("spare") is True)
            else:
                conn.sendall(b"-")
        except OSError:
            pass
        finally:
            conn.close()
            self._answered_one()

    def _drop_session(self, status_path: str, session: str) -> None:
        with self._lock:
            gone = [
                p
                for p, h in self._held.items()
                if (h.key.status_path, h.key.session) == (status_path, session)
            ]
        for path in gone:
            self._discard(path)

    def _discard(self, path: str) -> None:
        with self._lock:
            held = self._held.pop(path, None)
        if held is not None:
            self._retire(held)

    def _relay(self, conn: socket.socket, held: _Held, command: str, spare: bool) -> None:
        with self._lock:
            held.busy += 1
            ready = held.spares.pop(command, None) if spare else None
        try:
            try:
                process = ready if ready is not None and _running(ready) else None
                if process is None:
                    process = held.transport.start(command)
            except Exception:
                conn.sendall(b"-")
                return
            conn.settimeout(None)
            _deep_send_buffer(conn)
            conn.sendall(b"+")
            _relay_streams(_Frames(conn), process)
            if spare:
                self._start_spare(held, command)
        finally:
            with self._lock:
                held.busy -= 1
                held.last = time.monotonic()

    def _start_spare(self, held: _Held, command: str) -> None:
        """Start `command` for the next borrower (it waits for its stdin)."""
        if not held.transport.active:
            return
        try:
            process = held.transport.start(command)
        except Exception:
            return
        with self._lock:
            kept = held.path in self._held
            old = held.spares.pop(command, None)
            if kept:
                held.spares[command] = process
        for gone in (old, None if kept else process):
            if gone is not None:
                with contextlib.suppress(Exception):
                    gone.kill()


def _running(process: RemoteProcess) -> bool:
    try:
        process.wait(0)
    except TimeoutError:
        return True
    except Exception:
        return False
    return False


def _relay_streams(frames: _Frames, process: RemoteProcess) -> None:
    """Pump one process's streams through `frames` until it ended and both outputs did."""

    def pump(kind: bytes, read: Any) -> None:
        try:
            while True:
                data = read(_CHUNK)
                frames.send(kind, data)
                if not data:
                    return
        except (OSError, EOFError, Exception):
            process.kill()

    outs = [
        threading.Thread(target=pump, args=(b"o", process.read), daemon=True),
        threading.Thread(target=pump, args=(b"r", process.read_stderr), daemon=True),
    ]
    for t in outs:
        t.start()

    def down() -> None:
        while True:
            frame = frames.recv()
            if frame is None or frame[0] == b"k":
                process.kill()
                return
            kind, data = frame
            try:
                if kind == b"d":
                    process.write(data)
                elif kind == b"e":
                    process.close_stdin()
            except Exception:
                process.kill()
                return

    threading.Thread(target=down, daemon=True).start()
    for t in outs:
        t.join()
    try:
        code = process.wait(10.0)
    except Exception:
        code = -1
    with contextlib.suppress(OSError):
        frames.send(b"x", struct.pack(">i", code))
