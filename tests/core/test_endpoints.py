"""The token routing rule, as a table: which metro gets which token variable, which is refused."""

from __future__ import annotations

import pytest

from reconciler.spec import endpoints
from reconciler.spec.endpoints import EndpointRefusedError, resolve

CLOUD = {"UKC_TOKEN": "t"}


@pytest.mark.parametrize(
    ("metro", "base"),
    [
        ("fra", "https://api.fra.unikraft.cloud"),
        ("https://api.fra.unikraft.cloud", "https://api.fra.unikraft.cloud"),
        ("https://api.fra.unikraft.cloud/", "https://api.fra.unikraft.cloud"),
        ("https://api.dal.unikraft.cloud/v1", "https://api.dal.unikraft.cloud"),
        ("https://API.Sin.unikraft.cloud:443/v1/", "https://api.sin.unikraft.cloud"),
    ],
)
def test_official_metros_get_the_cloud_token(metro: str, base: str) -> None:
    assert resolve(metro, CLOUD) == endpoints.Endpoint(base, "UKC_TOKEN")


@pytest.mark.parametrize(
    "metro",
    [
        "http://127.0.0.1:47999/",
        "https://evil.example",
        "https://api.fra.unikraft.cloud.evil.example",
        "https://api.fra.unikraft.cloud:8443",
        "https://api.fra.unikraft.cloud/other",
        "https://xapi.fra.unikraft.cloud",
        "https://api.fra.unikraft.cloud%2F@evil.example",
        "https://evil.example/#@api.fra.unikraft.cloud",
        "https://evil.example\\@api.fra.unikraft.cloud",
    ],
)
def test_a_url_only_a_spec_names_is_refused(metro: str) -> None:
    with pytest.raises(EndpointRefusedError):
        resolve(metro, CLOUD)


@pytest.mark.parametrize(
    "metro", ["http://10.0.0.5:8080", "http://proxy.example", "http://api.fra.unikraft.cloud"]
)
def test_plain_http_off_the_loopback_is_refused_even_when_allow_listed(metro: str) -> None:
    env = {**CLOUD, "UKC_METRO_ALLOW": metro, "UKC_METRO": metro, "UKC_METRO_TOKEN": "m"}
    with pytest.raises(EndpointRefusedError, match="clear text"):
        resolve(metro, env)


def test_the_environments_own_metro_url_gets_the_cloud_token_over_https() -> None:
    env = {**CLOUD, "UKC_METRO": "https://ukc.corp.example/v1"}
    assert resolve("https://ukc.corp.example", env) == endpoints.Endpoint(
        "https://ukc.corp.example", "UKC_TOKEN"
    )


def test_an_allow_listed_url_gets_the_metro_token_when_one_is_set() -> None:
    env = {
        **CLOUD,
        "UKC_METRO_TOKEN": "m",
        "UKC_METRO_ALLOW": "https://a.example, https://b.example:8443/base",
    }
    assert resolve("https://b.example:8443/base/v1/", env) == endpoints.Endpoint(
        "https://b.example:8443/base", "UKC_METRO_TOKEN"
    )
    with pytest.raises(EndpointRefusedError):
        resolve("https://b.example:8443/other", env)


def test_loopback_http_chosen_in_the_environment_gets_only_its_own_token() -> None:
    url = "http://127.0.0.1:8080"
    with pytest.raises(EndpointRefusedError, match="only if UKC_METRO_ALLOW"):
        resolve(url, {**CLOUD, "UKC_METRO": url})
    env = {**CLOUD, "UKC_METRO": url, "UKC_METRO_TOKEN": "m"}
    assert resolve(url, env).token_var == "UKC_METRO_TOKEN"


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://[::1]:8080", "http://localhost"])
def test_the_cloud_token_goes_over_loopback_http_only_when_allow_listed(url: str) -> None:
    assert resolve(url, {**CLOUD, "UKC_METRO_ALLOW": url}).token_var == "UKC_TOKEN"


def test_the_refusal_names_the_remedy_and_no_token() -> None:
    env = {"UKC_TOKEN": "tok-CANARY-123456789", "UKC_METRO_TOKEN": "tok-CANARY-987654321"}
    with pytest.raises(EndpointRefusedError) as err:
        resolve("https://evil.example", env)
    text = str(err.value)
    assert "UKC_METRO_ALLOW=https://evil.example" in text and "UKC_METRO=" in text
    assert "CANARY" not in text


def test_a_malformed_allow_list_entry_is_named() -> None:
    with pytest.raises(EndpointRefusedError, match="UKC_METRO_ALLOW"):
        resolve("https://a.example", {"UKC_METRO_ALLOW": "ftp://a.example"})
