"""Why an instance stopped, from the platform's `stop_reason`, `stop_code` and `exit_code`.

`stop_reason` is a bitmask (docs/PLATFORM.md, "Stop reasons"): Z scale-to-zero, F forced,
U user-initiated, P platform-initiated, A the app exited (`exit_code` valid), K the kernel
exited (`stop_code` valid). For a platform-only stop `stop_code` is a platform code (1 =
NOMEDIUM: the image could not be pulled); for a kernel stop it packs the kernel's reason
(bits 0-7), the init level (8-14) and a Linux errno (16-23; out of memory is PGFAULT with
ENOMEM). Pure: the controller reads these to fail a boot at once with a named cause instead
of waiting out a deadline.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StopInfo", "decode"]

_K, _A, _P, _U, _F, _Z = 1, 2, 4, 8, 16, 32

_PLATFORM_CODES = {0: "UNKNOWN", 1: "NOMEDIUM"}
_PLATFORM_MEANING = {1: "image not found or could not be pulled"}
_KERNEL_REASONS = {
    0: "OK",
    1: "EXP",
    2: "MATH",
    3: "INVLOP",
    4: "PGFAULT",
    5: "SEGFAULT",
    6: "HWERR",
    7: "SECERR",
}
_ENOMEM = 12


@dataclass(frozen=True)
class StopInfo:
    """A decoded stop: `failed` says whether it ended the instance against the user's will
    (not a user stop and not scale-to-zero); `text` says why in one line."""

    failed: bool
    text: str
    #: a short name of the cause ("NOMEDIUM", "out of memory", "exit 1", "crash") for status
    cause: str


def decode(stop_reason: int | None, stop_code: int | None, exit_code: int | None) -> StopInfo:
    """What a stopped instance's fields say (unknown or missing fields say little)."""
    if stop_reason is None:
        return StopInfo(False, "no stop reason reported", "unknown")
    reason = stop_reason
    letters = "".join(
        letter if reason & bit else "-"
        for bit, letter in ((_Z, "Z"), (_F, "F"), (_U, "U"), (_P, "P"), (_A, "A"), (_K, "K"))
    )
    tag = f"stop_reason {reason} {letters}"
    if reason & _Z:
        return StopInfo(False, f"scaled to zero ({tag})", "scale-to-zero")
    if reason & _U:
        return StopInfo(False, f"stopped by the user ({tag})", "user stop")
    if reason & _A and exit_code is not None:
        return StopInfo(True, f"the app exited with code {exit_code} ({tag})", f"exit {exit_code}")
    if reason & _K and stop_code is not None:
        kernel = stop_code & 0xFF
        errno = (stop_code >> 16) & 0xFF
        level = (stop_code >> 8) & 0x7F
        name = _KERNEL_REASONS.get(kernel, f"reason {kernel}")
        code = f"stop_code 0x{stop_code:08X}: {name}, init level {level}, errno {errno}"
        if kernel == 4 and errno == _ENOMEM:
            return StopInfo(True, f"out of memory ({code}; {tag})", "out of memory")
        if kernel == 0 and not reason & _P:
            return StopInfo(True, f"the kernel shut down ({code}; {tag})", "shutdown")
        return StopInfo(True, f"the kernel crashed ({code}; {tag})", "crash")
    if reason & _P:
        if stop_code is not None and stop_code in _PLATFORM_CODES:
            name = _PLATFORM_CODES[stop_code]
            meaning = _PLATFORM_MEANING.get(stop_code, "the platform stopped it")
            return StopInfo(True, f"{meaning} ({name}; {tag}, stop_code {stop_code})", name)
        return StopInfo(True, f"the platform stopped it ({tag}, stop_code {stop_code})", "platform")
    if reason & _A:
        return StopInfo(True, f"the app exited ({tag})", "app exit")
    if reason & _K:
        return StopInfo(True, f"the kernel exited ({tag})", "crash")
    return StopInfo(False, f"unknown stop ({tag})", "unknown")
