"""The agent's command line: `--name value` pairs that the runtime writes (bwrap.py).

Why not argparse: with `re` and `gettext` it was a quarter of the agent's start, which every
sandbox boot pays; the runtime is the only caller and writes one fixed form.
"""

from __future__ import annotations

__all__ = ["Options", "parse"]


class Options:
    status_fd: int
    plugin_fd: int
    relay_fd: int
    env_fd: int
    host_key: str
    max_procs: int = 0
    max_data: int = 0
    # as on UKC, where `running` means the app reached its entry point: sshd listens this
    # long after the ready line, and the key from PUBKEY is installed this long after that
    ssh_delay: float = 0.0
    key_delay: float = 0.0


_TYPES: dict[str, type] = {
    "status_fd": int,
    "plugin_fd": int,
    "relay_fd": int,
    "env_fd": int,
    "host_key": str,
    "max_procs": int,
    "max_data": int,
    "ssh_delay": float,
    "key_delay": float,
}
_REQUIRED = ("status_fd", "plugin_fd", "relay_fd", "env_fd", "host_key")


def parse(argv: list[str]) -> Options:
    """The options in `argv`; ValueError naming the first one that is unknown, repeated,
    missing its value, of the wrong type or left out."""
    opts = Options()
    seen: set[str] = set()
    it = iter(argv)
    for flag in it:
        name = flag[2:].replace("-", "_") if flag.startswith("--") else ""
        kind = _TYPES.get(name)
        if kind is None or name in seen:
            raise ValueError(f"unknown or repeated option {flag[:40]!r}")
        value = next(it, None)
        if value is None:
            raise ValueError(f"option {flag} needs a value")
        try:
            setattr(opts, name, kind(value))
        except ValueError:
            raise ValueError(f"option {flag}: {value[:40]!r} is not {kind.__name__}") from None
        seen.add(name)
    missing = [f"--{n.replace('_', '-')}" for n in _REQUIRED if n not in seen]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    return opts
