"""The canary scanner itself: it must find a leak in every form it claims to cover."""

from __future__ import annotations

import base64
import urllib.parse
from pathlib import Path

import pytest

from tests.support.canary import Canaries, assert_nowhere


@pytest.mark.parametrize("prefix", [b"", b"a", b"ab", b"abc"])
def test_a_canary_base64_encoded_at_any_offset_is_found(prefix: bytes) -> None:
    c = Canaries.fresh()
    blob = base64.b64encode(prefix + c.secret.encode() + b"tail")
    with pytest.raises(AssertionError, match="secret"):
        assert_nowhere(c, texts=[blob])


def test_hex_and_url_encoded_canaries_are_found() -> None:
    c = Canaries.fresh()
    for text in (c.token.encode().hex(), urllib.parse.quote(c.token, safe="")):
        with pytest.raises(AssertionError, match="token"):
            assert_nowhere(c, texts=[f"x {text} y"])


def test_a_canary_in_a_nested_file_is_found_and_clean_trees_pass(tmp_path: Path) -> None:
    c = Canaries.fresh()
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "clean.txt").write_text("nothing here")
    assert_nowhere(c, paths=[tmp_path])
    (tmp_path / "a" / "b" / "log").write_text(f"Authorization: Bearer {c.token}\n")
    with pytest.raises(AssertionError, match="log"):
        assert_nowhere(c, paths=[tmp_path])
