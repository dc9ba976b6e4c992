"""Redaction: secret values masked in command output and in messages before anyone sees them.

The executor builds one `Redactor` per session from its `secret_env` values. Each command output
stream (stdout, stderr) goes through its own `RedactingStream` before it reaches a reporter
(the terminal) or the output tail stored in the status file; whole texts (error messages) go
through `Redactor.redact`.

What is masked, for each value: the value itself, and the forms a command commonly prints it in:
hex (lower and upper case), URL encoding (`%XX` in either case, `+` or `%20` for a space) and
base64 (standard and URL-safe alphabets) at each of the three byte alignments it can have inside
a longer base64 text (the characters that depend only on the value's own bytes). Every character
covered by an occurrence of any form is masked; overlapping or adjacent occurrences become one
`***`. A value shorter than `MIN_ENCODED` characters is masked as itself only: its encoded forms
are one to three characters long and would match all over ordinary output (`ukc validate` and
`ukc apply` warn about such values: masking them makes output unreadable, and a value that short
is guessed anyway).

Why a stream holds text back: a command may print a secret in several writes (`printf %s "$A";
sleep 1; printf %s "$B"`) and no chunk alone contains it. A stream keeps back the shortest tail
of its text that could still be the beginning of a form (at most the longest form minus one
character) and decides once more data arrives or the stream ends, so a value split over any
number of writes at any boundaries is masked whole. Only a possible beginning of a secret is
held, so a line that ends without one passes at once and the order of stdout and stderr lines
is what it would be without redaction (reporters print whole lines). Bytes are decoded by one
incremental UTF-8 decoder per stream: a character split between two chunks arrives whole.

Cost: a chunk without any form in it costs one substring search per form (C speed) plus the
decoding; the slower span bookkeeping runs only for chunks that contain a secret.
"""

from __future__ import annotations

import base64
import codecs
import re
import threading
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "MASK",
    "MIN_ENCODED",
    "OutputTail",
    "RedactingStream",
    "Redactor",
    "secret_forms",
    "short_secret_warnings",
]

MASK = "***"
#: values shorter than this (in characters) are masked as themselves only
MIN_ENCODED = 3
_PERCENT = re.compile(r"%[0-9A-F]{2}")


def secret_forms(value: str) -> frozenset[str]:
    """Every text whose presence in output would show `value` (see the module docstring)."""
    return frozenset(form for family in _families(value) for form in family)


def _families(value: str) -> list[set[str]]:
    """`value`'s forms, grouped into variants of one encoding (they share long substrings)."""
    if not value:
        return []
    # why surrogateescape: a value from the environment that is not valid UTF-8 holds its
    # bytes as lone surrogates; output decoded with "replace" shows them as U+FFFD
    raw = value.encode("utf-8", "surrogateescape")
    families = [{value}, {raw.decode("utf-8", "replace")}]
    if len(value) >= MIN_ENCODED:
        families.append({raw.hex(), raw.hex().upper()})
        quoted = set()
        for text in (
            urllib.parse.quote(raw, safe=""),
            urllib.parse.quote_plus(raw, safe=""),
            urllib.parse.quote(raw, safe="/"),
        ):
            quoted |= {text, _PERCENT.sub(lambda m: m.group(0).lower(), text)}
        families.append(quoted)
        for shift in range(3):
            cores = set()
            for encode in (base64.b64encode, base64.urlsafe_b64encode):
                # the value starting `shift` bytes into a base64 group; trailing zero bytes
                # make its last characters appear without padding
                text = encode(b"\0" * shift + raw + b"\0\0\0").decode("ascii")
                first = -(-8 * shift // 6)  # the first character made of the value's bits only
                cores.add(text[first : 8 * (shift + len(raw)) // 6])
            families.append(cores)
    return [family - {""} for family in families if family - {""}]


def _common(texts: set[str]) -> str:
    """The longest substring of the shortest text that every text contains."""
    shortest = min(texts, key=len)
    for size in range(len(shortest), 0, -1):
        for start in range(len(shortest) - size + 1):
            piece = shortest[start : start + size]
            if all(piece in text for text in texts):
                return piece
    return ""


#: an anchor shorter than this would be found all over ordinary output
_MIN_ANCHOR = 6


class Redactor:
    """Masks a session's secret values (and their encoded forms) in output and messages."""

    def __init__(self, values: Iterable[str]) -> None:
        forms: set[str] = set()
        anchors: set[str] = set()
        for value in values:
            for family in _families(value):
                forms |= family
                # why anchors: most chunks hold no secret, and proving that costs one search
                # per anchor; the variants of an encoding (hex case, base64 alphabets, URL
                # escapes) share a long substring that every one of them contains
                common = _common(family)
                if len(common) >= min(_MIN_ANCHOR, min(map(len, family))):
                    anchors.add(common)
                else:
                    anchors |= family
        # longest first: spans of a form and of a shorter one inside it merge anyway, but
        # the checks below then stop early on the common case
        self._forms = tuple(sorted(forms, key=len, reverse=True))
        #: every form contains one of these: none in a text, no form in it
        self._anchors = tuple(
            a for a in sorted(anchors, key=len) if not any(b in a for b in anchors if b != a)
        )
        #: forms whose beginning may end a chunk (a one-character form is always decided)
        self._prefixable = tuple(f for f in self._forms if len(f) > 1)

    def __bool__(self) -> bool:
        return bool(self._forms)

    def __call__(self, text: str) -> str:
        return self.redact(text)

    def redact(self, text: str) -> str:
        """`text` with every occurrence of a secret form masked."""
        return self._split(text, final=True)[0]

    def stream(self) -> RedactingStream:
        """A redactor for one output stream (bytes in, redacted text out)."""
        return RedactingStream(self)

    # -- the work --------------------------------------------------------------------------

    def _split(
        self, text: str, masked: int = 0, *, joined: bool = False, final: bool
    ) -> tuple[str, str, int, bool]:
        """Split `text` into what can be shown now and a tail to hold until more arrives.

        The first `masked` characters of `text` were shown already, as (part of) a mask;
        `joined`: what was shown so far ends with a mask (an occurrence at 0 continues it).
        Returns (shown, held tail, how much of the tail is shown already, joined).
        """
        if not self._forms:
            return text[masked:], "", 0, False
        hold = len(text) if final else self._hold_from(text)
        if not masked and not any(anchor in text for anchor in self._anchors):
            return text[:hold], text[hold:], 0, joined and hold == 0
        pieces: list[str] = []
        pos = masked
        in_mask = masked > 0 or joined
        for start, end in self._spans(text):
            if start >= hold:
                break  # it may still grow into a longer form: decided with the next chunk
            if start > pos:
                pieces.append(text[pos:start])
                in_mask = False
            if end > pos:
                if not in_mask:
                    pieces.append(MASK)
                pos, in_mask = end, True
        if hold > pos:
            pieces.append(text[pos:hold])
            pos, in_mask = hold, False
        # why masked characters stay in the held tail: an occurrence that starts there and
        # reaches into the next chunk must extend this mask, not show its own first part
        return "".join(pieces), text[hold:], pos - hold, in_mask

    def _hold_from(self, text: str) -> int:
        """Where the shortest tail of `text` that could begin a form starts (len: none)."""
        n = len(text)
        hold = n
        for form in self._prefixable:
            low = max(0, n - len(form) + 1)
            if low >= hold:
                continue
            i = text.find(form[0], low, hold)
            while i != -1:
                if form.startswith(text[i:]):
                    hold = i
                    break
                i = text.find(form[0], i + 1, hold)
        return hold

    def _spans(self, text: str) -> list[tuple[int, int]]:
        """Merged (start, end) of every occurrence of every form, overlapping ones included."""
        found: list[tuple[int, int]] = []
        for form in self._forms:
            i = text.find(form)
            while i != -1:
                found.append((i, i + len(form)))
                i = text.find(form, i + 1)
        found.sort()
        merged: list[tuple[int, int]] = []
        for start, end in found:
            if merged and start <= merged[-1][1]:
                if end > merged[-1][1]:
                    merged[-1] = (merged[-1][0], end)
            else:
                merged.append((start, end))
        return merged


class RedactingStream:
    """One output stream: bytes in, redacted text out, a possible secret's beginning held back.

    `feed` and `close` may be called from different threads (a reader thread feeds, the
    executor closes); after `close`, late data is dropped rather than shown unjoined.
    """

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._held = ""
        self._masked = 0
        self._joined = False
        self._closed = False
        self._lock = threading.Lock()

    def feed(self, data: bytes) -> str:
        """What can be shown of `data` now (possibly ""), redacted."""
        with self._lock:
            if self._closed:
                return ""
            text = self._decoder.decode(data)
            if not text:
                return ""
            shown, self._held, self._masked, self._joined = self._redactor._split(
                self._held + text, self._masked, joined=self._joined, final=False
            )
            return shown

    def close(self) -> str:
        """The rest, redacted: the stream ended."""
        with self._lock:
            if self._closed:
                return ""
            self._closed = True
            text = self._held + self._decoder.decode(b"", final=True)
            shown = self._redactor._split(text, self._masked, joined=self._joined, final=True)[0]
            self._held, self._masked, self._joined = "", 0, False
            return shown


class OutputTail:
    """The last `limit` bytes (UTF-8) of a stream's redacted text, for the status file."""

    def __init__(self, limit: int = 64 * 1024) -> None:
        self.limit = limit
        self._pieces: list[str] = []
        self._size = 0

    def add(self, text: str) -> None:
        self._pieces.append(text)
        self._size += len(text)
        if self._size > 2 * self.limit:
            joined = "".join(self._pieces)[-self.limit :]
            self._pieces, self._size = [joined], len(joined)

    def text(self) -> str:
        if not self.limit:
            return ""
        joined = "".join(self._pieces)[-self.limit :]
        data = joined.encode("utf-8", "replace")
        if len(data) <= self.limit:
            return joined
        # a character cut at the start is dropped, not shown as a replacement character
        return data[-self.limit :].decode("utf-8", "ignore")


def short_secret_warnings(
    secret_env: Mapping[str, Sequence[tuple[str, str]]], environ: Mapping[str, str]
) -> list[str]:
    """One warning per secret value shorter than `MIN_ENCODED` characters (value not shown).

    `secret_env` maps a session name to its (sandbox variable, controller variable) pairs.
    """
    lines = []
    for session, pairs in secret_env.items():
        for sandbox_name, controller_name in pairs:
            value = environ.get(controller_name)
            if not value or len(value) >= MIN_ENCODED:
                continue
            lines.append(
                f"warning: session {session!r}: secret_env {sandbox_name} (from "
                f"{controller_name}) is {len(value)} character(s) long: every occurrence of "
                "it in command output is masked, which leaves output unreadable, and a value "
                "that short is guessed at once; if it is not a secret, put it in env"
            )
    return lines
