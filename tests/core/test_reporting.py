"""Reporters: plain lines for pipes, a redrawn table for terminals."""

from __future__ import annotations

import io

from reconciler.cli.render import LiveReporter, PlainReporter
from reconciler.reconcile.events import Event


def test_plain_output_prefixes_every_line_with_its_session_and_joins_split_lines() -> None:
    out = io.StringIO()
    rep = PlainReporter(out)
    rep.event(Event("web", "action", "run command 'build' (never ran)"))
    rep.event(Event("web", "output", "hel", "stdout"))
    rep.event(Event("db", "output", "oops\n", "stderr"))
    rep.event(Event("web", "output", "lo\nwor", "stdout"))
    rep.close()
    assert out.getvalue().splitlines() == [
        "[web] run command 'build' (never ran)",
        "[db] ! oops",
        "[web] | hello",
        "[web] | wor",
    ]


def test_the_live_table_shows_one_row_per_session_and_scrolls_output_above_it() -> None:
    out = io.StringIO()
    rep = LiveReporter(out)
    rep.event(Event("web", "action", "sync"))
    rep.event(Event("db", "action", "create"))
    rep.event(Event("web", "output", "line\n", "stdout"))
    rep.event(Event("web", "done", "ready"))
    rep.close()
    text = out.getvalue()
    assert "[web] | line" in text
    final = text.rsplit("\x1b[J", 1)[-1]
    rows = [r for r in final.splitlines() if r.strip() and not r.startswith("[")]
    assert len(rows) == 2
    assert any("web" in r and "ready" in r for r in rows)
    assert any("db" in r and "working" in r for r in rows)
