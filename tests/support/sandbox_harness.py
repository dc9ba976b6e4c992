"""Real sandboxes and the TLS edge without the daemon, for tests that drive them directly.

`LoopThread` runs an asyncio loop in a background thread so a test can call blocking client
tools (ssh, rsync, curl, openssl) while the runtime and the edge serve. `EdgeHarness` wires a
`SandboxRuntime`, a `CertificateAuthority` and an `Edge` in a tmp state dir, with a table of
routes.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest

from reconciler.local.ca import CertificateAuthority
from reconciler.local.edge import Edge, Route
from reconciler.local.sandbox.layout import SandboxLayout
from reconciler.local.sandbox.runtime import SandboxRuntime
from tests.support.workflow import curl_argv, make_key, rsync_argv, ssh_argv

__all__ = ["APP_DOMAIN", "EdgeHarness", "LoopThread", "needs_metro_tools"]

T = TypeVar("T")

APP_DOMAIN = "local.ukc.localhost"

needs_metro_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("bwrap", "ssh", "openssl", "rsync", "curl"))
    or not Path("/usr/sbin/sshd").exists(),
    reason="needs bubblewrap, openssh-server/client, openssl, rsync and curl",
)


def drop_control_dirs(layout: SandboxLayout) -> None:
    """Remove a layout's control dirs whatever they hold: what a runtime never closed, or a
    killed daemon, left there (outside the test's tmp dir when a memory file system holds
    them)."""
    shutil.rmtree(layout.control_dir("any-uuid").parent, ignore_errors=True)


class LoopThread:
    """An asyncio loop in a daemon thread; `run` submits a coroutine and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class EdgeHarness:
    """Runtime + CA + edge over a tmp state dir, with `routes[fqdn] = Route`."""

    def __init__(self, root: Path, **runtime_options: Any) -> None:
        self.root = root
        self.state = root / "state"
        self.state.mkdir(parents=True, exist_ok=True)
        self.key = make_key(root)
        self.pubkey = (root / "id_ed25519.pub").read_text().strip()
        self.lt = LoopThread()
        self.exits: list[tuple[str, int, bool]] = []
        self.exit_event = threading.Event()
        self.activity: list[tuple[str, int]] = []
        self.routes: dict[tuple[str, int], Route] = {}
        self.drop = False
        self.resolved: list[tuple[str, int]] = []
        self.wakers: dict[str, Any] = {}
        self.runtime = SandboxRuntime(self.state, self._on_exit, **runtime_options)
        self.ca = CertificateAuthority.load_or_create(self.state / "ca", APP_DOMAIN)

        async def make_edge() -> Edge:
            return Edge(
                ca=self.ca,
                runtime=self.runtime,
                resolve=self._resolve,
                on_activity=lambda uuid, delta: self.activity.append((uuid, delta)),
                should_drop=lambda: self.drop,
            )

        self.edge = self.lt.run(make_edge())
        self.p2222 = self.lt.run(self.edge.open_port(2222))
        self.p443 = self.lt.run(self.edge.open_port(443))

    def _on_exit(self, uuid: str, code: int, out_of_memory: bool) -> None:
        self.exits.append((uuid, code, out_of_memory))
        self.exit_event.set()

    async def _resolve(self, sni: str, port: int) -> Route | None:
        self.resolved.append((sni, port))
        route = self.routes.get((sni, port))
        if route is not None and route.uuid in self.wakers:
            # why: like the daemon, resolve only schedules the wake; the edge retries meanwhile
            waker = self.wakers.pop(route.uuid)
            asyncio.get_running_loop().create_task(waker())
        return route

    @staticmethod
    def fqdn(name: str) -> str:
        return f"{name}.{APP_DOMAIN}"

    def start(
        self, uuid: str, name: str, env: dict[str, str] | None = None, memory_mb: int = 128
    ) -> str:
        """Boot a sandbox and route `<name>.local.ukc.localhost` 2222→2222, 443→8080 to it."""
        full_env = {"PUBKEY": self.pubkey, **(env or {})}
        boot = self.lt.run(self.runtime.start(uuid, env=full_env, memory_mb=memory_mb))
        self.routes[(self.fqdn(name), 2222)] = Route(uuid, 2222)
        self.routes[(self.fqdn(name), 443)] = Route(uuid, 8080)
        return boot

    def ssh(self, name: str, command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ssh_argv(self.key, self.p2222, self.fqdn(name), self.ca.cert_path, command),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def rsync(self, src: str, dst: str, name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            rsync_argv(self.key, self.p2222, self.fqdn(name), self.ca.cert_path, src, dst),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def curl(self, name: str, path: str, *extra: str) -> tuple[int, str]:
        """(HTTP status, body) of an HTTPS request through the edge's 443 listener."""
        out = subprocess.run(
            curl_argv(self.ca.cert_path, self.p443, self.fqdn(name), path, *extra),
            capture_output=True,
            text=True,
            timeout=30,
        )
        body, _, code = out.stdout.rpartition("\n")
        return int(code or 0), body

    def close(self) -> None:
        self.lt.run(self.edge.close())
        self.lt.run(self.runtime.close())
        self.lt.close()
