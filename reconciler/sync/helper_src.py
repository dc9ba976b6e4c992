"""The text of the remote sync helper: a small stdlib-only Python program run in the sandbox.

Who feeds it: `remote.HelperSession` sends this text over the process's stdin after a short
`python3 -c` bootstrap. Who uses it: `push` and `pull`, through `HelperSession`.

Remote requirement: `python3` (>= 3.7, stdlib only) on the sandbox's PATH (or
`SyncOptions.remote_python`). It is present in the local metro's sandboxes and in
Debian-based sandbox images.

Protocol (one process per push or pull, many operations): the client sends frames
`u32be length + JSON`; `put` is followed by exactly `size` raw bytes and one trailer byte
(1 = commit, 0 = discard); `patch` (a big file already there) is followed by only its
changed fixed-size blocks and the trailer, and is checked against the file's sha256.
The helper answers only operations that need an answer (hello, scan, blocks, sync, remove,
finish, pull) with frames of the same shape, each small (the client caps them at 1 MiB):
`scan` answers with `{"scan": [[path, type, size, mtime_ns, mode, ref], ...]}` batches and a
final `{"scan_end": true, "count": N}`; `blocks` with, per requested path, `{"n": N}` and N raw
8-byte block digests (`{"n": -1}` when the file cannot be read), never more than asked for.
`pull` answers with a stream of entry headers; each regular file header is followed by chunk
frames (`u32be length + bytes`, a zero length ends the file), and a final
`{"end": true, "errors": N, "missing": [back paths]}`: N counts entries it could not list or
read (anything but a vanished path), so the client knows whether the listing was complete
before it mirrors deletions.
Every write lands via a temp name in the same directory + rename, through directory fds
opened with O_NOFOLLOW, so a symlink inside the tree is never followed.
"""

from __future__ import annotations

__all__ = ["HELPER_SOURCE"]

HELPER_SOURCE = r'''
import _thread, errno, itertools, os, stat, struct, sys
IN = sys.stdin.buffer
# why: sshd writes what it receives into this pipe; at the default 64 KiB it is full whenever
# creating a file takes a moment, sshd stops reading and the client waits for the channel
# window. 1 MiB (the unprivileged limit) smooths that: ~20% off an initial push of 2,000
# files. Not a pipe (a local test run), or an older kernel: nothing to do.
try:
    import fcntl
    fcntl.fcntl(0, 1031, 1 << 20)  # F_SETPIPE_SZ
except Exception:
    pass
OUT = sys.stdout.buffer
CHUNK = 1 << 20
DFLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
ST = {"root": None, "rootfd": None, "state": None, "errors": [], "nerr": 0,
      "written": 0, "bytes": 0, "dirs": {}}
TMP = ".ukc-tmp."
UMASK = os.umask(0o022)
os.umask(UMASK)


def _json_codec():
    """loads/dumps from the C module `_json` directly: `import json` pulls in `re` and `enum`
    (~6 ms, paid on every push, pull and watch pass); the plain module is the fallback."""
    try:
        import _json

        class Ctx(object):
            strict = True
            object_hook = None
            object_pairs_hook = None
            parse_float = float
            parse_int = int
            memo = {}

            @staticmethod
            def parse_constant(name):
                raise ValueError("constant " + name)

        scan = _json.make_scanner(Ctx())
        enc = _json.make_encoder(None, None, _json.encode_basestring_ascii, None, ":", ",",
                                 False, False, False)

        def loads(text):
            try:
                obj, end = scan(text, 0)
            except StopIteration:
                raise ValueError("not json")
            if end != len(text):
                raise ValueError("extra data")
            return obj

        def dumps(obj):
            return "".join(enc(obj, 0))

        probe = {"a": [1, "\udcff\u00e9\n", None, True, {}]}
        if loads(dumps(probe)) != probe:
            raise ValueError("_json round trip")
        return loads, dumps
    except Exception:
        import json

        return json.loads, lambda obj: json.dumps(obj, separators=(",", ":"))


JLOADS, JDUMPS = _json_codec()


def rd(n):
    buf = IN.read(n)
    if buf is None or len(buf) != n:
        raise EOFError("short read")
    return buf


def recv():
    hdr = IN.read(4)
    if not hdr:
        return None
    if len(hdr) != 4:
        raise EOFError("short header")
    (n,) = struct.unpack(">I", hdr)
    return JLOADS(rd(n).decode("ascii"))


def send(obj):
    data = JDUMPS(obj).encode("ascii")
    OUT.write(struct.pack(">I", len(data)) + data)


LOCK = _thread.allocate_lock()
SMALL = 1 << 20
POOL = {"q": None, "threads": [], "n": 0}
SEQ = itertools.count()


def err(path, exc):
    with LOCK:
        ST["nerr"] += 1
        if len(ST["errors"]) < 50:
            # bounded: the answer carrying these must fit the client's frame cap
            ST["errors"].append(("%s: %s" % (path, exc))[:400])


def _worker(q):
    while True:
        job = q.get()
        try:
            if job is None:
                return
            job()
        finally:
            q.task_done()


def submit(job):
    """Run `job` on a small thread pool: creating many files is kernel-bound, and threads
    overlap it (the GIL is released in the syscalls)."""
    if POOL["q"] is None:
        import queue, threading  # only pooled writes need them (~2 ms at every start)

        POOL["q"] = queue.Queue(maxsize=32)  # at most 32 small files (<= 32 MiB) in flight
        for _ in range(POOL["n"]):
            t = threading.Thread(target=_worker, args=(POOL["q"],), daemon=True)
            t.start()
            POOL["threads"].append(t)
    POOL["q"].put(job)


def drain():
    """Wait until every submitted job is done (before anything that depends on them)."""
    if POOL["q"] is not None:
        POOL["q"].join()


def drop_dirs():
    drain()  # pooled jobs may still use these fds
    for fd in ST["dirs"].values():
        os.close(fd)
    ST["dirs"] = {}


def open_dir(rel, create):
    """fd of directory `rel` under the root, walked component by component with O_NOFOLLOW."""
    if rel == "":
        return ST["rootfd"]
    fd = ST["dirs"].get(rel)
    if fd is not None:
        return fd
    parent, _, name = rel.rpartition("/")
    pfd = open_dir(parent, create)
    try:
        fd = os.open(name, DFLAGS, dir_fd=pfd)
    except FileNotFoundError:
        if not create:
            raise
        os.mkdir(name, 0o755, dir_fd=pfd)
        fd = os.open(name, DFLAGS, dir_fd=pfd)
    if len(ST["dirs"]) > 256:
        drop_dirs()
    ST["dirs"][rel] = fd
    return fd


def split(rel):
    parent, _, name = rel.rpartition("/")
    if not name or name in (".", "..") or ".." in rel.split("/"):
        raise ValueError("bad path")
    return parent, name


def read_boot_id(paths):
    for p in paths:
        try:
            with open(p, "rb") as f:
                value = f.read(256).decode("ascii", "replace").strip()
        except OSError:
            continue
        if value:
            return value
    return ""


def record_path():
    return os.path.join(ST["state"], "record.json")


def op_hello(req):
    root = req["root"]
    ST["root"] = root
    POOL["n"] = min(int(req.get("threads", 0)), 16)
    ST["state"] = req["state_dir"]
    os.makedirs(root, exist_ok=True)
    ST["rootfd"] = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    boot = read_boot_id(req["boot_paths"])
    rec = None
    try:
        with open(record_path(), "rb") as f:
            rec = JLOADS(f.read().decode("ascii"))
    except (OSError, ValueError):
        rec = None
    fresh = bool(
        isinstance(rec, dict) and boot
        and rec.get("boot_id") == boot and rec.get("uuid") == req["uuid"]
        and rec.get("digest") == req["digest"] and rec.get("root") == root
    )
    # the record's identity too: a client that sent hello before reading its own last record
    # (to overlap this process's start with its local work) judges freshness itself
    ident = None
    if isinstance(rec, dict):
        ident = dict((k, rec.get(k)) for k in ("boot_id", "uuid", "digest", "root"))
    send({"boot_id": boot, "fresh": fresh, "has_record": rec is not None, "record": ident})


def file_sha(fd):
    import hashlib  # only scans hash; importing it costs a few ms at every start

    h = hashlib.sha256()
    while True:
        b = os.read(fd, CHUNK)
        if not b:
            return h.hexdigest()
        h.update(b)


SCAN_BATCH = 128 << 10


def op_scan(req):
    """Stream the tree in batches: each frame stays far below the client's cap, and a long
    walk keeps the channel busy (the client's idle timeout sees progress)."""
    want = req.get("want") or {}
    batch = []
    state = {"size": 0, "count": 0}

    def emit(item):
        batch.append(item)
        # worst case for the frame: every character escaped (\udcXX is 6 characters)
        state["size"] += 6 * (len(item[0]) + len(item[5])) + 80
        state["count"] += 1
        if state["size"] >= SCAN_BATCH:
            flush_batch()

    def flush_batch():
        if batch:
            send({"scan": batch})
            OUT.flush()
            del batch[:]
        state["size"] = 0

    def walk(path, rel):
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

    walk(ST["root"], "")
    flush_batch()
    send({"scan_end": True, "count": state["count"]})


def _create_temp(tmp, pfd, mode):
    """A new temp file created with the file's final permission bits, so that no fchmod is
    needed unless the umask strips some (`_finish_file`); a leftover of a killed helper with
    our pid is replaced."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        return os.open(tmp, flags, mode & 0o777, dir_fd=pfd)
    except FileExistsError:
        _unlink_quiet(tmp, pfd)
        return os.open(tmp, flags, mode & 0o777, dir_fd=pfd)


def _finish_file(fd, req):
    mode = req["mode"] & 0o7777
    if mode != mode & ~UMASK & 0o777:  # the umask took bits, or set-id/sticky bits wanted
        os.fchmod(fd, mode)
    os.utime(fd, ns=(req["mtime_ns"], req["mtime_ns"]))


def _put_small(path, pfd, name, data, req):
    tmp = TMP + name[:100] + "." + str(os.getpid()) + "." + str(next(SEQ))
    try:
        fd = _create_temp(tmp, pfd, req["mode"])
        try:
            _write_all(fd, data)
            _finish_file(fd, req)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
        with LOCK:
            ST["written"] += 1
            ST["bytes"] += len(data)
    except Exception as exc:
        err(path, exc)
        _unlink_quiet(tmp, pfd)


def op_put(req):
    path, size = req["path"], req["size"]
    if size <= SMALL and POOL["n"] > 0:
        try:
            parent, name = split(path)
            pfd = open_dir(parent, True)
        except Exception as exc:
            err(path, exc)
            pfd = None
        data = rd(size) if size else b""
        ok = rd(1) == b"\x01"
        if ok and pfd is not None:
            submit(lambda: _put_small(path, pfd, name, data, req))
        return
    fd = None
    tmp = None
    pfd = None
    try:
        parent, name = split(path)
        pfd = open_dir(parent, True)
        tmp = TMP + name[:100] + "." + str(os.getpid())
        fd = _create_temp(tmp, pfd, req["mode"])
    except Exception as exc:
        err(path, exc)
    left = size
    while left:
        b = IN.read(min(left, CHUNK))
        if not b:
            raise EOFError("short data")
        left -= len(b)
        if fd is not None:
            try:
                _write_all(fd, b)
            except OSError as exc:
                err(path, exc)
                os.close(fd)
                fd = None
    ok = rd(1) == b"\x01"
    if fd is None:
        if tmp is not None and pfd is not None:
            _unlink_quiet(tmp, pfd)
        return
    try:
        if not ok:
            raise OSError("file changed while it was being sent")
        _finish_file(fd, req)
        os.close(fd)
        fd = None
        os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
        ST["written"] += 1
        ST["bytes"] += size
    except Exception as exc:
        if ok:
            err(path, exc)
        if fd is not None:
            os.close(fd)
        _unlink_quiet(tmp, pfd)


def _write_all(fd, b):
    view = memoryview(b)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _unlink_quiet(name, dfd):
    try:
        os.unlink(name, dir_fd=dfd)
    except OSError:
        pass


def op_blocks(req):
    """Per-block digests of existing remote files, for delta uploads of big files: for each
    path `{"n": N}` and N raw 8-byte digests (at most the count asked for), or `{"n": -1}`."""
    import hashlib

    bs = req["bs"]
    for path, most in zip(req["paths"], req["max"]):
        out = None
        try:
            parent, name = split(path)
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=open_dir(parent, False))
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise OSError("not a regular file")
                digests = []
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
            send({"n": -1})
        else:
            send({"n": len(out) // 8})
            OUT.write(out)


def op_patch(req):
    """A new version of an existing file: old content + the changed blocks, verified by sha256."""
    import hashlib

    path, size, bs, idxs = req["path"], req["size"], req["bs"], req["send"]
    fd = src = pfd = tmp = None
    try:
        parent, name = split(path)
        pfd = open_dir(parent, False)
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=pfd)
        tmp = TMP + name[:100] + "." + str(os.getpid())
        _unlink_quiet(tmp, pfd)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=pfd)
        left = size
        while left > 0:
            b = os.read(src, min(CHUNK, left))
            if not b:
                break
            _write_all(fd, b)
            left -= len(b)
        os.ftruncate(fd, size)
    except Exception as exc:
        err(path, exc)
        if fd is not None:
            os.close(fd)
            fd = None
    finally:
        if src is not None:
            os.close(src)
    for i in idxs:
        b = rd(min(bs, size - i * bs))
        if fd is not None:
            view = memoryview(b)
            off = i * bs
            while view:
                n = os.pwrite(fd, view, off)
                view, off = view[n:], off + n
    ok = rd(1) == b"\x01"
    if fd is None:
        if tmp is not None and pfd is not None:
            _unlink_quiet(tmp, pfd)
        return
    try:
        if not ok:
            raise OSError("file changed while it was being sent")
        os.lseek(fd, 0, 0)
        if file_sha(fd) != req["sha256"]:
            raise OSError("patched content does not match its sha256")
        os.fchmod(fd, req["mode"] & 0o7777)
        os.utime(fd, ns=(req["mtime_ns"], req["mtime_ns"]))
        os.close(fd)
        fd = None
        os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
        ST["written"] += 1
        ST["bytes"] += sum(min(bs, size - i * bs) for i in idxs)
    except Exception as exc:
        if ok:
            err(path, exc)
        if fd is not None:
            os.close(fd)
        _unlink_quiet(tmp, pfd)


def op_mkdir(req):
    path = req["path"]
    try:
        parent, name = split(path)
        pfd = open_dir(parent, True)
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
        except FileExistsError:
            pass
        fd = os.open(name, DFLAGS, dir_fd=pfd)
        try:
            os.fchmod(fd, req["mode"] & 0o7777)
        finally:
            os.close(fd)
    except Exception as exc:
        err(path, exc)


def op_link(req):
    path = req["path"]
    try:
        parent, name = split(path)
        pfd = open_dir(parent, True)
        tmp = TMP + name[:100] + "." + str(os.getpid())
        _unlink_quiet(tmp, pfd)
        os.symlink(req["target"], tmp, dir_fd=pfd)
        os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
    except Exception as exc:
        err(path, exc)


def op_meta(req):
    path = req["path"]
    try:
        parent, name = split(path)
        pfd = open_dir(parent, False)
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=pfd)
        try:
            os.fchmod(fd, req["mode"] & 0o7777)
            os.utime(fd, ns=(req["mtime_ns"], req["mtime_ns"]))
        finally:
            os.close(fd)
    except Exception as exc:
        err(path, exc)


def protected(path, protect):
    for p in protect:
        if path == p or path.startswith(p + "/") or p.startswith(path + "/"):
            return True
    return False


def op_remove(req):
    """Remove files, links and empty dirs (never a non-empty dir, never the root)."""
    removed, kept = 0, []
    drop_dirs()
    for path in req["paths"]:
        if not path or protected(path, req.get("protect") or []):
            kept.append(path)
            continue
        try:
            parent, name = split(path)
            pfd = open_dir(parent, False)
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
                    err(path, exc)
            else:
                err(path, exc)
        except Exception as exc:
            err(path, exc)
    drop_dirs()
    send({"removed": removed, "kept": kept[:10]})


def op_sync(req):
    send({"errors": ST["errors"], "error_count": ST["nerr"], "written": ST["written"],
          "bytes": ST["bytes"]})


def op_finish(req):
    """Report the errors so far; write the record only when there were none."""
    rec = req.get("record")
    recorded = False
    if rec is not None and ST["nerr"] == 0:
        os.makedirs(ST["state"], mode=0o700, exist_ok=True)
        rec = dict(rec)
        rec["root"] = ST["root"]
        entries = rec.pop("entries", {})
        # the manifest beside the small record: hello reads only the record
        # no fsync: both live on tmpfs (/run), and a lost record only forces a scan
        for path, obj in ((record_path()[:-5] + ".manifest.json", entries), (record_path(), rec)):
            tmp = path + ".tmp." + str(os.getpid())
            with open(tmp, "wb") as f:
                f.write(JDUMPS(obj).encode("ascii"))
            os.replace(tmp, path)
        recorded = True
    send({"errors": ST["errors"], "error_count": ST["nerr"], "written": ST["written"],
          "bytes": ST["bytes"], "recorded": recorded})


def op_unrecord(req):
    try:
        os.unlink(record_path())
    except FileNotFoundError:
        pass


#: what one pull could not see, sent with the end of its stream: the client mirrors remote
#: deletions only after a pull that listed and read everything
PULL_ST = {"errors": 0, "missing": []}


def pull_failed(exc):
    """Count a failure to list, stat, open or read. A name that vanished meanwhile
    (FileNotFoundError) is a genuine absence, not an error."""
    if not isinstance(exc, FileNotFoundError):
        PULL_ST["errors"] += 1


def emit_file(r, dpath_fd, name, st, have):
    w = have.get(r)
    if w and w[0] == st.st_size and w[1] == st.st_mtime_ns:
        send({"path": r, "type": "f", "size": st.st_size, "mode": stat.S_IMODE(st.st_mode),
              "mtime_ns": st.st_mtime_ns, "unchanged": True})
        return
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dpath_fd)
    except OSError as exc:
        pull_failed(exc)
        return
    try:
        fst = os.fstat(fd)
        send({"path": r, "type": "f", "size": fst.st_size, "mode": stat.S_IMODE(fst.st_mode),
              "mtime_ns": fst.st_mtime_ns})
        left = fst.st_size
        while left > 0:
            try:
                b = os.read(fd, min(CHUNK, left))
            except OSError as exc:
                # the file ends short (the client refuses it) and the stream stays framed
                pull_failed(exc)
                break
            if not b:
                break
            left -= len(b)
            OUT.write(struct.pack(">I", len(b)))
            OUT.write(b)
        OUT.write(struct.pack(">I", 0))
    finally:
        os.close(fd)


def pull_entry(dfd, name, rel, st, have):
    """Announce one entry (and stream it, or walk into it); never follows a link."""
    m = st.st_mode
    if stat.S_ISDIR(m):
        send({"path": rel, "type": "d", "size": 0, "mode": stat.S_IMODE(m),
              "mtime_ns": st.st_mtime_ns})
        try:
            sub = os.open(name, DFLAGS, dir_fd=dfd)
        except OSError as exc:
            pull_failed(exc)
            return
        try:
            pull_walk(sub, rel, have)
        finally:
            os.close(sub)
    elif stat.S_ISREG(m):
        emit_file(rel, dfd, name, st, have)
    else:
        kind = "l" if stat.S_ISLNK(m) else "o"
        send({"path": rel, "type": kind, "size": 0, "mode": stat.S_IMODE(m),
              "mtime_ns": st.st_mtime_ns})


def pull_walk(dfd, rel, have):
    try:
        names = sorted(os.listdir(dfd))
    except OSError as exc:
        pull_failed(exc)
        return
    for name in names:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError as exc:
            pull_failed(exc)
            continue
        pull_entry(dfd, name, rel + "/" + name, st, have)


def op_pull(req):
    have = req.get("have") or {}
    PULL_ST["errors"] = 0
    PULL_ST["missing"] = []
    for back in req["back"]:
        try:
            parent, name = split(back)
            pfd = open_dir(parent, False)  # cached by open_dir: not ours to close
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            PULL_ST["missing"].append(back)  # it (or a parent) does not exist
            continue
        except Exception:
            PULL_ST["errors"] += 1
            continue
        pull_entry(pfd, name, back, st, have)
    send({"end": True, "errors": PULL_ST["errors"], "missing": PULL_ST["missing"]})


OPS = {"hello": op_hello, "scan": op_scan, "put": op_put, "mkdir": op_mkdir, "link": op_link,
       "meta": op_meta, "remove": op_remove, "sync": op_sync, "finish": op_finish,
       "unrecord": op_unrecord, "pull": op_pull,
       "blocks": op_blocks, "patch": op_patch}


def main():
    while True:
        req = recv()
        if req is None:
            break
        if req["op"] not in ("put", "mkdir", "link", "meta"):
            drain()
        OPS[req["op"]](req)
        if req.get("flush"):
            OUT.flush()
    drain()
    OUT.flush()
    # every file is closed and the output flushed: skip the interpreter's teardown
    os._exit(0)


main()
'''
