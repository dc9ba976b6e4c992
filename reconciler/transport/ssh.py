"""The `ssh` transport: SSH through the metro's TLS edge on public port 2222.

The instance gets the session's public key in its `PUBKEY` environment variable and one public
port, 2222 (`tls`): the only authenticated way in. Everything runs over that connection: the
sync helper's byte streams and the session commands. The sandbox's host key is accepted on the
first connection and pinned from then on.

paramiko (`transport.sshclient`) and the key generator (`transport.keys`) are imported only
when a connection or a key is made: a no-op apply needs neither.
"""

from __future__ import annotations

from reconciler.cloud.model import Service
from reconciler.transport.base import (
    CreateFields,
    Credentials,
    Target,
    Transport,
    TransportKind,
)
from reconciler.transport.commands import ShellTransport
from reconciler.transport.tls import Dialer

__all__ = ["KIND", "PRELOAD", "SshKind"]

SSH_PORT = 2222
#: what `connect` loads late (see `transport.select.preload`)
PRELOAD = ("reconciler.transport.sshclient",)


class SshKind:
    """Sets up the `ssh` transport."""

    name = "ssh"
    credentials_noun = "ssh key"
    services: tuple[Service, ...] = (Service(SSH_PORT, SSH_PORT, ("tls",)),)

    def warnings(self, session: str) -> tuple[str, ...]:
        return ()

    def credentials_present(self, credentials: Credentials) -> bool:
        return credentials.seed is not None or credentials.path.exists()

    def create_fields(self, credentials: Credentials) -> CreateFields:
        return CreateFields(env={"PUBKEY": _public_key(credentials)}, services=self.services)

    def connect(
        self, target: Target, credentials: Credentials, *, pin: str | None, deadline_s: float
    ) -> Transport:
        from reconciler.transport import sshclient

        if credentials.seed is not None:
            _public_key(credentials)  # this runner's copy of the derived key
        shell = sshclient.wait_ssh_ready(
            Dialer.to(target.reach),
            target.public_name(),
            key_path=credentials.path,
            deadline_s=deadline_s,
            expected_host_key=pin,
        )
        return ShellTransport(self.name, shell, pin=shell.host_key_fingerprint)

    def reopen(self, target: Target, credentials: Credentials, *, pin: str) -> Transport:
        from reconciler.transport import sshclient

        if credentials.seed is not None:
            _public_key(credentials)  # this runner's copy of the derived key
        shell = sshclient.SshShell.connect(
            Dialer.to(target.reach),
            target.public_name(),
            key_path=credentials.path,
            expected_host_key=pin,
        )
        return ShellTransport(self.name, shell, pin=shell.host_key_fingerprint)


def _public_key(credentials: Credentials) -> str:
    """The session's public key line; its private half in `credentials.path` (derived from
    the seed when there is one, else random and made on first use)."""
    from reconciler.transport.keys import ensure_derived_keypair, ensure_keypair

    if credentials.seed is not None:
        return ensure_derived_keypair(credentials.path, credentials.seed)
    return ensure_keypair(credentials.path)


KIND: TransportKind = SshKind()
