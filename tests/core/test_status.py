"""The status file: atomic, versioned, locked, and readable after any interruption."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from reconciler import errors
from reconciler.status import journal, schema


def doc_with(phase: str) -> schema.StatusDoc:
    return schema.StatusDoc(sessions={"s": schema.SessionStatus(phase=phase)})  # type: ignore[arg-type]


def test_a_missing_file_reads_as_an_empty_document(tmp_path: Path) -> None:
    doc = journal.load(tmp_path / ".ukc" / "status.json")
    assert doc.sessions == {} and doc.version == schema.STATUS_VERSION


def test_save_then_load_round_trips_and_keeps_the_previous_generation(tmp_path: Path) -> None:
    path = tmp_path / ".ukc" / "status.json"
    journal.save(path, doc_with("Ready"))
    journal.save(path, doc_with("Failed"))
    assert journal.load(path).sessions["s"].phase == "Failed"
    backup = json.loads(path.with_name("status.json.bak").read_text())
    assert backup["sessions"]["s"]["phase"] == "Ready"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_corrupt_file_falls_back_to_the_backup_generation(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    journal.save(path, doc_with("Ready"))
    journal.save(path, doc_with("Failed"))
    path.write_text('{"version": 1, "sessions": {"s": ')
    assert journal.load(path).sessions["s"].phase == "Ready"


def test_an_unreadable_file_without_backup_is_an_error_not_a_silent_reset(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    path.write_text("not json")
    with pytest.raises(errors.UsageError, match="unreadable"):
        journal.load(path)


def test_a_newer_status_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    path.write_text(json.dumps({"version": 99, "sessions": {}}))
    with pytest.raises(errors.UsageError, match="version 99"):
        journal.load(path)


def test_a_second_holder_of_the_lock_is_told_who_holds_it(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    with (
        journal.lock(path),
        pytest.raises(errors.LockedError, match=f"pid {os.getpid()}"),
        journal.lock(path, timeout_s=0.05),
    ):
        pass
    with journal.lock(path):  # released
        pass


def test_the_lock_names_its_holder_in_place_without_truncating_the_lock_file(
    tmp_path: Path,
) -> None:
    # ext4 flushes a file truncated to zero when it is closed: a disk write per watch pass
    path = tmp_path / "status.json"
    lock_file = tmp_path / "status.lock"
    lock_file.write_text("x" * 400)  # a longer text an earlier holder left
    with journal.lock(path):
        assert lock_file.stat().st_size == 400
        with (
            pytest.raises(errors.LockedError) as told,
            journal.lock(path, timeout_s=0.05),
        ):
            pass
    said = str(told.value)
    assert f"(pid {os.getpid()} on " in said and "xxxx" not in said


def test_the_lock_of_a_killed_holder_is_free_at_once(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    code = textwrap.dedent(
        f"""
        import os, time
        from pathlib import Path
        from reconciler.status import journal
        with journal.lock(Path({str(path)!r})):
            print("held", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    proc.kill()
    proc.wait()
    with journal.lock(path, timeout_s=1.0):
        pass


def _holder(path: Path, client_pid: int, hold_s: float) -> subprocess.Popen[str]:
    """A process holding the lock for `client_pid` (as a warm-process child does)."""
    code = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from reconciler.status import journal
        journal.set_client_pid({client_pid})
        with journal.lock(Path({str(path)!r})):
            print("held", flush=True)
            time.sleep({hold_s})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_holder_whose_ukc_is_gone_is_waited_for_not_reported(tmp_path: Path) -> None:
    # a warm-process command outlives its killed `ukc` by a few milliseconds; an immediate
    # re-run must wait for it rather than fail on it
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    path = tmp_path / "status.json"
    holder = _holder(path, gone.pid, 0.5)
    try:
        # it holds the lock now; with no --lock-timeout this would fail at once for a live one
        with journal.lock(path):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_whose_ukc_is_alive_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    holder = _holder(path, os.getpid(), 30)
    try:
        with (
            pytest.raises(errors.LockedError, match=f"for ukc pid {os.getpid()}"),
            journal.lock(path),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_a_kill_during_many_saves_never_leaves_an_unparseable_file(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    code = textwrap.dedent(
        f"""
        from pathlib import Path
        from reconciler.status import journal
        doc = schema.StatusDoc()
        for i in range(100000):
            n = i % 50 + 1
            doc.sessions = {{f"s{{j}}": schema.SessionStatus(message="x" * 200) for j in range(n)}}
            journal.save(Path({str(path)!r}), doc)
        """
    )
    for delay in (0.3, 0.45, 0.6):
        proc = subprocess.Popen([sys.executable, "-c", code])
        try:
            proc.wait(delay)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if path.exists():
            journal.load(path)  # parses (or falls back to a parseable backup)
            json.loads(path.read_text())


def test_conditions_keep_their_transition_time_while_the_status_is_unchanged() -> None:
    rec = schema.SessionStatus()
    journal.set_condition(rec, "Ready", "True", "Converged", "", "t1")
    journal.set_condition(rec, "Ready", "True", "Converged", "again", "t2")
    assert rec.conditions[0].last_transition_time == "t1"
    journal.set_condition(rec, "Ready", "False", "Failed", "boom", "t3")
    assert rec.conditions[0].last_transition_time == "t3"


def test_an_older_status_files_host_key_is_read_as_the_pin_and_written_back_as_pin(
    tmp_path: Path,
) -> None:
    path = tmp_path / "status.json"
    instance = {"name": "ukc-abcd1234-s", "uuid": "u-1", "host_key": "SHA256:abc"}
    path.write_text(json.dumps({"version": 1, "sessions": {"s": {"instance": instance}}}))
    doc = journal.load(path)
    record = doc.sessions["s"].instance
    assert record is not None and record.pin == "SHA256:abc"
    journal.save(path, doc)
    written = json.loads(path.read_text())["sessions"]["s"]["instance"]
    assert written["pin"] == "SHA256:abc" and "host_key" not in written


class _HeldWrites:
    """A status file write that the test lets through one at a time, recording each."""

    def __init__(self) -> None:
        self.written: list[dict[str, Any]] = []
        self.entered = threading.Semaphore(0)
        self.release = threading.Semaphore(0)
        self.fail_next = False

    def __call__(self, path: Path, data: bytes) -> None:
        self.entered.release()
        self.release.acquire()
        if self.fail_next:
            self.fail_next = False
            raise OSError(28, "No space left on device")
        self.written.append(json.loads(data))


def _change_and_save(committer: journal.Committer, name: str, seen: dict[str, bool]) -> None:
    with committer.doc_lock:
        committer.doc.sessions[name] = schema.SessionStatus(phase="Progressing")
    committer.save()
    # save returned: a write already made holds this change
    seen[name] = any(name in w["sessions"] for w in writes_of(committer))


def writes_of(committer: journal.Committer) -> list[dict[str, Any]]:
    held = committer._write
    assert isinstance(held, _HeldWrites)
    return held.written


def test_saves_asked_for_during_a_write_share_the_next_write_and_return_once_it_holds_them(
    tmp_path: Path,
) -> None:
    held = _HeldWrites()
    committer = journal.Committer(
        tmp_path / "status.json", schema.StatusDoc(), threading.Lock(), write=held
    )
    seen: dict[str, bool] = {}
    first = threading.Thread(target=_change_and_save, args=(committer, "s0", seen))
    first.start()
    assert held.entered.acquire(timeout=10)  # s0's write is in flight
    others = [
        threading.Thread(target=_change_and_save, args=(committer, f"s{i}", seen))
        for i in range(1, 11)
    ]
    for t in others:
        t.start()
    deadline = time.monotonic() + 30
    while committer.asked < 11 and time.monotonic() < deadline:  # every other save has asked
        time.sleep(0.01)
    assert seen == {}
    held.release.release()  # s0's write lands
    assert held.entered.acquire(timeout=10)  # one write for the ten that waited
    held.release.release()
    for t in (first, *others):
        t.join(10)
    assert committer.writes == 2
    assert seen == {f"s{i}": True for i in range(11)}
    assert set(held.written[-1]["sessions"]) == {f"s{i}" for i in range(11)}


def test_a_failed_write_covers_nothing_and_the_next_save_writes_the_change(
    tmp_path: Path,
) -> None:
    held = _HeldWrites()
    committer = journal.Committer(
        tmp_path / "status.json", schema.StatusDoc(), threading.Lock(), write=held
    )
    held.fail_next = True
    held.release.release()
    with pytest.raises(OSError, match="No space"):
        _change_and_save(committer, "s0", {})
    assert committer.writes == 0 and held.written == []
    seen: dict[str, bool] = {}
    held.release.release()
    _change_and_save(committer, "s1", seen)
    assert seen == {"s1": True}
    assert set(held.written[0]["sessions"]) == {"s0", "s1"}


def test_the_status_file_is_written_when_a_message_holds_an_undecodable_name(
    tmp_path: Path,
) -> None:
    path = tmp_path / "status.json"
    doc = schema.StatusDoc(sessions={"s": schema.SessionStatus(message="refused: x\udcff.txt")})
    journal.save(path, doc)
    assert journal.load(path).sessions["s"].message == "refused: x\udcff.txt"


def test_the_status_file_is_written_as_the_indented_json_of_the_document(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    doc = doc_with("Ready")
    doc.sessions["s"].message = "é ✓"
    journal.save(path, doc)
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == doc.model_dump(mode="json")
    assert text == json.dumps(doc.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"
