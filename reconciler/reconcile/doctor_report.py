"""The doctor's results, and the report made of them that is safe to share.

A report goes to people outside the account (an issue, a chat), so no value that identifies
the account or its instances may reach it: not the token, not an instance's FQDN, uuid or
name. Figures are numbers and words the doctor chose; only error texts come from the metro,
and every string of the report passes `Redactor` when it is made, whatever its origin.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Figure", "Outcome", "Redactor", "Result", "render_lines", "report_document"]

Outcome = Literal["PASS", "FAIL", "SKIP"]
Figure = float | int | bool | str

_UUID = re.compile(r"\b[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}\b", re.I)
#: a DNS name of two or more labels ending in a letter label (an FQDN, an API host, a URL's)
_HOST = re.compile(r"\b(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]*[a-z0-9]\b", re.I)
#: a bearer credential, and any long run of token characters (a JWT, an API key)
_BEARER = re.compile(r"bearer\s+\S+", re.I)
_LONG_RUN = re.compile(r"[A-Za-z0-9_\-+/=.]{32,}")
_MAX_TEXT = 300


@dataclass(frozen=True)
class Result:
    """What one check found: its outcome, one line for people, and figures for the report."""

    name: str
    outcome: Outcome
    summary: str
    figures: Mapping[str, Figure] = field(default_factory=dict)
    #: the error that decided a FAIL, as the metro or transport worded it (redacted on output)
    error: str | None = None


class Redactor:
    """Removes what identifies an account or an instance from a text.

    Known values (the token, the FQDN, uuids, the instance name) are replaced first; then
    anything shaped like a uuid, a host name, a bearer credential or a long key, because the
    metro's error texts may carry values the doctor never saw.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        self.add(*secrets)

    def add(self, *values: str | None) -> None:
        for value in values:
            if value and len(value) >= 4 and value not in self._secrets:
                self._secrets.append(value)
        # why: longest first, so an FQDN is replaced whole before the name inside it
        self._secrets.sort(key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "<redacted>")
        text = _BEARER.sub("bearer <redacted>", text)
        text = _UUID.sub("<uuid>", text)
        text = _HOST.sub("<host>", text)
        text = _LONG_RUN.sub("<redacted>", text)
        text = " ".join(text.split())
        return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"


def _clean(value: object, redact: Redactor) -> object:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, Mapping):
        return {redact(str(k)): _clean(v, redact) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v, redact) for v in value]
    return redact(str(value))


def report_document(
    results: Sequence[Result], *, about: Mapping[str, Figure], redact: Redactor
) -> dict[str, object]:
    """The JSON report: what was probed (`about`) and every check, every string redacted."""
    counts = {o: sum(1 for r in results if r.outcome == o) for o in ("PASS", "FAIL", "SKIP")}
    document: dict[str, object] = {
        "version": 1,
        "tool": "ukc doctor",
        "about": dict(about),
        "passed": counts["PASS"],
        "failed": counts["FAIL"],
        "skipped": counts["SKIP"],
        "checks": [
            {
                "name": r.name,
                "result": r.outcome,
                "summary": r.summary,
                "figures": dict(r.figures),
                **({"error": r.error} if r.error else {}),
            }
            for r in results
        ],
    }
    cleaned = _clean(document, redact)
    assert isinstance(cleaned, dict)
    return cleaned


def render_lines(document: Mapping[str, object]) -> list[str]:
    """One line per check (from the redacted document: the screen shows what is shared)."""
    lines: list[str] = []
    checks = document.get("checks")
    for check in checks if isinstance(checks, list) else []:
        line = f"{check['result']:<4}  {check['name']:<12}  {check['summary']}"
        if check.get("error"):
            line += f" ({check['error']})"
        lines.append(line)
    lines.append(
        f"{document.get('passed')} passed, {document.get('failed')} failed, "
        f"{document.get('skipped')} skipped"
    )
    return lines
