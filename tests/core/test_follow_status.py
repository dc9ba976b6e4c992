"""What `ukc status` says about the revision `ukc follow` applied and a later one it could not."""

from __future__ import annotations

from reconciler.cli.render import render_source, source_json
from reconciler.status.schema import SourceRecord, StatusDoc

GOOD = "a" * 40
BAD = "b" * 40
NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def followed(**changes: object) -> StatusDoc:
    doc = StatusDoc(
        source=SourceRecord(
            url="https://git.example/infra.git",
            ref="main",
            path="specs",
            revision=GOOD,
            applied_at="2027-01-15T07:55:00Z",
        ),
        last_applied_revision=GOOD,
        last_attempted_revision=GOOD,
        last_attempted_at="2027-01-15T07:55:00Z",
    )
    return doc.model_copy(update=changes)


def test_an_applied_revision_is_one_line() -> None:
    assert render_source(followed(), NOW) == [
        "source: https://git.example/infra.git main specs at aaaaaaaaaaaa, applied 5m ago"
    ]


def test_a_later_revision_that_did_not_apply_is_named_with_why() -> None:
    doc = followed(
        last_attempted_revision=BAD,
        last_attempted_at="2027-01-15T07:59:00Z",
        last_attempt_error="specs of revision bbbbbbbbbbbb not applied, nothing pruned: x",
    )
    assert render_source(doc, NOW)[1] == (
        "last attempt: bbbbbbbbbbbb 1m ago, not applied: specs of revision bbbbbbbbbbbb not "
        "applied, nothing pruned: x"
    )
    data = source_json(doc)
    assert data is not None and data.last_attempted_revision == BAD
    assert data.source is not None and data.source.revision == GOOD


def test_a_status_file_ukc_follow_never_wrote_shows_nothing() -> None:
    assert render_source(StatusDoc(), NOW) == [] and source_json(StatusDoc()) is None
