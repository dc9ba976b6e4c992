"""`ukc plan --output json` and `--output markdown`: the versioned document, its committed
schema, the pull-request comment's format, and a comment that a spec's tree cannot rewrite."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import jsonschema

from reconciler.cli import plan_output
from reconciler.cli.plan_output import PlannedGroup, build_document, render_markdown
from reconciler.cloud.model import Instance
from reconciler.reconcile import actions, identity
from reconciler.reconcile.desired import CommandIntent, DesiredSession, TreeState
from reconciler.reconcile.plan import plan_sessions
from reconciler.status.schema import InstanceRecord, SessionStatus, StatusDoc
from tests.support.planning import (
    INST_HASH,
    NOW,
    OWNER,
    OWNER_ID,
    PROJECT,
    converged_record,
    desired,
    instance,
)

ROOT = Path(__file__).resolve().parents[2]


def named(name: str, **overrides: object) -> DesiredSession:
    return desired(
        name=name,
        instance_name=identity.instance_name(PROJECT, name),
        tags=tuple(identity.owner_tags(PROJECT, name, INST_HASH, OWNER_ID)),
        **overrides,
    )


def running(d: DesiredSession, uuid: str) -> Instance:
    return instance(d, uuid=uuid, tags=(*d.tags, identity.transport_tag("ssh")))


def example_plan() -> actions.Plan:
    """A new session, one whose files changed, one up to date, and one to prune."""
    new = named("hello", tree=TreeState("t1", 3, 3000, uploads=("a.txt", "src/b.py")))
    changed = named("web", commands=(CommandIntent("test", "pytest -q\nmake lint", 300.0),))
    idle = named("idle")
    web_inst = running(changed, "u-web")
    idle_inst = running(idle, "u-idle")
    web_rec = converged_record(changed, web_inst)
    changed = named(
        "web",
        commands=changed.commands,
        tree=TreeState("t2", 4, 400, uploads=("index.html",), upload_bytes=120, deletes=("x",)),
    )
    gone = named("gone")
    gone_inst = running(gone, "u-gone")
    doc = StatusDoc(
        sessions={
            "web": web_rec,
            "idle": converged_record(idle, idle_inst),
            "gone": SessionStatus(
                phase="Ready", instance=InstanceRecord(name=gone_inst.name, uuid="u-gone")
            ),
        }
    )
    observed = {i.name: i for i in (web_inst, idle_inst, gone_inst)}
    return plan_sessions(
        [new, changed, idle],
        observed,
        doc,
        NOW,
        owner=OWNER,
        prune=True,
        claimed={"gone": gone_inst, "web": web_inst, "idle": idle_inst},
    )


def example_document() -> plan_output.PlanDocument:
    group = PlannedGroup(Path("specs"), Path("specs/.ukc/status.json"), True, example_plan())
    return build_document([group], api_requests=2)


def test_the_json_plan_is_a_versioned_document_valid_against_the_committed_schema() -> None:
    doc = json.loads(example_document().model_dump_json())
    schema = json.loads((ROOT / "docs" / "plan.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)
    assert doc["schema_version"] == 1
    assert doc["ok"] is True and doc["changes_pending"] is True
    assert doc["summary"] == {
        "sessions": 3,
        "create": 1,
        "replace": 0,
        "update": 1,
        "delete": 0,
        "up_to_date": 1,
        "errors": 0,
        "refused": 0,
        "files_to_send": 4,
        "bytes_to_send": 3120,
        "commands_to_run": 3,
        "prune_deletes": 1,
        "orphans": 0,
    }
    (group,) = doc["groups"]
    verdicts = {s["name"]: s["verdict"] for s in group["sessions"]}
    assert verdicts == {"hello": "create", "web": "update", "idle": "up_to_date"}
    web = next(s for s in group["sessions"] if s["name"] == "web")
    assert [a["type"] for a in web["actions"]] == ["send_files", "run_command", "bring_back"]
    send = web["actions"][0]
    assert (send["sample"], send["deleted_sample"], send["deletes"]) == (["index.html"], ["x"], 1)
    assert group["prune_deletes"] == [
        {
            "session": "gone",
            "instance": identity.instance_name(PROJECT, "gone"),
            "metro": "local",
            "reason": "no spec declares this session (prune)",
        }
    ]


def test_a_document_that_breaks_the_schema_is_refused_by_it() -> None:
    schema = json.loads((ROOT / "docs" / "plan.schema.json").read_text())
    doc = json.loads(example_document().model_dump_json())
    doc["groups"][0]["sessions"][0]["verdict"] = "maybe"
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(doc))
    assert errors and "maybe" in str(errors[0].message)


def test_every_action_the_planner_makes_has_a_json_shape_except_waiting() -> None:
    samples: dict[type, actions.Action] = {
        actions.CreateInstance: actions.CreateInstance("s", "i", "local", "r"),
        actions.DeleteInstance: actions.DeleteInstance("s", "i", "local", "r"),
        actions.StartInstance: actions.StartInstance("s", "i", "r"),
        actions.SetAutokill: actions.SetAutokill("s", "i", "u", 60_000, "r"),
        actions.WaitReady: actions.WaitReady("s", "i", "ssh"),
        actions.SyncUp: actions.SyncUp("s", 1, 2, 0, False, "r"),
        actions.RunCommand: actions.RunCommand("s", 0, "n", "true", 1.0, "h", "r"),
        actions.SyncBack: actions.SyncBack("s", ("out/",), "r"),
    }
    assert set(samples) == set(typing.get_args(actions.Action)), "a new action needs a shape"
    for kind, sample in samples.items():
        shaped = plan_output._action(sample)
        assert (shaped is None) == (kind is actions.WaitReady), kind


HEADLINE = (
    "**ukc plan:** 1 to create, 0 to replace, 1 to delete, 4 file(s) to send (3.0 KiB), "
    "3 command(s) to run.\n"
)
EXPECTED_MARKDOWN = (
    HEADLINE
    + """\

| session | verdict | files to send | commands to run |
| --- | --- | ---: | ---: |
| `hello` | create | 3 | 2 |
| `web` | update | 1 | 1 |
| `idle` | up to date | 0 | 0 |

**`hello`**: create

- create instance `ukc-abcd1234-hello` on `local` — no instance
- full sync: up to 3 file(s) (2.9 KiB), sandbox scanned — new instance
- run command `build` — new instance
- run command `test` — new instance
- bring back `out/` — commands ran

<details><summary>files and commands</summary>

Files to send (some of them):

- `a.txt`
- `src/b.py`

Command `build` (timeout 60 s):

```sh
make
```

Command `test` (timeout 60 s):

```sh
make test
```

</details>

**`web`**: update

- send 1 file(s) (120 B), delete 1 remotely — local files changed
- run command `test` — inputs changed (files, env or image)
- bring back `out/` — commands ran

<details><summary>files and commands</summary>

Files to send:

- `index.html`

Files to delete in the sandbox:

- `x`

Command `test` (timeout 300 s):

```sh
pytest -q
make lint
```

Unchanged:

- instance ukc-abcd1234-web is running

</details>

**prune** deletes sessions no spec declares:

- `gone`: instance `ukc-abcd1234-gone` on `local`

<sub>ukc plan, schema version 1</sub>
"""
)


def test_the_markdown_comment_keeps_its_format() -> None:
    text = render_markdown(example_document())
    assert text == EXPECTED_MARKDOWN


def _outside_code(markdown: str) -> str:
    """What GitHub would read as markup: the text with fenced blocks and code spans removed
    (the constructs `render_markdown` emits, by CommonMark's rules for them)."""
    kept: list[str] = []
    fence: str | None = None
    for line in markdown.splitlines():
        if fence is not None:
            if re.fullmatch(rf"{fence}`*\s*", line):
                fence = None
            continue
        opened = re.match(r"(`{3,})", line)
        if opened:
            fence = opened.group(1)
            continue
        kept.append(re.sub(r"(`+)(?!`).*?(?<!`)\1(?!`)", "", line))
    return "\n".join(kept)


HOSTILE = "x`` @octocat <img src=https://evil.example/p.png> [l](http://e) </details>\n# Fake"


def test_file_names_commands_and_messages_cannot_add_markup_mentions_or_close_the_details() -> None:
    tree = TreeState("t", 2, 20, uploads=(HOSTILE, "ok.txt"))
    command = CommandIntent("build", "echo ```\n</details>\n@octocat ~~~\n````\ndone", 60.0)
    d = named("hello", tree=tree, commands=(command,))
    halted = named("broken", tree=TreeState("", 0, 0, halted=f"directory {HOSTILE} is gone"))
    plan = plan_sessions([d, halted], {}, StatusDoc(), NOW, owner=OWNER)
    group = PlannedGroup(Path("specs"), Path("specs/.ukc/status.json"), False, plan)
    text = render_markdown(build_document([group], 0))

    markup = _outside_code(text)
    # a backslash-escaped punctuation character is plain text (CommonMark)
    literal = re.sub(r"\\[!-/:-@\[-`{-~]", "", markup)
    for needle in ("<img", "](http", "https://"):
        assert needle not in literal, needle
    assert not re.search("@(?!\u2060)", markup), "a mention outside code"
    lines = literal.splitlines()
    assert lines.count("</details>") == text.count("<details>") == 2  # one per session
    assert not any(line.lstrip().startswith("#") for line in lines)
    # the hostile path is still shown, as code, on one line
    assert any("x`` @octocat <img" in line and "\\n# Fake" in line for line in text.splitlines())
