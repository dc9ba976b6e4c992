"""Which way sync reaches into one sandbox: the python helper, or POSIX shell tools and tar.

The helper (`remote`/`helper`) needs python3 >= 3.7 in the image; standard Debian images and
the original workflow's image have none, only sh, coreutils, findutils and tar. The choice is
made once per instance and recorded in the session's sync state dir, so that:

* an image with python3 pays nothing: a push starts the helper as always, and its first
  success records "python" (one small write, once per instance);
* the first push to an image without one learns it from the helper's own failure (the shell's
  exit 126/127, `MissingToolError` naming the interpreter), records "shell" and goes on over
  the shell path at once; every later push and pull of that instance starts there;
* a pull (or anything else) that comes first asks `remote_tools`, which probes once (one round
  trip: start the interpreter and check its version) and records the answer;
* `ukc plan -v` reads the record (`recorded_tools`): a fact observed earlier, never a guess.

A new instance (a replacement, a new uuid) starts unknown again: its image may differ.
"""

from __future__ import annotations

import shlex
from typing import Literal

from reconciler.errors import MissingToolError, RemoteError
from reconciler.sync.options import SyncOptions
from reconciler.sync.records import TOOLS, read_record, write_record
from reconciler.transport.base import RemoteShell

__all__ = [
    "RECORD",
    "Tools",
    "describe",
    "is_missing_interpreter",
    "probe_tools",
    "record_tools",
    "recorded",
    "recorded_tools",
    "remote_tools",
]

#: the record's name in the session's sync state dir
RECORD = TOOLS

#: "python": the helper runs; "shell": sh + coreutils + findutils + tar (no usable python3)
Tools = Literal["python", "shell"]

_WORDS: dict[str, str] = {
    "python": "python helper",
    "shell": "shell+tar",
}


def describe(tools: Tools | None) -> str:
    """The words `ukc plan -v` uses for a sync path (None: nothing observed yet)."""
    return _WORDS[tools] if tools is not None else "not known until first contact"


def recorded(opts: SyncOptions) -> tuple[str, Tools] | None:
    """(instance uuid, sync path) as the session's record holds it, or None. The planner
    compares the uuid with the instance it observes (a pure judgement)."""
    rec = read_record(opts.state_dir, RECORD)
    if rec is None:
        return None
    uuid, tools = rec.get("uuid"), rec.get("tools")
    if not isinstance(uuid, str) or not uuid:
        return None
    if tools == "python":
        return uuid, "python"
    if tools == "shell":
        return uuid, "shell"
    return None


def recorded_tools(opts: SyncOptions, instance_uuid: str) -> Tools | None:
    """What an earlier contact found for this instance, or None (no contact yet, another
    instance, an unreadable record). Reads one small file; no remote I/O."""
    rec = recorded(opts)
    if not instance_uuid or rec is None or rec[0] != instance_uuid:
        return None
    return rec[1]


def record_tools(opts: SyncOptions, instance_uuid: str, tools: Tools) -> None:
    """Remember what this instance has (only one instance per session: a new uuid replaces
    the record). Not fsynced: a lost record costs one probe or one failed helper start."""
    if not instance_uuid or recorded_tools(opts, instance_uuid) == tools:
        return
    write_record(opts.state_dir, RECORD, {"uuid": instance_uuid, "tools": tools}, durable=False)


def is_missing_interpreter(exc: BaseException, opts: SyncOptions) -> bool:
    """True when `exc` is the helper's start failing because the image has no usable
    interpreter at `opts.remote_python` (the shell's 126/127, as `remote` reports it)."""
    return isinstance(exc, MissingToolError) and exc.tool == opts.remote_python


#: the probe: exit 0 for a usable interpreter, 3 for one older than the helper's floor (the
#: shell answers 126/127 for none)
_PROBE = "import sys;sys.exit(3 if sys.version_info<(3,7) else 0)"


def probe_tools(shell: RemoteShell, opts: SyncOptions, *, timeout_s: float = 30.0) -> Tools:
    """Start the interpreter once and judge by its exit status: 0 -> "python"; 3 (too old),
    126 or 127 (not runnable, not found) -> "shell". Any other answer is an error: a sandbox
    that cannot even run a command says nothing about its image."""
    cmd = f"exec {shlex.quote(opts.remote_python)} -E -S -c {shlex.quote(_PROBE)}"
    proc = shell.start(cmd)
    try:
        proc.close_stdin()
        try:
            code = proc.wait(timeout=timeout_s)
        except TimeoutError:
            raise RemoteError(
                f"sync of session {opts.session!r}: the probe for {opts.remote_python} did not "
                f"end within {timeout_s:g} s"
            ) from None
    finally:
        proc.kill()
    if code == 0:
        return "python"
    if code in (3, 126, 127):
        return "shell"
    raise RemoteError(
        f"sync of session {opts.session!r}: the probe for {opts.remote_python} exited with "
        f"code {code}"
    )


def remote_tools(shell: RemoteShell, opts: SyncOptions, instance_uuid: str) -> Tools:
    """The sync path for this instance: the recorded one, else probed once and recorded."""
    known = recorded_tools(opts, instance_uuid)
    if known is not None:
        return known
    found = probe_tools(shell, opts)
    record_tools(opts, instance_uuid, found)
    return found
