"""A session's credentials reproducible on every runner that holds the project's secret.

Without `UKC_SESSION_SECRET` a session's SSH key is random and lives only in the checkout's
`.ukc/keys/` (a fresh clone cannot reach the instance and must replace it). With the secret,
the key is derived, so any CI runner with the secret reaches the instance another one made:

    seed = HKDF-SHA256(ikm = secret, salt = "ukc.session-key:" + project,
                       info = "ukc.session-key\\0" + session + "\\0" + nonce)[:32]

and the ed25519 key is the one with that seed. The nonce is random per instance and kept in
its `ukc.key=<nonce>` tag: a replacement gets a new key (a key that leaked from an old instance
opens nothing new), and any holder of the secret reads the nonce from the instance it observes.
The nonce is not secret; without the secret it yields nothing. A tag that is not a nonce of
ours (another length, other characters) derives nothing.

Pure except `new_nonce` (random), which only the executor's create calls.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence

__all__ = [
    "KEY_TAG",
    "key_root",
    "key_tag",
    "new_nonce",
    "nonce_of",
    "seed",
]

#: tag key carrying the nonce of an instance's derived key
KEY_TAG = "ukc.key"
_NONCE = re.compile(r"[0-9a-f]{32}")
_SALT = b"ukc.session-key:"
_INFO = b"ukc.session-key\0"


def key_root(secret: str, project: str) -> bytes:
    """HKDF's extract step: the project's key-derivation key (the secret itself is not kept)."""
    return hmac.new(_SALT + project.encode(), secret.encode(), hashlib.sha256).digest()


def seed(root: bytes, session: str, nonce: str) -> bytes:
    """HKDF's expand step (one block): the 32-byte ed25519 seed of `session`'s instance."""
    info = _INFO + session.encode() + b"\0" + nonce.encode()
    return hmac.new(root, info + b"\x01", hashlib.sha256).digest()


def new_nonce() -> str:
    return secrets.token_hex(16)


def key_tag(nonce: str) -> str:
    return f"{KEY_TAG}={nonce}"


def nonce_of(tags: Sequence[str]) -> str | None:
    """The nonce an instance's `ukc.key` tag carries, if it is one ukc could have made."""
    prefix = KEY_TAG + "="
    found = [t[len(prefix) :] for t in tags if t.startswith(prefix)]
    # why exactly one: two tags would let whoever added the second choose which key we use
    if len(found) != 1 or not _NONCE.fullmatch(found[0]):
        return None
    return found[0]
