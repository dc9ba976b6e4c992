"""Names checked one way everywhere: metro codes, environment variable names, DNS labels.

A metro is named `local` (the emulator), by a code (`fra`, `dal`, and the older `fra0`), or by
the URL of its API; the official API of a code lives at `https://api.<code>.unikraft.cloud`.
"""

from __future__ import annotations

import re
from typing import Literal

__all__ = [
    "MetroKind",
    "is_dns_label",
    "is_env_name",
    "is_metro_code",
    "metro_kind",
    "official_metro_code",
]

MetroKind = Literal["local", "code", "url"]

_METRO_CODE = re.compile(r"[a-z]{2,5}[0-9]?")
_OFFICIAL_API_HOST = re.compile(rf"api\.({_METRO_CODE.pattern})\.unikraft\.cloud")
#: a shell variable name (what `export NAME=...` accepts)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


def is_metro_code(value: str) -> bool:
    return _METRO_CODE.fullmatch(value) is not None


def metro_kind(value: str) -> MetroKind | None:
    """What a metro name is; None when it is none of them. A URL is only recognised by its
    scheme here: what else it may hold is the caller's rule."""
    if value == "local":
        return "local"
    if is_metro_code(value):
        return "code"
    if value.startswith(("http://", "https://")):
        return "url"
    return None


def official_metro_code(host: str) -> str | None:
    """The metro code of an official API host name (`api.fra.unikraft.cloud` → `fra`)."""
    found = _OFFICIAL_API_HOST.fullmatch(host)
    return found.group(1) if found else None


def is_env_name(value: str) -> bool:
    return _ENV_NAME.fullmatch(value) is not None


def is_dns_label(value: str, max_len: int = 63) -> bool:
    """Lowercase letters, digits and inner '-', at most `max_len` characters."""
    return len(value) <= max_len and _DNS_LABEL.fullmatch(value) is not None
