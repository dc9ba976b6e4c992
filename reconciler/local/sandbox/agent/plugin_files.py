"""The file endpoints of the sandbox plugin API: `/fs/mkdir`, `read`, `read_raw`, `write`,
`upload`, acting as the agent (root of the sandbox) on absolute paths inside it."""

from __future__ import annotations

import base64
import binascii
import os
from typing import Any

from .console import os_message
from .httpd import EnvelopeHandler

__all__ = ["FileRoutes"]


class FileRoutes(EnvelopeHandler):
    """The `/fs/...` operations; the plugin handler routes to `_fs`."""

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
                self._err(500, os_message(exc))
                return
            self._ok(None)
        elif op == "read":
            try:
                with open(path, "rb") as f:
                    contents = f.read()
            except OSError as exc:
                self._err(500, os_message(exc))
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
                self._err(500, os_message(exc))
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
                    self._err(500, os_message(exc))
                    return
            if path.endswith("/") or os.path.isdir(path):
                target = os.path.join(path, filename)
            append = False
        try:
            with open(target, "ab" if append else "wb") as f:
                f.write(payload)
        except OSError as exc:
            self._err(500, os_message(exc))
            return
        self._ok(None)
