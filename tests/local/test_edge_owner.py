"""The edge's owner-only rule with a stand-in for the kernel's peer uid (the attack tests in
tests/security use a real second user): who is served, what a refused client sees, the log."""

from __future__ import annotations

import asyncio
import logging
import ssl
import subprocess
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from reconciler.local.ca import CertificateAuthority
from reconciler.local.edge import Edge, Route
from tests.support.users import need_other_user

APP_DOMAIN = "local.ukc.localhost"
OWNER = 1000
STRANGER = 4242


class _NoSandbox:
    """A runtime nobody may reach in these tests: any call is recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    async def open_connection(
        self, uuid: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.calls.append((uuid, port))
        raise OSError("no sandbox in this test")


class _World:
    def __init__(self, tmp_path: Path, uid: int | None, log_every_s: float = 60.0) -> None:
        self.ca = CertificateAuthority.load_or_create(tmp_path / "ca", APP_DOMAIN)
        self.uid = uid
        self.resolved: list[tuple[str, int]] = []
        self.runtime = _NoSandbox()
        self.log_every_s = log_every_s

    async def _resolve(self, sni: str, port: int) -> Route | None:
        self.resolved.append((sni, port))
        return None

    def edge(self, owner_uid: int = OWNER, real_peer_uid: bool = False) -> Edge:
        if real_peer_uid:
            return Edge(
                ca=self.ca,
                runtime=self.runtime,
                resolve=self._resolve,
                on_activity=lambda uuid, delta: None,
                should_drop=lambda: False,
                owner_uid=owner_uid,
            )
        return Edge(
            ca=self.ca,
            runtime=self.runtime,
            resolve=self._resolve,
            on_activity=lambda uuid, delta: None,
            should_drop=lambda: False,
            owner_uid=owner_uid,
            peer_uid=lambda peer, ours: self.uid,
            refusal_log_every_s=self.log_every_s,
        )

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca.cert_path))


def _run(world: _World, public_port: int, client: Callable[[int], Coroutine[Any, Any, Any]]) -> Any:
    async def main() -> Any:
        edge = world.edge()
        port = await edge.open_port(public_port)
        try:
            return await asyncio.wait_for(client(port), 30)
        finally:
            await edge.close()

    return asyncio.run(main())


async def _https_get(world: _World, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=world.client_context(), server_hostname=f"box.{APP_DOMAIN}"
    )
    writer.write(b"POST /exec HTTP/1.1\r\nHost: box\r\nContent-Length: 2\r\n\r\n{}")
    data = await reader.read()
    writer.close()
    return data


def test_another_uid_on_443_gets_a_403_naming_both_uids_and_nothing_is_routed(
    tmp_path: Path,
) -> None:
    world = _World(tmp_path, STRANGER)
    answer = _run(world, 443, lambda port: _https_get(world, port))
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert f"only its owner (uid {OWNER})".encode() in answer
    assert f"came from uid {STRANGER}".encode() in answer
    assert world.resolved == [] and world.runtime.calls == []


def test_another_uid_on_a_tls_port_is_closed_before_the_handshake(tmp_path: Path) -> None:
    world = _World(tmp_path, STRANGER)

    async def client(port: int) -> str:
        try:
            await asyncio.open_connection(
                "127.0.0.1", port, ssl=world.client_context(), server_hostname=f"b.{APP_DOMAIN}"
            )
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            return type(exc).__name__
        return "handshake completed"

    assert _run(world, 2222, client) != "handshake completed"
    assert world.resolved == [] and world.runtime.calls == []


def test_an_unknown_peer_is_refused_too(tmp_path: Path) -> None:
    world = _World(tmp_path, None)
    answer = _run(world, 443, lambda port: _https_get(world, port))
    assert b"403 Forbidden" in answer and b"an unknown local user" in answer
    assert world.resolved == []


@pytest.mark.parametrize("uid", [OWNER, 0])
def test_the_owner_and_root_are_served(tmp_path: Path, uid: int) -> None:
    world = _World(tmp_path, uid)
    answer = _run(world, 443, lambda port: _https_get(world, port))
    # no route for this name: the ordinary "service not found" page, after routing was asked
    assert answer.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert world.resolved == [(f"box.{APP_DOMAIN}", 443)]


def test_refusals_are_logged_once_per_user_and_interval_with_the_count_held_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    world = _World(tmp_path, STRANGER, log_every_s=0.5)

    async def client(port: int) -> None:
        for _ in range(3):
            await _https_get(world, port)
        await asyncio.sleep(0.6)
        await _https_get(world, port)

    with caplog.at_level(logging.WARNING, logger="reconciler.local.edge"):
        _run(world, 443, client)
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 2, lines
    assert f"from uid {STRANGER}" in lines[0] and f"uid {OWNER}" in lines[0]
    assert "(2 more refused since the last line)" in lines[1]


def test_a_metro_owned_by_another_uid_serves_that_uid_by_the_kernels_answer(
    tmp_path: Path,
) -> None:
    user = need_other_user()
    world = _World(tmp_path, None)

    async def main() -> str:
        edge = world.edge(owner_uid=user.pw_uid, real_peer_uid=True)
        port = await edge.open_port(443)
        host = f"box.{APP_DOMAIN}"
        argv = [
            "setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
            # -k: the CA file sits in root's private temp dir; who connects is the point here
            "--", "curl", "-sSk",
            "--resolve", f"{host}:{port}:127.0.0.1", "-o", "/dev/null", "-w", "%{http_code}",
            f"https://{host}:{port}/exec",
        ]  # fmt: skip
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE)
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            return out.decode()
        finally:
            await edge.close()

    # that user is served: its request is routed (no such instance here, hence 404), not 403
    assert asyncio.run(main()) == "404"
    assert world.resolved == [(f"box.{APP_DOMAIN}", 443)]
