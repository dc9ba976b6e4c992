"""Untrusted text (from a sandbox, a remote, a crafted stream, a git error) made safe to show:
`escape_controls` keeps the text and makes every control character visible; `one_line` makes
it fit one bounded line of a message."""

from __future__ import annotations

import re

__all__ = ["escape_controls", "one_line"]

#: C0 and C1 controls, DEL, the Unicode line and paragraph separators, and the bidirectional
#: overrides and isolates. why the last: they reorder what a terminal or a web page shows, so
#: text from a sandbox could make a line read as something it does not say
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def escape_controls(text: str, *, keep: str = "") -> str:
    """`text` with each control character but those in `keep` (e.g. "\\n\\t") shown as a
    `\\xNN` or `\\uNNNN` escape, so it can neither drive a terminal nor hide what it says."""

    def escape(m: re.Match[str]) -> str:
        c = m.group()
        if c in keep:
            return c
        return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"

    return _CONTROLS.sub(escape, text)


def one_line(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, each unprintable one (newlines, escapes) shown as `?`."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])
