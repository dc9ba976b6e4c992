"""The UKC sandbox plugin API: commands (start, logs, stdin, signals, waits) and files.

Served over HTTP/1.1 on the inherited plugin socket, which the metro's plugin route relays
to; answers use UKC's envelope, errors the plugin's OS error texts.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import time
from typing import Any

from .commands import Command, Registry, parse_signal
from .console import os_message
from .plugin_files import FileRoutes

__all__ = ["PluginHandler"]

_CMD_PATH = re.compile(r"^/commands/([0-9a-fA-F-]{1,64})(/.*)?$")


class PluginHandler(FileRoutes):
    """UKC sandbox plugin API over HTTP/1.1 on a unix socket: commands and files."""

    plugin: Registry

    def address_string(self) -> str:
        return "unix"

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
            command = Command(cmd, cwd, env)
        except FileNotFoundError as exc:
            if isinstance(cmd, list) and exc.filename == cmd[0]:
                self._err(400, f"program not found: {cmd[0]}")
            else:
                self._err(500, os_message(exc))
            return
        except OSError as exc:
            self._err(500, os_message(exc))
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
            sig = parse_signal(body.get("signal") if isinstance(body, dict) else None)
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

    def _close_stdin(self, command: Command) -> None:
        with command.lock:
            command.stdin_closed = True
        if command.proc.stdin is not None:
            with contextlib.suppress(OSError):
                command.proc.stdin.close()

    def _logs(self, command: Command, body: Any) -> None:
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

    def _raw_logs(self, command: Command, stream: str) -> None:
        if stream not in ("stdout", "stderr"):
            self._send(404, b"")
            return
        if command.logs_deleted:
            self._send(410, b"")
            return
        header = self.headers.get("Range")
        m = None if header is None else re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
        # why copy only the range under the lock: the log may be hundreds of MiB, read in
        # pieces; a whole copy per piece would cost the sandbox's memory many times over
        with command.lock:
            buf = command.out if stream == "stdout" else command.err
            total = len(buf)
            whole = bytes(buf) if header is None else b""
            start: int
            end: int
            if header is None or m is None or (m.group(1) == "" and m.group(2) == ""):
                ok = False
                start = end = 0
            elif m.group(1) == "":
                suffix = int(m.group(2))
                start, end = max(0, total - suffix), total - 1
                ok = suffix > 0 and total > 0
            else:
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else total - 1
                end = min(end, total - 1)
                ok = start < total and start <= end
            data = bytes(buf[start : end + 1]) if ok else b""
        if header is None:
            self._send(200, whole, "application/octet-stream")
            return
        if not ok:
            self._send(416, b"", "application/octet-stream", {"Content-Range": f"bytes */{total}"})
            return
        self._send(
            206, data, "application/octet-stream", {"Content-Range": f"bytes {start}-{end}/{total}"}
        )

    def _stdin(self, command: Command, body: Any) -> None:
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
                self._err(500, os_message(exc))
                return
        if eof:
            self._close_stdin(command)
        self._ok(None)
