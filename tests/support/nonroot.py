"""A sandbox runtime and TLS edge run by a throwaway unprivileged user (the non-root daemon case).

Root only (it creates the user). `ssh(command)` runs a command in the sandbox the way the
workflow does (ssh through the edge); `destroy()` has the runtime destroy the sandbox;
leaving the context stops everything and removes the user and its files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

import pytest

from reconciler.local.behaviour import BootOptions
from tests.support.workflow import ssh_argv

__all__ = ["NonRootRuntime"]

REPO = Path(__file__).resolve().parents[2]
# why: the venv's interpreter lives under /root (0700); Debian's python3 with its
# python3-cryptography is what an unprivileged user can run here
PYTHON = "/usr/bin/python3"
UUID = "nonroot-uuid"
FQDN = "nonroot.local.ukc.localhost"

SCRIPT = """
import asyncio, json, sys
from pathlib import Path
from reconciler.local.behaviour import BootOptions
from reconciler.local.ca import CertificateAuthority
from reconciler.local.edge import Edge, Route
from reconciler.local.sandbox.runtime import SandboxRuntime

async def main() -> None:
    root = Path(sys.argv[1])
    rt = SandboxRuntime(root / "state", lambda u, c, m: None)
    ca = CertificateAuthority.load_or_create(root / "state" / "ca", "local.ukc.localhost")
    async def resolve(sni: str, port: int) -> Route | None:
        return Route(sys.argv[3], 2222)
    edge = Edge(ca=ca, runtime=rt, resolve=resolve, on_activity=lambda u, d: None,
                should_drop=lambda: False)
    port = await edge.open_port(2222)
    boot = BootOptions(**json.loads(sys.argv[4]))
    await rt.start(sys.argv[3], env={"PUBKEY": sys.argv[2]}, memory_mb=int(sys.argv[5]), boot=boot)
    print(port, ca.cert_path, flush=True)
    loop = asyncio.get_running_loop()
    while (line := await loop.run_in_executor(None, sys.stdin.readline)).strip() == "destroy":
        await rt.destroy(sys.argv[3])
        print("destroyed", flush=True)
    await edge.close()
    await rt.close()

asyncio.run(main())
"""


class NonRootRuntime:
    """Context manager: one sandbox of a runtime run by a fresh unprivileged user, booted
    with `boot` (the kind metro's, unless given) and `memory_mb`."""

    def __init__(self, tmp: Path, *, boot: BootOptions | None = None, memory_mb: int = 128) -> None:
        if os.geteuid() != 0:
            pytest.skip("creating a throwaway user needs root")
        if shutil.which("useradd") is None or shutil.which("runuser") is None:
            pytest.skip("needs useradd and runuser")
        self.tmp = tmp
        self.user = "ukcprobe" + secrets.token_hex(3)
        self.root = Path(tempfile.mkdtemp(prefix="ukc-nonroot-"))
        self.key = tmp / "nonroot-key" / "id"
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.ca = Path()
        self.uid = -1
        self.boot = boot or BootOptions()
        self.memory_mb = memory_mb

    @property
    def workspace(self) -> Path:
        return self.root / "state" / "workspaces" / UUID

    def __enter__(self) -> NonRootRuntime:
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", self.user], check=True)
        self.uid = pwd.getpwnam(self.user).pw_uid
        os.chown(self.root, self.uid, -1)
        self.key.parent.mkdir()
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True
        )
        script = self.root / "run.py"
        script.write_text(SCRIPT)
        pub = self.key.with_suffix(".pub").read_text().strip()
        self.proc = subprocess.Popen(
            [
                "runuser", "-u", self.user, "--", PYTHON, str(script), str(self.root), pub, UUID,
                json.dumps(dataclasses.asdict(self.boot)), str(self.memory_mb),
            ],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=str(REPO), env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.__exit__(None, None, None)
            raise AssertionError(f"non-root runtime did not start: {err}")
        port, ca = line.split()
        self.port, self.ca = int(port), Path(ca)
        return self

    def ssh(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ssh_argv(self.key, self.port, FQDN, self.ca, command),
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def destroy(self) -> None:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write("destroy\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "destroyed"

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self.proc is not None:
                try:
                    self.proc.communicate("quit\n", timeout=30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.communicate()
        finally:
            subprocess.run(["userdel", self.user], check=False, capture_output=True)
            shutil.rmtree(self.root, ignore_errors=True)
