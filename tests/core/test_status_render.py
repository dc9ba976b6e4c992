"""`ukc status` for people and for CI: a table with headers, age and TTL left, a stable JSON
document, and an exit code that says whether every session is Ready."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from reconciler.cli.render import (
    STATUS_COLUMNS,
    LiveReporter,
    StatusRow,
    render_status,
    span,
    status_document,
    status_exit_code,
    status_schema,
)
from reconciler.reconcile.events import Event
from reconciler.spec.sizes import human_size
from reconciler.status.schema import BackFrom, CommandRecord, InstanceRecord, SessionStatus

NOW = 1_800_000_000.0
ROOT = Path(__file__).resolve().parents[2]


def stamp(seconds_ago: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - seconds_ago))


def record(phase: str = "Ready", **fields: Any) -> SessionStatus:
    return SessionStatus.model_validate({"phase": phase, **fields})


def ready_session() -> SessionStatus:
    return record(
        created_at=stamp(2 * 3600 + 5 * 60),
        expires_at=stamp(-(55 * 60)),
        last_applied_at=stamp(30),
        instance=InstanceRecord(name="ukc-p-calc", uuid="u1", state="running"),
        commands=[CommandRecord(name="test", run="pytest", exit_code=0)],
    )


def test_the_status_table_has_headers_then_age_ttl_left_and_last_apply_per_session() -> None:
    lines = render_status([StatusRow("calc", "s.json", ready_session())], NOW)
    assert lines[0].split() == ["NAME", "PHASE", "AGE", "TTL", "LEFT", "LAST", "APPLY", "INSTANCE"]
    assert lines[1].split() == [
        "calc",
        "Ready",
        "2h05m",
        "55m",
        "30s",
        "ago",
        "ukc-p-calc",
        "(running)",
    ]
    assert lines[2].split() == ["test", "exit", "0"]
    # columns line up under their headers
    for column in ("PHASE", "AGE", "TTL LEFT", "LAST APPLY", "INSTANCE"):
        at = lines[0].index(column)
        assert lines[1][at] != " " and lines[1][at - 1] == " ", column


def test_a_session_past_its_ttl_reads_expired_and_one_without_ttl_a_dash() -> None:
    expired = record(created_at=stamp(7200), expires_at=stamp(60), last_applied_at=stamp(90))
    no_ttl = record(created_at=stamp(10))
    lines = render_status(
        [StatusRow("old", "s.json", expired), StatusRow("plain", "s.json", no_ttl)], NOW
    )
    assert lines[1].split()[:4] == ["old", "Ready", "2h00m", "expired"]
    assert lines[2].split()[:5] == ["plain", "Ready", "10s", "-", "never"]


def test_sessions_of_two_status_files_say_which_file_each_comes_from() -> None:
    rows = [
        StatusRow("web", "a/.ukc/status.json", None),
        StatusRow("web", "b/.ukc/status.json", None),
    ]
    lines = render_status(rows, NOW)
    assert lines[0].split()[-2:] == ["STATUS", "FILE"]
    assert lines[1].endswith("a/.ukc/status.json") and lines[2].endswith("b/.ukc/status.json")


def test_a_session_never_applied_reads_pending_and_never() -> None:
    lines = render_status([StatusRow("new", "s.json", None)], NOW)
    assert lines[1].split() == ["new", "Pending", "-", "-", "never", "-"]


def test_a_session_only_the_status_file_remembers_says_it_is_not_declared() -> None:
    lines = render_status([StatusRow("gone", "s.json", record(), declared=False)], NOW)
    assert "Ready (not declared)" in lines[1]


@pytest.mark.parametrize(
    ("phases", "code"),
    [
        (["Ready", "Ready"], 0),
        (["Ready", "Failed"], 1),
        (["Failed", "Progressing"], 1),
        (["Ready", "Pending"], 3),
        (["Ready", None], 3),
        (["Interrupted"], 3),
        (["Expired"], 3),
        ([], 3),
    ],
)
def test_the_exit_code_is_0_all_ready_1_one_failed_3_one_not_ready_yet(
    phases: list[str | None], code: int
) -> None:
    rows = [
        StatusRow(f"s{i}", "s.json", None if p is None else record(p)) for i, p in enumerate(phases)
    ]
    assert status_exit_code(rows) == code


def test_the_json_document_carries_ages_in_seconds_and_its_own_version() -> None:
    rows = [StatusRow("calc", "s.json", ready_session()), StatusRow("new", "s.json", None)]
    doc = json.loads(status_document(rows, NOW).model_dump_json())
    assert doc["schema_version"] == 1 and doc["exit_code"] == 3
    calc, new = doc["sessions"]
    assert (calc["name"], calc["phase"], calc["age_s"], calc["ttl_left_s"]) == (
        "calc",
        "Ready",
        7500,
        3300,
    )
    assert calc["last_applied_at"] == stamp(30) and calc["status_file"] == "s.json"
    assert calc["instance"]["name"] == "ukc-p-calc" and calc["commands"][0]["exit_code"] == 0
    assert (new["name"], new["phase"], new["age_s"], new["ttl_left_s"]) == (
        "new",
        "Pending",
        None,
        None,
    )
    # the same state gives the same bytes
    assert (
        status_document(rows, NOW).model_dump_json() == status_document(rows, NOW).model_dump_json()
    )


def test_the_json_document_is_valid_against_the_committed_schema() -> None:
    committed = json.loads((ROOT / "docs" / "status.schema.json").read_text())
    assert committed == status_schema(), "regenerate: ukc schema status > docs/status.schema.json"
    jsonschema.Draft202012Validator.check_schema(committed)
    rows = [StatusRow("calc", "s.json", ready_session()), StatusRow("new", "s.json", None)]
    doc = json.loads(status_document(rows, NOW).model_dump_json())
    jsonschema.validate(doc, committed, cls=jsonschema.Draft202012Validator)
    doc["sessions"][0]["phase"] = "Sleeping"
    assert list(jsonschema.Draft202012Validator(committed).iter_errors(doc))


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0s"), (59, "59s"), (60, "1m"), (3599, "59m"), (3600, "1h00m"), (90061, "1d01h")],
)
def test_durations_read_in_at_most_two_units(seconds: float, shown: str) -> None:
    assert span(seconds) == shown


@pytest.mark.parametrize(
    ("count", "shown"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (157300293, "150.0 MiB"),
        (3 << 30, "3.0 GiB"),
    ],
)
def test_sizes_for_people_are_iec_units_everywhere(count: int, shown: str) -> None:
    assert human_size(count) == shown


def test_the_column_names_are_the_documented_ones() -> None:
    assert STATUS_COLUMNS == ("NAME", "PHASE", "AGE", "TTL LEFT", "LAST APPLY", "INSTANCE")


class Screen:
    def __init__(self) -> None:
        self.text = ""

    def write(self, data: str) -> int:
        self.text += data
        return len(data)

    def flush(self) -> None:
        pass

    def last_table_row(self, name: str) -> str:
        rows = [line for line in self.text.split("\n") if line.strip().startswith(name)]
        return rows[-1]


def test_the_live_header_drops_a_failure_once_the_same_row_is_done_again() -> None:
    screen = Screen()
    live = LiveReporter(screen)  # type: ignore[arg-type]
    live.event(Event("watch", "failed", "spec not reloaded: a.yaml:1: bad"))
    assert "FAILED" in screen.last_table_row("watch")
    live.event(Event("watch", "done", "specs valid again: reloaded"))
    assert "FAILED" not in screen.last_table_row("watch")
    assert "specs valid again" in screen.last_table_row("watch")


def test_status_says_from_which_command_run_the_outputs_brought_home_come() -> None:
    failed = ready_session().model_copy(update={"phase": "Failed"})
    failed.sync.back_from = BackFrom(command="test", exit_code=1, finished_at=stamp(90))
    lines = render_status([StatusRow("calc", "s.json", failed)], NOW)
    assert "    outputs brought home from command 'test' (exit 1), 1m ago" in lines, lines
    failed.sync.back_from = BackFrom(command="test", timed_out=True, finished_at=stamp(5))
    lines = render_status([StatusRow("calc", "s.json", failed)], NOW)
    assert "    outputs brought home from command 'test' (timed out), 5s ago" in lines, lines


def test_a_command_this_apply_did_not_run_still_shows_how_its_last_run_ended() -> None:
    rec = ready_session()
    rec.commands = [
        CommandRecord(name="test", run="pytest", exit_code=0, skipped=True),
        CommandRecord(name="slow", run="sleep 9", timed_out=True, skipped=True),
        CommandRecord(name="never", run="true", skipped=True),
    ]
    lines = render_status([StatusRow("calc", "s.json", rec)], NOW)
    assert [line.split(None, 1) for line in lines[2:]] == [
        ["test", "skipped (last run: exit 0)"],
        ["slow", "skipped (last run: timed out)"],
        ["never", "skipped (never ran)"],
    ]
