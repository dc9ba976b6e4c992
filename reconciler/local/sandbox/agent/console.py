"""What the agent says: lines on the sandbox console and OS error texts."""

from __future__ import annotations

import os
import sys

__all__ = ["log", "os_message", "suppress"]


def log(message: str) -> None:
    """One line on the sandbox console (the runtime keeps the last 64 KiB)."""
    sys.stderr.write(f"agent: {message}\n")
    sys.stderr.flush()


def os_message(exc: OSError) -> str:
    """Rust-style error text, as the real plugin reports it: `Is a directory (os error 21)`."""
    if exc.errno is None:
        return str(exc)
    return f"{exc.strerror or os.strerror(exc.errno)} (os error {exc.errno})"


class suppress:  # noqa: N801 (named as the contextlib one it stands for)
    """`contextlib.suppress` without contextlib, which loads functools and collections: the
    agent's imports are paid by every sandbox boot."""

    def __init__(self, *kinds: type[BaseException]) -> None:
        self._kinds = kinds

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, _value: object, _tb: object) -> bool:
        return kind is not None and issubclass(kind, self._kinds)
