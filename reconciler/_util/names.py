"""Names checked one way everywhere: metro codes, environment variable names, DNS labels.

A metro is named `local` (the emulator), by a code (`fra`, `dal`, and the older `fra0`), or by
the URL of its API; the official API of a code lives at `https://api.<code>.unikraft.cloud`.
The codes are the platform's list (`KNOWN_METRO_CODES`): a word shaped like a code that is not
on it (`mars`) is an unknown metro, said so, rather than a host name to send the token to. A
metro the list does not know yet is reached by its URL (`UKC_METRO`).
"""

from __future__ import annotations

import re
from typing import Literal

__all__ = [
    "KNOWN_METRO_CODES",
    "MetroKind",
    "is_dns_label",
    "is_env_name",
    "is_metro_code",
    "metro_kind",
    "official_metro_code",
    "unknown_metro_message",
]

MetroKind = Literal["local", "code", "url"]

#: the platform's metros: current ones first, then the older `*.kraft.cloud` era's
KNOWN_METRO_CODES: tuple[str, ...] = (
    "fra",
    "dal",
    "sin",
    "was",
    "sfo",
    "fra0",
    "dal0",
    "sin0",
    "was1",
)

_METRO_CODE = re.compile(r"[a-z]{2,5}[0-9]?")
_OFFICIAL_API_HOST = re.compile(rf"api\.({_METRO_CODE.pattern})\.unikraft\.cloud")
#: a shell variable name (what `export NAME=...` accepts)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


def is_metro_code(value: str) -> bool:
    return value in KNOWN_METRO_CODES


def unknown_metro_message(value: str) -> str | None:
    """For a word shaped like a metro code that is none (`mars`): what to say; else None."""
    if _METRO_CODE.fullmatch(value) is None or value in KNOWN_METRO_CODES:
        return None
    return (
        f"unknown metro {value!r}: known metro codes are {', '.join(KNOWN_METRO_CODES)} "
        "(or 'local', or a metro's API URL)"
    )


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
    return found.group(1) if found and is_metro_code(found.group(1)) else None


def is_env_name(value: str) -> bool:
    return _ENV_NAME.fullmatch(value) is not None


def is_dns_label(value: str, max_len: int = 63) -> bool:
    """Lowercase letters, digits and inner '-', at most `max_len` characters."""
    return len(value) <= max_len and _DNS_LABEL.fullmatch(value) is not None
