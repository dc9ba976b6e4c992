"""Human durations ("90s", "5m", "2h", "1h30m", "1d") for spec fields such as `ttl` and
command `timeout`.

`spec.py` feeds it the raw YAML values; the planner, executor and status writer use the
resulting `Duration` (an `int` of seconds, so arithmetic and timeouts need no conversion)
and `format_duration` to show it back. Pure: no I/O, no clock.
"""

from __future__ import annotations

import re

__all__ = ["MAX_DURATION_S", "Duration", "DurationError", "format_duration", "parse_duration"]

_UNITS: dict[str, int] = {"d": 86400, "h": 3600, "m": 60, "s": 1}

# Units must appear largest first, each at most once: "1h30m" yes, "30m1h" and "1m1m" no,
# because an odd order is far more likely a typo than intent.
_DURATION_RE = re.compile(
    r"(?:(?P<d>[0-9]+)d)?(?:(?P<h>[0-9]+)h)?(?:(?P<m>[0-9]+)m)?(?:(?P<s>[0-9]+)s)?"
)

#: 366 days: longer than any sandbox session should live; also keeps numbers sane.
MAX_DURATION_S = 366 * 86400


class DurationError(ValueError):
    """The text is not a duration we accept; `str()` is one lowercase line."""


class Duration(int):
    """A positive whole number of seconds that prints as its shortest human form.

    Being an `int` lets callers pass it straight to timeouts and date arithmetic; `str()`
    gives "1h30m" for status files and plans.
    """

    __slots__ = ()

    def __new__(cls, seconds: int) -> Duration:
        if isinstance(seconds, bool) or not isinstance(seconds, int):
            raise DurationError(f"a duration is a whole number of seconds, got {seconds!r}")
        if seconds <= 0:
            raise DurationError(f"a duration must be positive, got {seconds}s")
        if seconds > MAX_DURATION_S:
            raise DurationError(f"a duration must be at most 366d, got {seconds}s")
        return super().__new__(cls, seconds)

    @property
    def seconds(self) -> int:
        return int(self)

    def __str__(self) -> str:
        return format_duration(int(self))

    def __repr__(self) -> str:
        return f"Duration({format_duration(int(self))!r})"


def parse_duration(value: object) -> Duration:
    """Parse "90s", "5m", "2h", "1h30m", "1d" or a plain integer of seconds.

    Raises `DurationError` for anything else: booleans, floats, zero, negatives, unknown
    units, empty strings, or more than `MAX_DURATION_S`.
    """
    if isinstance(value, bool):
        raise DurationError("expected a duration like 90s, 5m, 2h or 1h30m, got a boolean")
    if isinstance(value, int):
        return Duration(value)
    if not isinstance(value, str):
        raise DurationError(
            f"expected a duration like 90s, 5m, 2h or 1h30m, got {type(value).__name__}"
        )
    text = value.strip()
    shown = _show(value)
    if text.isdigit():
        # Bound the digits before int(): a 10,000-digit string must not cost anything.
        if len(text) > 12:
            raise DurationError(f"duration {shown} is too large (max 366d)")
        return Duration(int(text))
    match = _DURATION_RE.fullmatch(text) if len(text) <= 40 else None
    if not text or match is None or not any(match.groupdict().values()):
        raise DurationError(
            f"invalid duration {shown}: use a number with units d, h, m, s (90s, 5m, 1h30m)"
        )
    total = 0
    for unit, count in match.groupdict().items():
        if count is not None:
            total += int(count) * _UNITS[unit]
    if total == 0:
        raise DurationError(f"a duration must be positive, got {shown}")
    if total > MAX_DURATION_S:
        raise DurationError(f"duration {shown} is too large (max 366d)")
    return Duration(total)


def format_duration(seconds: int) -> str:
    """Shortest canonical form: 5400 -> "1h30m", 90 -> "1m30s", 0 -> "0s"."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds == 0:
        return "0s"
    parts: list[str] = []
    rest = seconds
    for unit, size in _UNITS.items():
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _show(value: str) -> str:
    # why: user text goes into one-line error messages; repr escapes newlines, the cut
    # keeps a 2 MB scalar from becoming a 2 MB message.
    return repr(value if len(value) <= 40 else value[:37] + "...")
