"""The `sync` limits: sync-back caps (`back_max_bytes`, `back_max_files`, `back_max_refused`)
and the sync deadlines (`timeout`, `idle_timeout`): accepted forms, refusals with their file,
line and field, and a spec hash that does not move for specs that do not set them."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.spec.defaults import (
    DEFAULT_BACK_MAX_BYTES,
    DEFAULT_BACK_MAX_FILES,
    DEFAULT_BACK_MAX_REFUSED,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
)
from reconciler.spec.models import SyncSpec, spec_hash
from reconciler.spec.sizes import SizeError, format_size, parse_size
from tests.support.specfiles import load_one, spec_error

#: the hash of `name: a` + `sync: {back: [out/]}` as computed by the ukc before these fields
#: (and before back_delete) existed
OLD_HASH = "d0dc9d802d524cd1e0cbf62a1001f0d69d028df73c1c0f60628f43dc4a1a333a"


def test_the_defaults_are_the_engines() -> None:
    sync = SyncSpec()
    assert sync.back_max_bytes == DEFAULT_BACK_MAX_BYTES == 16 << 30
    assert sync.back_max_files == DEFAULT_BACK_MAX_FILES == 1_000_000
    assert sync.back_max_refused == DEFAULT_BACK_MAX_REFUSED == 10_000
    assert int(sync.timeout) == DEFAULT_TIMEOUT_S == 3600
    assert int(sync.idle_timeout) == DEFAULT_IDLE_TIMEOUT_S == 120


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1048576", 1 << 20),
        ("'512MiB'", 512 << 20),
        ("2GiB", 2 << 30),
        ("1.5GB", 1_500_000_000),
        ("100 kB", 100_000),
        ("1TiB", 1 << 40),
        ("7B", 7),
    ],
)
def test_back_max_bytes_takes_a_size_with_units_or_plain_bytes(
    tmp_path: Path, text: str, value: int
) -> None:
    (session,) = load_one(tmp_path, f"name: a\nsync:\n  back_max_bytes: {text}\n")
    assert session.spec.sync.back_max_bytes == value


def test_the_counts_and_durations_are_read_as_written(tmp_path: Path) -> None:
    text = (
        "name: a\nsync:\n  back_max_files: 500\n  back_max_refused: 0\n"
        "  timeout: 2h\n  idle_timeout: 30s\n"
    )
    (session,) = load_one(tmp_path, text)
    sync = session.spec.sync
    assert (sync.back_max_files, sync.back_max_refused) == (500, 0)
    assert (int(sync.timeout), int(sync.idle_timeout)) == (7200, 30)


REFUSALS = [
    ("back_max_bytes: 5 mb", "sync.back_max_bytes", "invalid size '5 mb'"),
    ("back_max_bytes: 1.5B", "sync.back_max_bytes", "not a whole number of bytes"),
    ("back_max_bytes: 0", "sync.back_max_bytes", "a size must be positive"),
    ("back_max_bytes: -1", "sync.back_max_bytes", "a size must be positive"),
    ("back_max_bytes: 2PiB", "sync.back_max_bytes", "invalid size '2PiB'"),
    ("back_max_bytes: 9999TiB", "sync.back_max_bytes", "too large (max 1PiB)"),
    ("back_max_bytes: true", "sync.back_max_bytes", "got a boolean"),
    ("back_max_bytes: [1]", "sync.back_max_bytes", "got list"),
    ("back_max_files: 0", "sync.back_max_files", "from 1 to 1,000,000,000, got 0"),
    ("back_max_files: '10'", "sync.back_max_files", "expected a whole number, got a string"),
    ("back_max_files: 1e6", "sync.back_max_files", "expected a whole number"),
    ("back_max_refused: -1", "sync.back_max_refused", "from 0 to 1,000,000,000, got -1"),
    ("timeout: 0", "sync.timeout", "positive"),
    ("idle_timeout: soon", "sync.idle_timeout", "invalid duration"),
    ("back_max_byte: 1GiB", "sync.back_max_byte", "did you mean 'back_max_bytes'"),
]


@pytest.mark.parametrize(("line", "field", "fragment"), REFUSALS)
def test_an_invalid_limit_is_refused_at_its_file_line_and_field(
    tmp_path: Path, line: str, field: str, fragment: str
) -> None:
    err = spec_error(tmp_path, f"name: ok\nsync:\n  back: [out/]\n  {line}\n")
    file = str(tmp_path / "s.yaml")
    assert (err.file, err.line, err.field) == (file, 4, field)
    assert str(err).startswith(f"{file}:4: {field}: ")
    assert fragment in str(err)


@pytest.mark.parametrize(
    "sync",
    [
        "sync: {back: [out/]}",
        # the defaults written out hash as if they were not written
        "sync:\n  back: [out/]\n  back_max_bytes: 16GiB\n  back_max_files: 1000000\n"
        "  back_max_refused: 10000\n  timeout: 1h\n  idle_timeout: 2m\n  back_delete: false",
    ],
)
def test_a_spec_without_the_limits_keeps_the_hash_it_had_before_they_existed(
    tmp_path: Path, sync: str
) -> None:
    (session,) = load_one(tmp_path, f"name: a\n{sync}\n")
    assert spec_hash(session.spec) == OLD_HASH


@pytest.mark.parametrize(
    "line",
    [
        "back_max_bytes: 1GiB",
        "back_max_files: 10",
        "back_max_refused: 0",
        "timeout: 10m",
        "idle_timeout: 5m",
    ],
)
def test_setting_a_limit_changes_the_hash(tmp_path: Path, line: str) -> None:
    (session,) = load_one(tmp_path, f"name: a\nsync:\n  back: [out/]\n  {line}\n")
    assert spec_hash(session.spec) != OLD_HASH


@pytest.mark.parametrize(
    "value", [True, 1.5, None, "", "GiB", "1 GiB B", "1gib", "1Mb", "0x10", "1e9", "9" * 20]
)
def test_parse_size_refuses_what_it_would_have_to_guess(value: object) -> None:
    with pytest.raises(SizeError):
        parse_size(value)


def test_format_size_gives_the_shortest_exact_binary_form() -> None:
    assert [format_size(n) for n in (1 << 30, 3 << 20, 1500, 1024)] == [
        "1GiB",
        "3MiB",
        "1500B",
        "1KiB",
    ]
