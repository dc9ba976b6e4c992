"""Push over shell+tar (a sandbox without python3): the python path's push tests, run again
over the shell path, and what is its own (fallback, round trips, staging, atomic replace)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from reconciler.errors import SyncError
from reconciler.sync.capability import recorded_tools
from reconciler.sync.engine import push
from reconciler.sync.tarpush import STAGE
from tests.support.synctree import Site, snapshot, write


def seed(site: Site) -> None:
    write(site.local / "main.py", "print('hi')\n", 0o644)
    write(site.local / "bin/run.sh", "#!/bin/sh\necho run\n", 0o755)
    write(site.local / "data/deep/blob.bin", os.urandom(300_000), 0o600)
    os.symlink("../main.py", site.local / "bin/main-link")


SHELL = pytest.mark.parametrize("site", ["shell"], indirect=True)


@SHELL
class TestRoundTrips:
    def test_a_first_push_is_a_failed_helper_start_hello_scan_and_one_tar_stream(
        self, site: Site
    ) -> None:
        seed(site)
        push(site.shell, site.opts(), instance_uuid="u1")
        assert len(site.shell.started) == 4  # no hashes: the sandbox held nothing

    def test_a_no_change_push_is_one_small_command(self, site: Site) -> None:
        seed(site)
        push(site.shell, site.opts(), instance_uuid="u1")
        started = len(site.shell.started)
        again = push(site.shell, site.opts(), instance_uuid="u1")
        assert (again.files_sent, again.bytes_sent, again.remote_scanned) == (0, 0, False)
        assert len(site.shell.started) == started + 1  # hello only: no helper start, no scan


@SHELL
class TestPathSelection:
    def test_a_sandbox_without_python3_is_synced_and_the_finding_recorded(self, site: Site) -> None:
        seed(site)
        push(site.shell, site.opts(), instance_uuid="u1")
        assert snapshot(site.remote) == snapshot(site.local)
        assert recorded_tools(site.opts(), "u1") == "shell"
        write(site.local / "main.py", "print('two')\n")
        push(site.shell, site.opts(), instance_uuid="u1")
        assert not any("-E -S -c" in cmd for cmd in site.shell.started[4:])  # no helper again


@SHELL
class TestShellOwnGuarantees:
    def test_a_file_that_changes_while_it_is_sent_leaves_the_old_version_whole(
        self, site: Site
    ) -> None:
        write(site.local / "a.txt", "old content\n")
        write(site.local / "gone.txt", "g")
        push(site.shell, site.opts(), instance_uuid="u1")
        big = write(site.local / "a.txt", os.urandom(3 << 20))
        (site.local / "gone.txt").unlink()
        opts = site.opts()
        from reconciler.sync.manifest import scan_local

        local = scan_local(opts)
        with open(big, "ab") as f:  # changes after the scan: size and mtime no longer match
            f.write(b"more")
        with pytest.raises(SyncError, match="changed while it was being sent"):
            push(site.shell, opts, instance_uuid="u1", local=local)
        assert (site.remote / "a.txt").read_text() == "old content\n"
        assert (site.remote / "gone.txt").exists()  # no delete after an error
        assert not (site.remote / STAGE).exists()

    def test_a_directory_swapped_for_a_link_in_the_sandbox_is_refused_not_followed(
        self, site: Site, tmp_path: Path
    ) -> None:
        write(site.local / "d/a.txt", "a")
        push(site.shell, site.opts(), instance_uuid="u1")
        outside = tmp_path / "outside"
        outside.mkdir()
        shutil.rmtree(site.remote / "d")
        os.symlink(outside, site.remote / "d")  # the record still says d/ is a directory
        write(site.local / "d/a.txt", "changed")
        with pytest.raises(SyncError, match="a symbolic link"):
            push(site.shell, site.opts(), instance_uuid="u1")
        assert list(outside.iterdir()) == []
        # the failed push dropped the remote record: the next one scans and swaps the link
        result = push(site.shell, site.opts(), instance_uuid="u1")
        assert result.remote_scanned is True
        assert (site.remote / "d").is_dir() and not (site.remote / "d").is_symlink()
        assert list(outside.iterdir()) == []

    def test_a_local_name_equal_to_the_staging_dir_is_refused(self, site: Site) -> None:
        write(site.local / STAGE, "mine")
        with pytest.raises(SyncError, match="stages files under"):
            push(site.shell, site.opts(), instance_uuid="u1")

    def test_a_staging_dir_left_by_a_killed_push_is_not_synced_nor_kept(self, site: Site) -> None:
        write(site.local / "a.txt", "a")
        write(site.remote / STAGE / "t/junk", "left over")
        push(site.shell, site.opts(), instance_uuid="u1")
        assert not (site.remote / STAGE).exists()
        assert snapshot(site.remote) == snapshot(site.local)

    def test_odd_names_arrive_exactly(self, site: Site) -> None:
        names = ["sp ace", "quo'te", 'dq"x', "new\nline", "-dash", "$(x)", "b\\s", "\udcff"]
        for n in names:
            write(site.local / "d" / n, n.encode("utf-8", "surrogateescape"))
        write(site.local / ("long" * 40), "long name")
        push(site.shell, site.opts(), instance_uuid="u1")
        assert snapshot(site.remote) == snapshot(site.local)
        (site.local / "d" / "quo'te").unlink()
        write(site.local / "d" / "new\nline", "edited")
        push(site.shell, site.opts(), instance_uuid="u1")
        assert snapshot(site.remote) == snapshot(site.local)


def test_a_sandbox_with_python3_records_the_helper_path(site: Site) -> None:
    write(site.local / "a.txt", "a")
    push(site.shell, site.opts(), instance_uuid="u1")
    assert recorded_tools(site.opts(), "u1") == "python"


@SHELL
def test_hundreds_of_paths_near_path_max_are_synced_and_deleted(
    site: Site,
) -> None:
    # 600 paths of ~3,900 characters in one directory: the operations script splits its
    # rm and mv calls (at most 500 paths and 64 KiB of them each)
    deep = "/".join(["p" * 240] * 16)
    for i in range(600):
        write(site.local / deep / f"f{i:03d}", "x")
    push(site.shell, site.opts(), instance_uuid="u1")
    assert snapshot(site.remote) == snapshot(site.local)
    shutil.rmtree(site.local / ("p" * 240))
    write(site.local / "keep.txt", "k")
    result = push(site.shell, site.opts(), instance_uuid="u1")
    assert result.deleted == 600 + 16
    assert snapshot(site.remote) == snapshot(site.local)
