"""Push without python in the sandbox: POSIX sh, coreutils, GNU find and GNU tar.

The decisions are the python path's (`push.judge`: trusted remote record or scan, then
`diff`); only the remote end differs. At most three commands per push:

1. hello: the boot id and our remote record (one small, bounded answer). A record that
   matches our last push in this boot is trusted, and a push with nothing to do ends here;
2. scan (only when the record is not trusted): `find -printf` with NUL-separated fields,
   parsed by `ScanParser` (bounded, every path checked) into `push.RemoteScan`;
3. apply: a tar stream made here (headers from `tarfile`, file data read and sent in chunks,
   never whole in memory) is extracted by the sandbox's `tar -x` into a staging directory
   inside the root; its last member is the operations script, written once every file was
   sent, which moves the staged files into place (a rename per file, so a file is replaced
   whole, never seen half-written), applies modes and mtimes, and - only when nothing failed -
   deletes, swaps types and writes the remote record. The record is removed first, so an
   interrupted push forces a scan next time, as on the python path.

What this path does not do (docs/sync-paths.md): delta uploads of big files (a changed file is
sent whole), hashing remote files during a scan (a file the remote may already hold is sent
again after an untrusted record), and it walks directories by path with `[ -L ]` checks rather
than O_NOFOLLOW directory fds (a command racing the push inside the sandbox can still move
things under it; only the sandbox's own files are at stake).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import stat
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from reconciler._util.text import one_line
from reconciler.errors import MALFORMED_JSON, RemoteError, SyncError
from reconciler.sync.diff import TransferPlan
from reconciler.sync.ignore import IgnoreRules, is_under, load_rules
from reconciler.sync.manifest import (
    CHUNK,
    READ_FLAGS,
    Entry,
    Manifest,
    push_meta,
    record_push,
    scan_local,
)
from reconciler.sync.options import SyncOptions
from reconciler.sync.push import PushResult, RemoteScan, judge
from reconciler.sync.remote import HelperSession
from reconciler.transport.base import RemoteShell

__all__ = ["MAX_FIELD", "MAX_HELLO", "STAGE", "ScanParser", "push"]

#: the staging directory inside the remote root (the scan skips it; every apply starts by
#: removing what a killed one left)
STAGE = ".ukc-tmp.push"
#: the largest hello answer: a boot id (256 bytes) and a record (4 KiB)
MAX_HELLO = 8 << 10
#: the longest field of a scan entry (a path or a link target: PATH_MAX)
MAX_FIELD = 4096
#: the longest answer of the apply script on stdout (one status line)
_MAX_DONE = 4096
#: paths per command line of the operations script (argv stays far below ARG_MAX)
_ARGS_PER_CALL = 500
_CHARS_PER_CALL = 64 << 10
_BLOCK = 512
_RECORD = 20 * _BLOCK

_NUMBER = re.compile(rb"[0-9]{1,20}")
_MTIME = re.compile(rb"(-?[0-9]{1,15})(?:\.([0-9]{1,12}))?")
_MODE = re.compile(rb"[0-7]{1,6}")
#: `find -printf %y` letters: regular, directory, link, and the rest (sockets, fifos, devices)
_KINDS = {b"f": "f", b"d": "d", b"l": "l", b"b": "o", b"c": "o", b"p": "o", b"s": "o", b"D": "o"}


def push(
    shell: RemoteShell,
    opts: SyncOptions,
    *,
    instance_uuid: str,
    local: Manifest | None = None,
    rules: IgnoreRules | None = None,
) -> PushResult:
    """Sync the local tree to a sandbox without python3 (see the module's doc). Raises
    `SyncHaltedError` (guards), `SyncError` or `RemoteError` as the python path does."""
    rules = rules if rules is not None else load_rules(opts)
    if local is None:
        local = scan_local(opts, rules)
    if STAGE in local.entries:
        raise SyncError(
            f"push to {opts.remote_root}: the local tree holds {STAGE!r}, the name the shell+tar "
            "sync stages files under; rename it or exclude it"
        )
    last = push_meta(opts)
    boot_id, record = _hello(shell, opts)

    def scan(want: dict[str, list[int]]) -> Manifest:
        return _scan(shell, opts, local, rules, want)

    previous, plan, delta, scanned = judge(
        opts, rules, local, last, record, boot_id, instance_uuid, scan
    )
    result = PushResult(0, 0, 0, scanned, boot_id, local.digest, plan)
    if plan.empty and not scanned:
        return result  # our record already describes this tree
    _apply(shell, opts, rules, local, previous, plan, instance_uuid, boot_id, result)
    record_push(opts, local, instance_uuid, boot_id, delta=delta)
    return result


# -- hello


def _session(shell: RemoteShell, opts: SyncOptions, command: str, tool: str) -> HelperSession:
    return HelperSession(shell, opts, command=command, tool=tool)


def _read_all(s: HelperSession, limit: int, what: str) -> bytes:
    out = bytearray()
    while True:
        chunk = s.reader.some()
        if not chunk:
            return bytes(out)
        out += chunk
        if len(out) > limit:
            raise RemoteError(
                f"push to {s.opts.remote_root}: the sandbox's {what} answer is longer than "
                f"{limit} bytes"
            )


def _finish(s: HelperSession, what: str, ok: tuple[int, ...] = (0,)) -> int:
    """Wait for the command's exit (the watchdog still runs); its stderr for a failure."""
    try:
        with contextlib.suppress(Exception):
            s.proc.close_stdin()
        code = s.proc.wait(timeout=60)
    except TimeoutError:
        s.close(abort=True)
        raise RemoteError(f"the sandbox's {what} did not exit within 60 s") from None
    finally:
        s.watchdog.stop()
    if code in (126, 127):
        s.exit_reason()  # raises the MissingToolError that names the tool
    if code not in ok:
        raise RemoteError(f"the sandbox's {what} exited with code {code}: {s.stderr_line()}")
    return code


def hello_command(opts: SyncOptions) -> str:
    boots = " ".join(shlex.quote(p) for p in opts.boot_id_paths)
    root = shlex.quote(opts.remote_root)
    rec = shlex.quote(f"{opts.remote_state_dir}/record.json")
    return (
        f"mkdir -p -- {root} || exit 90; b=; "
        f'for p in {boots}; do b=$(head -c 256 -- "$p" 2>/dev/null) && [ -n "$b" ] && break; '
        "b=; done; "
        "printf '%s\\0' \"$b\"; "
        f"head -c 4096 -- {rec} 2>/dev/null; exit 0"
    )


def _hello(shell: RemoteShell, opts: SyncOptions) -> tuple[str, Any]:
    """(boot id, the remote record as the sandbox shows it; None when there is none)."""
    s = _session(shell, opts, hello_command(opts), "head")
    try:
        raw = _read_all(s, MAX_HELLO, "hello")
        _finish(s, "hello")
    except BaseException:
        s.close(abort=True)
        raise
    return parse_hello(raw)


def parse_hello(raw: bytes) -> tuple[str, Any]:
    """The boot id (printable ASCII, at most 128 characters) and the record (a JSON object,
    else None: an unreadable record is no record, and forces a scan)."""
    boot, sep, rest = raw.partition(b"\0")
    if not sep:
        raise RemoteError("the sandbox's hello answer has no boot id field")
    boot_id = one_line(boot.decode("ascii", "replace").strip(), 128)
    record: Any = None
    if rest:
        try:
            record = json.loads(rest.decode("ascii"))
        except MALFORMED_JSON:
            record = None
    return boot_id, record if isinstance(record, dict) else None


# -- scan


def scan_command(opts: SyncOptions) -> str:
    root = shlex.quote(opts.remote_root)
    return (
        f"cd -- {root} || exit 90; "
        f"exec find . -mindepth 1 -path ./{STAGE} -prune -o "
        "-printf '%y\\0%s\\0%T@\\0%m\\0%P\\0%l\\0'"
    )


class ScanParser:
    """`find -printf '%y\\0%s\\0%T@\\0%m\\0%P\\0%l\\0'` output, fed in chunks as it comes.

    The sandbox writes it, so every field is checked: a field without its NUL within
    `MAX_FIELD` bytes, a number that is not one, an unknown type letter, a path that is
    empty, absolute or holds `.`/`..`/empty components, or a link target on a non-link ends
    the push before any change. Entries go to `RemoteScan`, which bounds what is kept.
    """

    def __init__(self, keep: RemoteScan) -> None:
        self._keep = keep
        self._buf = bytearray()
        self._fields: list[bytes] = []
        self.count = 0

    def feed(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        start = 0
        fields = self._fields
        while True:
            end = buf.find(b"\0", start)
            if end < 0:
                break
            fields.append(bytes(buf[start:end]))
            start = end + 1
            if len(fields) == 6:
                self._entry(fields)
                fields.clear()
        del buf[:start]
        if len(buf) > MAX_FIELD:
            raise RemoteError(
                f"the sandbox's scan sent a field longer than {MAX_FIELD} bytes "
                f"({self.count} entries read)"
            )

    def end(self) -> None:
        if self._buf or self._fields:
            raise RemoteError(f"the sandbox's scan ended inside an entry ({self.count} read)")

    def _bad(self, what: str) -> RemoteError:
        return RemoteError(f"the sandbox's scan sent {what} (entry {self.count + 1})")

    def _entry(self, f: list[bytes]) -> None:
        kind = _KINDS.get(f[0])
        if kind is None:
            raise self._bad("an unknown type")
        if not _NUMBER.fullmatch(f[1]) or not _MODE.fullmatch(f[3]):
            raise self._bad("a malformed size or mode")
        m = _MTIME.fullmatch(f[2])
        if m is None:
            raise self._bad("a malformed mtime")
        if len(f[4]) > MAX_FIELD or len(f[5]) > MAX_FIELD:
            raise self._bad(f"a path longer than {MAX_FIELD} bytes")
        path = f[4].decode("utf-8", "surrogateescape")
        if not path or path.startswith("/") or any(c in ("", ".", "..") for c in path.split("/")):
            raise self._bad("a path outside the root")
        if kind != "l" and f[5]:
            raise self._bad("a link target on a non-link")
        if kind == "l" and not f[5]:
            raise self._bad("a link without a target")
        secs, frac = m.group(1), m.group(2) or b"0"
        ns = abs(int(secs)) * 10**9 + int((frac + b"000000000")[:9])
        mtime_ns = -ns if secs.startswith(b"-") else ns
        mode = int(f[3], 8) & 0o7777
        size = int(f[1])
        target = f[5].decode("utf-8", "surrogateescape")
        if kind == "l":
            self._keep.add(path, "l", len(f[5]), mtime_ns, 0o777, target)
        elif kind == "d":
            self._keep.add(path, "d", 0, mtime_ns, mode, "")
        else:
            # no hash: a remote file is never taken as equal to ours without one, so after an
            # untrusted record every file is sent again (docs/sync-paths.md)
            self._keep.add(path, kind, size, mtime_ns, mode, "")
        self.count += 1


def _scan(
    shell: RemoteShell,
    opts: SyncOptions,
    local: Manifest,
    rules: IgnoreRules,
    want: dict[str, list[int]],
) -> Manifest:
    """The remote tree; files whose size and mtime equal ours are hashed (one more command),
    so that a file the sandbox already holds is not sent again."""
    keep = RemoteScan(local, rules, opts)
    parser = ScanParser(keep)
    s = _session(shell, opts, scan_command(opts), "find")
    try:
        with contextlib.suppress(Exception):
            s.proc.close_stdin()
        while True:
            chunk = s.reader.some()
            if not chunk:
                break
            parser.feed(chunk)
        parser.end()
        _finish(s, "scan (find)")
    except BaseException:
        s.close(abort=True)
        raise
    entries = keep.entries
    same = [
        p
        for p, e in entries.items()
        if e.type == "f" and (w := want.get(p)) is not None and [e.size, e.mtime_ns] == w
    ]
    if same:
        for path, digest in _hashes(shell, opts, same).items():
            entries[path] = entries[path]._replace(ref=digest)
    return Manifest(entries)


def hash_command(opts: SyncOptions) -> str:
    root = shlex.quote(opts.remote_root)
    return f"cd -- {root} || exit 90; exec xargs -0 -r sha256sum -z --"


_HASHED = re.compile(rb"([0-9a-f]{64}) [ *]\./(.+)", re.DOTALL)


def _hashes(shell: RemoteShell, opts: SyncOptions, paths: list[str]) -> dict[str, str]:
    """sha256 of each of `paths` the sandbox could read (`sha256sum -z`; a name it answers
    that we did not ask for, or a malformed record, ends the push before any change)."""
    asked = set(paths)
    limit = sum(len(p.encode("utf-8", "surrogateescape")) + 72 for p in paths) + 4096
    s = _session(shell, opts, hash_command(opts), "sha256sum")
    try:
        for p in paths:
            s.send_raw(b"./" + p.encode("utf-8", "surrogateescape") + b"\0")
        s.flush()
        s.proc.close_stdin()
        raw = _read_all(s, limit, "hash")
        # 123: a file could not be read (it vanished or is unreadable: it is sent again)
        _finish(s, "hash (sha256sum)", ok=(0, 123))
    except BaseException:
        s.close(abort=True)
        raise
    out: dict[str, str] = {}
    records = raw.split(b"\0")
    if records and records[-1] == b"":
        records.pop()
    for rec in records:
        m = _HASHED.fullmatch(rec)
        path = m.group(2).decode("utf-8", "surrogateescape") if m else None
        if m is None or path not in asked:
            raise RemoteError("the sandbox's hash answer holds a malformed or unasked record")
        out[path] = m.group(1).decode("ascii")
    return out


# -- apply


def apply_command(opts: SyncOptions) -> str:
    root = shlex.quote(opts.remote_root)
    rec = shlex.quote(f"{opts.remote_state_dir}/record.json")
    return (
        "umask 077; "
        f"cd -- {root} || exit 90; "
        f"rm -f -- {rec}; "
        f"S=./{STAGE}; "
        'rm -rf -- "$S" && mkdir -- "$S" || exit 91; '
        'tar -x -p --no-same-owner -f - -C "$S" 2>"$S/.err"; t=$?; '
        # tar's first real complaint (not its note on the pax charset field, nor its last line)
        'if [ "$t" -ne 0 ]; then grep -v -e "extended header" -e "Exiting with failure" '
        '-- "$S/.err" | head -n 1 | head -c 1024 >&2; rm -rf -- "$S"; exit "$t"; fi; '
        'sh "$S/ops" 2>"$S/.err"; c=$?; '
        'head -n 1 -- "$S/.err" | head -c 1024 >&2; rm -rf -- "$S"; exit "$c"'
    )


def _q(path: str) -> str:
    """A path relative to the root as one shell word (`./` first: never an option)."""
    return shlex.quote("./" + path if path else ".")


def _staged(path: str) -> str:
    return '"$T"/' + shlex.quote(path)


def _calls(head: str, words: Iterable[str], tail: str = "") -> Iterator[str]:
    """`head WORDS... tail` lines, at most `_ARGS_PER_CALL` words and `_CHARS_PER_CALL`
    characters of them each (a program's arguments stay far below ARG_MAX)."""
    batch: list[str] = []
    size = 0
    for w in words:
        if batch and (len(batch) >= _ARGS_PER_CALL or size + len(w) > _CHARS_PER_CALL):
            yield f"{head} {' '.join(batch)}{tail}"
            batch, size = [], 0
        batch.append(w)
        size += len(w) + 1
    if batch:
        yield f"{head} {' '.join(batch)}{tail}"


def _protected(path: str, protect: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p + "/") or p.startswith(path + "/") for p in protect)


def _ancestors(path: str) -> Iterator[str]:
    i = path.find("/")
    while i != -1:
        yield path[:i]
        i = path.find("/", i + 1)


class _Ops:
    """The operations script, built beside the tar stream."""

    def __init__(
        self,
        opts: SyncOptions,
        rules: IgnoreRules,
        local: Manifest,
        previous: Manifest,
        plan: TransferPlan,
    ) -> None:
        self.opts = opts
        self.rules = rules
        self.local = local
        self.previous = previous
        self.plan = plan
        self.replaced = frozenset(plan.replaces)
        #: uploads that go in as part of a whole new directory (moved once, with it)
        self.new_dirs = {
            p for p in plan.uploads if local.entries[p].type == "d" and p not in previous.entries
        }

    def staged_members(self) -> list[str]:
        """The uploads the tar carries, parents first."""
        return list(self.plan.uploads)

    def script(self, bad: set[str], missing: set[str], record: dict[str, Any]) -> str:
        plan, local, prev = self.plan, self.local.entries, self.previous.entries
        replaced = self.replaced
        lines = [
            "S=./" + STAGE,
            'T="$S/t"',
            "e=0",
            "n=0",
            "k=0",
            "f() { e=$((e+1)); }",
            'c() { k=0; for p in "$@"; do if [ -L "$p" ] || [ -e "$p" ]; then k=$((k+1)); fi; '
            "done; }",
            'fin() { echo "ukc-done $n $e"; exit "$1"; }',
        ]
        # no directory on the way to what we touch may be a link: the python path walks with
        # O_NOFOLLOW and refuses one; here it is checked before any change
        touched = [p for p in plan.uploads if not is_under(p, replaced)]
        touched += list(plan.metas) + list(plan.deletes) + list(plan.replaces)
        check: set[str] = set()
        for p in touched:
            check.update(_ancestors(p))
        check.update(p for p in plan.metas)
        check.update(
            p
            for p in plan.uploads
            if local[p].type == "d" and p in prev and not is_under(p, replaced)
        )
        for line in _calls("set --", (_q(p) for p in sorted(check))):
            lines.append(line)
            lines.append(
                'for p in "$@"; do if [ -L "$p" ]; then '
                'echo "${p#./}: a symbolic link where a directory or file was" >&2; f; fi; done'
            )
        lines.append('[ "$e" -eq 0 ] || fin 3')
        for p in sorted(bad):
            lines.append(f"rm -f -- {_staged(p)}")
            lines.append(f"echo {shlex.quote(p + ': changed while it was being sent')} >&2; f")
        for p in sorted(missing):
            lines.append(f"echo {shlex.quote(p + ': could not be read')} >&2; f")
        skip = bad | missing
        # uploads outside swapped paths: whole new directories, modes of existing ones,
        # files and links renamed into place per parent directory
        by_parent: dict[str, list[str]] = {}
        dir_modes: dict[int, list[str]] = {}
        for p in plan.uploads:
            if is_under(p, replaced) or p in skip:
                continue
            parent = p.rpartition("/")[0]
            if parent in self.new_dirs:
                continue  # moved with its directory
            e = local[p]
            if e.type == "d":
                if p in self.new_dirs:
                    lines.append(f"mv -T -- {_staged(p)} {_q(p)} || f")
                else:
                    dir_modes.setdefault(e.mode, []).append(p)
            else:
                by_parent.setdefault(parent, []).append(p)
        for mode, paths in sorted(dir_modes.items()):
            lines.extend(_calls(f"chmod {mode:o} --", (_q(p) for p in paths), " || f"))
        for parent, paths in sorted(by_parent.items()):
            lines.extend(_calls(f"mv -f -t {_q(parent)} --", (_staged(p) for p in paths), " || f"))
        modes: dict[int, list[str]] = {}
        mtimes: dict[int, list[str]] = {}
        for p in plan.metas:
            modes.setdefault(local[p].mode, []).append(p)
            mtimes.setdefault(local[p].mtime_ns, []).append(p)
        for mode, paths in sorted(modes.items()):
            lines.extend(_calls(f"chmod {mode:o} --", (_q(p) for p in paths), " || f"))
        for ns, paths in sorted(mtimes.items()):
            sec, frac = divmod(ns, 10**9)
            lines.extend(
                _calls(f"touch -c -h -d @{sec}.{frac:09d} --", (_q(p) for p in paths), " || f")
            )
        # the barrier: no delete unless every upload so far landed
        lines.append('[ "$e" -eq 0 ] || fin 3')
        protect = list(self.rules.back)
        deletes = [p for p in plan.deletes if not _protected(p, protect)]
        files = [p for p in deletes if prev[p].type != "d"]
        dirs = [p for p in deletes if prev[p].type == "d"]  # deepest first, as planned
        for line in _calls("set --", (_q(p) for p in files)):
            lines += [line, 'c "$@"; b=$k; rm -f -- "$@" || f; c "$@"; n=$((n+b-k))']
        for line in _calls("set --", (_q(p) for p in dirs)):
            lines += [
                line,
                'c "$@"; b=$k; rmdir --ignore-fail-on-non-empty -- "$@" || f; c "$@"; n=$((n+b-k))',
            ]
        swaps = [p for p in plan.replaces if not _protected(p, protect)]
        for p in swaps:
            rm = "rmdir" if prev[p].type == "d" else "rm -f"
            lines.append(f"{rm} -- {_q(p)} && n=$((n+1)) || f")
        lines.append('[ "$e" -eq 0 ] || fin 4')
        for p in swaps:
            if p in skip:
                continue
            lines.append(f"mv -f -T -- {_staged(p)} {_q(p)} || f")
        lines.append('[ "$e" -eq 0 ] || fin 4')
        state = self.opts.remote_state_dir
        tmp = shlex.quote(f"{state}/record.json.tmp") + ".$$"
        text = json.dumps(record, separators=(",", ":"), ensure_ascii=True)
        lines += [
            f"mkdir -p -- {shlex.quote(state)} && chmod 700 -- {shlex.quote(state)} || fin 4",
            f"printf '%s' {shlex.quote(text)} > {tmp} && "
            f"mv -f -- {tmp} {shlex.quote(state + '/record.json')} || {{ f; fin 4; }}",
            "fin 0",
        ]
        return "\n".join(lines) + "\n"


class _TarStream:
    """Tar members written straight into the session's input (1 MiB coalesced writes)."""

    def __init__(self, s: HelperSession) -> None:
        self.s = s
        self.written = 0

    def raw(self, data: bytes) -> None:
        self.s.send_raw(data)
        self.written += len(data)

    def header(self, info: tarfile.TarInfo, mtime_ns: int) -> None:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        sec, frac = divmod(mtime_ns, 10**9)
        info.mtime = max(sec, 0)
        # the exact mtime (a ustar header holds whole seconds only)
        info.pax_headers = {"mtime": f"{sec}.{frac:09d}"}
        self.raw(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def pad(self, size: int) -> None:
        rest = -size % _BLOCK
        if rest:
            self.raw(bytes(rest))

    def end(self) -> None:
        self.raw(bytes(2 * _BLOCK))
        rest = -self.written % _RECORD
        if rest:
            self.raw(bytes(rest))


def _send_file(t: _TarStream, root: Path, path: str, e: Entry) -> tuple[bool, bool, int]:
    """(sent, intact, bytes): a file that cannot be opened is not sent; one that changed
    while it was read is sent padded to its announced size, and its staged copy dropped."""
    try:
        fd = os.open(root / path, READ_FLAGS)  # a fifo in its place must not block
    except OSError:
        return False, False, 0
    try:
        st = os.fstat(fd)
        intact = stat.S_ISREG(st.st_mode) and st.st_size == e.size and st.st_mtime_ns == e.mtime_ns
        info = tarfile.TarInfo("t/" + path)
        info.size = e.size
        info.mode = e.mode
        t.header(info, e.mtime_ns)
        offset = 0
        while offset < e.size:
            n = min(CHUNK, e.size - offset)
            chunk = os.pread(fd, n, offset) if intact else b""
            if len(chunk) != n:
                intact = False
                chunk = bytes(n)
            t.raw(chunk)
            offset += n
        t.pad(e.size)
        if intact:
            after = os.fstat(fd)
            intact = after.st_mtime_ns == e.mtime_ns and after.st_size == e.size
    finally:
        os.close(fd)
    return True, intact, e.size


def _apply(
    shell: RemoteShell,
    opts: SyncOptions,
    rules: IgnoreRules,
    local: Manifest,
    previous: Manifest,
    plan: TransferPlan,
    instance_uuid: str,
    boot_id: str,
    result: PushResult,
) -> None:
    ops = _Ops(opts, rules, local, previous, plan)
    root = Path(opts.local_root)
    bad: set[str] = set()
    missing: set[str] = set()
    files = sent_bytes = 0
    s = _session(shell, opts, apply_command(opts), "tar")
    try:
        t = _TarStream(s)
        for path in ops.staged_members():
            e = local.entries[path]
            if e.type == "f":
                sent, intact, n = _send_file(t, root, path, e)
                if not sent:
                    missing.add(path)
                elif not intact:
                    bad.add(path)
                else:
                    files += 1
                    sent_bytes += n
                continue
            info = tarfile.TarInfo("t/" + path)
            if e.type == "d":
                info.type = tarfile.DIRTYPE
                info.mode = e.mode
            else:
                info.type = tarfile.SYMTYPE
                info.linkname = e.ref
                info.mode = 0o777
            t.header(info, e.mtime_ns)
        record = {"version": 2, "boot_id": boot_id, "uuid": instance_uuid, "digest": local.digest}
        record["root"] = opts.remote_root
        text = ops.script(bad, missing, record).encode("utf-8", "surrogateescape")
        info = tarfile.TarInfo("ops")
        info.size = len(text)
        info.mode = 0o600
        t.header(info, 0)
        t.raw(text)
        t.pad(len(text))
        t.end()
        s.flush()
        s.proc.close_stdin()
        out = _read_all(s, _MAX_DONE, "apply")
        code = _finish(s, "apply (tar)", ok=(0, 3, 4))
    except BaseException:
        s.close(abort=True)
        raise
    result.files_sent, result.bytes_sent = files, sent_bytes
    m = re.search(rb"ukc-done ([0-9]{1,12}) ([0-9]{1,12})", out)
    if m is None:
        raise RemoteError(f"push to {opts.remote_root}: the sandbox's apply script said nothing")
    result.deleted, errors = int(m.group(1)), int(m.group(2))
    if code == 0 and errors == 0:
        return
    first = s.stderr_line() or "see the sandbox"
    if code == 3:
        raise SyncError(
            f"push to {opts.remote_root}: {errors} errors ({first}); "
            f"{len(plan.deletes)} deletes skipped"
        )
    raise SyncError(f"push to {opts.remote_root}: {errors} errors ({first})")
