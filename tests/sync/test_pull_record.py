"""The pull record as a journal: a pull appends what it changed, reads an older ukc's
`pull.json`, and never holds or sends the whole record as one JSON text."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from reconciler.sync.engine import plan_pull, pull
from reconciler.sync.pull import _send_have, pull_record
from reconciler.sync.pullrecord import PULL_JOURNAL, PULL_LEGACY, PullRecord
from reconciler.sync.records import write_record
from tests.support.synctree import Site, write

BACK = ("out/",)
UUID = "3f1c9a2e-0002"


def pulled(site: Site) -> Any:
    return pull(site.shell, site.opts(back=BACK), instance_uuid=UUID)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_bytes().splitlines()]


def test_a_pull_that_brings_one_changed_file_appends_one_line_and_rewrites_nothing(
    site: Site,
) -> None:
    for i in range(40):
        write(site.remote / f"out/f{i:02d}.txt", f"file {i}")
    assert pulled(site).files_written == 40
    jnl = site.state / PULL_JOURNAL
    before = jnl.stat()
    n = len(lines(jnl))
    write(site.remote / "out/f07.txt", "changed in the sandbox")
    result = pulled(site)
    assert result.files_written == 1
    after = jnl.stat()
    assert after.st_ino == before.st_ino  # appended to, not replaced
    added = lines(jnl)[n:]
    assert len(added) == 1
    assert list(added[0]["set"]) == ["out/f07.txt"]
    sha = hashlib.sha256(b"changed in the sandbox").hexdigest()
    assert pull_record(site.opts())["out/f07.txt"][2] == sha
    assert pull_record(site.opts())["out/f07.txt"][3] == f"{UUID}/boot-1"


def test_a_pull_that_finds_nothing_new_leaves_the_record_untouched(site: Site) -> None:
    for i in range(5):
        write(site.remote / f"out/f{i}.txt", f"file {i}")
    pulled(site)
    jnl = site.state / PULL_JOURNAL
    before = jnl.stat()
    result = pulled(site)
    assert (result.files_written, result.unchanged) == (0, 5)
    after = jnl.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )


def test_an_older_ukcs_pull_json_is_read_and_replaced_by_the_journal(site: Site) -> None:
    write(site.remote / "out/a.txt", "same")
    write(site.local / "out/a.txt", "same")
    st = os.stat(site.remote / "out/a.txt")
    sha = hashlib.sha256(b"same").hexdigest()
    write_record(
        site.state,
        PULL_LEGACY,
        {"version": 1, "files": {"out/a.txt": [st.st_size, st.st_mtime_ns, sha, "i-0/b"]}},
    )
    assert plan_pull(site.opts(back=BACK)).known_files == 1
    result = pulled(site)
    # known from the old record: not sent again, and no conflict
    assert (result.files_written, result.unchanged, result.conflicts) == (0, 1, [])
    assert not (site.state / PULL_LEGACY).exists()
    assert pull_record(site.opts())["out/a.txt"] == [
        st.st_size,
        st.st_mtime_ns,
        sha,
        f"{UUID}/boot-1",
    ]


def test_a_garbled_record_costs_a_content_comparison_never_a_conflict(site: Site) -> None:
    write(site.remote / "out/a.txt", "same")
    pulled(site)
    (site.state / PULL_JOURNAL).write_bytes(b'{"seq": 0, "reset": true, "set": [1, 2\n')
    assert len(pull_record(site.opts())) == 0
    result = pulled(site)
    assert (result.files_written, result.unchanged, result.conflicts) == (0, 1, [])
    assert "out/a.txt" in pull_record(site.opts())


def test_plan_counts_the_records_files_and_bytes_from_its_last_line(site: Site) -> None:
    write(site.remote / "out/a.txt", "aaa")
    write(site.remote / "out/sub/b.txt", "bb")
    pulled(site)
    plan = plan_pull(site.opts(back=BACK))
    assert (plan.known_files, plan.known_bytes) == (2, 5)
    last = lines(site.state / PULL_JOURNAL)[-1]
    assert (last["meta"]["files"], last["meta"]["bytes"]) == (2, 5)


class _Frames:
    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    def send(self, obj: dict[str, Any]) -> None:
        self.frames.append(obj)


def test_what_was_pulled_goes_to_the_helper_in_parts_never_as_one_frame() -> None:
    rec = PullRecord({}, [])
    for i in range(4500):
        rec.put(f"out/f{i}.txt", i, 7, "0" * 64, "u/b")
    s = _Frames()
    _send_have(s, rec)  # type: ignore[arg-type]
    assert [len(f["have"]) for f in s.frames] == [2000, 2000, 500]
    assert all(f["op"] == "have" for f in s.frames)
    have = {p: v for f in s.frames for p, v in f["have"].items()}
    assert have["out/f4499.txt"] == [4499, 7]


def test_files_known_from_more_than_one_part_are_not_resent(site: Site) -> None:
    for i in range(2100):
        write(site.remote / f"out/d{i % 7}/f{i}.txt", "x")
    assert pulled(site).files_written == 2100
    result = pulled(site)
    assert (result.files_written, result.unchanged) == (0, 2100)


def test_sources_no_entry_names_are_dropped_from_the_record(site: Site) -> None:
    rec = PullRecord({}, [])
    rec.put("out/a.txt", 1, 1, "a" * 64, "old/boot")
    rec.put("out/b.txt", 1, 1, "b" * 64, "new/boot")
    rec.put("out/a.txt", 1, 1, "a" * 64, "new/boot")
    meta = rec.meta()
    assert meta["sources"] == ["new/boot"]
    assert rec["out/a.txt"][3] == rec["out/b.txt"][3] == "new/boot"


def test_a_pull_forgets_the_index_the_scan_loaded_even_with_a_feed(site: Site) -> None:
    from reconciler.sync import feed, journal
    from reconciler.sync.engine import scan_local
    from reconciler.sync.records import INDEX

    for i in range(30):
        write(site.local / f"src/f{i}.txt", f"local {i}")
    write(site.remote / "out/r.txt", "result")
    opts = site.opts(back=BACK)
    scan_local(opts)
    index = journal.load(site.state / INDEX)
    assert journal.load(site.state / INDEX) is index  # loaded once, kept
    pulled(site)
    again = journal.load(site.state / INDEX)
    assert again is not index  # read again: the pull did not keep the scan's state alive
    assert dict(again.entries) == dict(index.entries)

    # a feed compares the next scan's index by its file (inode, length), not by holding it
    feed.attach(site.state)
    try:
        scan_local(opts)
        kept = journal.load(site.state / INDEX)
        pulled(site)
        assert journal.load(site.state / INDEX) is not kept
    finally:
        feed.detach(site.state)


def test_a_record_changed_in_more_than_one_part_is_written_from_its_parts_and_reads_back_whole(
    tmp_path: Path,
) -> None:
    from reconciler.sync.pullrecord import load_pull_record, save_pull_record

    first = PullRecord({}, [])
    for i in range(3000):
        first.put(f"out/old{i}.txt", i, 1, "a" * 64, "old/boot")
    first.put("out/keep.txt", 5, 1, "k" * 64, "other/boot")
    save_pull_record(tmp_path, first)
    loaded = load_pull_record(tmp_path)
    assert len(loaded) == 3001

    rec = loaded.copy()
    for i in range(4500):  # more than two parts: most of it is held encoded
        name = f"out/old{i}.txt" if i < 3000 else f"out/new{i}.txt"
        rec.put(name, i, 2, "b" * 64, "new/b")
    assert rec.spooled
    rec.pop("out/keep.txt", None)  # as a mirrored deletion drops it
    save_pull_record(tmp_path, rec)

    back = load_pull_record(tmp_path)
    assert len(back) == 4500
    assert "out/keep.txt" not in back
    assert back["out/old7.txt"] == [7, 2, "b" * 64, "new/b"]
    assert back["out/new4499.txt"] == [4499, 2, "b" * 64, "new/b"]
    last = lines(tmp_path / PULL_JOURNAL)[-1]["meta"]
    # the two sources no entry names any more are gone; counts match the state
    assert last["sources"] == ["new/b"]
    assert (last["files"], last["bytes"]) == (4500, sum(range(4500)))


def test_a_record_changed_in_more_than_one_part_keeps_the_encoded_parts_out_of_memory() -> None:
    rec = PullRecord({}, [])
    for i in range(4500):
        rec.put(f"out/f{i}.txt", i, 2, "c" * 64, "new/b")
    # two parts encoded, each named by where it lies in the temp file, not held as bytes
    assert len(rec._spool) == 2
    assert all(isinstance(part, tuple) for part in rec._spool)
    assert len(rec) == 4500
    assert rec["out/f0.txt"] == [0, 2, "c" * 64, "new/b"]
    assert rec["out/f4499.txt"] == [4499, 2, "c" * 64, "new/b"]
