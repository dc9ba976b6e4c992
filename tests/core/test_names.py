"""Metro codes, environment variable names and DNS labels: one rule each, everywhere."""

from __future__ import annotations

import pytest

from reconciler._util.names import (
    KNOWN_METRO_CODES,
    is_dns_label,
    is_env_name,
    is_metro_code,
    metro_kind,
    official_metro_code,
    unknown_metro_message,
)
from reconciler.cloud.api import metro_base_url
from reconciler.errors import SpecError
from reconciler.spec import endpoints
from reconciler.transport.commands import export_lines


@pytest.mark.parametrize("code", ["fra", "dal", "sin", "was", "sfo", "fra0", "was1"])
def test_the_platforms_metro_codes_are_codes(code: str) -> None:
    assert is_metro_code(code) and metro_kind(code) == "code"


@pytest.mark.parametrize("name", ["f", "frankfurt", "fra-1", "FRA", "fra01", "", "fra\n"])
def test_other_words_are_not_metro_codes(name: str) -> None:
    assert not is_metro_code(name) and metro_kind(name) is None


def test_a_metro_is_local_a_code_or_a_url() -> None:
    assert metro_kind("local") == "local"
    assert metro_kind("https://api.fra.unikraft.cloud") == "url"
    assert metro_kind("ftp://x") is None


def test_the_official_api_host_names_a_code_and_nothing_longer() -> None:
    assert official_metro_code("api.fra0.unikraft.cloud") == "fra0"
    assert official_metro_code("api.evil-example.unikraft.cloud") is None
    assert official_metro_code("api.fra.unikraft.cloud.evil.example") is None


def test_the_spec_the_token_routing_and_the_api_agree_on_codes() -> None:
    for name in ("fra0", "frankfurt"):
        spec_ok = metro_kind(name) == "code"
        try:
            endpoints.resolve(name, {})
            routed = True
        except endpoints.EndpointRefusedError:
            routed = False
        try:
            metro_base_url(name)
            api_ok = True
        except ValueError:
            api_ok = False
        assert spec_ok == routed == api_ok, name


def test_a_url_to_an_unknown_host_under_the_official_domain_is_not_official() -> None:
    with pytest.raises(endpoints.EndpointRefusedError, match="not an official metro"):
        endpoints.resolve("https://api.evil-example.unikraft.cloud", {})


@pytest.mark.parametrize("name", ["X", "_x", "PATH", "a1_B2"])
def test_shell_variable_names_are_env_names(name: str) -> None:
    assert is_env_name(name)


@pytest.mark.parametrize("name", ["", "1X", "A-B", "A B", "A=B", "A\n", "$(id)", "é"])
def test_other_strings_are_not_env_names_and_are_never_exported(name: str) -> None:
    assert not is_env_name(name)
    with pytest.raises(SpecError, match="not a shell variable name"):
        export_lines({name: "v"})


def test_dns_labels_are_lowercase_with_inner_dashes_and_at_most_63_characters() -> None:
    assert is_dns_label("a") and is_dns_label("ukc-1234abcd-s1") and is_dns_label("a" * 63)
    for bad in ("", "-a", "a-", "A", "a_b", "a.b", "a" * 64, "abc\n"):
        assert not is_dns_label(bad), bad


@pytest.mark.parametrize("name", ["ok-name", "a" * 63])
def test_the_local_metro_accepts_instance_names_that_are_dns_labels(name: str) -> None:
    from reconciler.local.state.validation import parse_create

    assert parse_create({"name": name, "image": "img"}).name == name


@pytest.mark.parametrize("name", ["name\n", "Name", "a" * 64, "-a"])
def test_the_local_metro_refuses_instance_names_that_are_not(name: str) -> None:
    from reconciler.local.state.records import ItemError
    from reconciler.local.state.validation import parse_create

    with pytest.raises(ItemError, match="not a valid DNS label"):
        parse_create({"name": name, "image": "img"})


@pytest.mark.parametrize("word", ["mars", "xyz", "abc1"])
def test_a_word_shaped_like_a_metro_code_that_is_none_is_an_unknown_metro(word: str) -> None:
    assert not is_metro_code(word) and metro_kind(word) is None
    message = unknown_metro_message(word)
    assert message is not None and f"unknown metro {word!r}" in message
    assert all(code in message for code in KNOWN_METRO_CODES)
    with pytest.raises(endpoints.EndpointRefusedError):
        endpoints.resolve(f"https://api.{word}.unikraft.cloud", {})


def test_every_known_metro_code_is_a_code_and_no_unknown_one() -> None:
    for code in KNOWN_METRO_CODES:
        assert is_metro_code(code) and unknown_metro_message(code) is None


def test_the_metro_registry_names_an_unknown_metro_before_asking_for_a_token() -> None:
    from reconciler.cloud.metros import MetroRegistry
    from reconciler.errors import UsageError

    with pytest.raises(UsageError, match="unknown metro 'mars': known metro codes are fra"):
        MetroRegistry({}).get("mars")
