"""Attacks on where the cloud token goes.

The attacker controls what a checkout contains (a pull request): spec files and even a
committed `.ukc/status.json`. They run a listener posing as a metro and wait for the victim's
`ukc` to send it `Authorization: Bearer $UKC_TOKEN`. The victim's environment is trusted;
only a URL named there (`UKC_METRO`, `UKC_METRO_ALLOW`) may receive a token.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from tests.support.canary import Canaries, assert_nowhere
from tests.support.listener import RecordingMetro
from tests.support.ukc import Ukc


@pytest.fixture
def listener() -> Iterator[RecordingMetro]:
    server = RecordingMetro()
    yield server
    server.close()


def spec_naming(url: str) -> str:
    return f"name: hello\nimage: attacker/box:1\nmetro: {url}/\n"


def assert_never_reached(
    listener: RecordingMetro, canaries: Canaries, ukc: Ukc, *texts: str
) -> None:
    assert listener.requests == [], "the listener was contacted"
    assert_nowhere(canaries, texts=texts, paths=[ukc.project])


@pytest.mark.parametrize("command", ["validate", "plan", "apply", "delete"])
def test_a_spec_naming_a_listener_on_the_loopback_never_gets_the_cloud_token(
    ukc: Ukc, canaries: Canaries, listener: RecordingMetro, command: str
) -> None:
    ukc.extra_env["UKC_TOKEN"] = canaries.token
    ukc.write_spec(spec_naming(listener.url))
    proc = ukc.run(command, "session.yaml", check=2)
    # refused at the spec's own line, with the remedy
    assert "session.yaml:3: metro:" in proc.stderr
    assert f"UKC_METRO_ALLOW={listener.url}" in proc.stderr
    assert_never_reached(listener, canaries, ukc, proc.stdout, proc.stderr)


def test_a_spec_naming_a_listener_gets_no_metro_token_either(
    ukc: Ukc, canaries: Canaries, listener: RecordingMetro
) -> None:
    ukc.extra_env.update({"UKC_TOKEN": canaries.token, "UKC_METRO_TOKEN": canaries.secret})
    ukc.write_spec(spec_naming(listener.url))
    proc = ukc.run("plan", "session.yaml", check=2)
    assert_never_reached(listener, canaries, ukc, proc.stdout, proc.stderr)


def test_a_status_file_in_the_checkout_cannot_route_the_token_to_its_metro(
    ukc: Ukc, canaries: Canaries, listener: RecordingMetro
) -> None:
    # an innocent spec on the local metro, but the checkout ships a status file whose
    # inventory records a session on the attacker's "metro"
    ukc.extra_env["UKC_TOKEN"] = canaries.token
    ukc.write_spec("name: hello\nmetro: local\n")
    state = ukc.project / ".ukc"
    state.mkdir()
    record = {
        "phase": "Ready",
        "metro": listener.url,
        "instance": {"name": "ukc-x-old", "uuid": "u", "metro": listener.url},
    }
    (state / "status.json").write_text(json.dumps({"version": 1, "sessions": {"old": record}}))
    proc = ukc.run("plan", "session.yaml", check=2)
    assert "status.json: session 'old' was recorded on a metro ukc will not use" in proc.stderr
    assert_never_reached(listener, canaries, ukc, proc.stdout, proc.stderr)


def test_the_cloud_token_is_not_sent_over_loopback_http_the_environment_merely_names(
    ukc: Ukc, canaries: Canaries, listener: RecordingMetro
) -> None:
    # another local user may be the one listening on a loopback port: the cloud token
    # crosses plain http only when UKC_METRO_ALLOW lists the URL
    ukc.extra_env.update({"UKC_TOKEN": canaries.token, "UKC_METRO": listener.url})
    ukc.write_spec("name: hello\nimage: me/box:1\n")
    proc = ukc.run("plan", "session.yaml", check=2)
    assert "UKC_METRO_TOKEN" in proc.stderr and "(from $UKC_METRO)" in proc.stderr
    assert_never_reached(listener, canaries, ukc, proc.stdout, proc.stderr)


def _non_loopback_address() -> str:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.123", 9))  # no packet is sent: this only picks a route
        address = str(probe.getsockname()[0])
    except OSError:
        pytest.skip("this machine has no non-loopback IPv4 address")
    finally:
        probe.close()
    if address.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address")
    return address


def test_plain_http_to_another_address_is_refused_even_when_the_environment_lists_it(
    ukc: Ukc, canaries: Canaries
) -> None:
    server = RecordingMetro(host=_non_loopback_address())
    try:
        ukc.extra_env.update(
            {
                "UKC_TOKEN": canaries.token,
                "UKC_METRO_TOKEN": canaries.secret,
                "UKC_METRO": server.url,
                "UKC_METRO_ALLOW": server.url,
            }
        )
        ukc.write_spec(spec_naming(server.url))
        proc = ukc.run("plan", "session.yaml", check=2)
        assert "clear text" in proc.stderr
        assert_never_reached(server, canaries, ukc, proc.stdout, proc.stderr)
    finally:
        server.close()


def test_an_allow_listed_loopback_metro_does_receive_the_cloud_token(
    ukc: Ukc, canaries: Canaries, listener: RecordingMetro
) -> None:
    ukc.extra_env.update({"UKC_TOKEN": canaries.token, "UKC_METRO_ALLOW": listener.url})
    ukc.write_spec(spec_naming(listener.url))
    proc = ukc.run("plan", "session.yaml", check=0)
    assert "create instance" in proc.stdout
    assert listener.authorizations() and set(listener.authorizations()) == {
        f"Bearer {canaries.token}"
    }
    assert_nowhere(canaries, texts=[proc.stdout, proc.stderr], paths=[ukc.project])


def test_the_environments_own_metro_gets_its_own_token_and_never_the_cloud_token(
    ukc: Ukc, canaries: Canaries, listener: RecordingMetro
) -> None:
    ukc.extra_env.update(
        {
            "UKC_TOKEN": canaries.token,
            "UKC_METRO": listener.url,
            "UKC_METRO_TOKEN": "metro-own-token-0123456789",
        }
    )
    ukc.write_spec("name: hello\nimage: me/box:1\n")
    ukc.run("plan", "session.yaml", check=0)
    assert listener.authorizations() and set(listener.authorizations()) == {
        "Bearer metro-own-token-0123456789"
    }
    sent = [json.dumps(r.headers).encode() + r.path.encode() + r.body for r in listener.requests]
    assert_nowhere(canaries, texts=sent)


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
def test_a_proxy_the_environment_names_never_sees_a_plain_http_metros_token(
    ukc: Ukc, canaries: Canaries, listener: RecordingMetro, variable: str
) -> None:
    # the attacker runs the proxy a shell profile or a CI image points at: a plain-HTTP
    # request through it arrives whole, bearer token included, and the metro it names is on
    # the victim's loopback, where no proxy can reach it anyway
    proxy = RecordingMetro()
    try:
        ukc.extra_env.update(
            {
                "UKC_TOKEN": canaries.token,
                "UKC_METRO": listener.url,
                "UKC_METRO_TOKEN": canaries.secret,
                variable: proxy.url,
            }
        )
        ukc.write_spec("name: hello\nimage: me/box:1\n")
        proc = ukc.run("plan", "session.yaml", check=0)
        assert "create instance" in proc.stdout
        assert proxy.requests == [], [r.path for r in proxy.requests]
        assert listener.authorizations() and set(listener.authorizations()) == {
            f"Bearer {canaries.secret}"
        }
    finally:
        proxy.close()


@pytest.mark.parametrize("variable", ["UKC_TOKEN", "UKC_METRO_TOKEN", "UKC_SESSION_SECRET"])
def test_a_spec_cannot_forward_ukcs_own_credentials_into_its_sandbox(
    ukc: Ukc, canaries: Canaries, variable: str
) -> None:
    # the sandbox runs what the spec says: with the credential in its environment it could
    # send it anywhere; here it only brings it home, where we can see it
    ukc.extra_env[variable] = canaries.token
    ukc.write_spec(
        f"name: hello\nsecret_env: {{LOOT: {variable}}}\nsync:\n  back: [out]\n"
        "commands: ['mkdir -p out && printf %s \"$LOOT\" > out/loot.txt']\n"
    )
    proc = ukc.run("apply", "session.yaml")
    assert_nowhere(canaries, texts=[proc.stdout, proc.stderr], paths=[ukc.project])
    assert proc.returncode == 2
    assert f"session.yaml:2: secret_env.LOOT: {variable} is ukc's own credential" in proc.stderr
