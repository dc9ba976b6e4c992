from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.spec.durations import (
    MAX_DURATION_S,
    Duration,
    DurationError,
    format_duration,
    parse_duration,
)


class TestParsing:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [
            ("90s", 90),
            ("5m", 300),
            ("2h", 7200),
            ("1h30m", 5400),
            ("1d", 86400),
            ("1d2h3m4s", 86400 + 7200 + 180 + 4),
            ("45", 45),
            (" 10m ", 600),
            (120, 120),
        ],
    )
    def test_the_documented_forms_are_read_as_seconds(self, text: object, seconds: int) -> None:
        assert parse_duration(text) == seconds

    @pytest.mark.parametrize(
        "text",
        [
            "0",
            "0s",
            "0h0m",
            0,
            -5,
            "-5m",
            "",
            "5x",
            "m",
            "1.5h",
            "30m1h",
            "1m1m",
            "1 h",
            "9" * 5000,
            "367d",
        ],
    )
    def test_zero_negative_unknown_or_huge_durations_are_refused(self, text: object) -> None:
        with pytest.raises(DurationError):
            parse_duration(text)

    @pytest.mark.parametrize("value", [True, False, 1.5, None, [1], {"m": 1}])
    def test_non_text_non_integer_values_are_refused(self, value: object) -> None:
        with pytest.raises(DurationError):
            parse_duration(value)

    def test_an_error_message_is_one_line_even_for_a_multiline_input(self) -> None:
        with pytest.raises(DurationError) as info:
            parse_duration("5m\n" + "x" * 100)
        assert "\n" not in str(info.value)
        assert len(str(info.value)) < 150


class TestDurationValue:
    def test_a_duration_is_an_int_of_seconds_that_prints_in_human_form(self) -> None:
        d = parse_duration("1h30m")
        assert isinstance(d, int)
        assert d + 1 == 5401
        assert d.seconds == 5400
        assert str(d) == "1h30m"
        assert repr(d) == "Duration('1h30m')"

    def test_a_non_positive_duration_cannot_be_built(self) -> None:
        with pytest.raises(DurationError):
            Duration(0)

    @pytest.mark.parametrize(
        ("seconds", "text"),
        [(0, "0s"), (59, "59s"), (90, "1m30s"), (3600, "1h"), (90061, "1d1h1m1s")],
    )
    def test_format_gives_the_shortest_form(self, seconds: int, text: str) -> None:
        assert format_duration(seconds) == text

    @given(st.integers(min_value=1, max_value=MAX_DURATION_S))
    def test_format_and_parse_round_trip(self, seconds: int) -> None:
        assert parse_duration(format_duration(seconds)) == seconds
