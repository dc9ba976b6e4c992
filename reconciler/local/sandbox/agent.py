"""The agent that runs as the main process inside every local-metro sandbox.

`local/sandbox.py` starts it with the host's `/usr/bin/python3` inside bubblewrap, so it uses the
standard library only and is bound read-only into the sandbox. It plays the part of the sandbox
image of the original workflow plus the UKC sandbox plugin:

* writes a fresh boot id to `/run/ukc/boot_id`;
* installs env `PUBKEY` as the authorized key and runs `sshd` on 127.0.0.1:2222;
* serves the exec API (`POST /exec`) on 127.0.0.1:8080;
* serves the sandbox plugin API (ukc-api.md §11) on a unix socket inherited from the runtime;
* relays byte streams: a host client connects to the inherited relay socket, sends `PORT\\n`,
  gets `OK\\n` once the agent reached 127.0.0.1:PORT inside the sandbox's network namespace,
  then bytes flow both ways (this is how the TLS edge reaches sshd and the exec API);
* reports `ready <boot id>` on the inherited status fd once sshd accepts.

Everything the runtime needs is passed as inherited file descriptors, so the sandbox never gets
write access to any host path except `/workspace`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import errno
import fcntl
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["main"]

SSH_PORT = 2222
EXEC_PORT = 8080
RUN_DIR = "/run/ukc"
WORKSPACE = "/workspace"
PUMP_BUF = 256 * 1024
# why: the metro proxy reads at most 2 MiB of request body (ukc-api.md §11.1); JSON + base64
# framing of a 1 MiB SDK chunk stays well below this.
MAX_BODY = 4 * 1024 * 1024
READY_DEADLINE_S = 10.0
# why: output is kept in memory for the log endpoints; a runaway command must not exhaust the
# host, so each stream keeps its first 256 MiB (the rest is read and dropped)
MAX_LOG = 256 * 1024 * 1024
_F_SETPIPE_SZ = 1031
# why: never SPLICE_F_MORE, it corks the socket like MSG_MORE and delays every small packet
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1)
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12)

SSHD_CONFIG = """\
ListenAddress 127.0.0.1
HostKey {host_key}
AuthorizedKeysFile {run}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
PidFile none
PrintLastLog no
PrintMotd no
UseDNS no
Subsystem sftp internal-sftp
MaxStartups 100
AcceptEnv none
"""


def _log(message: str) -> None:
    sys.stderr.write(f"agent: {message}\n")
    sys.stderr.flush()


# --------------------------------------------------------------------------- relay


def _ack_now(sock: socket.socket) -> None:
    """Acknowledge what was just read from sshd at once (Linux leaves quick-ACK mode by itself).

    why: sshd leaves Nagle on for sessions without a pty, and its answers come in pairs of small
    writes (auth success, then a host-keys notice; a channel confirmation after it): the second
    waited for our delayed ACK, 40 ms on every first channel of a connection. A real edge is
    not a loopback peer with a 40 ms ACK timer; this relay is ours, so it must not add that.
    """
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)


def _splice_all(src: socket.socket, dst: socket.socket) -> bool:
    """Zero-copy src → dst through a pipe until EOF; False if splice is unusable here."""
    rfd, wfd = os.pipe()
    moved = False
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(wfd, _F_SETPIPE_SZ, 1024 * 1024)
        while True:
            try:
                n = os.splice(src.fileno(), wfd, PUMP_BUF, flags=_SPLICE_FLAGS)
            except OSError as exc:
                if not moved and exc.errno in (errno.EINVAL, errno.ENOSYS):
                    return False
                raise
            if n == 0:
                return True
            moved = True
            _ack_now(src)
            while n > 0:
                n -= os.splice(rfd, dst.fileno(), n, flags=_SPLICE_FLAGS)
    finally:
        os.close(rfd)
        os.close(wfd)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy src → dst until EOF; splice where the kernel allows, else 256 KiB recv/send."""
    clean = False
    try:
        if not (hasattr(os, "splice") and _splice_all(src, dst)):
            while True:
                data = src.recv(PUMP_BUF)
                if not data:
                    break
                _ack_now(src)
                dst.sendall(data)
        clean = True
    except OSError:
        pass
    finally:
        if clean:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        else:
            # why: a reset on one side must also unblock the thread pumping the other way
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def _relay_one(client: socket.socket) -> None:
    upstream: socket.socket | None = None
    try:
        client.settimeout(5.0)
        line = b""
        while not line.endswith(b"\n") and len(line) < 8:
            chunk = client.recv(8 - len(line))
            if not chunk:
                return
            line += chunk
        text = line.strip().decode("ascii", "replace")
        if not text.isdigit() or not 0 < int(text) < 65536:
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", int(text)), timeout=5.0)
        except OSError:
            return  # refused inside: the client sees EOF at once
        client.settimeout(None)
        upstream.settimeout(None)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.sendall(b"OK\n")
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()
    except OSError:
        pass
    finally:
        if upstream is not None:
            upstream.close()
        client.close()


def _serve_relay(listener: socket.socket) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError as exc:
            _log(f"relay accept failed: {exc.strerror}")
            time.sleep(0.05)
            continue
        threading.Thread(target=_relay_one, args=(client,), daemon=True).start()


# --------------------------------------------------------------------------- http basics


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ukc-agent"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass  # why: request lines may carry paths of user files; the console stays quiet

    def _body(self) -> bytes | None:
        """The request body, or None after answering 413 for a bad or oversized length."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self._send(413, b"", "text/plain")
            self.close_connection = True
            return None
        return self.rfile.read(length) if length > 0 else b""

    def _send(
        self,
        status: int,
        body: bytes,
        ctype: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        if body or ctype != "application/json":
            self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: object) -> None:
        self._send(status, json.dumps(obj).encode())


# --------------------------------------------------------------------------- exec API


class _ExecHandler(_Handler):
    """The original workflow image's exec server (ukc-api.md §12)."""

    def _route(self) -> None:
        if self.command != "POST" or self.path.split("?", 1)[0] != "/exec":
            self._body()
            self._json(404, {"error": "not found"})
            return
        raw = self._body()
        if raw is None:
            return
        try:
            req = json.loads(raw)
        except ValueError:
            self._json(400, {"error": "invalid json"})
            return
        cmd = req.get("cmd") if isinstance(req, dict) else None
        if not isinstance(cmd, str):
            self._json(400, {"error": '"cmd" must be a string'})
            return
        # why: `sh -lc CMD`, as the image's server runs it, but CMD (env values included) goes
        # through the environment: a sandbox process's command line is readable by every
        # user of the host, its environment only by its own
        env = dict(os.environ, UKC_EXEC_CMD=cmd)
        try:
            proc = subprocess.run(
                ["sh", "-lc", 'c=$UKC_EXEC_CMD; unset UKC_EXEC_CMD; eval "$c"'],
                cwd=WORKSPACE,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
            )
        except (OSError, ValueError) as exc:  # ValueError: NUL byte in cmd
            self._json(500, {"error": str(exc)})
            return
        self._json(
            200,
            {
                "stdout": proc.stdout.decode("utf-8", "replace"),
                "stderr": proc.stderr.decode("utf-8", "replace"),
                "code": proc.returncode,
            },
        )

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _route  # noqa: N815


# --------------------------------------------------------------------------- plugin API


def _os_message(exc: OSError) -> str:
    """Rust-style error text, as the real plugin reports it: `Is a directory (os error 21)`."""
    if exc.errno is None:
        return str(exc)
    return f"{exc.strerror or os.strerror(exc.errno)} (os error {exc.errno})"


def _parse_signal(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 < value < signal.NSIG else None
    if isinstance(value, str):
        name = value.strip().upper()
        if name.isdigit():
            return _parse_signal(int(name))
        if not name.startswith("SIG"):
            name = "SIG" + name
        sig = getattr(signal.Signals, name, None) if name.isidentifier() else None
        return int(sig) if isinstance(sig, signal.Signals) else None
    return None


class _Command:
    """One command started through the plugin API, with its collected output."""

    def __init__(
        self, cmdline: str | list[str], cwd: str | None, env: dict[str, str] | None
    ) -> None:
        self.uuid = str(uuid.uuid4())
        self.cmdline = cmdline
        self.cwd = cwd
        self.env = env
        self.lock = threading.Lock()
        self.out = bytearray()
        self.err = bytearray()
        self.exitcode: int | None = None
        self.done = threading.Event()
        self.logs_deleted = False
        self.stdin_closed = False
        argv = ["sh", "-c", cmdline] if isinstance(cmdline, str) else list(cmdline)
        full_env = dict(os.environ)
        full_env.update(env or {})
        # why: a new session lets a signal reach the whole command tree (sh and its children)
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd or WORKSPACE,
            env=full_env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._readers:
            t.start()
        threading.Thread(target=self._wait, daemon=True).start()

    def _read(self, stream: Any, buf: bytearray) -> None:
        fd = stream.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            with self.lock:
                if not self.logs_deleted and len(buf) < MAX_LOG:
                    buf += data[: MAX_LOG - len(buf)]
        stream.close()

    def _wait(self) -> None:
        code = self.proc.wait()
        # why: output written just before exit must be collected before a wait answers, but a
        # background child holding the pipe open must not block the exit code forever
        for t in self._readers:
            t.join(timeout=1.0)
        with self.lock:
            self.exitcode = code
        self.done.set()

    def describe(self) -> dict[str, object]:
        return {
            "uuid": self.uuid,
            "cmdline": self.cmdline,
            "cwd": self.cwd,
            "env": self.env,
            "exitcode": self.exitcode,
        }


class _Plugin:
    """The command registry behind the plugin API; one per agent."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.commands: dict[str, _Command] = {}


_CMD_PATH = re.compile(r"^/commands/([0-9a-fA-F-]{1,64})(/.*)?$")


class _PluginHandler(_Handler):
    """UKC sandbox plugin API over HTTP/1.1 on a unix socket (ukc-api.md §11.2–§11.5)."""

    plugin: _Plugin

    def address_string(self) -> str:
        return "unix"

    def _ok(self, data: object) -> None:
        self._json(200, {"status": "success", "data": data, "op_time_us": self._us()})

    def _err(self, status: int, message: str) -> None:
        self._json(
            status,
            {
                "status": "error",
                "message": message,
                "errors": [{"status": status}],
                "data": None,
                "op_time_us": self._us(),
            },
        )

    def _us(self) -> int:
        return max(1, int((time.monotonic() - self._t0) * 1e6))

    def _route(self) -> None:
        self._t0 = time.monotonic()
        raw = self._body()
        if raw is None:
            return
        body: Any = None
        if raw.strip():
            try:
                body = json.loads(raw)
            except ValueError:
                self._err(400, "invalid json body")
                return
        path = self.path.split("?", 1)[0]
        method = self.command
        try:
            if path == "/commands" and method == "GET":
                with self.plugin.lock:
                    self._ok({"commands": list(self.plugin.commands)})
            elif path == "/commands" and method == "POST":
                self._start(body)
            elif path.startswith("/fs/") and method == "POST":
                self._fs(path[4:], body)
            elif (m := _CMD_PATH.match(path)) is not None:
                self._command(m.group(1), m.group(2) or "", method, body)
            else:
                self._send(404, b"")
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as exc:  # why: one bad request must not kill the plugin server
            self._err(500, f"internal error: {type(exc).__name__}")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _route  # noqa: N815

    # ---- commands

    def _start(self, body: Any) -> None:
        if not isinstance(body, dict):
            self._err(400, "body must be an object")
            return
        cmd = body.get("cmd")
        cwd = body.get("cwd")
        env = body.get("env")
        if isinstance(cmd, list):
            if not cmd or not all(isinstance(a, str) for a in cmd):
                self._err(400, "cmd must be a non-empty list of strings")
                return
        elif not isinstance(cmd, str):
            self._err(400, "cmd must be a string or a list of strings")
            return
        if cwd is not None and not isinstance(cwd, str):
            self._err(400, "cwd must be a string")
            return
        if env is not None and not (
            isinstance(env, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
        ):
            self._err(400, "env must map strings to strings")
            return
        try:
            command = _Command(cmd, cwd, env)
        except FileNotFoundError as exc:
            if isinstance(cmd, list) and exc.filename == cmd[0]:
                self._err(400, f"program not found: {cmd[0]}")
            else:
                self._err(500, _os_message(exc))
            return
        except OSError as exc:
            self._err(500, _os_message(exc))
            return
        except ValueError as exc:  # why: a NUL byte in cmd, cwd or env
            self._err(400, str(exc))
            return
        with self.plugin.lock:
            self.plugin.commands[command.uuid] = command
        self._ok({"uuid": command.uuid})

    def _command(self, cid: str, rest: str, method: str, body: Any) -> None:
        with self.plugin.lock:
            command = self.plugin.commands.get(cid)
        if command is None:
            self._send(404, b"")
            return
        if rest == "" and method == "GET":
            self._ok(command.describe())
        elif rest == "" and method == "DELETE":
            if not command.done.is_set():
                self._err(409, f"command {cid} is still running")
                return
            with self.plugin.lock:
                self.plugin.commands.pop(cid, None)
            self._ok(None)
        elif rest == "/logs" and method == "GET":
            self._logs(command, body)
        elif rest == "/logs" and method == "DELETE":
            with command.lock:
                command.logs_deleted = True
                command.out.clear()
                command.err.clear()
            self._close_stdin(command)
            self._ok(None)
        elif rest.startswith("/logs/raw/") and method == "GET":
            self._raw_logs(command, rest[len("/logs/raw/") :])
        elif rest == "/stdin" and method == "POST":
            self._stdin(command, body)
        elif rest == "/signal" and method == "POST":
            sig = _parse_signal(body.get("signal") if isinstance(body, dict) else None)
            if sig is None:
                self._err(400, "unknown signal")
                return
            if not command.done.is_set():
                try:
                    os.killpg(command.proc.pid, sig)
                except OSError:
                    with contextlib.suppress(OSError):
                        command.proc.send_signal(sig)
            self._ok(None)
        elif rest == "/wait" and method == "POST":
            command.done.wait()
            self._ok(None)
        elif rest == "/wait_timeout" and method == "POST":
            timeout = body.get("timeout_s") if isinstance(body, dict) else None
            if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout < 0:
                self._err(400, "timeout_s must be a non-negative number")
                return
            if command.done.wait(float(timeout)):
                self._ok(None)
            else:
                self._err(408, f"command {cid} still running after {timeout} s")
        else:
            self._send(404, b"")

    def _close_stdin(self, command: _Command) -> None:
        with command.lock:
            command.stdin_closed = True
        if command.proc.stdin is not None:
            with contextlib.suppress(OSError):
                command.proc.stdin.close()

    def _logs(self, command: _Command, body: Any) -> None:
        if command.logs_deleted:
            self._send(410, b"")
            return
        ranges: dict[str, tuple[int, int | None]] = {"stdout": (0, None), "stderr": (0, None)}
        if body is not None:
            if not isinstance(body, dict):
                self._err(400, "body must be an object")
                return
            for name in ranges:
                spec = body.get(name)
                off = spec.get("offset") if isinstance(spec, dict) else None
                lim = spec.get("limit") if isinstance(spec, dict) else None
                if (
                    not isinstance(off, int)
                    or off < 0
                    or (lim is not None and (not isinstance(lim, int) or lim < 0))
                ):
                    self._err(400, f"{name} needs a non-negative offset and limit")
                    return
                ranges[name] = (off, lim)
        with command.lock:
            data: dict[str, object] = {}
            for name, buf in (("stdout", command.out), ("stderr", command.err)):
                off, lim = ranges[name]
                end = len(buf) if lim is None else min(len(buf), off + lim)
                data[name] = base64.b64encode(bytes(buf[off:end])).decode()
                data[f"{name}_available"] = len(buf)
        self._ok(data)

    def _raw_logs(self, command: _Command, stream: str) -> None:
        if stream not in ("stdout", "stderr"):
            self._send(404, b"")
            return
        if command.logs_deleted:
            self._send(410, b"")
            return
        with command.lock:
            data = bytes(command.out if stream == "stdout" else command.err)
        total = len(data)
        header = self.headers.get("Range")
        if header is None:
            self._send(200, data, "application/octet-stream")
            return
        m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
        start: int
        end: int
        if m is None or (m.group(1) == "" and m.group(2) == ""):
            self._send(416, b"", "application/octet-stream", {"Content-Range": f"bytes */{total}"})
            return
        if m.group(1) == "":
            suffix = int(m.group(2))
            start, end = max(0, total - suffix), total - 1
            ok = suffix > 0 and total > 0
        else:
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else total - 1
            end = min(end, total - 1)
            ok = start < total and start <= end
        if not ok:
            self._send(416, b"", "application/octet-stream", {"Content-Range": f"bytes */{total}"})
            return
        self._send(
            206,
            data[start : end + 1],
            "application/octet-stream",
            {"Content-Range": f"bytes {start}-{end}/{total}"},
        )

    def _stdin(self, command: _Command, body: Any) -> None:
        if command.logs_deleted:
            self._send(410, b"")
            return
        if not isinstance(body, dict) or not isinstance(body.get("data"), str):
            self._err(400, "data must be a base64 string")
            return
        try:
            data = base64.b64decode(body["data"], validate=True)
        except (binascii.Error, ValueError):
            self._err(400, "data is not valid base64")
            return
        eof = body.get("eof") is True
        if command.stdin_closed:
            self._err(400, "stdin is already closed")
            return
        stdin = command.proc.stdin
        if data and stdin is not None:
            try:
                stdin.write(data)
                stdin.flush()
            except OSError as exc:
                self._err(500, _os_message(exc))
                return
        if eof:
            self._close_stdin(command)
        self._ok(None)

    # ---- files

    def _fs(self, op: str, body: Any) -> None:
        if not isinstance(body, dict) or not isinstance(body.get("path"), str):
            self._err(400, "path must be a string")
            return
        path: str = body["path"]
        if not path.startswith("/"):
            self._err(400, f"path {path} must be absolute")
            return
        if op == "mkdir":
            try:
                if body.get("parents") is True:
                    os.makedirs(path, exist_ok=True)
                else:
                    os.mkdir(path)
            except OSError as exc:
                self._err(500, _os_message(exc))
                return
            self._ok(None)
        elif op == "read":
            try:
                with open(path, "rb") as f:
                    contents = f.read()
            except OSError as exc:
                self._err(500, _os_message(exc))
                return
            self._ok({"contents": base64.b64encode(contents).decode()})
        elif op == "read_raw":
            try:
                with open(path, "rb") as f:
                    contents = f.read()
            except FileNotFoundError:
                self._send(404, b"")
                return
            except OSError as exc:
                self._err(500, _os_message(exc))
                return
            self._send(200, contents, "application/octet-stream")
        elif op in ("write", "upload"):
            self._write(op, path, body)
        else:
            self._send(404, b"")

    def _write(self, op: str, path: str, body: dict[str, Any]) -> None:
        encoding = body.get("encoding", "utf-8")
        data = body.get("data")
        if not isinstance(data, str):
            self._err(400, "data must be a string")
            return
        if encoding == "utf-8":
            payload = data.encode("utf-8")
        elif encoding == "base64":
            try:
                payload = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                self._err(400, "data is not valid base64")
                return
        else:
            self._err(400, f"unknown encoding {encoding}")
            return
        target = path
        append = body.get("append") is True
        if op == "upload":
            filename = body.get("filename")
            if not isinstance(filename, str) or not filename or "/" in filename:
                self._err(400, "filename must be a plain file name")
                return
            if body.get("parents") is True:
                parent = path if path.endswith("/") else os.path.dirname(path)
                try:
                    os.makedirs(parent or "/", exist_ok=True)
                except OSError as exc:
                    self._err(500, _os_message(exc))
                    return
            if path.endswith("/") or os.path.isdir(path):
                target = os.path.join(path, filename)
            append = False
        try:
            with open(target, "ab" if append else "wb") as f:
                f.write(payload)
        except OSError as exc:
            self._err(500, _os_message(exc))
            return
        self._ok(None)


class _UnixHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer on an already listening unix socket inherited from the runtime."""

    address_family = socket.AF_UNIX
    daemon_threads = True

    def __init__(self, sock: socket.socket, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__("", handler, bind_and_activate=False)  # type: ignore[arg-type]
        self.socket.close()
        self.socket = sock

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)


class _ExecServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


# --------------------------------------------------------------------------- boot


def _write(path: str, data: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def _listening(port: int) -> bool:
    """Whether 127.0.0.1:`port` is in LISTEN state in this network namespace.

    Reading /proc/net/tcp instead of connecting keeps sshd from logging a dropped connection
    on every boot; a listening socket queues connections, so sshd is accepting from here on.
    """
    want = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) > 3 and fields[1] == want and fields[3] == "0A":
                    return True
    except OSError:
        pass
    return False


def _wait_accepting(port: int, sshd: subprocess.Popen[bytes], deadline: float) -> bool:
    while time.monotonic() < deadline:
        if sshd.poll() is not None:
            return False
        if _listening(port):
            return True
        time.sleep(0.005)
    return False


def _load_env(fd: int) -> None:
    """The instance env (a JSON object on `fd`) becomes this process's environment.

    It comes through a pipe, not bwrap's environment, so nothing on the host side of the
    sandbox ever runs with it (secret values, or an `LD_PRELOAD` aimed at the host).
    """
    with os.fdopen(fd, "rb") as f:
        env = json.loads(f.read())
    if not isinstance(env, dict):
        raise ValueError("the env pipe must carry a JSON object")
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in env.items()})


def _limit(max_procs: int, max_data: int) -> None:
    """The rlimit fallback (no usable cgroups): set before anything else of the sandbox runs.

    Soft and hard alike: raising a hard limit needs CAP_SYS_RESOURCE in the host's user
    namespace, which nothing in the sandbox has. RLIMIT_NPROC counts the processes of the
    sandbox's user inside this user namespace only.
    """
    if max_procs:
        resource.setrlimit(resource.RLIMIT_NPROC, (max_procs, max_procs))
    if max_data:
        # why: thread stacks count as data; the agent's many small threads need little
        threading.stack_size(1024 * 1024)
        resource.setrlimit(resource.RLIMIT_DATA, (max_data, max_data))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ukc-agent")
    ap.add_argument("--status-fd", type=int, required=True)
    ap.add_argument("--plugin-fd", type=int, required=True)
    ap.add_argument("--relay-fd", type=int, required=True)
    ap.add_argument("--env-fd", type=int, required=True)
    ap.add_argument("--host-key", required=True)
    ap.add_argument("--max-procs", type=int, default=0)
    ap.add_argument("--max-data", type=int, default=0)
    args = ap.parse_args(argv)
    if args.max_procs or args.max_data:
        _limit(args.max_procs, args.max_data)

    _load_env(args.env_fd)
    boot_id = str(uuid.uuid4())
    os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
    _write(f"{RUN_DIR}/boot_id", boot_id + "\n", 0o644)
    # why: sshd reads the key as the sandbox user; the value never leaves this 0600 file
    _write(f"{RUN_DIR}/authorized_keys", os.environ.get("PUBKEY", "").strip() + "\n", 0o600)
    _write(
        f"{RUN_DIR}/sshd_config",
        SSHD_CONFIG.format(host_key=args.host_key, run=RUN_DIR),
        0o644,
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)

    plugin_sock = socket.socket(fileno=args.plugin_fd)
    relay_sock = socket.socket(fileno=args.relay_fd)
    plugin_handler = type("PluginHandler", (_PluginHandler,), {"plugin": _Plugin()})
    servers: list[ThreadingHTTPServer] = [_UnixHTTPServer(plugin_sock, plugin_handler)]
    try:
        servers.append(_ExecServer(("127.0.0.1", EXEC_PORT), _ExecHandler))
    except OSError as exc:
        _log(f"exec api cannot listen on {EXEC_PORT}: {exc.strerror}")
        return 1
    for srv in servers:
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    threading.Thread(target=_serve_relay, args=(relay_sock,), daemon=True).start()

    sshd_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    try:
        sshd = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", f"{RUN_DIR}/sshd_config", "-p", str(SSH_PORT)],
            env=sshd_env,
            stdin=subprocess.DEVNULL,
        )
    except OSError as exc:
        _log(f"sshd failed to start: {_os_message(exc)}")
        return 1

    def _terminate(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            sshd.terminate()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)

    if not _wait_accepting(SSH_PORT, sshd, time.monotonic() + READY_DEADLINE_S):
        _log(f"sshd not accepting on {SSH_PORT} (exit code {sshd.poll()})")
        sshd.kill()
        return 1
    with contextlib.suppress(OSError):
        os.write(args.status_fd, f"ready {boot_id}\n".encode())
        os.close(args.status_fd)
    code = sshd.wait()
    _log(f"sshd exited with code {code}")
    return 1 if code == 0 else (code if code > 0 else 128 - code)


if __name__ == "__main__":
    sys.exit(main())
