"""What the instance lifecycle needs from the sandboxes: the `Runtime` it drives."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from reconciler.local.behaviour import BootOptions
from reconciler.local.sandbox.layout import Mount

__all__ = ["Runtime"]


class Runtime(Protocol):
    """What the metro needs from the sandbox runtime."""

    async def start(
        self,
        uuid: str,
        *,
        env: dict[str, str],
        memory_mb: int,
        boot: BootOptions,
        volumes: list[Mount] | None = None,
    ) -> str: ...

    async def remove_volume(self, source: Path) -> None: ...

    async def stop(self, uuid: str) -> None: ...

    async def freeze(self, uuid: str) -> None: ...

    async def thaw(self, uuid: str) -> None: ...

    async def destroy(self, uuid: str) -> None: ...

    async def prune(self, keep: Iterable[str]) -> list[str]: ...

    def is_running(self, uuid: str) -> bool: ...

    def plugin_socket(self, uuid: str) -> Path: ...

    def console(self, uuid: str) -> bytes: ...

    async def close(self) -> None: ...
