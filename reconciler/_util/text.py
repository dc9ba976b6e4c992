"""Untrusted text (from a sandbox, a remote, a crafted stream) made fit for one line of a
message: printable characters only, bounded."""

from __future__ import annotations

__all__ = ["one_line"]


def one_line(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, each unprintable one (newlines, escapes) shown as `?`."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])
