"""Sync-back from a sandbox without python3: its own `find` lists, its own `tar` sends.

One sandbox process (a POSIX shell script) serves a pull. It prints NUL-terminated records:
`B<boot id>`, then per back path either `M<path>` (missing) or `find`'s entries
`F<type> <mode> <size> <mtime> ./<path>`, then `E<errors>`. The client judges the listing
as the helper's headers are judged (`pull._Puller.entry`: the caps, `check_path`, links and
devices refused, unchanged files against the pull record by size and mtime), in the helper's
order (sorted, depth first). The files that changed are then asked for by name on the
script's stdin; it runs `tar -c` on exactly those, and the stream is read by `tarread` and
written by `pull._Puller` (one writer for both paths). A stop at a cap while listing still
brings the files listed before it (as the helper's stream does), from a second process.

Everything the sandbox prints is untrusted, as the helper's frames are (it can replace find,
tar or the shell): records are bounded (`_RECORD_LIMIT`), the listing is held only within the
entry and path budgets of `sync.back_max_files`, tar members are bounded by `tarread` and
accepted only when they are files we asked for, each once, in the order asked; a member
larger than listed may use only what is left of `sync.back_max_bytes`; anything else ends the
stream (`PullResult.aborted`). The pull's `Watchdog` (idle and overall deadlines) stamps every
read, as the helper session's does. Deletions (`sync.back_delete`) are judged as after a
helper pull; a tar that exits non-zero (a file vanished, changed or unreadable while read)
counts as an error, so nothing is deleted after it.

Remote requirements: a POSIX shell, GNU find (`-printf`) and GNU tar (`--null -T -`), head,
tr; a missing one is a `MissingToolError` naming it.
"""

from __future__ import annotations

import contextlib
import shlex
import threading
from dataclasses import dataclass
from typing import Any

from reconciler._util.text import one_line
from reconciler.errors import HostileEntryError, MissingToolError, RemoteError, SyncStalledError
from reconciler.sync.backdelete import REFUSED, source_id
from reconciler.sync.manifest import CHUNK
from reconciler.sync.options import SyncOptions
from reconciler.sync.pull import (
    _PATH_MAX,
    PullResult,
    _conclude,
    _Puller,
    _safe_label,
    _save_record,
    _Tree,
    check_path,
    local_mode,
)
from reconciler.sync.remote import FrameReader
from reconciler.sync.tarread import Member, TarReader
from reconciler.sync.watchdog import Watchdog
from reconciler.transport.base import RemoteProcess, RemoteShell

__all__ = ["pull_tar", "tar_pull_command"]

#: one listing record: a path of 4096 characters of up to 4 bytes each, and its fields (the
#: helper's header frames have the same cap)
_RECORD_LIMIT = 1 << 16
#: what may follow the end of the archive (tar pads to its 10 KiB record) before EOF
_TAIL_LIMIT = 1 << 20
#: the script's exit status for a missing tool (named on stderr as `ukc-missing TOOL`)
_MISSING = 3
_TOOLS = ("find", "tar")
#: find's %y -> the helper's kinds (anything not a file, directory or link is "o")
_FIND_KINDS = {b"f": "f", b"d": "d", b"l": "l"}
_FIND_OTHER = frozenset(b"pscbDU?")
#: names are written to tar's stdin in pieces (a feeding thread: tar reads while it writes)
_PIECE = 128 << 10
#: why a tar member other than a file is refused (the helper path's words where they exist)
_REFUSED_KINDS = {
    "f": "sparse file (its data in the stream is not the file's bytes)",
    "l": "symlink (never followed or written)",
    "h": "hard link (never followed or written)",
    "o": "not a regular file or directory (fifo, socket or device)",
}
_UNKNOWN_KIND = "not a regular file or directory (an unknown tar member type)"

_TAR = (
    'case $(tar --version 2>/dev/null) in *"GNU tar"*) ;; '
    "*) echo 'ukc-missing tar' >&2; exit 3;; esac\n"
    # gnu format: no pax header per file (the listing gave exact mtimes); --null -T -: the
    # names we ask for, taken literally; no recursion, no hard link members
    "exec tar -c -f - --format=gnu --null --no-unquote --no-recursion --hard-dereference -T -\n"
)


def tar_pull_command(opts: SyncOptions, back: tuple[str, ...], *, listing: bool = True) -> str:
    """The sandbox's side of a tar pull: the listing, then tar on the names read from stdin
    after a line `tar` (`done` ends it); `listing=False`: tar alone (every name is quoted)."""
    q = shlex.quote
    root = q(opts.remote_root)
    if not listing:
        return f"cd -- {root} || exit 4\n{_TAR}"
    backs = " ".join(q(b) for b in back)
    boots = " ".join(q(p) for p in opts.boot_id_paths)
    return f"""LC_ALL=C; export LC_ALL
find / -maxdepth 0 -printf '' >/dev/null 2>&1 || {{ echo 'ukc-missing find' >&2; exit 3; }}
boot=
for p in {boots}; do
  [ -r "$p" ] || continue
  boot=$(head -c 256 -- "$p" 2>/dev/null | tr -d '\\000')
  case $boot in *[![:space:]]*) break;; esac
done
printf 'B%s\\0' "$boot"
errors=0
if cd -- {root} 2>/dev/null; then
  for b in {backs}; do
    state=ok rest=$b p=
    while :; do
      case $rest in */*) ;; *) break;; esac
      p=${{p:+$p/}}${{rest%%/*}}; rest=${{rest#*/}}
      if [ -h "./$p" ]; then state=err; break; fi
      if [ ! -e "./$p" ]; then state=missing; break; fi
      if [ ! -d "./$p" ]; then state=err; break; fi
    done
    if [ $state = ok ] && [ ! -e "./$b" ] && [ ! -h "./$b" ]; then state=missing; fi
    case $state in
      missing) printf 'M%s\\0' "$b";;
      err) errors=$((errors+1));;
      *) find "./$b" -printf 'F%y %m %s %T@ %p\\0' || errors=$((errors+1));;
    esac
  done
else
  for b in {backs}; do printf 'M%s\\0' "$b"; done
fi
printf 'E%d\\0' "$errors"
IFS= read -r go || exit 0
[ "$go" = tar ] || exit 0
{_TAR}"""


class _Reader(FrameReader):
    """The script's output: NUL-terminated records, then raw bytes (the tar stream)."""

    def record(self, limit: int) -> bytes:
        """The next record without its NUL; raises RemoteError past `limit` bytes."""
        start = 0
        while True:
            cut = self._buf.find(b"\0", start)
            if cut != -1:
                break
            if len(self._buf) > limit:
                break
            start = len(self._buf)
            self._fill(start + 1)
        if cut == -1 or cut > limit:
            raise RemoteError(f"the sandbox's listing sent a record over {limit} bytes")
        rec = bytes(self._buf[:cut])
        del self._buf[: cut + 1]
        return rec

    def drop_buffered(self) -> int:
        """Forget what was read ahead; how many bytes that was."""
        n = len(self._buf)
        self._buf.clear()
        return n


@dataclass
class _Want:
    """A file the listing showed changed: asked of tar."""

    path: str
    size: int
    mtime: int


class _Remote:
    """The sandbox process of a tar pull (the script, or a tar alone after a stop), ended
    by the pull's watchdog when it stalls or the pull outlives its deadline."""

    def __init__(self, shell: RemoteShell, opts: SyncOptions) -> None:
        self._shell = shell
        self.opts = opts
        name = f"sync-back of session {opts.session!r}" if opts.session else "sync-back"
        self.watchdog = Watchdog(
            name=name,
            after="files brought back so far are kept, no deletions mirrored",
            idle_s=opts.idle_timeout_s,
            total_s=opts.timeout_s,
            kill=self._kill,
            escalate=shell.close,
        )
        self._proc: RemoteProcess | None = None
        self._feeder: threading.Thread | None = None

    @property
    def proc(self) -> RemoteProcess:
        assert self._proc is not None
        return self._proc

    def start(self, command: str) -> _Reader:
        """Start `command` (ending the process before it); its output's reader."""
        self.abort()
        dog = self.watchdog
        with dog.call():
            self._proc = self._shell.start(command)
        return _Reader(self._proc, on_eof=self._died, watchdog=dog)

    def _kill(self) -> None:
        if self._proc is None:
            self._shell.close()
        else:
            self._proc.kill()

    def feed(self, data: bytes) -> None:
        """Send `data`, then end the input, from a thread: tar reads names while it writes
        the archive we read. Not stamped: a sandbox that stops reading also stops writing,
        and the reader's wait is stamped."""
        proc = self.proc

        def run() -> None:
            with contextlib.suppress(Exception):  # the process was ended: the reader says why
                with memoryview(data) as view:
                    for start in range(0, len(view), _PIECE):
                        proc.write(bytes(view[start : start + _PIECE]))
                proc.close_stdin()

        self._feeder = threading.Thread(target=run, name="ukc-tar-names", daemon=True)
        self._feeder.start()

    def finish(self, reader: _Reader) -> int:
        """After the last record or the end of the archive: read to EOF (a bounded tail),
        then the exit status; -1 when the process would not end."""
        tail = reader.drop_buffered()
        dog = self.watchdog
        while tail <= _TAIL_LIMIT:
            with dog.call():
                chunk = self.proc.read(1 << 16)
            if not chunk:
                break
            tail += len(chunk)
        else:
            self.abort()
            return -1
        try:
            code = self.proc.wait(timeout=max(1.0, min(30.0, self.opts.idle_timeout_s)))
        except TimeoutError:
            self.abort()
            return -1
        if self._feeder is not None:
            self._feeder.join(5)
        return code

    def abort(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(Exception):
                self._proc.kill()
            if self._feeder is not None:
                self._feeder.join(5)
                self._feeder = None

    def close(self) -> None:
        self.abort()
        self.watchdog.stop()

    def _died(self) -> str:
        """The output ended early: a clear error for a failed exit, else how it ended."""
        if self.watchdog.expired is not None:
            raise SyncStalledError(self.watchdog.expired)
        try:
            code = self.proc.wait(timeout=5)
        except TimeoutError:
            return "it has not exited after 5 s"
        err = self._stderr()
        if code == _MISSING and err.startswith("ukc-missing "):
            named = err.removeprefix("ukc-missing ")
            tool = named if named in _TOOLS else "find or tar"
            raise MissingToolError(
                f"the sandbox's image has no usable GNU {tool}, which ukc's sync-back needs "
                "in an image without python3 (GNU find with -printf, GNU tar)",
                tool=tool,
            )
        if code != 0:
            raise RemoteError(
                f"sync-back in the sandbox (find, tar) exited with code {code}: {err}"
            )
        return "it exited with status 0" + (f": {err}" if err else "")

    def _stderr(self) -> str:
        try:
            raw = self.proc.read_stderr(4096)
        except Exception:  # the transport may already be gone
            return ""
        lines = raw.decode("utf-8", "replace").strip().splitlines()
        return one_line(lines[-1] if lines else "", 200)


def _sort_key(rec: bytes) -> bytes:
    """The helper's order (each directory's names sorted, depth first): "/" sorts before
    every character a name may hold."""
    path = rec.split(b" ", 4)[-1]
    return path.replace(b"/", b"\0")


def _int(text: bytes, base: int = 10) -> int | None:
    if not text or len(text) > 19 or text.strip(b"01234567" if base == 8 else b"0123456789"):
        return None
    return int(text, base)


def _mtime_ns(text: bytes) -> int | None:
    """find's `%T@` (seconds, a point, up to 10 digits) as exact nanoseconds."""
    sec, dot, frac = text.partition(b".")
    whole = _int(sec)
    if whole is None or (dot and (len(frac) > 10 or _int(frac) is None)):
        return None
    return whole * 1_000_000_000 + int(frac[:9].ljust(9, b"0") or b"0")


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _listed_path(raw: bytes) -> str:
    """A path as find printed it below the root ("./" first), relative to the root."""
    return _decode(raw[2:] if raw.startswith(b"./") else raw)


class _TarPuller(_Puller):
    """The judge and writer of `pull`, fed by a listing and a tar stream."""

    def __init__(self, opts: SyncOptions, tree: _Tree, source: str) -> None:
        super().__init__(None, opts, tree, source)
        #: changed files, in listing order: asked of tar
        self.wanted: list[_Want] = []
        self.tar: TarReader | None = None

    # -- listing

    def header(self, rec: bytes) -> dict[str, Any]:
        """A helper-style header from a listing record `F<type> <mode> <size> <mtime> <path>`
        (unparsable numbers left None: `entry` refuses the header as malformed)."""
        parts = rec[1:].split(b" ", 4)
        if len(parts) != 5:
            return {"path": None, "type": None}
        y, mode, size, mtime, raw = parts
        kind = _FIND_KINDS.get(y) or ("o" if len(y) == 1 and y[0] in _FIND_OTHER else None)
        path = _listed_path(raw)
        n = _int(size) if kind == "f" else 0
        ns = _mtime_ns(mtime)
        hdr: dict[str, Any] = {
            "path": path,
            "type": kind,
            "size": n,
            "mode": _int(mode, 8),
            "mtime_ns": ns,
        }
        was = self.record.entries.get(path) if kind == "f" else None
        if was is not None and (was.size, was.mtime_ns) == (n, ns):
            hdr["unchanged"] = True
        return hdr

    def listing(self, reader: _Reader) -> bool:
        """Take in the listing, then judge its entries in the helper's order; True when it
        was read to its end record (the script then waits for its orders). Entries are held
        only within the entry and path budgets: past them the rest is not read."""
        held: list[bytes] = []
        missing: list[str] = []
        count = chars = 0
        errors: object = None
        ended = False
        while not ended:
            rec = reader.record(_RECORD_LIMIT)
            tag = rec[:1]
            if tag == b"F":
                count += 1
                length = len(_listed_path(rec.split(b" ", 4)[-1]))
                chars += min(length, _PATH_MAX + 1)
                if length > _PATH_MAX:
                    # refused whatever its place: judged now, never held
                    if not self.entry(self.header(rec)):
                        return False
                else:
                    held.append(rec)
                if count > self.max_files or chars > self.max_chars:
                    break  # `entry` stops at the same cap below
            elif tag == b"M":
                missing.append(_decode(rec[1:]))
                if len(missing) > len(self.back):
                    errors = "malformed"  # more missing paths than there are back paths
                    missing.pop()
            elif tag == b"E":
                if errors is None:
                    errors = _int(rec[1:]) if _int(rec[1:]) is not None else "malformed"
                ended = True
            else:
                self.result.aborted = "sandbox sent a malformed listing record"
                return False
        if ended:
            self.seen.end = {"end": True, "errors": errors, "missing": missing}
        held.sort(key=_sort_key)
        for rec in held:
            if not self.entry(self.header(rec)):
                break
        if not ended and self.result.stopped is None and self.result.aborted is None:
            self.stop(
                f"stopped at sync.back_max_files = {self.max_files}: the sandbox listed more "
                "entries than the budget allows"
            )
        return ended

    def tar_failed(self) -> None:
        """tar exited non-zero (a file vanished, changed or could not be read) or was ended:
        counted as an error of the listing, so no deletion is mirrored."""
        end = self.seen.end
        if isinstance(end, dict) and isinstance(end.get("errors"), int):
            end["errors"] += 1

    def file(self, path: str, size: int, mode: int, mtime: int) -> bool:
        if self.tar is not None:
            return super().file(path, size, mode, mtime)
        self.wanted.append(_Want(path, size, mtime))  # listing: asked of tar later
        return True

    def skip(self, path: object, size: int) -> bool:
        if self.tar is not None:
            self.tar.skip()
        return True  # a listing has no data to skip

    def next_chunk(self, total: int, size: int) -> bytes | None:
        assert self.tar is not None
        return self.tar.read(min(CHUNK, size - total)) if total < size else b""

    # -- tar

    def names(self) -> bytes:
        return b"".join(
            b"./" + w.path.encode("utf-8", "surrogateescape") + b"\0" for w in self.wanted
        )

    def transfer(self, tar: TarReader) -> bool:
        """Write the members of the tar stream; True when it ended with its end marker."""
        self.tar = tar
        order = {w.path: i for i, w in enumerate(self.wanted)}
        last = -1
        before = self.result.stopped  # a stop while listing still brings what was listed
        while True:
            try:
                member = tar.next()
            except HostileEntryError as exc:
                self.result.aborted = f"sandbox sent a broken tar stream: {exc}"
                return False
            if member is None:
                return True
            path = member.name.removeprefix("./") if member.name.startswith("./") else None
            at = order.get(path, -1) if path is not None else -1
            if at <= last:
                label = member.name
                why = check_path(path if path is not None else label, self.back_set)
                self.reject(label, why or "a tar member not asked for, or sent twice")
                self.result.aborted = (
                    f"sandbox's tar sent {_safe_label(label)}, which was not asked for"
                )
                return False
            last = at
            assert path is not None
            if not self.member(member, path, self.wanted[at]):
                return False
            if self.result.stopped != before or self.result.aborted is not None:
                return False

    def member(self, m: Member, path: str, want: _Want) -> bool:
        """Write one member asked for; False when the stream must be abandoned."""
        is_file = m.kind == "f" and not m.sparse
        extra = m.size - want.size if is_file else m.size
        if extra > 0:
            # more than listed (it grew, or it is no file): only what is left may come
            if self.announced_bytes + extra > self.max_bytes:
                left = self.max_bytes - self.announced_bytes + (m.size - extra)
                self.stop(
                    f"stopped at sync.back_max_bytes = {self.max_bytes}: "
                    f"{_safe_label(path)} announces {m.size} bytes, only {left} are left"
                )
                return False
            self.announced_bytes += extra
        if is_file:
            mtime = m.mtime_ns
            if not m.mtime_exact and m.size == want.size and mtime // 10**9 == want.mtime // 10**9:
                mtime = want.mtime  # the listing's nanoseconds (the tar header has seconds)
            return self.file(path, m.size, local_mode(m.mode), mtime)
        tar = self.tar
        assert tar is not None
        if m.kind == "d":
            # it became a directory since it was listed (the helper would announce one)
            if self.keep_seen:
                self.seen.paths[path] = "d"
            self.directory(path, m.mode)
        else:
            if self.keep_seen:
                self.seen.paths[path] = REFUSED
            self.reject(path, _REFUSED_KINDS.get(m.kind, _UNKNOWN_KIND))
        tar.skip()
        return True


def pull_tar(
    shell: RemoteShell, opts: SyncOptions, tree: _Tree, back: tuple[str, ...], uuid: str
) -> PullResult:
    """`pull` through the sandbox's find and tar (see the module's text)."""
    remote = _Remote(shell, opts)
    try:
        reader = remote.start(tar_pull_command(opts, back))
        first = reader.record(_RECORD_LIMIT)
        boot = first[1:].decode("ascii", "replace").strip() if first[:1] == b"B" else None
        puller = _TarPuller(opts, tree, source_id(uuid, boot))
        try:
            if boot is None:
                puller.result.aborted = "sandbox sent a malformed listing record"
                ended = False
            else:
                ended = puller.listing(reader)
            result = puller.result
            if result.aborted is not None or not (ended or puller.wanted):
                remote.abort()
                return _conclude(opts, tree, back, puller)
            if not puller.wanted:
                remote.feed(b"done\n")
            elif ended:
                remote.feed(b"tar\n" + puller.names())
            else:
                # stopped at a cap while listing (the rest was not read): the files listed
                # before the stop still come, from a tar of their own
                reader = remote.start(tar_pull_command(opts, back, listing=False))
                remote.feed(puller.names())
            if puller.wanted and not puller.transfer(TarReader(reader)):
                remote.abort()
                puller.tar_failed()
            elif remote.finish(reader) != 0:
                puller.tar_failed()
            return _conclude(opts, tree, back, puller)
        except BaseException:
            # a stalled or broken stream: what was written is ours all the same
            puller.finish()
            _save_record(opts, puller.new_record)
            raise
    finally:
        remote.close()
