"""Human sizes ("512MiB", "2GiB", "1.5GB", or a plain number of bytes) for spec fields such
as `sync.back_max_bytes`.

`spec.py` feeds it the raw YAML values; the sync engine gets plain `int` bytes. Pure: no I/O.
Units: B; kB/KB, MB, GB, TB (powers of 1000); KiB, MiB, GiB, TiB (powers of 1024). The unit
must be written as shown (up to the case of the leading k), since "mb" or "Mb" would be a guess.
"""

from __future__ import annotations

import re

__all__ = ["MAX_SIZE", "SizeError", "format_size", "human_size", "parse_size"]

_UNITS: dict[str, int] = {
    "B": 1,
    "kB": 1000,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "TiB": 1 << 40,
}
_SIZE_RE = re.compile(r"(?P<n>[0-9]{1,15}(?:\.[0-9]{1,6})?)\s?(?P<unit>[A-Za-z]{1,3})")

#: 1 PiB: more than any sandbox holds; also keeps numbers sane
MAX_SIZE = 1 << 50


class SizeError(ValueError):
    """The value is not a size we accept; `str()` is one lowercase line."""


def parse_size(value: object) -> int:
    """Bytes from "512MiB", "2GiB", "1.5GB", "100B" or a whole number of bytes.

    Raises `SizeError` for booleans, floats, zero, negatives, unknown units, fractions of a
    byte, or more than `MAX_SIZE`.
    """
    if isinstance(value, bool):
        raise SizeError("expected a size like 512MiB or 2GiB, got a boolean")
    if isinstance(value, int):
        return _check(value, str(value))
    if not isinstance(value, str):
        raise SizeError(f"expected a size like 512MiB or 2GiB, got {type(value).__name__}")
    text = value.strip()
    shown = _show(value)
    if text.isdigit() and len(text) <= 16:
        return _check(int(text), shown)
    match = _SIZE_RE.fullmatch(text) if len(text) <= 40 else None
    unit = match.group("unit") if match else ""
    if match is None or unit not in _UNITS:
        raise SizeError(
            f"invalid size {shown}: use a number of bytes or a number with a unit "
            f"({', '.join(_UNITS)}), e.g. 512MiB or 2GiB"
        )
    whole, _, frac = match.group("n").partition(".")
    scale = _UNITS[unit]
    # exact arithmetic: 1.5GB is 1,500,000,000 bytes, not a float's idea of it
    numerator = (int(whole) * 10 ** len(frac) + int(frac or "0")) * scale
    count, rest = divmod(numerator, 10 ** len(frac))
    if rest:
        raise SizeError(f"size {shown} is not a whole number of bytes")
    return _check(count, shown)


def _check(count: int, shown: str) -> int:
    if count <= 0:
        raise SizeError(f"a size must be positive, got {shown}")
    if count > MAX_SIZE:
        raise SizeError(f"size {shown} is too large (max 1PiB)")
    return count


def format_size(count: int) -> str:
    """The shortest exact binary form: 1073741824 -> "1GiB", 1500 -> "1500B"."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        scale = _UNITS[unit]
        if count >= scale and count % scale == 0:
            return f"{count // scale}{unit}"
    return f"{count}B"


def human_size(count: int) -> str:
    """A size for people, in one style everywhere (IEC units): 900 -> "900 B",
    157300293 -> "150.0 MiB"."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _show(value: str) -> str:
    # why: user text goes into one-line error messages; repr escapes newlines, the cut
    # keeps a 2 MB scalar from becoming a 2 MB message
    return repr(value if len(value) <= 40 else value[:37] + "...")
