"""The exec API of the original workflow's image: `POST /exec {"cmd": ...}` on port 8080."""

from __future__ import annotations

import json
import os
import subprocess

from .httpd import Handler

__all__ = ["WORKSPACE", "ExecHandler"]

WORKSPACE = "/workspace"


class ExecHandler(Handler):
    """`sh -lc CMD` in /workspace; the answer holds stdout, stderr and the exit code."""

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
