"""What the runtime hands a sandbox: pipes that already hold their data, listening sockets.

Everything the agent needs comes as an inherited file descriptor (the instance env, bwrap's
options, the plugin and relay sockets), so the sandbox is never given a host path to write.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from reconciler.errors import LocalMetroError

__all__ = ["listen_unix", "pipe_with"]

_PIPE_MAX = 60000


def pipe_with(data: bytes) -> int:
    """The read end of a pipe that holds `data` and is closed for writing."""
    if len(data) > _PIPE_MAX:
        raise LocalMetroError(f"sandbox setup of {len(data)} bytes exceeds a pipe buffer")
    r, w = os.pipe()
    try:
        os.write(w, data)
    except OSError:
        os.close(r)
        raise
    finally:
        os.close(w)
    return r


def listen_unix(path: Path) -> socket.socket:
    """A unix socket listening at `path` (0600), replacing whatever was there."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock
