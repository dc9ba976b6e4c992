"""A session's SSH key pair: ed25519, the private half 0600 from its first byte.

A random key outlives a replacement of the instance and is removed only when the session is
deleted. A key derived from a seed is rewritten whenever the seed changes (a new instance).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from reconciler._util.atomic import write_atomic

__all__ = ["ensure_derived_keypair", "ensure_keypair", "generate_keypair"]


def _line_of(key: Ed25519PrivateKey, comment: str) -> str:
    """The OpenSSH public line of `key`."""
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return f"{public.decode()} {comment}"


def generate_keypair(path: Path, comment: str | None = None) -> str:
    """Write a new ed25519 private key (OpenSSH format, 0600) at `path`; return the public line.

    The file is created with O_EXCL and mode 0600 in the same call, so it is never readable by
    others, not even briefly; an existing file is an error (never overwrite a key silently).
    """
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # why: a umask can only remove bits; make the mode exact
        view = memoryview(private)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return _line_of(key, comment or path.name)


def _public_line(path: Path, comment: str) -> str | None:
    """The public line of the ed25519 private key at `path`; None if there is none whole."""
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
        return None
    if not isinstance(key, Ed25519PrivateKey):
        return None
    return _line_of(key, comment)


def ensure_keypair(path: Path) -> str:
    """The session's public key line, generating the keypair (private 0600) on first use.

    The key outlives a replacement of the instance and is removed only when the session is
    deleted; an adopted instance (lost create answer) therefore still accepts it.
    """
    pub = path.with_name(path.name + ".pub")
    comment = f"ukc-{path.name}"
    if path.exists():
        with contextlib.suppress(FileNotFoundError):
            line = pub.read_text().strip()
            if line.startswith("ssh-ed25519 "):
                return line
        # A .pub that is missing or empty (a kill or power loss while it was written) is
        # derived again from the private key: that key, fsynced before this function first
        # returned (so before any create sent its public half), is what an instance accepts.
        # why: then the .pub needs no fsync of its own on every new session's create path
        derived = _public_line(path, comment)
        if derived is not None:
            write_atomic(pub, (derived + "\n").encode(), mode=0o644, durable=False)
            return derived
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a private key cut short by a kill: no create ever sent it; start over
    line = generate_keypair(path, comment=comment)
    write_atomic(pub, (line + "\n").encode(), mode=0o644, durable=False)
    return line


def ensure_derived_keypair(path: Path, seed: bytes, comment: str | None = None) -> str:
    """The public key line of the ed25519 key whose seed is `seed`, written at `path` (0600)
    and `path.pub` unless they already hold it (another seed's key is replaced)."""
    key = Ed25519PrivateKey.from_private_bytes(seed)
    line = _line_of(key, comment or f"ukc-{path.name}")
    pub = path.with_name(path.name + ".pub")
    with contextlib.suppress(FileNotFoundError):
        if path.exists() and pub.read_text().strip() == line:
            return line
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    # why the private half first: a kill between the two leaves a .pub that does not match,
    # so the next call writes both again
    with contextlib.suppress(FileNotFoundError):
        pub.unlink()
    write_atomic(path, private, mode=0o600)
    write_atomic(pub, (line + "\n").encode(), mode=0o644)
    return line
