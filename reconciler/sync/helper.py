"""The remote sync helper: the program that runs in the sandbox, one process per push or pull
(a push's helper may be kept for the next push over the same connection: each hello starts
afresh).

This file is not imported by the controller: `remote` reads its text and sends it over the
process's stdin after a short `python3 -c` bootstrap, which runs it as `__main__`. So it must
run alone: standard library only, nothing from `reconciler`, ASCII text, and Python >= 3.7
(the floor of the sandbox images we support; the tests run it under the oldest interpreter
available and ruff checks it with a py37 target). Importing it runs nothing, which lets tests
drive a `Helper` in-process.

Protocol (one process per push or pull, many operations): the client sends frames
`u32be length + JSON`; `put` is followed by exactly `size` raw bytes and one trailer byte
(1 = commit, 0 = discard); `puts` names many small files (`files`: [path, size, mode,
mtime_ns] each), whose bytes and trailers follow one after the other, as for a `put` each;
`patch` (a big file already there) is followed by only its changed fixed-size blocks and the
trailer, and is checked against the file's sha256.
The helper answers only operations that need an answer (hello, scan, blocks, sync, remove,
finish, pull) with frames of the same shape, each small (the client caps them at 1 MiB):
`scan` answers with `{"scan": [[path, type, size, mtime_ns, mode, ref], ...]}` batches and a
final `{"scan_end": true, "count": N}`; `blocks` with, per requested path, `{"n": N}` and N raw
8-byte block digests (`{"n": -1}` when the file cannot be read), never more than asked for.
`pull` answers with a stream of entry headers; each regular file header is followed by chunk
frames (`u32be length + bytes`, a zero length ends the file); the small files of a directory
come together instead, as `{"dir": rel, "files": [[name, size, mode, mtime_ns], ...]}` followed
by their bytes one after the other (the sizes' sum); and a final
`{"end": true, "errors": N, "missing": [back paths]}`: N counts entries it could not list or
read (anything but a vanished path), so the client knows whether the listing was complete
before it mirrors deletions.
A hello with `z` (a deflate level; `sync.compress`) turns compression on for the rest of the
process, both ways: the client's bytes after that hello and ours after its answer (which says
`z`) are segments (`SEG`), raw or deflated as a sample of each says (`Packer`); each side
inflates only as much as it reads (`Unpacker`).

Every write lands via a temp name in the same directory + rename, through directory fds
opened with O_NOFOLLOW (a symlink inside the tree is never followed); in a root empty at hello
(a first push) or a directory this push made (nothing in it was there to read), a new small file
is made under its final name with O_EXCL: one cut short lacks its mtime (set last), and the next
push scans (no record) and resends it.

Start cost matters: slow imports (`json`, `typing`, `threading`, `queue`, `hashlib`) are
avoided or made where first needed.
"""

from __future__ import annotations

import _thread
import errno
import itertools
import os
import stat
import struct
import sys

# why not `typing.TYPE_CHECKING`: importing typing costs ms at every start
TYPE_CHECKING = False
if TYPE_CHECKING:
    import queue
    import threading
    from collections.abc import Callable
    from typing import Any, BinaryIO, ClassVar

    #: a request or an answer: a JSON object
    Msg = dict[str, Any]
    #: a small file for the write pool: (path, parent dir fd, name, content, request)
    Job = tuple[str, int, str, bytes, Msg]

__all__ = ["Helper", "main"]

CHUNK = 1 << 20
#: files up to this size are written by the pool (if asked)
SMALL = 1 << 20
#: a scan frame is sent once its worst-case encoded size reaches this
SCAN_BATCH = 128 << 10
#: errors kept for the answer (which must fit the client's cap)
MAX_ERRORS = 50
MAX_ERROR_CHARS = 400
#: directory fds kept open; past this, all are closed
MAX_DIR_FDS = 256
MAX_THREADS = 16
DFLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
PUTS_AT_ONCE = 4 << 20
#: a pull sends files up to BATCH_FILE bytes in `files` frames, each sent once it reaches
#: BATCH_BYTES, BATCH_FILES files or BATCH_CHARS characters of names
BATCH_FILE = 64 << 10
BATCH_BYTES = 1 << 20
BATCH_FILES = 512
BATCH_CHARS = 16 << 10
TMP = ".ukc-tmp."
F_SETPIPE_SZ = 1031
#: once a hello asks for it (`z`: the deflate level), each side sends segments: a kind byte
#: and a u32be length, then that many bytes, raw or the next part of one raw-deflate stream
#: per direction (sync-flushed at each segment's end, so each inflates as it comes)
SEG = struct.Struct(">BI")
SEG_RAW = 0
SEG_ZIP = 1
#: a buffer is deflated when a sample of this many bytes from its middle shrinks to below
#: PROBE_RATIO of its size (why a sample: deflating incompressible data costs ~25 ms a MiB)
PROBE = 8 << 10
PROBE_RATIO = 0.9
#: buffers under this many bytes go raw (control frames: nothing to gain)
PACK_MIN = 1 << 10
#: an inflate gives at most this many bytes more than its reader asked for, whatever the
#: segment holds (a small segment may inflate to gigabytes)
INFLATE_STEP = 256 << 10
#: the helper packs what it sends in parts of about this size
OUT_PART = 256 << 10


class MismatchError(OSError):
    """A patch's old file or result is not what the client believed (it may ask again)."""


def _json_codec() -> tuple[Callable[[str], Any], Callable[[Any], str]]:
    """loads/dumps from the C module `_json` directly: `import json` pulls in `re` and `enum`
    (~6 ms, paid on every push, pull and watch pass); the plain module is the fallback."""
    try:
        import _json

        class Ctx:
            strict = True
            object_hook = None
            object_pairs_hook = None
            parse_float = float
            parse_int = int
            memo: ClassVar[dict[str, Any]] = {}

            @staticmethod
            def parse_constant(name: str) -> Any:
                raise ValueError("constant " + name)

        scan = _json.make_scanner(Ctx())  # type: ignore[arg-type]
        enc = _json.make_encoder(
            None,
            None,  # type: ignore[arg-type]
            _json.encode_basestring_ascii,
            None,
            ":",
            ",",
            False,
            False,
            False,
        )

        def loads(text: str) -> Any:
            try:
                obj, end = scan(text, 0)
            except StopIteration:
                raise ValueError("not json") from None
            if end != len(text):
                raise ValueError("extra data")
            return obj

        def dumps(obj: Any) -> str:
            return "".join(enc(obj, 0))

        probe = {"a": [1, "\udcff\u00e9\n", None, True, {}]}
        if loads(dumps(probe)) != probe:
            raise ValueError("_json round trip")
        return loads, dumps
    except Exception:
        import json

        return json.loads, lambda obj: json.dumps(obj, separators=(",", ":"))


JLOADS, JDUMPS = _json_codec()


def split(rel: str) -> tuple[str, str]:
    """(parent, name) of a path relative to the root; refuses empty names, `.` and `..`."""
    parent, _, name = rel.rpartition("/")
    if not name or name in (".", "..") or ".." in rel.split("/"):
        raise ValueError("bad path")
    return parent, name


def read_boot_id(paths: list[str]) -> str:
    """The first non-empty boot id among `paths` (at most 256 bytes of it), else ""."""
    for p in paths:
        try:
            with open(p, "rb") as f:
                value = f.read(256).decode("ascii", "replace").strip()
        except OSError:
            continue
        if value:
            return value
    return ""


def file_sha(fd: int) -> str:
    """sha256 of what is left to read from `fd`."""
    import hashlib  # only scans and patches hash; importing it costs a few ms at every start

    h = hashlib.sha256()
    while True:
        b = os.read(fd, CHUNK)
        if not b:
            return h.hexdigest()
        h.update(b)


def protected(path: str, protect: list[str]) -> bool:
    """Whether `path` is, is under, or contains one of the `protect` paths."""
    return any(path == p or path.startswith(p + "/") or p.startswith(path + "/") for p in protect)


def write_all(fd: int, b: bytes | memoryview) -> None:
    view = memoryview(b)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def unlink_quiet(name: str, dfd: int) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except OSError:
        pass


def create_temp(tmp: str, pfd: int, mode: int) -> int:
    """A new temp file with the final permission bits (no fchmod unless the umask strips
    some); a leftover of a killed helper with our pid is replaced."""
    try:
        return os.open(tmp, NEW, mode & 0o777, dir_fd=pfd)
    except FileExistsError:
        unlink_quiet(tmp, pfd)
        return os.open(tmp, NEW, mode & 0o777, dir_fd=pfd)


class Packer:
    """Encodes what one side sends once compression is on (see `SEG`)."""

    def __init__(self, level: int) -> None:
        import zlib  # only when asked for: ~1 ms at every start

        self.zlib = zlib
        self.c = zlib.compressobj(level, zlib.DEFLATED, -15)

    def worth(self, data: bytes | bytearray | memoryview) -> bool:
        """Whether deflating `data` is likely to pay: a sample of it shrinks."""
        n = len(data)
        if n < PACK_MIN:
            return False
        at = (n - PROBE) // 2 if n > PROBE else 0
        sample = data[at : at + PROBE]
        return len(self.zlib.compress(sample, 1)) < PROBE_RATIO * len(sample)

    def pack(
        self, data: bytes | bytearray | memoryview, z: bool | None = None
    ) -> tuple[list[bytes | bytearray | memoryview], bool]:
        """(the segment's header and body, whether deflated): deflated when `z`, raw when
        not, as `worth` says when None (a caller sending one file in parts passes the first
        part's answer on)."""
        if z is None:
            z = self.worth(data)
        if not z:
            return [SEG.pack(SEG_RAW, len(data)), data], False
        body = self.c.compress(data) + self.c.flush(self.zlib.Z_SYNC_FLUSH)
        return [SEG.pack(SEG_ZIP, len(body)), body], True


class Unpacker:
    """Decodes segments (see `SEG`) fed as they arrive, in any pieces. What it inflates is
    bounded by what its reader asks for (`take`), never by what a segment claims or holds:
    the other side may be hostile (a sandbox's helper), and a few KiB of deflate inflate to
    gigabytes."""

    def __init__(self) -> None:
        import zlib

        self.zlib = zlib
        self.d = zlib.decompressobj(-15)
        self.data = b""
        self.pos = 0
        self.kind = SEG_RAW
        #: bytes of the current segment not fed yet, and deflated bytes fed not inflated yet
        self.left = 0
        self.tail: bytes = b""

    def feed(self, data: bytes) -> None:
        """More bytes from the wire (`take` returned b"": what was fed is used up)."""
        rest = self.data[self.pos :]
        self.data = rest + data if rest else data
        self.pos = 0

    def take(self, want: int) -> bytes:
        """Decoded bytes (at most max(`want`, INFLATE_STEP) inflated ones, or a raw
        segment's part already fed); b"" when more must be fed. Raises ValueError on a
        malformed stream (zlib.error on broken deflate data)."""
        while True:
            if self.tail:
                out = self.d.decompress(self.tail, max(want, INFLATE_STEP))
                self.tail = self.d.unconsumed_tail
                if self.d.eof:
                    raise ValueError("the deflate stream ended")
                if out:
                    return out
                continue
            data, pos = self.data, self.pos
            if self.left:
                if pos >= len(data):
                    return b""
                end = min(len(data), pos + self.left)
                part = data[pos:end]
                self.left -= end - pos
                self.pos = end
                if self.kind == SEG_RAW:
                    return part
                self.tail = part
                continue
            if len(data) - pos < SEG.size:
                return b""
            self.kind, self.left = SEG.unpack_from(data, pos)
            self.pos = pos + SEG.size
            if self.kind not in (SEG_RAW, SEG_ZIP):
                raise ValueError("unknown segment kind")


class Inflow:
    """The helper's input once compression is on: reads as a binary file does."""

    def __init__(self, raw: BinaryIO) -> None:
        # why read1: one read of what is there (a pipe's), never a wait for a whole CHUNK
        self.read1: Callable[[int], bytes] = raw.read1  # type: ignore[attr-defined]
        self.unpacker = Unpacker()
        self.buf = bytearray()

    def read(self, n: int) -> bytes:
        """`n` bytes, fewer only at the end of the input."""
        buf, unpacker = self.buf, self.unpacker
        while len(buf) < n:
            out = unpacker.take(n - len(buf))
            if out:
                if not buf and len(out) == n:
                    return out
                buf += out
                continue
            more = self.read1(CHUNK)
            if not more:
                break
            unpacker.feed(more)
        with memoryview(buf) as view:
            got = bytes(view[:n])
        del buf[:n]
        return got


class Outflow:
    """The helper's output once compression is on: written as a binary file is, packed in
    parts of about OUT_PART bytes."""

    def __init__(self, raw: BinaryIO, level: int) -> None:
        self.raw = raw
        self.packer = Packer(level)
        self.buf = bytearray()

    def write(self, b: bytes, z: bool | None = None) -> bool | None:
        """Buffer `b`, or pack it now when big (`z` as for `Packer.pack`); returns the
        decision taken for it, else `z`."""
        if len(b) < OUT_PART:
            self.buf += b
            if len(self.buf) >= OUT_PART:
                self.push()
            return z
        self.push()
        parts, z = self.packer.pack(b, z)
        for part in parts:
            self.raw.write(part)
        return z

    def push(self) -> None:
        if self.buf:
            parts, _ = self.packer.pack(self.buf)
            for part in parts:
                self.raw.write(part)
            self.buf = bytearray()

    def flush(self) -> None:
        self.push()
        self.raw.flush()


class Helper:
    """One helper session: requests from `inp`, answers to `out`, files under the root that
    `hello` names. `umask` is the process's (files are created through it)."""

    def __init__(self, inp: BinaryIO, out: BinaryIO, umask: int) -> None:
        self.inp: BinaryIO | Inflow = inp
        self.out: BinaryIO | Outflow = out
        self.umask = umask
        self.root = ""
        self.rootfd = -1
        self.state = ""
        self.direct = False
        #: directories this push made: their new files need no temp either (`op_puts`)
        self.new_dirs: set[str] = set()
        self.errors: list[str] = []
        self.nerr = 0
        self.written = 0
        self.nbytes = 0
        self.dirs: dict[str, int] = {}
        self.lock = _thread.allocate_lock()
        self.seq = itertools.count()
        self.nthreads = 0
        self.queue: queue.Queue[Job | None] | None = None
        self.workers: list[threading.Thread] = []
        #: what one pull could not see, sent with the end of its stream: the client mirrors
        #: remote deletions only after a pull that listed and read everything
        self.pull_errors = 0
        self.pull_missing: list[str] = []
        #: patched files the client may send whole instead: until then, nothing is recorded
        self.redo: set[str] = set()
        #: what the client last pulled (`op_have`): files unchanged since are not resent
        self.have: Msg = {}
        #: a pull's small files not sent yet (all in one directory): entries, bytes, sizes
        self.batch: list[list[Any]] = []
        self.blobs: list[bytes] = []
        self.batch_bytes = 0
        self.batch_chars = 0
        self.ops: dict[str, Callable[[Msg], None]] = {
            "hello": self.op_hello,
            "scan": self.op_scan,
            "put": self.op_put,
            "puts": self.op_puts,
            "mkdir": self.op_mkdir,
            "link": self.op_link,
            "meta": self.op_meta,
            "remove": self.op_remove,
            "sync": self.op_sync,
            "finish": self.op_finish,
            "unrecord": self.op_unrecord,
            "have": self.op_have,
            "pull": self.op_pull,
            "blocks": self.op_blocks,
            "patch": self.op_patch,
        }

    # -- framing

    def rd(self, n: int) -> bytes:
        buf = self.inp.read(n)
        if buf is None or len(buf) != n:
            raise EOFError("short read")
        return buf

    def recv(self) -> Any:
        hdr = self.inp.read(4)
        if not hdr:
            return None
        if len(hdr) != 4:
            raise EOFError("short header")
        (n,) = struct.unpack(">I", hdr)
        return JLOADS(self.rd(n).decode("ascii"))

    def send(self, obj: Any) -> None:
        data = JDUMPS(obj).encode("ascii")
        self.out.write(struct.pack(">I", len(data)) + data)

    def serve(self) -> None:
        """Answer requests until the input ends."""
        while True:
            req = self.recv()
            if req is None:
                break
            if req["op"] not in ("put", "puts", "mkdir", "link", "meta"):
                self.drain()
            self.ops[req["op"]](req)
            if req.get("flush"):
                self.out.flush()
        self.drain()
        self.out.flush()

    # -- errors, write pool, directory fds

    def err(self, path: str, exc: BaseException) -> None:
        with self.lock:
            self.nerr += 1
            if len(self.errors) < MAX_ERRORS:
                self.errors.append(f"{path}: {exc}"[:MAX_ERROR_CHARS])

    def _work(self, q: queue.Queue[Job | None]) -> None:
        while True:
            job = q.get()
            try:
                if job is None:
                    return
                self.put_small(*job)
            finally:
                q.task_done()

    def submit(self, job: Job) -> None:
        """Write a small file on a thread pool (creating files is kernel-bound)."""
        if self.queue is None:
            import queue
            import threading  # only pooled writes need them (~2 ms at every start)

            self.queue = queue.Queue(maxsize=32)  # at most 32 small files (<= 32 MiB) in flight
            for _ in range(self.nthreads):
                t = threading.Thread(target=self._work, args=(self.queue,), daemon=True)
                t.start()
                self.workers.append(t)
        self.queue.put(job)

    def drain(self) -> None:
        """Wait until every submitted job is done (before anything that depends on them)."""
        if self.queue is not None:
            self.queue.join()

    def stop_pool(self) -> None:
        """End the pool's threads (the helper process skips this: it exits instead)."""
        if self.queue is not None:
            for _ in self.workers:
                self.queue.put(None)
            for t in self.workers:
                t.join()
            self.queue = None
            self.workers = []

    def drop_dirs(self) -> None:
        self.drain()  # pooled jobs may still use these fds
        for fd in self.dirs.values():
            os.close(fd)
        # emptied in place: a loop holding the cache in a local (`op_puts`) then finds no
        # closed fd in it
        self.dirs.clear()

    def open_dir(self, rel: str, create: bool) -> int:
        """fd of directory `rel` under the root, walked component by component with
        O_NOFOLLOW (cached: not the caller's to close)."""
        if rel == "":
            return self.rootfd
        fd = self.dirs.get(rel)
        if fd is not None:
            return fd
        parent, _, name = rel.rpartition("/")
        pfd = self.open_dir(parent, create)
        try:
            fd = os.open(name, DFLAGS, dir_fd=pfd)
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(name, 0o755, dir_fd=pfd)
            self.new_dirs.add(rel)
            fd = os.open(name, DFLAGS, dir_fd=pfd)
        if len(self.dirs) > MAX_DIR_FDS:
            self.drop_dirs()
        self.dirs[rel] = fd
        return fd

    def record_path(self) -> str:
        return os.path.join(self.state, "record.json")

    # -- push

    def op_hello(self, req: Msg) -> None:
        # a kept helper's next push: nothing the last one left (dir fds, counters) is its
        self.drop_dirs()
        if self.rootfd >= 0:
            os.close(self.rootfd)
            self.rootfd = -1
        self.errors, self.nerr, self.written, self.nbytes = [], 0, 0, 0
        self.redo = set()
        self.new_dirs = set()
        root = req["root"]
        self.root = root
        self.nthreads = min(int(req.get("threads", 0)), MAX_THREADS)
        self.state = req["state_dir"]
        os.makedirs(root, exist_ok=True)
        self.rootfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        boot = read_boot_id(req["boot_paths"])
        rec = None
        try:
            with open(self.record_path(), "rb") as f:
                rec = JLOADS(f.read().decode("ascii"))
        except (OSError, ValueError):
            rec = None
        fresh = bool(
            isinstance(rec, dict)
            and boot
            and rec.get("boot_id") == boot
            and rec.get("uuid") == req["uuid"]
            and rec.get("digest") == req["digest"]
            and rec.get("root") == root
        )
        # the record's identity too: a client may judge freshness itself
        ident = None
        if isinstance(rec, dict):
            ident = {k: rec.get(k) for k in ("boot_id", "uuid", "digest", "root")}
        # an empty root (a first push): the client then needs no scan of it
        with os.scandir(self.rootfd) as it:
            empty = next(it, None) is None
        self.direct = empty
        answer: Msg = {
            "boot_id": boot,
            "fresh": fresh,
            "has_record": rec is not None,
            "record": ident,
            "empty": empty,
        }
        level = req.get("z")
        inp, out = self.inp, self.out
        if type(level) is int and 1 <= level <= 9 and not isinstance(inp, Inflow):
            # compression both ways from here on: the client's next byte is a segment, and
            # ours after this answer (the client switches when it reads `z` in it)
            answer["z"] = True
            self.inp = Inflow(inp)
            self.send(answer)
            if not isinstance(out, Outflow):
                self.out = Outflow(out, level)
            return
        self.send(answer)

    def op_scan(self, req: Msg) -> None:
        """Stream the tree in batches: each frame stays far below the client's cap, and a long
        walk keeps the channel busy (the client's idle timeout sees progress)."""
        want = req.get("want") or {}
        batch: list[list[Any]] = []
        state = {"size": 0, "count": 0}

        def emit(item: list[Any]) -> None:
            batch.append(item)
            # worst case for the frame: every character escaped (\udcXX is 6 characters)
            state["size"] += 6 * (len(item[0]) + len(item[5])) + 80
            state["count"] += 1
            if state["size"] >= SCAN_BATCH:
                flush_batch()

        def flush_batch() -> None:
            if batch:
                self.send({"scan": batch})
                self.out.flush()
                del batch[:]
            state["size"] = 0

        def walk(path: str, rel: str) -> None:
            try:
                it = os.scandir(path)
            except OSError:
                return
            with it:
                kids = list(it)
            for d in kids:
                r = rel + "/" + d.name if rel else d.name
                try:
                    st = d.stat(follow_symlinks=False)
                except OSError:
                    continue
                m = st.st_mode
                if stat.S_ISDIR(m):
                    emit([r, "d", 0, st.st_mtime_ns, stat.S_IMODE(m), ""])
                    walk(d.path, r)
                elif stat.S_ISLNK(m):
                    try:
                        t = os.readlink(d.path)
                    except OSError:
                        continue
                    emit([r, "l", len(t), st.st_mtime_ns, 0o777, t])
                elif stat.S_ISREG(m):
                    ref = ""
                    w = want.get(r)
                    if w and w[0] == st.st_size and w[1] == st.st_mtime_ns:
                        try:
                            fd = os.open(d.path, os.O_RDONLY | os.O_NOFOLLOW)
                            try:
                                ref = file_sha(fd)
                            finally:
                                os.close(fd)
                        except OSError:
                            ref = ""
                    emit([r, "f", st.st_size, st.st_mtime_ns, stat.S_IMODE(m), ref])
                else:
                    emit([r, "o", 0, st.st_mtime_ns, stat.S_IMODE(m), ""])

        walk(self.root, "")
        flush_batch()
        self.send({"scan_end": True, "count": state["count"]})

    def finish_file(self, fd: int, req: Msg) -> None:
        mode = req["mode"] & 0o7777
        if mode != mode & ~self.umask & 0o777:  # the umask took bits, or set-id/sticky wanted
            os.fchmod(fd, mode)
        os.utime(fd, ns=(req["mtime_ns"], req["mtime_ns"]))

    def put_small(self, path: str, pfd: int, name: str, data: bytes, req: Msg) -> None:
        tmp = TMP + name[:100] + "." + str(os.getpid()) + "." + str(next(self.seq))
        try:
            fd = create_temp(tmp, pfd, req["mode"])
            try:
                write_all(fd, data)
                self.finish_file(fd, req)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            with self.lock:
                self.written += 1
                self.nbytes += len(data)
                self.redo.discard(path)
        except Exception as exc:
            self.err(path, exc)
            unlink_quiet(tmp, pfd)

    def op_put(self, req: Msg) -> None:
        path, size = req["path"], req["size"]
        if size <= SMALL and self.nthreads > 0:
            name = ""
            spfd = None
            try:
                parent, name = split(path)
                spfd = self.open_dir(parent, True)
            except Exception as exc:
                self.err(path, exc)
            data = self.rd(size) if size else b""
            ok = self.rd(1) == b"\x01"
            if ok and spfd is not None:
                self.submit((path, spfd, name, data, req))
            return
        fd = None
        tmp = None
        pfd = None
        try:
            parent, name = split(path)
            pfd = self.open_dir(parent, True)
            tmp = TMP + name[:100] + "." + str(os.getpid())
            fd = create_temp(tmp, pfd, req["mode"])
        except Exception as exc:
            self.err(path, exc)
        left = size
        while left:
            b = self.inp.read(min(left, CHUNK))
            if not b:
                raise EOFError("short data")
            left -= len(b)
            if fd is not None:
                try:
                    write_all(fd, b)
                except OSError as exc:
                    self.err(path, exc)
                    os.close(fd)
                    fd = None
        ok = self.rd(1) == b"\x01"
        if fd is None or tmp is None or pfd is None:
            if tmp is not None and pfd is not None:
                unlink_quiet(tmp, pfd)
            return
        try:
            if not ok:
                raise OSError("file changed while it was being sent")
            self.finish_file(fd, req)
            os.close(fd)
            fd = None
            os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            self.written += 1
            self.nbytes += size
            self.redo.discard(path)
        except Exception as exc:
            if ok:
                self.err(path, exc)
            if fd is not None:
                os.close(fd)
            unlink_quiet(tmp, pfd)

    def op_puts(self, req: Msg) -> None:
        """A batch of small files: `files` names each one's [path, size, mode, mtime_ns];
        their bytes and trailers follow in that order, as after one `put` each."""
        files = req["files"]
        sizes = [f[1] for f in files]
        total = sum(sizes) + len(sizes)
        if type(total) is not int or min(sizes, default=0) < 0:
            raise ValueError("bad sizes")
        if total > PUTS_AT_ONCE or self.nthreads:
            for path, size, mode, mtime_ns in files:
                self.op_put({"path": path, "size": size, "mode": mode, "mtime_ns": mtime_ns})
            return
        data = self.rd(total)
        view = memoryview(data)
        dirs, keep, pos, n, nbytes = self.dirs, ~self.umask & 0o777, 0, 0, 0
        new_dirs, direct, redo = self.new_dirs, self.direct, self.redo
        # why locals: this loop runs once per small file (100,000 on a first push)
        osopen, write, utime, close = os.open, os.write, os.utime, os.close
        try:
            for path, size, mode, mtime_ns in files:
                end = pos + size
                ok, body, pos = data[end] == 1, view[pos:end], end + 1
                parent, _, name = path.rpartition("/")
                # a parent in `dirs` passed `split`
                pfd = dirs.get(parent) if parent else self.rootfd
                made = ""
                try:
                    if pfd is None or name in ("", ".", ".."):
                        parent, name = split(path)
                        pfd = self.open_dir(parent, True)
                    if not ok:
                        continue
                    fd = -1
                    if direct or parent in new_dirs:
                        try:
                            fd = osopen(name, NEW, mode & 0o777, dir_fd=pfd)
                            made = name
                        except FileExistsError:
                            pass
                    if fd < 0:
                        made = TMP + name[:100] + "." + str(os.getpid())
                        fd = create_temp(made, pfd, mode)
                    try:
                        done = write(fd, body)
                        if done != size:
                            write_all(fd, body[done:])
                        mode &= 0o7777
                        if mode != mode & keep:
                            os.fchmod(fd, mode)
                        utime(fd, ns=(mtime_ns, mtime_ns))
                    finally:
                        close(fd)
                    if made != name:
                        os.rename(made, name, src_dir_fd=pfd, dst_dir_fd=pfd)
                    n += 1
                    nbytes += size
                    if redo:
                        redo.discard(path)
                except Exception as exc:
                    self.err(path, exc)
                    if made and pfd is not None:
                        unlink_quiet(made, pfd)
        finally:
            self.written += n
            self.nbytes += nbytes

    def op_blocks(self, req: Msg) -> None:
        """Per-block digests of existing remote files, for delta uploads of big files: for each
        path `{"n": N}` and N raw 8-byte digests (at most the count asked for), or `{"n": -1}`."""
        import hashlib

        bs = req["bs"]
        for path, most in zip(req["paths"], req["max"]):
            out = None
            try:
                parent, name = split(path)
                pfd = self.open_dir(parent, False)
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=pfd)
                try:
                    if not stat.S_ISREG(os.fstat(fd).st_mode):
                        raise OSError("not a regular file")
                    digests: list[bytes] = []
                    while len(digests) < most:
                        b = os.read(fd, bs)
                        if not b:
                            break
                        digests.append(hashlib.sha1(b).digest()[:8])
                    out = b"".join(digests)
                finally:
                    os.close(fd)
            except Exception:
                out = None
            if out is None:
                self.send({"n": -1})
            else:
                self.send({"n": len(out) // 8})
                self.out.write(out)

    def op_patch(self, req: Msg) -> None:
        """A new version of an existing file, built in one pass: the old file's unchanged
        blocks and the changed ones that follow the request (`send`, ascending) are written to
        a temp file in order and hashed on the way; the temp replaces the file only when that
        sha256 is the one asked for (a reader sees the old file or the new one, never a mix).

        With `base` ([size, mtime_ns]) the old file must be that one. With `redo`, an old file
        or result that is not what the client believed is noted for the client to send whole
        (`redo` in the counts), not an error."""
        import hashlib

        path, size, bs, idxs = req["path"], req["size"], req["bs"], req["send"]
        h = hashlib.sha256()
        fd = src = pfd = tmp = failed = None
        try:
            parent, name = split(path)
            pfd = self.open_dir(parent, False)
            # O_NONBLOCK: a fifo planted under the name must not stall the open
            src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=pfd)
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode):
                raise OSError("not a regular file")
            base = req.get("base")
            if base is not None and [st.st_size, st.st_mtime_ns] != base:
                raise MismatchError("not the file the patch was made for")
            tmp = TMP + name[:100] + "." + str(os.getpid())
            fd = create_temp(tmp, pfd, 0o600)
        except Exception as exc:
            failed = exc
        pos = 0
        for i in idxs:
            off = i * bs
            if failed is None and off < pos:
                failed = OSError("patch blocks out of order")
            if failed is None:
                try:
                    self.copy_hashed(src, fd, h, pos, off)
                except Exception as exc:
                    failed = exc
            b = self.rd(min(bs, size - off)) if off < size else b""
            if failed is None and fd is not None:
                try:
                    h.update(b)
                    write_all(fd, b)
                except Exception as exc:
                    failed = exc
            pos = off + len(b)
        if failed is None:
            try:
                self.copy_hashed(src, fd, h, pos, size)
            except Exception as exc:
                failed = exc
        if src is not None:
            os.close(src)
        ok = self.rd(1) == b"\x01"
        try:
            if failed is not None:
                raise failed
            if fd is None or tmp is None or pfd is None:
                raise OSError("no temp file")
            if not ok:
                raise OSError("file changed while it was being sent")
            if h.hexdigest() != req["sha256"]:
                raise MismatchError("patched content does not match its sha256")
            os.fchmod(fd, req["mode"] & 0o7777)
            os.utime(fd, ns=(req["mtime_ns"], req["mtime_ns"]))
            os.close(fd)
            fd = None
            os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
            self.written += 1
            self.nbytes += sum(min(bs, size - i * bs) for i in idxs)
        except Exception as exc:
            if isinstance(exc, MismatchError) and req.get("redo"):
                self.redo.add(path)
            elif ok or failed is not None:
                self.err(path, exc)
            if fd is not None:
                os.close(fd)
            if tmp is not None and pfd is not None:
                unlink_quiet(tmp, pfd)

    @staticmethod
    def copy_hashed(src: int | None, fd: int | None, h: Any, start: int, end: int) -> None:
        """Append the old file's bytes [start, end) to `fd` (zeros past its end), hashed."""
        if src is None or fd is None:
            raise OSError("no file to patch")
        while start < end:
            n = min(CHUNK, end - start)
            b = os.pread(src, n, start)
            if not b:
                b = bytes(n)
            h.update(b)
            write_all(fd, b)
            start += len(b)

    def op_mkdir(self, req: Msg) -> None:
        path = req["path"]
        try:
            parent, name = split(path)
            pfd = self.open_dir(parent, True)
            try:
                os.mkdir(name, 0o700, dir_fd=pfd)
                self.new_dirs.add(path)
            except FileExistsError:
                pass
            fd = os.open(name, DFLAGS, dir_fd=pfd)
            try:
                os.fchmod(fd, req["mode"] & 0o7777)
            finally:
                os.close(fd)
        except Exception as exc:
            self.err(path, exc)

    def op_link(self, req: Msg) -> None:
        path = req["path"]
        try:
            parent, name = split(path)
            pfd = self.open_dir(parent, True)
            tmp = TMP + name[:100] + "." + str(os.getpid())
            unlink_quiet(tmp, pfd)
            os.symlink(req["target"], tmp, dir_fd=pfd)
            os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
        except Exception as exc:
            self.err(path, exc)

    def op_meta(self, req: Msg) -> None:
        path = req["path"]
        try:
            parent, name = split(path)
            pfd = self.open_dir(parent, False)
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=pfd)
            try:
                os.fchmod(fd, req["mode"] & 0o7777)
                os.utime(fd, ns=(req["mtime_ns"], req["mtime_ns"]))
            finally:
                os.close(fd)
        except Exception as exc:
            self.err(path, exc)

    def op_remove(self, req: Msg) -> None:
        """Remove files, links and empty dirs (never a non-empty dir, never the root)."""
        removed = 0
        kept: list[str] = []
        self.drop_dirs()
        for path in req["paths"]:
            if not path or protected(path, req.get("protect") or []):
                kept.append(path)
                continue
            try:
                parent, name = split(path)
                pfd = self.open_dir(parent, False)
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    os.rmdir(name, dir_fd=pfd)
                else:
                    os.unlink(name, dir_fd=pfd)
                removed += 1
            except (FileNotFoundError, NotADirectoryError):
                pass
            except OSError as exc:
                if exc.errno == errno.ENOTEMPTY:
                    kept.append(path)
                    if req.get("strict"):
                        self.err(path, exc)
                else:
                    self.err(path, exc)
            except Exception as exc:
                self.err(path, exc)
        self.drop_dirs()
        self.send({"removed": removed, "kept": kept[:10]})

    def counts(self) -> Msg:
        out: Msg = {
            "errors": self.errors,
            "error_count": self.nerr,
            "written": self.written,
            "bytes": self.nbytes,
        }
        if self.redo:
            # bounded like the errors: the client sends these, asks again, and gets the rest
            out["redo"] = sorted(self.redo)[:MAX_ERRORS]
        return out

    def op_sync(self, req: Msg) -> None:
        self.send(self.counts())

    def op_finish(self, req: Msg) -> None:
        """Report the errors so far; write the record only when there were none."""
        rec = req.get("record")
        recorded = False
        if rec is not None and self.nerr == 0 and not self.redo:
            os.makedirs(self.state, mode=0o700, exist_ok=True)
            rec = dict(rec)
            rec["root"] = self.root
            writes = [(self.record_path(), rec)]
            if "entries" in rec:
                # a manifest beside the small record (older clients send one): hello reads
                # only the record
                writes.insert(0, (self.record_path()[:-5] + ".manifest.json", rec.pop("entries")))
            # no fsync: both live on tmpfs (/run), and a lost record only forces a scan
            for path, obj in writes:
                tmp = path + ".tmp." + str(os.getpid())
                with open(tmp, "wb") as f:
                    f.write(JDUMPS(obj).encode("ascii"))
                os.replace(tmp, path)
            recorded = True
        answer = self.counts()
        answer["recorded"] = recorded
        self.send(answer)

    def op_unrecord(self, req: Msg) -> None:
        try:
            os.unlink(self.record_path())
        except FileNotFoundError:
            pass

    # -- pull

    def pull_failed(self, exc: BaseException) -> None:
        """Count a failure to list, stat, open or read. A name that vanished meanwhile
        (FileNotFoundError) is a genuine absence, not an error."""
        if not isinstance(exc, FileNotFoundError):
            self.pull_errors += 1

    def emit_file(self, r: str, dfd: int, name: str, st: os.stat_result, have: Msg) -> None:
        if self.same(have, r, st):
            self.send(
                {
                    "path": r,
                    "type": "f",
                    "size": st.st_size,
                    "mode": stat.S_IMODE(st.st_mode),
                    "mtime_ns": st.st_mtime_ns,
                    "unchanged": True,
                }
            )
            return
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
        except OSError as exc:
            self.pull_failed(exc)
            return
        try:
            self.stream(r, fd, os.fstat(fd))
        finally:
            os.close(fd)

    @staticmethod
    def same(have: Msg, r: str, st: os.stat_result) -> bool:
        w = have.get(r)
        if not w:
            return False
        return bool(w[0] == st.st_size and w[1] == st.st_mtime_ns)

    def stream(self, r: str, fd: int, fst: os.stat_result) -> None:
        out = self.out
        self.send(
            {
                "path": r,
                "type": "f",
                "size": fst.st_size,
                "mode": stat.S_IMODE(fst.st_mode),
                "mtime_ns": fst.st_mtime_ns,
            }
        )
        left = fst.st_size
        z = None
        while left > 0:
            try:
                b = os.read(fd, min(CHUNK, left))
            except OSError as exc:
                # the file ends short (the client refuses it) and the stream stays framed
                self.pull_failed(exc)
                break
            if not b:
                break
            left -= len(b)
            out.write(struct.pack(">I", len(b)))
            if isinstance(out, Outflow):
                z = out.write(b, z)  # the first part's sample decides for the whole file
            else:
                out.write(b)
        out.write(struct.pack(">I", 0))

    def add_small(self, rel: str, dfd: int, name: str) -> None:
        """Read a small file into the pending `files` frame (sent when full), or stream it
        alone when it grew meanwhile."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
        except OSError as exc:
            self.pull_failed(exc)
            return
        try:
            fst = os.fstat(fd)
            if fst.st_size > BATCH_FILE:
                self.send_batch(rel)
                self.stream(rel + "/" + name, fd, fst)
                return
            data = os.read(fd, fst.st_size)
            while len(data) < fst.st_size:
                b = os.read(fd, fst.st_size - len(data))
                if not b:
                    break
                data += b
        except OSError as exc:
            self.pull_failed(exc)
            return
        finally:
            os.close(fd)
        self.batch.append([name, len(data), stat.S_IMODE(fst.st_mode), fst.st_mtime_ns])
        self.blobs.append(data)
        self.batch_bytes += len(data)
        self.batch_chars += len(name)
        if (
            self.batch_bytes >= BATCH_BYTES
            or len(self.batch) >= BATCH_FILES
            or self.batch_chars >= BATCH_CHARS
        ):
            self.send_batch(rel)

    def send_batch(self, rel: str) -> None:
        if self.batch:
            self.send({"dir": rel, "files": self.batch})
            self.out.write(b"".join(self.blobs))
            self.batch, self.blobs = [], []
            self.batch_bytes = self.batch_chars = 0

    def pull_entry(self, dfd: int, name: str, rel: str, st: os.stat_result, have: Msg) -> None:
        """Announce one entry (and stream it, or walk into it); never follows a link."""
        m = st.st_mode
        if stat.S_ISDIR(m):
            self.send(
                {
                    "path": rel,
                    "type": "d",
                    "size": 0,
                    "mode": stat.S_IMODE(m),
                    "mtime_ns": st.st_mtime_ns,
                }
            )
            try:
                sub = os.open(name, DFLAGS, dir_fd=dfd)
            except OSError as exc:
                self.pull_failed(exc)
                return
            try:
                self.pull_walk(sub, rel, have)
            finally:
                os.close(sub)
        elif stat.S_ISREG(m):
            self.emit_file(rel, dfd, name, st, have)
        else:
            kind = "l" if stat.S_ISLNK(m) else "o"
            self.send(
                {
                    "path": rel,
                    "type": kind,
                    "size": 0,
                    "mode": stat.S_IMODE(m),
                    "mtime_ns": st.st_mtime_ns,
                }
            )

    def pull_walk(self, dfd: int, rel: str, have: Msg) -> None:
        try:
            names = sorted(os.listdir(dfd))
        except OSError as exc:
            self.pull_failed(exc)
            return
        # the pending small files are sent before any entry sent alone: the stream keeps the
        # names' order (a cap stops a pull at the same file either way)
        for name in names:
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except OSError as exc:
                self.pull_failed(exc)
                continue
            r = rel + "/" + name
            if stat.S_ISREG(st.st_mode) and st.st_size <= BATCH_FILE and not self.same(have, r, st):
                self.add_small(rel, dfd, name)
                continue
            self.send_batch(rel)
            self.pull_entry(dfd, name, r, st, have)
        self.send_batch(rel)

    def op_have(self, req: Msg) -> None:
        """Part of what the client last pulled (path -> [size, mtime_ns]), sent in parts
        before the pull so that no frame holds all of it."""
        self.have.update(req.get("have") or {})

    def op_pull(self, req: Msg) -> None:
        have = req.get("have") or self.have
        self.pull_errors = 0
        self.pull_missing = []
        for back in req["back"]:
            try:
                parent, name = split(back)
                pfd = self.open_dir(parent, False)  # cached by open_dir: not ours to close
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            except FileNotFoundError:
                self.pull_missing.append(back)  # it (or a parent) does not exist
                continue
            except Exception:
                self.pull_errors += 1
                continue
            self.pull_entry(pfd, name, back, st, have)
        self.send({"end": True, "errors": self.pull_errors, "missing": self.pull_missing})


def main() -> None:
    """The helper process: serve stdin/stdout, then exit without the interpreter's teardown."""
    # why: at 64 KiB sshd stalls on this pipe whenever a file takes a moment to create; 1 MiB
    # (the unprivileged limit): ~20% off a 2,000-file push
    try:
        import fcntl

        fcntl.fcntl(0, F_SETPIPE_SZ, 1 << 20)
    except Exception:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    Helper(sys.stdin.buffer, sys.stdout.buffer, umask).serve()
    # every file is closed and the output flushed: skip the interpreter's teardown
    os._exit(0)


if __name__ == "__main__":
    main()
