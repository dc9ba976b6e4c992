"""Redaction of secret values: every form, across any chunking, without reordering output."""

from __future__ import annotations

import base64
import io
import itertools
import re
import urllib.parse
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.cli.render import PlainReporter
from reconciler.reconcile.events import Event
from reconciler.reconcile.redaction import (
    MASK,
    OutputTail,
    Redactor,
    secret_forms,
    short_secret_warnings,
)

SECRET = "s3cr3t-Value/with+odd=chars&é"


def feed_all(redactor: Redactor, chunks: list[bytes]) -> tuple[str, list[str]]:
    stream = redactor.stream()
    shown = [stream.feed(chunk) for chunk in chunks]
    shown.append(stream.close())
    return "".join(shown), shown


def test_the_value_and_its_hex_url_and_base64_forms_are_masked_in_a_whole_text() -> None:
    raw = SECRET.encode()
    texts = [
        SECRET,
        raw.hex(),
        raw.hex().upper(),
        urllib.parse.quote(SECRET, safe=""),
        re.sub("%[0-9A-F]{2}", lambda m: m.group(0).lower(), urllib.parse.quote(SECRET, safe="")),
        urllib.parse.quote_plus(SECRET),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
    ]
    redact = Redactor([SECRET])
    for text in texts:
        assert redact(f"before {text} after") == f"before {MASK} after", text


@pytest.mark.parametrize("prefix", [b"", b"a", b"ab", b"abc", b"abcd"])
@pytest.mark.parametrize("encode", [base64.b64encode, base64.urlsafe_b64encode])
def test_base64_of_a_secret_inside_a_longer_text_is_masked_at_any_alignment(
    prefix: bytes, encode: Callable[[bytes], bytes]
) -> None:
    blob = encode(prefix + SECRET.encode() + b"trailing bytes").decode()
    shown = Redactor([SECRET]).redact(blob)
    assert MASK in shown
    assert not any(form in shown for form in secret_forms(SECRET))
    # what is left around the mask: the prefix's and the trailer's characters only
    head, _, rest = shown.partition(MASK)
    assert blob.startswith(head) and blob.endswith(rest)
    assert len(head) <= len(prefix) * 4 // 3 + 1


def test_values_of_one_and_two_characters_are_masked_as_themselves() -> None:
    redact = Redactor(["q", "Zx"])
    assert redact("a q b Zx c") == f"a {MASK} b {MASK} c"
    # their encoded forms would be one to four characters: not masked, output stays readable
    assert redact("7a 5a78 WnE") == "7a 5a78 WnE"


def test_overlapping_secrets_are_masked_as_one_span() -> None:
    redact = Redactor(["abcdef", "defghi", "s3cret", "s3cret-and-more"])
    assert redact("x abcdefghi y s3cret-and-more z s3cret") == f"x {MASK} y {MASK} z {MASK}"


def test_a_secret_split_into_single_bytes_is_masked_whole() -> None:
    data = f"log: {SECRET} done\n".encode()
    shown, pieces = feed_all(Redactor([SECRET]), [data[i : i + 1] for i in range(len(data))])
    assert shown == f"log: {MASK} done\n"
    assert not any(SECRET[:4] in p for p in pieces)


def test_a_multibyte_character_split_between_chunks_arrives_whole() -> None:
    data = "naïve — ✓ 𝄞\n".encode()
    for cut in range(1, len(data)):
        shown, _ = feed_all(Redactor(["unrelated-secret"]), [data[:cut], data[cut:]])
        assert shown == data.decode()


def test_only_a_possible_beginning_of_a_secret_is_held_back() -> None:
    stream = Redactor(["ukcSECRET123"]).stream()
    assert stream.feed(b"first line\n") == "first line\n"
    assert stream.feed(b"second line ends in uk") == "second line ends in "
    assert stream.feed(b"elele\n") == "ukelele\n"
    assert stream.feed(b"tail ukcSEC") == "tail "
    assert stream.close() == "ukcSEC"


def test_holding_back_keeps_the_order_of_stdout_and_stderr_lines_a_reporter_prints() -> None:
    secret = "ukcSECRET123"
    writes = [
        ("stdout", "step 1\n"),
        ("stderr", "warn 1\n"),
        ("stdout", "step 2 uk"),  # could be the secret's beginning: held
        ("stderr", "warn 2\n"),
        ("stdout", "elele\n"),
        ("stderr", f"err {secret[:5]}"),
        ("stdout", "step 3\n"),
        ("stderr", f"{secret[5:]}\n"),
    ]

    def printed(redactor: Redactor) -> list[str]:
        out = io.StringIO()
        reporter = PlainReporter(out)
        streams = {"stdout": redactor.stream(), "stderr": redactor.stream()}
        for kind, text in writes:
            reporter.event(Event("s", "output", streams[kind].feed(text.encode()), kind))
        for kind, stream in streams.items():
            reporter.event(Event("s", "output", stream.close(), kind))
        reporter.close()
        return out.getvalue().splitlines()

    plain = printed(Redactor([]))
    assert printed(Redactor([secret])) == [line.replace(secret, MASK) for line in plain]
    assert plain[-1] == f"[s] ! err {secret}"


def test_a_secret_straddling_two_chunks_by_one_character_is_still_masked() -> None:
    shown, _ = feed_all(Redactor(["abcdef"]), [b"xx abcde", b"f yy"])
    assert shown == f"xx {MASK} yy"


def test_a_stream_of_a_repeated_short_secret_never_holds_more_than_a_tail() -> None:
    stream = Redactor(["aa"]).stream()
    shown = [stream.feed(b"a" * 100_000) for _ in range(5)]
    assert shown[0] == MASK and shown[1:] == [""] * 4
    assert stream.close() == ""


def test_after_close_late_data_is_dropped_not_shown_unjoined() -> None:
    stream = Redactor(["abcdef"]).stream()
    assert stream.feed(b"abc") == ""
    assert stream.close() == "abc"
    assert stream.feed(b"def") == ""


def test_without_secrets_a_stream_only_decodes() -> None:
    shown, pieces = feed_all(Redactor([]), [b"a\xc3", b"\xa9b", b"\xff"])
    assert shown == "a\xe9b\ufffd" and pieces[0] == "a"


_alphabet = st.sampled_from([*"ab+/=%é\n YWJj", "\U0001d11e"])


@settings(max_examples=300)
@given(
    secrets=st.lists(st.text(_alphabet, min_size=1, max_size=12), min_size=1, max_size=3),
    pieces=st.lists(st.one_of(st.text(_alphabet, max_size=8), st.integers(0, 99)), max_size=12),
    cuts=st.lists(st.integers(0, 400), max_size=20),
)
def test_streaming_at_any_chunking_shows_exactly_what_redacting_the_whole_text_shows(
    secrets: list[str], pieces: list[str | int], cuts: list[int]
) -> None:
    # the text: random filler with the secrets' forms (plain and encoded) spliced in
    forms = sorted({form for secret in secrets for form in secret_forms(secret)})
    text = "".join(p if isinstance(p, str) else forms[p % len(forms)] for p in pieces)
    data = text.encode()
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    redactor = Redactor(secrets)
    shown, _ = feed_all(redactor, chunks)
    assert shown == redactor.redact(text)
    for form in forms:
        assert form not in shown.replace(MASK, "\0")


def test_the_stored_tail_keeps_the_last_bytes_and_drops_a_character_cut_in_half() -> None:
    tail = OutputTail(limit=10)
    for _ in range(50):
        tail.add("é" * 3)
    assert tail.text() == "é" * 5
    tail = OutputTail(limit=9)
    tail.add("xé" * 20)
    assert tail.text().encode() == ("xé" * 20).encode()[-9:]
    tail = OutputTail(limit=11)
    tail.add("xxxé" * 20)
    assert tail.text() == "xxxé" * 2  # the é cut in half is dropped, not shown as U+FFFD


def test_short_secret_values_get_a_warning_that_names_the_variables_not_the_value() -> None:
    lines = short_secret_warnings(
        {"web": (("PIN", "MY_PIN"), ("KEY", "MY_KEY"), ("GONE", "NOT_SET"))},
        {"MY_PIN": "Qz", "MY_KEY": "long-enough-value"},
    )
    assert len(lines) == 1
    assert "'web'" in lines[0] and "PIN" in lines[0] and "MY_PIN" in lines[0]
    assert "2 character(s)" in lines[0] and "Qz" not in lines[0]
