"""The instance env's way into the sandbox: `key NUL value NUL` pairs on an inherited pipe.

Why not JSON: the agent runs once per sandbox boot, and `json` (with `re`) was a sixth of its
start. An environment can hold no NUL byte, so NUL separates without escaping; a key or value
that holds one, or a key with `=` or empty, is refused when encoded, as the agent's
`os.environ` would refuse it.
"""

from __future__ import annotations

__all__ = ["decode", "encode"]


def encode(env: dict[str, str]) -> bytes:
    parts: list[bytes] = []
    for key, value in env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise ValueError(
                f"env variable {key[:64]!r}: a name must be non-empty, without '=' "
                "or NUL, and a value without NUL"
            )
        parts += [key.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape")]
    return b"".join(p + b"\0" for p in parts)


def decode(data: bytes) -> dict[str, str]:
    fields = data.split(b"\0")
    if fields.pop() != b"" or len(fields) % 2:
        raise ValueError("the env pipe must carry NUL-terminated key, value pairs")
    text = [f.decode("utf-8", "surrogateescape") for f in fields]
    return dict(zip(text[::2], text[1::2], strict=True))
