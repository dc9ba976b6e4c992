"""A sync helper the sandbox replaced: a real program that answers with a crafted stream.

The sandbox can replace the sync helper, or the python3 it runs with, so every byte the
engine reads from it is the attacker's. `fake_python(dir, body)` writes an executable that
stands in for the sandbox's python3: give its path as `SyncOptions.remote_python` and the
engine starts it exactly as it starts the real interpreter (through `LocalShell`, a real
process on a real pipe). `body` is Python source run with these names:

    frame(obj)      one control frame (u32be length + JSON)
    chunk(data)     one file data chunk; end_file() ends a file
    hello()         a hello answer from a sandbox with boot id "b" and no record
    flush()         push what was written to the pipe
    entry(path, kind="f", size=0, mode=0o644, mtime_ns=1, **extra)   a pull header

`run_in_child(...)` runs a push or pull in a fresh interpreter with resource limits (memory,
descriptors, file size) and reports its result and peak RSS: an attack that would exhaust
something then fails that child, never the test process or the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

__all__ = ["fake_python", "run_in_child"]

_PRELUDE = """\
#!/usr/bin/python3
import json, os, struct, sys, time
OUT = sys.stdout.buffer


def frame(obj):
    data = json.dumps(obj, separators=(",", ":")).encode("ascii")
    OUT.write(struct.pack(">I", len(data)) + data)


def chunk(data):
    OUT.write(struct.pack(">I", len(data)) + data)


def end_file():
    OUT.write(struct.pack(">I", 0))


def hello():
    frame({"boot_id": "b", "fresh": False, "has_record": False, "record": None})


def flush():
    OUT.flush()


def entry(path, kind="f", size=0, mode=0o644, mtime_ns=1, **extra):
    frame(dict(path=path, type=kind, size=size, mode=mode, mtime_ns=mtime_ns, **extra))


"""


def fake_python(directory: Path, body: str, name: str = "python3") -> str:
    """Write the stand-in interpreter; returns its path (for `remote_python`)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(_PRELUDE + textwrap.dedent(body) + "\nflush()\n")
    path.chmod(0o755)
    return str(path)


_CHILD = """\
import json, os, resource, sys, traceback
args = json.loads(sys.argv[1])
for name, value in args["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
os.umask(args["umask"])
from pathlib import Path
from reconciler.transport.local_shell import LocalShell
from reconciler.sync.options import SyncOptions
from reconciler.sync import pull, push

def peak_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0

opts = dict(args["opts"])
for key in ("local_root", "state_dir"):
    opts[key] = Path(opts[key])
for key in ("back", "exclude", "boot_id_paths"):
    if key in opts:
        opts[key] = tuple(opts[key])
options = SyncOptions(**opts)
out = {"before_mib": peak_mib()}
shell = LocalShell()
try:
    if args["kind"] == "pull":
        r = pull.pull(shell, options, instance_uuid=args.get("uuid", ""))
        out["result"] = {
            "files_written": r.files_written, "rejected": r.rejected, "refused": r.refused,
            "stopped": r.stopped, "aborted": r.aborted, "deleted": r.deleted,
            "deletes_skipped": r.deletes_skipped, "conflicts": r.conflicts,
        }
    else:
        r = push.push(shell, options, instance_uuid="u")
        out["result"] = {"files_sent": r.files_sent}
except BaseException as exc:
    out["error"] = type(exc).__name__ + ": " + str(exc)[:2000]
    out["trace"] = traceback.format_exc()[-3000:]
finally:
    shell.close()
out["peak_mib"] = peak_mib()
print(json.dumps(out))
"""


def run_in_child(
    kind: str,
    opts: dict[str, Any],
    *,
    limits: dict[str, int] | None = None,
    umask: int = 0o022,
    uuid: str = "",
    timeout: float = 300,
    wrap: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run `pull` or `push` with `SyncOptions(**opts)` (paths as strings) in a child process
    under `limits` (resource names -> soft = hard value, e.g. {"RLIMIT_NOFILE": 256}).

    Returns {"result": {...}} or {"error": "Type: message"}, with "before_mib" and "peak_mib"
    (the child's peak RSS before and after). `wrap` prefixes the command (e.g. `unshare`);
    `env` adds to the child's environment (its "sandbox" commands inherit it: a PATH)."""
    root = Path(__file__).resolve().parents[2]
    arg = json.dumps(
        {"kind": kind, "opts": opts, "limits": limits or {}, "umask": umask, "uuid": uuid}
    )
    proc = subprocess.run(
        [*(wrap or []), sys.executable, "-c", _CHILD, arg],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=root,
        env={**os.environ, **(env or {}), "PYTHONPATH": str(root)},
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"error": f"child exited {proc.returncode}: {proc.stderr[-3000:]}"}
    data: dict[str, Any] = json.loads(lines[-1])
    return data
