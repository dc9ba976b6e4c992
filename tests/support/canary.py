"""Canary secrets: values that must never appear in any output, file, status, log or exception.

A test puts them where a user puts real secrets (`UKC_TOKEN`, a `secret_env` variable) and,
after running what it tests, calls `assert_nowhere` over everything `ukc` printed or wrote.
Encoded forms are searched too (base64 at any alignment, hex, URL encoding): a leak is a leak
in any form.
"""

from __future__ import annotations

import base64
import os
import secrets
import stat
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Canaries", "assert_nowhere", "forms"]

#: files larger than this are read only up to it (sandbox workspaces are never scanned)
_READ_CAP = 64 * 1024 * 1024


@dataclass(frozen=True)
class Canaries:
    """A fake cloud token and a fake secret value, fresh per test session."""

    token: str
    secret: str

    @classmethod
    def fresh(cls) -> Canaries:
        return cls(
            token="ukcTOKENcanary" + secrets.token_hex(12),
            secret="ukcSECRETcanary" + secrets.token_hex(12),
        )

    def values(self) -> tuple[str, str]:
        return (self.token, self.secret)


def forms(value: str) -> set[bytes]:
    """Byte strings whose presence anywhere means `value` leaked."""
    raw = value.encode()
    found = {
        raw,
        raw.hex().encode(),
        raw.hex().upper().encode(),
        urllib.parse.quote(value, safe="").encode(),
    }
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        # the value at byte offset 0, 1 or 2 (mod 3) inside a longer encoded text: the
        # characters that depend only on the value's own bytes
        for shift in range(3):
            text = encode(b"\0" * shift + raw)
            start = 4 if shift else 0
            found.add(text[start:-4])
    return {f for f in found if len(f) >= 16}


def _files(root: Path) -> Iterable[Path]:
    if root.is_file():
        yield root
        return
    for top, dirs, names in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(top, d))]
        for name in names:
            yield Path(top, name)


def assert_nowhere(
    canaries: Canaries,
    *,
    texts: Iterable[str | bytes] = (),
    paths: Iterable[Path] = (),
) -> None:
    """Fail, naming the place, if a canary (in any form) is in `texts` or under `paths`."""
    wanted = [(which, f) for which in canaries.values() for f in forms(which)]

    def check(blob: bytes, where: str) -> None:
        for which, form in wanted:
            if form in blob:
                kind = "token" if which == canaries.token else "secret"
                raise AssertionError(f"canary {kind} found in {where}")

    for index, text in enumerate(texts):
        check(text.encode() if isinstance(text, str) else text, f"text #{index}")
    for root in paths:
        if not root.exists():
            continue
        for path in _files(root):
            try:
                mode = os.lstat(path).st_mode
                if not stat.S_ISREG(mode):
                    continue
                with open(path, "rb") as f:
                    blob = f.read(_READ_CAP)
            except OSError:
                continue
            check(blob, str(path))
