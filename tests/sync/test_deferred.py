"""A deferring scan lists new files without reading them; the push reads each one once and
records the sha256 of the bytes it sent: the index, the push record and the result's digest."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from reconciler.errors import SyncError
from reconciler.sync import feed as sync_feed
from reconciler.sync import journal
from reconciler.sync.engine import push, scan_local
from reconciler.sync.manifest import PENDING, PENDING_DIGEST, last_push_record
from reconciler.sync.records import INDEX
from reconciler.transport.local_shell import LocalProcess, LocalShell
from tests.support.synctree import BOTH_PATHS, Site, snapshot, write


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def index_entries(site: Site) -> dict[str, tuple[object, ...]]:
    return {p: tuple(e) for p, e in journal.load(site.state / INDEX).entries.items()}


class _EditingProcess:
    """Rewrites a local file right after the helper was sent bytes holding `marker`: an
    edit made while the push is running, after the file was read."""

    def __init__(self, proc: LocalProcess, shell: EditingShell) -> None:
        self._proc = proc
        self._shell = shell

    def write(self, data: bytes) -> None:
        self._proc.write(data)
        s = self._shell
        if s.marker is not None and s.marker in bytes(data):
            s.marker = None
            s.target.write_bytes(s.replacement)
            os.utime(s.target, ns=(s.mtime_ns, s.mtime_ns))

    def __getattr__(self, name: str) -> object:
        return getattr(self._proc, name)


class EditingShell(LocalShell):
    def __init__(self, target: Path, marker: bytes, replacement: bytes, mtime_ns: int) -> None:
        super().__init__()
        self.target, self.marker, self.replacement = target, marker, replacement
        self.mtime_ns = mtime_ns

    def start(self, command: str) -> LocalProcess:
        return _EditingProcess(super().start(command), self)  # type: ignore[return-value]


def new_files(site: Site, n: int = 20) -> None:
    for i in range(n):
        write(site.local / f"d{i % 3}/f{i}.txt", f"file {i}\n" * (i + 1))
    write(site.local / "big.bin", os.urandom((1 << 20) + 12345))


def test_a_deferring_scan_lists_new_files_and_writes_no_index(site: Site) -> None:
    new_files(site)
    local = scan_local(site.opts(), defer=True)
    assert local.pending == {p for p, e in local.entries.items() if e.type == "f"}
    assert all(local.entries[p].ref == PENDING for p in local.pending)
    assert local.digest == PENDING_DIGEST
    assert local.file_count == 21
    assert not (site.state / INDEX).exists()


@BOTH_PATHS
def test_a_push_of_a_listed_tree_records_the_digest_a_full_scan_finds(site: Site) -> None:
    new_files(site)
    result = push(
        site.shell, site.opts(), instance_uuid="u1", local=scan_local(site.opts(), defer=True)
    )
    assert snapshot(site.remote) == snapshot(site.local)
    assert result.files_sent == 21
    again = scan_local(site.opts())
    assert not again.pending
    assert result.digest == again.digest != PENDING_DIGEST
    assert index_entries(site)["big.bin"][4] == sha((site.local / "big.bin").read_bytes())
    assert push(site.shell, site.opts(), instance_uuid="u1").files_sent == 0


def test_new_files_after_a_push_are_listed_and_sent_as_a_delta(site: Site) -> None:
    write(site.local / "old.txt", "old")
    push(site.shell, site.opts(), instance_uuid="u1")
    new_files(site, 5)
    local = scan_local(site.opts(), defer=True)
    assert local.pending == {"big.bin"} | {f"d{i % 3}/f{i}.txt" for i in range(5)}
    assert local.entries["old.txt"].ref == sha(b"old")  # the index vouches for it: kept
    result = push(site.shell, site.opts(), instance_uuid="u1", local=local)
    assert result.files_sent == 6
    assert snapshot(site.remote) == snapshot(site.local)
    assert result.digest == scan_local(site.opts()).digest
    assert push(site.shell, site.opts(), instance_uuid="u1").files_sent == 0


def test_a_file_rewritten_between_listing_and_send_is_recorded_as_sent(site: Site) -> None:
    new_files(site, 3)
    local = scan_local(site.opts(), defer=True)
    target = site.local / "d1/f1.txt"
    listed = local.entries["d1/f1.txt"]
    target.write_bytes(b"rewritten, and longer than it was when listed\n")
    os.utime(target, ns=(listed.mtime_ns + 5_000_000_000,) * 2)
    push(site.shell, site.opts(), instance_uuid="u1", local=local)
    sent = (site.remote / "d1/f1.txt").read_bytes()
    # what the sandbox holds is what the record names: the bytes sent, under the listed mtime
    record = last_push_record(site.opts())
    assert record is not None
    assert record[0].entries["d1/f1.txt"].ref == sha(sent)
    assert index_entries(site)["d1/f1.txt"][4] == sha(sent)
    assert index_entries(site)["d1/f1.txt"][2] == listed.mtime_ns
    # the next scan sees the newer mtime and reads it: the next push sets it right
    push(site.shell, site.opts(), instance_uuid="u1")
    assert snapshot(site.remote) == snapshot(site.local)


def test_a_file_edited_after_it_was_sent_is_pushed_again_by_the_next_push(site: Site) -> None:
    new_files(site, 3)
    target = site.local / "d2/f2.txt"
    original = target.read_bytes()
    listed_mtime = target.stat().st_mtime_ns
    shell = EditingShell(target, original, b"edited during the push\n", listed_mtime + 7_000_000)
    local = scan_local(site.opts(), defer=True)
    result = push(shell, site.opts(), instance_uuid="u1", local=local)
    shell.close()
    assert shell.marker is None  # the edit happened, after the bytes were read
    assert (site.remote / "d2/f2.txt").read_bytes() == original
    record = last_push_record(site.opts())
    assert record is not None
    assert record[0].entries["d2/f2.txt"].ref == sha(original)
    after = scan_local(site.opts(), defer=True)
    assert after.digest != result.digest
    assert push(site.shell, site.opts(), instance_uuid="u1", local=after).files_sent == 1
    assert (site.remote / "d2/f2.txt").read_bytes() == b"edited during the push\n"
    assert snapshot(site.remote) == snapshot(site.local)


def test_a_listed_file_gone_before_the_send_is_left_out_of_the_record(site: Site) -> None:
    new_files(site, 4)
    local = scan_local(site.opts(), defer=True)
    (site.local / "d0/f3.txt").unlink()
    result = push(site.shell, site.opts(), instance_uuid="u1", local=local)
    assert not (site.remote / "d0/f3.txt").exists()
    assert "d0/f3.txt" not in index_entries(site)
    assert result.digest == scan_local(site.opts()).digest
    assert push(site.shell, site.opts(), instance_uuid="u1").files_sent == 0


def test_a_failed_push_of_a_listed_tree_leaves_no_unhashed_entry_in_the_index(
    site: Site,
) -> None:
    new_files(site, 4)
    local = scan_local(site.opts(), defer=True)
    target = site.local / "d1/f1.txt"
    target.unlink()
    target.mkdir()  # a directory where a listed file was: the push stops with an error
    with pytest.raises(SyncError, match="changed while it was being sent"):
        push(site.shell, site.opts(), instance_uuid="u1", local=local)
    assert not (site.state / INDEX).exists()
    target.rmdir()
    write(target, "back\n")
    push(site.shell, site.opts(), instance_uuid="u1")
    assert all(e[4] for e in index_entries(site).values() if e[0] == "f")
    assert snapshot(site.remote) == snapshot(site.local)


def test_a_listed_scan_through_a_feed_makes_the_next_scan_walk_until_a_push_wrote_it(
    site: Site,
) -> None:
    write(site.local / "a.txt", "a")
    with sync_feed.tracking([(site.state, site.local, ())]):
        push(site.shell, site.opts(), instance_uuid="u1", local=scan_local(site.opts()))
        write(site.local / "b.txt", "b")
        listed = scan_local(site.opts(), defer=True)
        assert listed.pending == {"b.txt"}
        # no push: the next scan still finds b.txt, now read
        again = scan_local(site.opts())
        assert again.entries["b.txt"].ref == sha(b"b")
        write(site.local / "c.txt", "c")
        pushed = push(
            site.shell, site.opts(), instance_uuid="u1", local=scan_local(site.opts(), defer=True)
        )
        assert pushed.files_sent == 2  # b.txt was scanned, never pushed
        # the push wrote the index and settled the feed: the next scan sees the same tree
        assert scan_local(site.opts()).digest == pushed.digest
    assert snapshot(site.remote) == snapshot(site.local)


def test_listed_files_a_cut_short_push_left_in_the_sandbox_are_not_sent_again(
    site: Site,
) -> None:
    write(site.local / "old.txt", "old")
    push(site.shell, site.opts(), instance_uuid="u1")
    new_files(site, 10)
    for i in range(6):  # what a push cut short had sent: same bytes, size and mtime
        rel = f"d{i % 3}/f{i}.txt"
        (site.remote / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(site.local / rel, site.remote / rel)
    shutil.rmtree(site.remote_state)  # it never recorded: the sandbox is scanned
    result = push(
        site.shell, site.opts(), instance_uuid="u1", local=scan_local(site.opts(), defer=True)
    )
    assert result.remote_scanned is True
    assert result.files_sent == 5  # four small files and big.bin
    assert snapshot(site.remote) == snapshot(site.local)
    assert result.digest == scan_local(site.opts()).digest
