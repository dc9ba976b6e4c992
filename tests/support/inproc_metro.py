"""The local metro's API app over a `LocalMetro` with a fake runtime, served in-process.

For behaviour a real sandbox cannot be made to show on demand (a sandbox that crashes by
itself, slow boots, boot failures): `InProcessMetro` serves the real aiohttp app from a
background event loop; `FakeRuntime` is the runtime interface with no sandboxes behind it.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import httpx
from aiohttp import web

from reconciler.errors import LocalMetroError
from reconciler.local.api.app import create_app
from reconciler.local.behaviour import BootOptions
from reconciler.local.faults import Faults
from reconciler.local.sandbox.layout import Mount
from reconciler.local.state.lifecycle import LocalMetro
from reconciler.local.state.validation import MetroLimits

__all__ = ["FakeRuntime", "InProcessMetro", "unique"]

T = TypeVar("T")


def unique(prefix: str = "t") -> str:
    """A fresh instance name (DNS label)."""
    return f"{prefix}-{uuidlib.uuid4().hex[:10]}"


class FakeRuntime:
    """The runtime interface with no sandboxes behind it; `crash()` makes one exit by itself."""

    def __init__(self, boot_delay_s: float = 0.02) -> None:
        self.boot_delay_s = boot_delay_s
        self.running: set[str] = set()
        self.frozen: set[str] = set()
        self.starts: list[str] = []
        self.destroyed: list[str] = []
        self.on_exit: Callable[[str, int, bool], None] = lambda u, c, m: None
        self.fail_next_start = False
        #: how long a freeze takes (a real one waits for the cgroup's processes to stop)
        self.freeze_delay_s = 0.0
        #: how long a freeze holds the event loop before it first waits (a real one lists the
        #: sandbox's processes and stops each one on the loop)
        self.freeze_block_s = 0.0
        #: when each freeze's first pass (its hold of the loop) ended, `time.monotonic()`
        self.first_passes: list[float] = []
        #: set: a freeze waits for it before it ends (what else the metro does meanwhile)
        self.freeze_gate: threading.Event | None = None
        #: the sandboxes whose freeze has begun
        self.freezing: set[str] = set()
        #: the volumes each sandbox was last started with
        self.mounts: dict[str, list[Mount]] = {}
        self.removed_volumes: list[Path] = []

    async def start(
        self,
        uuid: str,
        *,
        env: dict[str, str],
        memory_mb: int,
        boot: BootOptions,
        volumes: list[Mount] | None = None,
    ) -> str:
        await asyncio.sleep(self.boot_delay_s)
        self.mounts[uuid] = list(volumes or [])
        if self.fail_next_start:
            self.fail_next_start = False
            raise LocalMetroError(f"sandbox {uuid} did not boot")
        self.running.add(uuid)
        self.starts.append(uuid)
        return uuidlib.uuid4().hex

    async def stop(self, uuid: str) -> None:
        self.running.discard(uuid)
        self.frozen.discard(uuid)

    async def freeze(self, uuid: str) -> None:
        self.freezing.add(uuid)
        time.sleep(self.freeze_block_s)
        self.first_passes.append(time.monotonic())
        await asyncio.sleep(self.freeze_delay_s)
        if self.freeze_gate is not None:
            await asyncio.to_thread(self.freeze_gate.wait, 30)
        self.frozen.add(uuid)

    async def thaw(self, uuid: str) -> None:
        self.frozen.discard(uuid)

    async def destroy(self, uuid: str) -> None:
        await self.stop(uuid)
        self.destroyed.append(uuid)

    async def prune(self, keep: Iterable[str]) -> list[str]:
        return []

    async def remove_volume(self, source: Path) -> None:
        self.removed_volumes.append(source)

    def is_running(self, uuid: str) -> bool:
        return uuid in self.running

    def plugin_socket(self, uuid: str) -> Path:
        return Path("/nonexistent") / uuid

    def console(self, uuid: str) -> bytes:
        return b"fake console\n" if uuid in self.running else b""

    async def close(self) -> None:
        self.running.clear()

    def crash(self, uuid: str, code: int, out_of_memory: bool = False) -> None:
        self.running.discard(uuid)
        self.on_exit(uuid, code, out_of_memory)


class InProcessMetro:
    """The API app over a LocalMetro with a fake runtime, on a background loop thread."""

    token = "test-token"

    def __init__(self, state_dir: Path, limits: MetroLimits | None = None) -> None:
        self.state_dir = state_dir
        self.runtime = FakeRuntime()
        self.faults = Faults()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.metro: LocalMetro = self.call(self._make(limits))
        self.runtime.on_exit = self.metro.on_exit
        self._runner: web.AppRunner | None = None
        self.url = self.call(self._serve())

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout=30)

    async def _make(self, limits: MetroLimits | None) -> LocalMetro:
        metro = LocalMetro(self.state_dir, self.runtime, limits=limits, save_delay_s=0.01)
        metro.bind_loop(asyncio.get_running_loop())
        metro.load()
        await metro.resume()
        return metro

    async def _serve(self) -> str:
        app = create_app(self.metro, self.faults, self.token, shutdown=lambda: None)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30.0
        )

    def crash(self, uuid: str, code: int, out_of_memory: bool = False) -> None:
        self.loop.call_soon_threadsafe(self.runtime.crash, uuid, code, out_of_memory)

    def close(self) -> None:
        async def shutdown() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
            await self.metro.close()

        self.call(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()
