"""Push: the batched transfer, the no-change proof, boot detection, guards and safe deletes."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
from pathlib import Path

import pytest

from reconciler.errors import SyncError, SyncHaltedError
from reconciler.sync import blockdigests
from reconciler.sync.engine import (
    DigestsAhead,
    big_files,
    digest_ahead,
    forget,
    plan_push,
    pull,
    push,
    scan_local,
    start_ahead,
)
from reconciler.sync.push import BATCH_FILE
from reconciler.transport.base import RemoteProcess
from reconciler.transport.local_shell import LocalProcess, LocalShell
from tests.support.synctree import BOTH_PATHS, NO_PYTHON, Site, snapshot, write


def seed(site: Site) -> None:
    write(site.local / "main.py", "print('hi')\n", 0o644)
    write(site.local / "bin/run.sh", "#!/bin/sh\necho run\n", 0o755)
    write(site.local / "data/deep/blob.bin", os.urandom(300_000), 0o600)
    os.symlink("../main.py", site.local / "bin/main-link")
    os.symlink("/etc/passwd", site.local / "escaping-link")


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    return {p: v[:3] for p, v in snapshot(root).items()}


class TestInitialPush:
    @BOTH_PATHS
    def test_the_remote_equals_the_local_tree_with_modes_links_and_mtimes(self, site: Site) -> None:
        seed(site)
        result = push(site.shell, site.opts(), instance_uuid="u1")
        assert snapshot(site.remote) == snapshot(site.local)
        assert result.files_sent == 3
        assert result.bytes_sent == scan_local(site.opts()).total_bytes
        assert result.remote_scanned is True

    @BOTH_PATHS
    def test_modes_a_umask_would_strip_and_set_id_bits_arrive_exactly(self, site: Site) -> None:
        # the helper creates files with their final mode and skips fchmod when the umask keeps
        # every bit; these are the modes where it must not skip it
        write(site.local / "shared.txt", "w", 0o666)
        write(site.local / "tool", "#!/bin/sh\n", 0o777)
        write(site.local / "setid", "#!/bin/sh\n", 0o2755)
        write(site.local / "plain.txt", "p", 0o644)
        old = os.umask(0o077)  # the helper inherits it: stricter than any mode above
        try:
            push(site.shell, site.opts(), instance_uuid="u1")
        finally:
            os.umask(old)
        assert snapshot(site.remote) == snapshot(site.local)

    @BOTH_PATHS
    def test_a_link_escaping_the_root_is_sent_as_a_link_not_followed(self, site: Site) -> None:
        seed(site)
        push(site.shell, site.opts(), instance_uuid="u1")
        assert os.readlink(site.remote / "escaping-link") == "/etc/passwd"

    def test_one_remote_process_serves_the_whole_push(self, site: Site) -> None:
        seed(site)
        push(site.shell, site.opts(), instance_uuid="u1")
        assert len(site.shell.started) == 1


@BOTH_PATHS
class TestNoChange:
    def test_a_second_push_sends_nothing_and_does_not_walk_the_remote(self, site: Site) -> None:
        seed(site)
        push(site.shell, site.opts(), instance_uuid="u1")
        again = push(site.shell, site.opts(), instance_uuid="u1")
        assert (again.files_sent, again.bytes_sent, again.deleted) == (0, 0, 0)
        assert again.remote_scanned is False

    def test_ten_changed_files_send_exactly_their_bytes(self, site: Site) -> None:
        for i in range(30):
            write(site.local / f"f{i}.txt", f"v1 {i}\n")
        push(site.shell, site.opts(), instance_uuid="u1")
        changed = 0
        for i in range(10):
            changed += write(site.local / f"f{i}.txt", f"version two {i}\n").stat().st_size
        result = push(site.shell, site.opts(), instance_uuid="u1")
        assert (result.files_sent, result.bytes_sent, result.remote_scanned) == (10, changed, False)
        assert tree(site.remote) == tree(site.local)

    def test_a_chmod_only_change_is_applied_without_sending_content(self, site: Site) -> None:
        seed(site)
        push(site.shell, site.opts(), instance_uuid="u1")
        (site.local / "main.py").chmod(0o600)
        result = push(site.shell, site.opts(), instance_uuid="u1")
        assert result.bytes_sent == 0
        assert snapshot(site.remote) == snapshot(site.local)


@BOTH_PATHS
class TestRemoteIdentity:
    def test_a_new_boot_forces_a_scan_that_repairs_a_tampered_remote(self, site: Site) -> None:
        seed(site)
        push(site.shell, site.opts(), instance_uuid="u1")
        victim = site.remote / "main.py"
        st = victim.stat()
        victim.write_text("print('HI')\n")  # same size, same mtime: only a hash can tell
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
        (site.remote / "bin/run.sh").unlink()
        site.reboot("boot-2")
        result = push(site.shell, site.opts(), instance_uuid="u1")
        assert result.remote_scanned is True
        assert result.boot_id == "boot-2"
        assert result.files_sent == 2
        assert snapshot(site.remote) == snapshot(site.local)

    def test_a_different_instance_uuid_forces_a_scan(self, site: Site) -> None:
        seed(site)
        push(site.shell, site.opts(), instance_uuid="u1")
        result = push(site.shell, site.opts(), instance_uuid="u2")
        assert result.remote_scanned is True
        assert result.bytes_sent == 0  # the scan found every file already there

    def test_a_missing_remote_record_forces_a_scan(self, site: Site) -> None:
        seed(site)
        push(site.shell, site.opts(), instance_uuid="u1")
        shutil.rmtree(site.remote_state)
        assert push(site.shell, site.opts(), instance_uuid="u1").remote_scanned is True

    def test_a_remote_record_of_another_tree_forces_a_scan(self, site: Site) -> None:
        seed(site)
        push(site.shell, site.opts(), instance_uuid="u1")
        record = site.remote_state / "record.json"
        data = json.loads(record.read_text())
        record.write_text(json.dumps({**data, "digest": "0" * 64}))
        result = push(site.shell, site.opts(), instance_uuid="u1")
        assert result.remote_scanned is True
        assert result.bytes_sent == 0

    def test_a_remote_record_for_another_root_forces_a_scan(self, site: Site) -> None:
        seed(site)
        push(site.shell, site.opts(), instance_uuid="u1")
        record = site.remote_state / "record.json"
        data = json.loads(record.read_text())
        record.write_text(json.dumps({**data, "root": "/elsewhere"}))
        assert push(site.shell, site.opts(), instance_uuid="u1").remote_scanned is True

    def test_forgetting_the_session_makes_the_next_plan_a_full_upload(self, site: Site) -> None:
        seed(site)
        push(site.shell, site.opts(), instance_uuid="u1")
        forget(site.opts())
        plan = plan_push(scan_local(site.opts()), site.opts())
        assert len(plan.uploads) == len(scan_local(site.opts()).entries)


@BOTH_PATHS
class TestDeletes:
    def test_a_local_delete_is_propagated_after_the_uploads(self, site: Site) -> None:
        seed(site)
        push(site.shell, site.opts(), instance_uuid="u1")
        shutil.rmtree(site.local / "data")
        result = push(site.shell, site.opts(), instance_uuid="u1")
        assert result.deleted == 3
        assert not (site.remote / "data").exists()

    def test_files_only_the_sandbox_created_are_never_deleted(self, site: Site) -> None:
        seed(site)
        push(site.shell, site.opts(), instance_uuid="u1")
        write(site.remote / "data/deep/generated.log", "made in the sandbox")
        shutil.rmtree(site.local / "data")
        push(site.shell, site.opts(), instance_uuid="u1")
        assert (site.remote / "data/deep/generated.log").read_text() == "made in the sandbox"

    def test_excluded_and_back_paths_are_never_deleted_even_after_a_scan(self, site: Site) -> None:
        write(site.local / "src/a.py", "a")
        write(site.remote / "node_modules/x/index.js", "built remotely")
        write(site.remote / "out/result.txt", "an output")
        site.reboot("boot-9")
        opts = site.opts(exclude=("node_modules/",), back=("out/",))
        result = push(site.shell, opts, instance_uuid="u1")
        assert result.remote_scanned is True
        assert (site.remote / "node_modules/x/index.js").exists()
        assert (site.remote / "out/result.txt").exists()

    def test_no_delete_happens_when_an_upload_failed_in_the_same_sync(self, site: Site) -> None:
        write(site.local / "a/keep.txt", "k")
        write(site.local / "c.txt", "c")
        push(site.shell, site.opts(), instance_uuid="u1")
        # tamper behind the record's back: the uploads into a/ will fail
        shutil.rmtree(site.remote / "a")
        write(site.remote / "a", "now a file")
        write(site.local / "a/new.txt", "n")
        (site.local / "c.txt").unlink()
        with pytest.raises(SyncError, match="1 deletes skipped"):
            push(site.shell, site.opts(), instance_uuid="u1")
        assert (site.remote / "c.txt").read_text() == "c"
        # and the next push repairs it: the failed push dropped the remote record
        result = push(site.shell, site.opts(), instance_uuid="u1")
        assert result.remote_scanned is True
        assert tree(site.remote) == tree(site.local)


@BOTH_PATHS
class TestGuards:
    def test_a_missing_local_root_halts_before_anything_is_sent(self, site: Site) -> None:
        seed(site)
        push(site.shell, site.opts(), instance_uuid="u1")
        before = snapshot(site.base / "sandbox")
        started = len(site.shell.started)
        shutil.rmtree(site.local)
        with pytest.raises(SyncHaltedError, match="is missing"):
            push(site.shell, site.opts(), instance_uuid="u1")
        assert snapshot(site.base / "sandbox") == before
        assert len(site.shell.started) == started

    def test_an_emptied_local_root_halts_and_says_how_many_files_are_at_stake(
        self, site: Site
    ) -> None:
        seed(site)
        push(site.shell, site.opts(), instance_uuid="u1")
        before = snapshot(site.base / "sandbox")
        for child in site.local.iterdir():
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        with pytest.raises(SyncHaltedError, match=r"last push had 3 files.*ukc delete"):
            push(site.shell, site.opts(), instance_uuid="u1")
        assert snapshot(site.base / "sandbox") == before

    def test_an_empty_root_without_a_record_is_a_normal_empty_push(self, site: Site) -> None:
        result = push(site.shell, site.opts(), instance_uuid="u1")
        assert (result.files_sent, result.deleted) == (0, 0)

    def test_a_root_that_is_a_file_halts(self, site: Site) -> None:
        shutil.rmtree(site.local)
        write(site.local, "not a dir")
        with pytest.raises(SyncHaltedError, match="not a directory"):
            push(site.shell, site.opts(), instance_uuid="u1")


@BOTH_PATHS
class TestTypeSwaps:
    def test_file_dir_and_link_swaps_converge(self, site: Site) -> None:
        write(site.local / "a", "file a")
        write(site.local / "b/inner.txt", "in b")
        os.symlink("a", site.local / "c")
        push(site.shell, site.opts(), instance_uuid="u1")
        (site.local / "a").unlink()
        write(site.local / "a/now-dir.txt", "x")
        shutil.rmtree(site.local / "b")
        os.symlink("a", site.local / "b")
        (site.local / "c").unlink()
        write(site.local / "c", "c is a file")
        push(site.shell, site.opts(), instance_uuid="u1")
        assert tree(site.remote) == tree(site.local)


class TestDeltaUploads:
    def test_an_edited_big_file_sends_only_its_changed_blocks(self, site: Site) -> None:
        big = write(site.local / "big.bin", os.urandom(3 << 20))
        push(site.shell, site.opts(), instance_uuid="u1")
        with open(big, "r+b") as f:
            f.seek(2 << 20)
            f.write(b"patched!")
        with open(big, "ab") as f:
            f.write(b"tail")
        result = push(site.shell, site.opts(), instance_uuid="u1")
        assert result.files_sent == 1
        assert result.bytes_sent == 65536 + 4  # one block in the middle, the new tail block
        assert snapshot(site.remote) == snapshot(site.local)

    def test_a_remote_block_tampered_behind_our_back_is_repaired_after_a_reboot(
        self, site: Site
    ) -> None:
        big = write(site.local / "big.bin", os.urandom(2 << 20))
        push(site.shell, site.opts(), instance_uuid="u1")
        remote = site.remote / "big.bin"
        with open(remote, "r+b") as f:
            f.seek(100)
            f.write(b"TAMPERED")
        with open(big, "r+b") as f:
            f.seek(1 << 20)
            f.write(b"local edit")
        site.reboot("boot-2")
        result = push(site.shell, site.opts(), instance_uuid="u1")
        assert result.bytes_sent == 2 * 65536
        assert snapshot(site.remote) == snapshot(site.local)


class _Tapped:
    """A shell whose processes' input is kept: what the client asked the helper for."""

    def __init__(self, shell: LocalShell) -> None:
        self.shell = shell
        self.sent = bytearray()

    def start(self, command: str) -> RemoteProcess:
        proc = self.shell.start(command)
        sent = self.sent
        write = proc.write

        def tapped(data: bytes) -> None:
            sent.extend(data)
            write(data)

        proc.write = tapped  # type: ignore[method-assign]
        return proc

    def close(self) -> None:
        self.shell.close()


def _edit(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


class TestRememberedDigests:
    def test_an_edited_big_file_is_patched_without_asking_the_sandbox_for_its_digests(
        self, site: Site
    ) -> None:
        big = write(site.local / "big.bin", os.urandom(3 << 20))
        push(site.shell, site.opts(), instance_uuid="u1")
        for round_ in range(2):  # remembered from the whole upload, then from the patch
            _edit(big, (1 + round_) << 20, b"edit %d" % round_)
            tapped = _Tapped(site.shell)
            result = push(tapped, site.opts(), instance_uuid="u1")  # type: ignore[arg-type]
            assert b'"op":"blocks"' not in tapped.sent
            assert b'"op":"patch"' in tapped.sent
            assert (result.files_sent, result.bytes_sent) == (1, 65536)
            assert snapshot(site.remote) == snapshot(site.local)

    @pytest.mark.parametrize("keep_mtime", [False, True])
    def test_a_big_file_changed_in_the_sandbox_since_our_push_is_sent_whole_in_the_same_push(
        self, site: Site, keep_mtime: bool
    ) -> None:
        big = write(site.local / "big.bin", os.urandom(3 << 20))
        write(site.local / "small.txt", "s")
        push(site.shell, site.opts(), instance_uuid="u1")
        remote = site.remote / "big.bin"
        st = remote.stat()
        _edit(remote, 100, b"CHANGED IN THE SANDBOX")  # our record still says it is ours
        if keep_mtime:  # only the patched result's sha256 can tell
            os.utime(remote, ns=(st.st_atime_ns, st.st_mtime_ns))
        _edit(big, 2 << 20, b"local edit")
        write(site.local / "gone-soon.txt", "x")
        result = push(site.shell, site.opts(), instance_uuid="u1")
        assert result.files_sent == 3  # the patch that did not fit, then the whole file
        assert snapshot(site.remote) == snapshot(site.local)
        (site.local / "gone-soon.txt").unlink()  # a barrier before deletes asks the same way
        _edit(remote, 100, b"AND AGAIN")
        _edit(big, 2 << 20, b"local again")
        result = push(site.shell, site.opts(), instance_uuid="u1")
        assert result.deleted == 1
        assert snapshot(site.remote) == snapshot(site.local)
        again = push(site.shell, site.opts(), instance_uuid="u1")
        assert (again.files_sent, again.remote_scanned) == (0, False)

    @pytest.mark.parametrize("damage", ["wrong digests", "garbled", "other block size"])
    def test_remembered_digests_that_are_wrong_cost_bytes_never_a_wrong_file(
        self, site: Site, damage: str
    ) -> None:
        big = write(site.local / "big.bin", os.urandom(2 << 20))
        push(site.shell, site.opts(), instance_uuid="u1")
        memory = site.state / blockdigests.FILE
        doc = json.loads(memory.read_text())
        if damage == "wrong digests":  # well formed: every block looks unchanged
            sha = hashlib.sha256(big.read_bytes()).hexdigest()
            _edit(big, 1 << 20, b"edit")
            with open(big, "rb") as f:
                doc["files"][sha] = blockdigests.digests(f.fileno(), big.stat().st_size).hex()
            memory.write_text(json.dumps(doc))
        else:
            memory.write_text("{not json" if damage == "garbled" else json.dumps({**doc, "bs": 7}))
            _edit(big, 1 << 20, b"edit")
        push(site.shell, site.opts(), instance_uuid="u1")
        assert snapshot(site.remote) == snapshot(site.local)

    def test_only_the_digests_of_the_trees_big_files_are_remembered_and_kept(
        self, site: Site
    ) -> None:
        write(site.local / "a.bin", os.urandom(2 << 20))
        write(site.local / "b.bin", os.urandom(1 << 20))
        write(site.local / "small.bin", os.urandom(100_000))
        push(site.shell, site.opts(), instance_uuid="u1")
        shas = {
            p: hashlib.sha256((site.local / p).read_bytes()).hexdigest() for p in ("a.bin", "b.bin")
        }
        assert set(blockdigests.load(site.state)) == set(shas.values())
        (site.local / "a.bin").unlink()
        _edit(site.local / "b.bin", 0, b"edit")  # the next push that sends a big file prunes
        push(site.shell, site.opts(), instance_uuid="u1")
        b_now = hashlib.sha256((site.local / "b.bin").read_bytes()).hexdigest()
        assert set(blockdigests.load(site.state)) == {b_now}


class TestDigestedAhead:
    """A first push digests its big files as it sends them (for the next edit's delta); the
    same digests can be made while the sandbox boots, and the push given them takes them."""

    def _digests(self, path: Path) -> bytes:
        with open(path, "rb") as f:
            return blockdigests.digests(f.fileno(), path.stat().st_size)

    def test_a_first_pushs_big_files_digested_ahead_are_taken_and_remembered(
        self, site: Site
    ) -> None:
        big = write(site.local / "big.bin", os.urandom(3 << 20))
        write(site.local / "small.txt", "s")
        files = big_files(scan_local(site.opts()))
        assert files == [("big.bin", 3 << 20, big.stat().st_mtime_ns)]
        ahead = DigestsAhead()
        digest_ahead(ahead, [(site.opts(), files)], lambda: False)
        [held] = ahead.files()
        assert held == (str(big), 3 << 20, big.stat().st_mtime_ns)
        push(site.shell, site.opts(), instance_uuid="u1", ahead=ahead)
        assert ahead.files() == []  # the push took them
        sha = hashlib.sha256(big.read_bytes()).hexdigest()
        assert blockdigests.load(site.state) == {sha: self._digests(big)}
        assert snapshot(site.remote) == snapshot(site.local)

    def test_a_push_not_given_the_digests_made_ahead_leaves_them(self, site: Site) -> None:
        big = write(site.local / "big.bin", os.urandom(2 << 20))
        ahead = DigestsAhead()
        digest_ahead(ahead, [(site.opts(), big_files(scan_local(site.opts())))], lambda: False)
        push(site.shell, site.opts(), instance_uuid="u1")
        assert [file for file, _, _ in ahead.files()] == [str(big)]

    def test_a_big_file_changed_after_it_was_digested_ahead_is_digested_as_it_is_sent(
        self, site: Site
    ) -> None:
        big = write(site.local / "big.bin", os.urandom(2 << 20))
        ahead = DigestsAhead()
        digest_ahead(ahead, [(site.opts(), big_files(scan_local(site.opts())))], lambda: False)
        _edit(big, 1 << 20, b"edited after")
        os.utime(big, ns=(big.stat().st_atime_ns, big.stat().st_mtime_ns + 1_000_000))
        push(site.shell, site.opts(), instance_uuid="u1", ahead=ahead)
        sha = hashlib.sha256(big.read_bytes()).hexdigest()
        assert blockdigests.load(site.state) == {sha: self._digests(big)}
        assert snapshot(site.remote) == snapshot(site.local)

    def test_digesting_ahead_stops_when_asked_and_keeps_nothing_half_done(self, site: Site) -> None:
        write(site.local / "big.bin", os.urandom(3 << 20))
        asked: list[int] = []

        def stop() -> bool:
            asked.append(1)
            return len(asked) > 2  # two blocks digested, then the push may begin

        ahead = DigestsAhead()
        digest_ahead(ahead, [(site.opts(), big_files(scan_local(site.opts())))], stop)
        assert ahead.files() == []
        push(site.shell, site.opts(), instance_uuid="u1", ahead=ahead)
        assert snapshot(site.remote) == snapshot(site.local)

    def test_digesting_again_drops_what_an_earlier_call_left(self, site: Site) -> None:
        write(site.local / "big.bin", os.urandom(2 << 20))
        ahead = DigestsAhead()
        files = big_files(scan_local(site.opts()))
        digest_ahead(ahead, [(site.opts(), files)], lambda: False)
        digest_ahead(ahead, [(site.opts(), files)], lambda: True)
        assert ahead.files() == []


class _RecordingProcess:
    """A helper process whose input is kept: what the push sent, in order."""

    def __init__(self, proc: LocalProcess, sent: bytearray) -> None:
        self._proc = proc
        self._sent = sent

    def write(self, data: bytes) -> None:
        self._sent += data
        self._proc.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._proc, name)


class _RecordingShell(LocalShell):
    def __init__(self) -> None:
        super().__init__()
        self.sent = bytearray()

    def start(self, command: str) -> LocalProcess:
        return _RecordingProcess(super().start(command), self.sent)  # type: ignore[return-value]


def test_big_files_go_out_after_the_small_files_whatever_their_names(site: Site) -> None:
    write(site.local / "a/big.bin", os.urandom(BATCH_FILE + 1))
    for i in range(20):
        write(site.local / f"b/f{i:02d}.txt", f"small {i}")
    write(site.local / "c/big.bin", os.urandom(2 << 20))
    shell = _RecordingShell()
    push(shell, site.opts(), instance_uuid="u1")
    sent = bytes(shell.sent)
    last_small = sent.rindex(b"b/f19.txt")
    assert sent.index(b'"a/big.bin"') > last_small
    assert sent.index(b'"c/big.bin"') > last_small
    assert snapshot(site.remote) == snapshot(site.local)


class TestWriteThreads:
    def test_pooled_writes_give_the_same_trees_both_ways(self, site: Site) -> None:
        for i in range(120):
            write(site.local / f"d{i % 5}/f{i}.txt", f"{i}" * (i + 1), 0o640)
        seed(site)
        opts = site.opts(write_threads=4, back=("out/",))
        push(site.shell, opts, instance_uuid="u1")
        assert snapshot(site.remote) == snapshot(site.local)
        for i in range(80):
            write(site.remote / f"out/r{i}.txt", f"result {i}")
        result = pull(site.shell, opts)
        assert result.files_written == 80
        assert snapshot(site.local / "out") == snapshot(site.remote / "out")


class TestKeptHelper:
    def test_pushes_over_one_connection_share_one_helper(self, site: Site) -> None:
        write(site.local / "a.txt", "a")
        push(site.shell, site.opts(), instance_uuid="u1")
        started = len(site.shell.started)
        for i in range(3):
            write(site.local / f"b{i}.txt", "b")
            assert push(site.shell, site.opts(), instance_uuid="u1").files_sent == 1
        assert len(site.shell.started) == started
        assert snapshot(site.remote) == snapshot(site.local)

    def test_a_kept_helper_that_died_is_replaced(self, site: Site) -> None:
        write(site.local / "a.txt", "a")
        push(site.shell, site.opts(), instance_uuid="u1")
        site.shell._procs[-1].kill()
        write(site.local / "b.txt", "b")
        assert push(site.shell, site.opts(), instance_uuid="u1").files_sent == 1
        assert snapshot(site.remote) == snapshot(site.local)

    def test_a_kept_helper_writes_where_the_paths_lead_now(self, site: Site) -> None:
        write(site.local / "d" / "a.txt", "old")
        push(site.shell, site.opts(), instance_uuid="u1")
        # a command moved the directory away and made another in its place
        (site.remote / "d").rename(site.remote / "e")
        (site.remote / "d").mkdir()
        write(site.local / "d" / "a.txt", "new")
        push(site.shell, site.opts(), instance_uuid="u1")
        assert (site.remote / "d" / "a.txt").read_text() == "new"
        assert (site.remote / "e" / "a.txt").read_text() == "old"


class TestStartedAhead:
    def test_a_helper_started_ahead_over_a_connection_serves_the_push_that_follows(
        self, site: Site
    ) -> None:
        write(site.local / "a.txt", "a")
        start_ahead(site.shell, site.opts(), instance_uuid="u1")
        assert len(site.shell.started) == 1  # running before the push asks for it
        assert push(site.shell, site.opts(), instance_uuid="u1").files_sent == 1
        assert len(site.shell.started) == 1
        assert snapshot(site.remote) == snapshot(site.local)

    def test_what_a_helper_started_ahead_is_given_to_run_first_runs_in_its_own_shell(
        self, site: Site
    ) -> None:
        # why: a new boot's marker rides on the helper's start, no channel of its own
        write(site.local / "a.txt", "a")
        mark = site.remote.parent / "boot mark"
        first = f"printf x > {shlex.quote(str(mark))}"
        assert start_ahead(site.shell, site.opts(), instance_uuid="u1", before=first) is True
        assert push(site.shell, site.opts(), instance_uuid="u1").files_sent == 1
        assert len(site.shell.started) == 1
        assert mark.read_text() == "x"
        assert snapshot(site.remote) == snapshot(site.local)

    def test_what_fails_before_a_helper_started_ahead_does_not_stop_it(self, site: Site) -> None:
        write(site.local / "a.txt", "a")
        first = "printf x > /nonexistent/dir/mark"
        assert start_ahead(site.shell, site.opts(), instance_uuid="u1", before=first) is True
        assert push(site.shell, site.opts(), instance_uuid="u1").files_sent == 1
        assert len(site.shell.started) == 1  # the helper started ahead served the push
        assert snapshot(site.remote) == snapshot(site.local)

    @BOTH_PATHS
    def test_a_sandbox_without_python3_still_syncs_over_the_tar_path_after_a_start_ahead(
        self, site: Site
    ) -> None:
        write(site.local / "a.txt", "a")
        for i in range(2):  # before the path is known, then once it is recorded
            write(site.local / f"b{i}.txt", "b")
            start_ahead(site.shell, site.opts(), instance_uuid="u1")
            push(site.shell, site.opts(), instance_uuid="u1")
            assert snapshot(site.remote) == snapshot(site.local)
        if site.remote_python == NO_PYTHON:
            started = len(site.shell.started)
            start_ahead(site.shell, site.opts(), instance_uuid="u1")
            assert len(site.shell.started) == started  # known to have no python3: nothing


class TestBatches:
    def test_many_small_files_arrive_in_batches_with_their_modes_and_mtimes(
        self, site: Site
    ) -> None:
        for i in range(1300):  # more than two batches' worth of files
            write(
                site.local / f"d{i % 7}/f{i}.txt", f"{i}" * (i % 50), (0o600, 0o644, 0o755)[i % 3]
            )
        write(site.local / "d1/big.bin", os.urandom(300_000))  # between batches, alone
        os.symlink("f1.txt", site.local / "d1/link")
        result = push(site.shell, site.opts(), instance_uuid="u1")
        assert result.files_sent == 1301
        assert snapshot(site.remote) == snapshot(site.local)

    def test_a_file_changed_after_the_scan_is_discarded_and_the_rest_of_its_batch_lands(
        self, site: Site
    ) -> None:
        for i in range(20):
            write(site.local / f"f{i:02}.txt", f"first {i}")
        local = scan_local(site.opts())
        write(site.local / "f07.txt", "second, and longer")
        (site.local / "f12.txt").unlink()
        with pytest.raises(SyncError, match=r"2 errors \(f07.txt: changed while it was being sent"):
            push(site.shell, site.opts(), instance_uuid="u1", local=local)
        landed = sorted(p.name for p in site.remote.iterdir() if not p.name.startswith("."))
        assert landed == [f"f{i:02}.txt" for i in range(20) if i not in (7, 12)]
        assert (site.remote / "f06.txt").read_text() == "first 6"
        # the next push (a fresh scan) repairs it
        push(site.shell, site.opts(), instance_uuid="u1")
        assert tree(site.remote) == tree(site.local)

    def test_files_whose_directory_went_after_the_scan_are_errors_and_the_rest_lands(
        self, site: Site
    ) -> None:
        for d in ("a", "b", "c"):
            for i in range(3):
                write(site.local / f"{d}/f{i}.txt", f"{d} {i}")
        local = scan_local(site.opts())
        shutil.rmtree(site.local / "b")
        (site.local / "c/f1.txt").unlink()
        with pytest.raises(SyncError, match=r"4 errors \(b/f0.txt: No such file"):
            push(site.shell, site.opts(), instance_uuid="u1", local=local)
        landed = sorted(
            f"{p.parent.name}/{p.name}" for p in site.remote.glob("*/*") if p.name[0] != "."
        )
        assert landed == ["a/f0.txt", "a/f1.txt", "a/f2.txt", "c/f0.txt", "c/f2.txt"]
        assert (site.remote / "c/f2.txt").read_text() == "c 2"


def test_edited_big_files_among_small_ones_send_changed_blocks_and_every_small_file(
    site: Site,
) -> None:
    bigs = [write(site.local / f"big{i}.bin", os.urandom(2 << 20)) for i in range(3)]
    for i in range(40):
        write(site.local / f"small/{i}.txt", f"small {i}")
    push(site.shell, site.opts(), instance_uuid="u1")
    for n, big in enumerate(bigs):
        with open(big, "r+b") as f:
            f.seek((n + 1) * (1 << 19))
            f.write(b"edited")
    for i in range(0, 40, 4):
        write(site.local / f"small/{i}.txt", f"small {i} edited")
    write(site.local / "small/new.txt", "new")
    result = push(site.shell, site.opts(), instance_uuid="u1")
    assert result.files_sent == 3 + 10 + 1
    small = sum(len(f"small {i} edited") for i in range(0, 40, 4)) + len("new")
    assert result.bytes_sent == 3 * 65536 + small
    assert snapshot(site.remote) == snapshot(site.local)


class TestFirstPush:
    def test_an_empty_sandbox_is_not_scanned_and_gets_the_whole_tree(self, site: Site) -> None:
        seed(site)
        result = push(site.shell, site.opts(), instance_uuid="u1")
        assert result.plan is not None and result.plan.reason.startswith("remote root empty")
        assert result.remote_scanned is True  # what it holds is known, not trusted from a record
        assert tree(site.remote) == tree(site.local)

    def test_a_sandbox_holding_files_without_our_record_is_scanned_and_mirrored(
        self, site: Site
    ) -> None:
        seed(site)
        write(site.remote / "main.py", "older content")
        write(site.remote / "stale.txt", "only in the sandbox")
        result = push(site.shell, site.opts(), instance_uuid="u1")
        assert result.plan is not None and result.plan.reason.startswith("remote scanned")
        assert not (site.remote / "stale.txt").exists()
        assert tree(site.remote) == tree(site.local)
