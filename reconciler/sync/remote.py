"""The client side of the remote sync helper: start it, frame requests, read answers.

`push` and `pull` give it a `RemoteShell` and `SyncOptions`. The other end is the module
`helper` (remote requirement: python3 >= 3.7, stdlib only, on the sandbox's PATH or at
`SyncOptions.remote_python`). One remote process serves a whole push or pull: the module's
text goes over stdin after a one-line `python3 -c` bootstrap, so there are no per-file round
trips. Writes are coalesced into ~1 MiB blocks because SSH channels are slow with small
writes, and handed to the transport in 128 KiB pieces (see `_PIECE`).

The sandbox is untrusted, and it can replace the helper (or python3): every reply is read with
a hard size cap small enough that parsing it costs a bounded amount of memory (JSON grows ~25x
into Python objects), big answers come as many small frames or raw bytes, and a `Watchdog`
ends the session when the helper stays silent (or stops reading) for `idle_timeout_s`, or when
the push or pull outlives `timeout_s`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import marshal
import shlex
import struct
import sys
import threading
import time
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler._util.text import one_line
from reconciler.errors import MALFORMED_JSON, MissingToolError, RemoteError, SyncStalledError
from reconciler.sync.helper import Packer, Unpacker
from reconciler.sync.options import SyncOptions
from reconciler.sync.watchdog import Watchdog
from reconciler.transport.base import RemoteProcess, RemoteShell

__all__ = [
    "MAX_FRAME",
    "FrameReader",
    "HelperSession",
    "Program",
    "bytecode_tag",
    "encode_frame",
    "helper_command",
    "program",
]

#: largest control frame we accept from the sandbox. why so small: a frame is parsed whole, and
#: JSON like `[{},{},...]` grows ~25x into Python objects; scans come in many frames
MAX_FRAME = 1 << 20
_FLUSH_AT = 1 << 20
#: the deflate level of what we send when `SyncOptions.compress` (the helper's too): level 1
#: took the 2k bench's text from 17.6 to 6.3 MB for 0.17 s of CPU, level 6 to 5.6 MB for 0.37 s
ZLEVEL = 1
#: largest single write to the transport. why: paramiko's sendall re-slices the rest of the
#: buffer after every 32 KiB packet (quadratic copying), so large writes cost more client CPU
_PIECE = 128 << 10
#: read size from the helper's output (the SSH channel window, 16 MiB, bounds what is buffered)
_READ = 4 << 20
#: the helper's program: the text of the module, read from the installed package (never
#: imported here: it runs in the sandbox, where the bootstrap runs it as `__main__`)
_PROGRAM = Path(__file__).with_name("helper.py").read_bytes()
#: the bootstrap's expression for its interpreter's bytecode identity (`bytecode_tag` here):
#: `_frozen_importlib_external` is loaded at every start, even with -S (importlib.util is not)
_TAG_EXPR = (
    "'%s%s-%s'%(sys.implementation.cache_tag,getattr(sys,'abiflags',''),"
    "__import__('_frozen_importlib_external').MAGIC_NUMBER.hex())"
)
#: The bootstrap: read the program's source and, when the controller's interpreter could
#: compile it (`program()`), its code object, marshalled, tagged with that interpreter's
#: bytecode identity: the pyc magic number and cache tag, as a `.pyc` file is (an exact
#: version would miss 3.11.2 in the sandbox against 3.11.7 here, whose bytecode is the same).
#: The bootstrap runs the code object cached in the remote state dir under (program hash,
#: interpreter version) if there is one (as before: one file read); else, when its
#: interpreter has the same identity, the shipped code (why: compiling ~36 KB was ~8-15 ms of
#: the sandbox's CPU, and every new sandbox starts without a cache); else it compiles the
#: source and caches it. Unmarshalling our own bytes in the sandbox is safe; nothing the
#: sandbox sends is ever unmarshalled here. The cache lives in the sandbox, as does the
#: interpreter: a tampered cache is no new power, and whatever the helper says is untrusted
#: anyway. argv: compressed source length, state dir, program id,
#: "w" to write the cache ("r" for pulls, which leave the sandbox as they found it), code
#: length (0: none shipped), identity tag.
#: Compiled with optimize=2: docstrings stay out of the code, so it loads as fast as before
#: the helper had them (the helper has no `assert` to lose).
#: An interpreter older than the helper's floor is named, rather than failing on its syntax.
#: Only a program read in full is run or cached. why: a client killed while sending it ends
#: the stream early, and a program cut at a statement boundary still compiles; cached, that
#: truncated program (which never reaches `main()`) answered nothing, forever, in that sandbox.
_BOOT = "\n".join(
    [
        "import sys,os,marshal,zlib",
        "if sys.version_info<(3,7):sys.exit('ukc sync helper needs python3 >= 3.7, not %d.%d'"
        "%sys.version_info[:2])",
        "a=sys.argv;n=int(a[1]);m=int(a[5]);s=sys.stdin.buffer.read(n+m)",
        "if len(s)!=n+m:sys.exit('ukc sync helper: program cut short')",
        "p='%s/helper-%s-%x.bin'%(a[2],a[3],sys.hexversion)",
        "try:",
        " with open(p,'rb') as f:c=marshal.loads(f.read())",
        "except Exception:",
        " c=None",
        " if m and a[6]==" + _TAG_EXPR + ":",
        "  try:c=marshal.loads(zlib.decompress(s[n:]))",
        "  except Exception:pass",
        " if c is None:",
        "  c=compile(zlib.decompress(s[:n]),'ukc-sync','exec',optimize=2)",
        "  try:",
        "   if a[4]=='w':",
        "    os.makedirs(a[2],0o700,exist_ok=True);t='%s.%d'%(p,os.getpid())",
        "    with open(t,'wb') as f:f.write(marshal.dumps(c))",
        "    os.replace(t,p)",
        "  except OSError:pass",
        "del s,a,p",
        "exec(c)",
    ]
)
#: names the cache entry: the program and the bootstrap that reads it (a cache written by an
#: older bootstrap is never trusted)
_PROGRAM_ID = hashlib.sha256(_PROGRAM + _BOOT.encode("ascii")).hexdigest()[:16]


@dataclass(frozen=True)
class Program:
    """What a helper is sent: its source, and the code object compiled from it (marshalled
    and zlib-compressed; may be empty) for interpreters whose bytecode identity is `tag`.

    Both are shipped zlib-compressed. why: the payload must stay under a pipe's 64 KiB, so
    that a sandbox that does not read its input (a stand-in in the tests, a hostile one) still
    lets the whole program and the first request be written; raw, the source (~36 KB) and
    the code (52 KB marshalled, 22 KB compressed) left the helper a few bytes to grow."""

    source: bytes
    code: bytes = b""
    tag: str = ""

    @functools.cached_property
    def packed_source(self) -> bytes:
        """The source as shipped (inflated by the bootstrap only when it has to compile)."""
        return zlib.compress(self.source, 9)

    @property
    def payload(self) -> bytes:
        """The bytes the bootstrap reads from stdin, in order."""
        return self.packed_source + self.code


@functools.cache
def program() -> Program:
    """The helper's program, compiled once per process (the warm process compiles it before
    it forks). An interpreter without a bytecode cache tag ships the source only."""
    if sys.implementation.cache_tag is None:
        return Program(_PROGRAM)
    code = compile(_PROGRAM, "ukc-sync", "exec", dont_inherit=True, optimize=2)
    return Program(_PROGRAM, zlib.compress(marshal.dumps(code), 6), bytecode_tag())


def bytecode_tag() -> str:
    """This interpreter's bytecode identity, as the bootstrap computes it for its own."""
    return "%s%s-%s" % (  # noqa: UP031  # the same expression as the bootstrap's
        sys.implementation.cache_tag,
        getattr(sys, "abiflags", ""),
        importlib.util.MAGIC_NUMBER.hex(),
    )


def helper_command(
    opts: SyncOptions, *, cache: bool = True, prog: Program | None = None, before: str = ""
) -> str:
    """The shell command that starts the helper; it then reads `prog.payload` (default: the
    helper's `program()`) from stdin. `before`: shell text the same shell runs first (its
    failure and its messages do not stop the helper)."""
    prog = prog if prog is not None else program()
    python = shlex.quote(opts.remote_python)
    state = shlex.quote(opts.remote_state_dir)
    mode = "w" if cache else "r"
    tag = shlex.quote(prog.tag or "-")
    first = f"{{ {before}; }} 2>/dev/null; " if before else ""
    return (
        f"{first}exec {python} -E -S -c {shlex.quote(_BOOT)} {len(prog.packed_source)} {state} "
        f"{_PROGRAM_ID} {mode} {len(prog.code)} {tag}"
    )


def encode_frame(obj: Any) -> bytes:
    """`u32be length + JSON` (ASCII: non-UTF-8 names travel as \\udcXX escapes)."""
    data = json.dumps(obj, separators=(",", ":")).encode("ascii")
    return struct.pack(">I", len(data)) + data


class FrameReader:
    """Buffered reads of frames and raw bytes from a process's stdout."""

    def __init__(
        self,
        proc: RemoteProcess,
        on_eof: Callable[[], str] | None = None,
        watchdog: Watchdog | None = None,
    ) -> None:
        self._proc = proc
        self._buf = bytearray()
        self._on_eof = on_eof
        self._watchdog = watchdog
        #: set once the helper said it compresses (`unpack`)
        self._unpacker: Unpacker | None = None

    def unpack(self) -> None:
        """From now on the output is segments (`helper.SEG`): decoded, inflated only as far
        as what is read asks for."""
        if self._unpacker is None:
            self._unpacker = Unpacker()
            # what was read past the hello's answer is segments already
            self._unpacker.feed(bytes(self._buf))
            self._buf.clear()

    def _more(self, want: int) -> bytes:
        """The next bytes of the helper's output (b"" at its end), decoded."""
        unpacker = self._unpacker
        if unpacker is None:
            return self._read(want)
        while True:
            try:
                out = unpacker.take(want)
            except (ValueError, zlib.error) as exc:
                raise RemoteError("sync helper sent a malformed compressed stream") from exc
            if out:
                return out
            raw = self._read(want)
            if not raw:
                return b""
            unpacker.feed(raw)

    def _read(self, n: int) -> bytes:
        dog = self._watchdog
        # why 4 MiB: paramiko keeps received data in an array and moves what is left to its
        # front after every partial read (up to the 16 MiB window each time: 1 MiB reads
        # cost 0.13 s of a 60 MB pull); a read of the whole window costs its size twice
        # more (the bytes read, then this reader's buffer): 48 MiB in flight while a pull
        # of small files waits for the local disk, against ~24 MiB with 4 MiB reads
        if dog is None:
            return self._proc.read(max(n, _READ))
        with dog.call():
            return self._proc.read(max(n, _READ))

    def some(self) -> bytes:
        """What is buffered, else the next read; b"" at the end of the output (a stream of
        unframed bytes, such as a shell command's: the caller bounds what it keeps)."""
        if self._buf:
            out = bytes(self._buf)
            self._buf.clear()
            return out
        chunk = self._more(0)
        if not chunk and self._watchdog is not None and self._watchdog.expired is not None:
            raise SyncStalledError(self._watchdog.expired)
        return chunk

    def _fill(self, n: int) -> None:
        dog = self._watchdog
        while len(self._buf) < n:
            chunk = self._more(n - len(self._buf))
            if not chunk:
                if dog is not None and dog.expired is not None:
                    raise SyncStalledError(dog.expired)
                # on_eof raises for a failed exit; otherwise it says how the helper ended
                why = self._on_eof() if self._on_eof is not None else ""
                raise RemoteError(
                    f"sync helper closed its output after {len(self._buf)} of {n} bytes"
                    + (f" ({why})" if why else "")
                )
            self._buf += chunk

    def exact(self, n: int) -> bytes:
        self._fill(n)
        with memoryview(self._buf) as view:
            out = bytes(view[:n])  # one copy (a bytearray slice would be a second)
        del self._buf[:n]
        return out

    def u32(self) -> int:
        value: int = struct.unpack(">I", self.exact(4))[0]
        return value

    def frame(self, limit: int = MAX_FRAME) -> Any:
        n = self.u32()
        if n > limit:
            raise RemoteError(f"sync helper sent a {n}-byte frame; the limit is {limit}")
        try:
            return json.loads(self.exact(n).decode("ascii"))
        except MALFORMED_JSON as exc:
            raise RemoteError(f"sync helper sent a malformed {n}-byte frame") from exc


#: helpers kept running after a push, by the shell (connection) they run over
_PARKED: weakref.WeakKeyDictionary[RemoteShell, HelperSession] = weakref.WeakKeyDictionary()
#: read-only helpers started ahead of a pull (`start_pull_ahead`), by shell: apart from the
#: push's, since a pull's helper writes nothing in the sandbox (not even its cache)
_PARKED_PULL: weakref.WeakKeyDictionary[RemoteShell, HelperSession] = weakref.WeakKeyDictionary()
_PARKED_LOCK = threading.Lock()


def _take_parked(
    slot: weakref.WeakKeyDictionary[RemoteShell, HelperSession],
    shell: RemoteShell,
    opts: SyncOptions,
) -> HelperSession | None:
    """The helper parked in `slot` for `shell`, woken, when it runs with `opts` and is alive;
    else None (one that is not is ended)."""
    with _PARKED_LOCK:
        kept = slot.pop(shell, None)
    if kept is None:
        return None
    if kept.opts == opts and kept._alive():
        kept._wake()
        return kept
    kept.close(abort=True)
    return None


class HelperSession:
    """One running helper process. Use as a context manager; `close()` ends it."""

    def __init__(
        self,
        shell: RemoteShell,
        opts: SyncOptions,
        *,
        read_only: bool = False,
        command: str | None = None,
        tool: str | None = None,
        before: str = "",
    ) -> None:
        """`command`: run this shell command instead of the python helper (the shell+tar
        path: the same watchdog, bounded reads and coalesced writes), `tool` the program it
        needs (named when the shell answers 126/127); `before`: shell text the helper's shell
        runs first (`helper_command`)."""
        self.opts = opts
        self._shell = shell
        self._proc: RemoteProcess | None = None
        self._read_only = read_only
        self._tool = tool if command is not None and tool else opts.remote_python
        self.watchdog = self._watchdog()
        dog = self.watchdog
        try:
            with dog.call():
                self._proc = shell.start(
                    command
                    if command is not None
                    else helper_command(opts, cache=not read_only, before=before)
                )
        except Exception:
            dog.stop()
            raise
        self.proc: RemoteProcess = self._proc
        self._out = bytearray()
        #: set once our hello asked for compression: what follows the hello is packed, and
        #: `_plain` bytes at the head of `_out` (the program and the hello) are not
        self._packer: Packer | None = None
        self._plain = 0
        self.reader = FrameReader(self.proc, on_eof=self._died, watchdog=dog)
        self._closed = False
        #: a hello sent ahead of the push that reads its answer (`greet`), answer not read yet
        self.greeted = False
        if command is None:
            self._out += program().payload

    def _watchdog(self) -> Watchdog:
        opts = self.opts
        what = "sync-back" if self._read_only else "push"
        return Watchdog(
            name=f"{what} of session {opts.session!r}" if opts.session else what,
            after=(
                "files brought back so far are kept, no deletions mirrored"
                if self._read_only
                else "nothing more is sent or deleted"
            ),
            idle_s=opts.idle_timeout_s,
            total_s=opts.timeout_s,
            kill=self._kill,
            escalate=self._shell.close,
        )

    @classmethod
    def for_push(cls, shell: RemoteShell, opts: SyncOptions) -> tuple[HelperSession, bool]:
        """A helper for a push over `shell`: the one the last push over it left running (a
        watch pushes every edit over one connection; starting a helper is most of a one-file
        push), else a new one. True when it is a kept one: its first answer may be "gone"."""
        kept = _take_parked(_PARKED, shell, opts)
        return (kept, True) if kept is not None else (cls(shell, opts), False)

    @classmethod
    def for_pull(cls, shell: RemoteShell, opts: SyncOptions) -> tuple[HelperSession, bool]:
        """A read-only helper for a pull over `shell`: the one started ahead of it
        (`start_pull_ahead`), else a new one. True when it is the one started ahead: it may
        have died meanwhile (a command that ended the sandbox's processes), and then its first
        answer never comes (the caller starts a new one)."""
        kept = _take_parked(_PARKED_PULL, shell, opts)
        if kept is not None:
            return kept, True
        return cls(shell, opts, read_only=True), False

    @classmethod
    def start_pull_ahead(cls, shell: RemoteShell, opts: SyncOptions) -> None:
        """Start a read-only helper for a pull still to come (while the command before it
        runs) and park it: `for_pull` finds its interpreter started. It reads nothing of the
        sandbox before the pull's hello. A helper that fails to start is only a lost head
        start, as for `start_ahead`."""
        with contextlib.suppress(Exception):
            cls(shell, opts, read_only=True).park()

    def _wake(self) -> None:
        """Back in use after `park`: a watchdog of its own for this push or pull."""
        self.watchdog = self._watchdog()
        self.reader._watchdog = self.watchdog
        self._closed = False

    @staticmethod
    def greet(shell: RemoteShell, opts: SyncOptions, hello: Any) -> bool:
        """Send `hello` now to the helper parked on `shell`, if one is (and was not greeted):
        its answer travels while the caller does other work, and the next push over `shell`
        reads it instead of asking (`greeted`). Whoever greets reads the answer if no push
        came (`ungreet`), before anything else may change the sandbox."""
        with _PARKED_LOCK:
            kept = _PARKED.get(shell)
            if kept is None or kept.greeted or kept.opts != opts:
                return False
            kept.greeted = True
        try:
            kept.hello(hello)
            kept.flush()
        except Exception:
            # its channel is gone: the push starts a helper (and reports what it must)
            with _PARKED_LOCK:
                if _PARKED.get(shell) is kept:
                    del _PARKED[shell]
            kept.close(abort=True)
            return False
        return True

    @staticmethod
    def ungreet(shell: RemoteShell) -> None:
        """Read (and drop) the answer to a `greet` no push read: a later push must ask again,
        since the sandbox may change meanwhile. A helper that does not answer is ended."""
        with _PARKED_LOCK:
            kept = _PARKED.get(shell)
            if kept is None or not kept.greeted:
                return
            del _PARKED[shell]
        kept._wake()
        try:
            kept.read_hello(1 << 16)
        except Exception:
            kept.close(abort=True)
            return
        kept.greeted = False
        kept.park()

    @classmethod
    def start_ahead(cls, shell: RemoteShell, opts: SyncOptions, *, before: str = "") -> bool:
        """Start a helper for a push still to come and park it: its interpreter starts (tens
        of ms in the sandbox) while the controller scans and plans, and `for_push` finds it
        running. A helper that fails to start is only a lost head start: `for_push` finds it
        dead and starts its own, whose failure says why. True once its shell was started
        (with `before` ahead of the helper)."""
        try:
            helper = cls(shell, opts, before=before)
        except Exception:
            return False
        with contextlib.suppress(Exception):
            helper.park()
        return True

    def _alive(self) -> bool:
        try:
            self.proc.wait(timeout=0)
        except TimeoutError:
            return True
        except Exception:
            return False
        return False

    def park(self) -> None:
        """Keep the helper running for the next push (a read-only one: pull) over the same
        shell (a helper left from before is ended); it ends with the connection."""
        self.flush()
        self.watchdog.stop()
        self._closed = True
        slot = _PARKED_PULL if self._read_only else _PARKED
        with _PARKED_LOCK:
            old = slot.get(self._shell)
            slot[self._shell] = self
        if old is not None and old is not self:
            old.close(abort=True)

    def _kill(self) -> None:
        """The watchdog's way out: end the helper (or the connection, while it starts)."""
        if self._proc is None:
            self._shell.close()
        else:
            self._proc.kill()

    def __enter__(self) -> HelperSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(abort=exc[0] is not None)

    def _died(self) -> str:
        """The helper stopped talking: raise a clear error for a failed exit, else say how it
        ended (a clean exit without an answer means its input ended early)."""
        if self.watchdog.expired is not None:
            raise SyncStalledError(self.watchdog.expired)
        try:
            code = self.proc.wait(timeout=5)
        except TimeoutError:
            return "it has not exited after 5 s"
        if code in (126, 127) and self._tool != self.opts.remote_python:
            raise MissingToolError(
                f"the sandbox's image has no usable {self._tool} (exit {code}), which ukc's "
                "shell+tar sync needs (with sh, coreutils, GNU find and GNU tar)",
                tool=self._tool,
            )
        if code in (126, 127):
            # 127: not found, 126: found but not runnable (the shell's two answers)
            raise MissingToolError(
                f"the sandbox's image has no usable {self.opts.remote_python} (exit {code}), "
                "which ukc's sync helper needs (python3 >= 3.7): use an image with python3 "
                "(on the local metro ukc/local-sandbox:latest)",
                tool=self.opts.remote_python,
            )
        if code != 0:
            raise RemoteError(f"sync helper in sandbox exited with code {code}: {self._stderr()}")
        err = self._stderr()
        return "it exited with status 0" + (f": {err}" if err else "")

    def exit_reason(self) -> str:
        """How the process ended, for a caller that read its output to the end: raises for a
        failed exit (a `MissingToolError` for 126/127), else a few words."""
        return self._died()

    def stderr_line(self) -> str:
        """The last line of its stderr's first 4 KiB (printable, bounded: untrusted text)."""
        return self._stderr()

    def _stderr(self) -> str:
        try:
            raw = self.proc.read_stderr(4096)
        except Exception:  # the transport may already be gone
            return ""
        lines = raw.decode("utf-8", "replace").strip().splitlines()
        last = lines[-1] if lines else ""
        # untrusted text: printable only, bounded
        return one_line(last, 200)

    def send(self, obj: Any) -> None:
        self._out += encode_frame(obj)
        if len(self._out) >= _FLUSH_AT:
            self.flush()

    def hello(self, obj: dict[str, Any]) -> None:
        """Send a hello. The first one asks for compression both ways when the options say
        so; ours starts right after it, the helper's after its answer (`read_hello`)."""
        if not self.opts.compress or self._packer is not None:
            self.send(obj)
            return
        self.send({**obj, "z": ZLEVEL})
        self._plain = len(self._out)
        self._packer = Packer(ZLEVEL)

    def read_hello(self, limit: int) -> Any:
        """The answer to a hello; the helper's output is segments after one that says `z`
        (only if we asked: a stand-in that says so unasked is not believed)."""
        answer = self.reader.frame(limit)
        if self._packer is not None and isinstance(answer, dict) and answer.get("z") is True:
            self.reader.unpack()
        return answer

    def send_raw(self, data: bytes, z: bool | None = None) -> bool | None:
        """Send bytes as they are. `z`: whether they are worth deflating if sent now (None:
        a sample says); returns the answer taken, else `z` (a file sent in parts passes its
        first part's answer on)."""
        if len(data) >= _FLUSH_AT:
            self.flush()
            return self._emit(data, z)
        self._out += data
        if len(self._out) >= _FLUSH_AT:
            self.flush()
        return z

    def _emit(self, data: bytes | bytearray, z: bool | None = None) -> bool | None:
        """Write `data` after what was written before, packed once compression is on."""
        packer = self._packer
        if packer is None or not data:
            self._write(data)
            return z
        plain, self._plain = self._plain, 0
        with memoryview(data) as view:
            parts: list[Any] = [view[:plain]] if plain else []
            if len(view) > plain:
                got, z = packer.pack(view[plain:], z)
                parts += got
            self._write(b"".join(parts))
        return z

    def _write(self, data: bytes | bytearray) -> None:
        dog = self.watchdog
        dog.waiting_for = "read its input"
        dog.since = time.monotonic()
        try:
            if len(data) <= _PIECE:
                self.proc.write(bytes(data))
                return
            with memoryview(data) as view:
                for start in range(0, len(view), _PIECE):
                    self.proc.write(bytes(view[start : start + _PIECE]))
        except Exception as exc:
            if dog.expired is not None:
                raise SyncStalledError(dog.expired) from None
            # why RemoteError too: the SSH transport reports a closed channel as one, and a
            # helper whose interpreter is missing closes it before reading its program
            if not isinstance(exc, (OSError, RemoteError)):
                raise
            self._died()
            raise RemoteError("sync helper in sandbox stopped reading its input") from exc
        finally:
            dog.since = 0.0

    def flush(self) -> None:
        if self._out:
            self._emit(self._out)
            self._out.clear()

    def call(
        self, obj: Any, limit: int = MAX_FRAME, *, meanwhile: Callable[[], None] | None = None
    ) -> Any:
        """Send a request that has an answer, and return the answer; `meanwhile` runs once the
        request is sent, before the answer is read."""
        self.send({**obj, "flush": True})
        self.flush()
        if meanwhile is not None:
            meanwhile()
        reply = self.reader.frame(limit)
        if not isinstance(reply, dict):
            raise RemoteError("sync helper answered with a non-object frame")
        return reply

    def close(self, *, abort: bool = False) -> None:
        if abort:  # a kept (parked) helper too
            self._closed = True
            self.watchdog.stop()
            with contextlib.suppress(Exception):
                self.proc.kill()
            return
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
            self.proc.close_stdin()
            code = self.proc.wait(timeout=60)
        except TimeoutError:
            self.proc.kill()
            raise RemoteError("sync helper in sandbox did not exit within 60 s") from None
        finally:
            self.watchdog.stop()
        if code != 0:
            raise RemoteError(f"sync helper in sandbox exited with code {code}: {self._stderr()}")
