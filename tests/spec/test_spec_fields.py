"""Every key of the user contract: what is accepted, and the file:line: field of each refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.spec.durations import Duration
from reconciler.spec.models import DEFAULT_LOCAL_IMAGE, CommandSpec, SessionSpec, SyncSpec
from tests.support.specfiles import load_one, spec_error

# (yaml after "name: ok\n" on line 1, line, field, fragment of the message)
REFUSALS: list[tuple[str, int, str, str]] = [
    # name
    ("image: x", 1, "name", "required field is missing"),
    ("name: Hello", 1, "name", "lowercase DNS label"),
    ("name: -x", 1, "name", "lowercase DNS label"),
    ("name: a_b", 1, "name", "lowercase DNS label"),
    ("name: " + "a" * 51, 1, "name", "51 characters, the limit is 50"),
    ("name: no", 1, "name", "got a boolean (false); quote it"),
    ("name: 123", 1, "name", 'got a number (123); quote it (write "123")'),
    ("name: 2026-01-01", 1, "name", "got a date; quote it"),
    ("name:", 1, "name", "got an empty value (null)"),
    # image
    ("name: ok\nimage: 7", 2, "image", "expected a string"),
    ("name: ok\nimage: 'a b'", 2, "image", "without spaces"),
    ("name: ok\nimage: ''", 2, "image", "without spaces"),
    # metro
    ("name: ok\nmetro: FRA", 2, "metro", "a metro code like 'fra'"),
    ("name: ok\nmetro: ftp://x", 2, "metro", "http(s) url"),
    ("name: ok\nmetro: https://user:pw@api.example", 2, "metro", "must not contain credentials"),
    ("name: ok\nmetro: https://", 2, "metro", "has no host"),
    ("name: ok\nmetro: on", 2, "metro", "got a boolean (true)"),
    # directory
    ("name: ok\ndirectory: ''", 2, "directory", "directory is empty"),
    ('name: ok\ndirectory: "a\\tb"', 2, "directory", "control characters"),
    ("name: ok\ndirectory: [a]", 2, "directory", "expected a string, got a list"),
    # commands
    ("name: ok\ncommands: echo hi", 2, "commands", "expected a list, got a string"),
    ("name: ok\ncommands:\n  - echo\n  - 5", 4, "commands[1]", "expected a mapping"),
    ("name: ok\ncommands:\n  - name: t", 3, "commands[0].run", "required field is missing"),
    ("name: ok\ncommands:\n  - run: ''", 3, "commands[0].run", "command is empty"),
    (
        "name: ok\ncommands:\n  - run: x\n    timout: 5m",
        4,
        "commands[0].timout",
        "did you mean 'timeout'",
    ),
    (
        "name: ok\ncommands:\n  - x\n  - run: y\n    timeout: 0",
        5,
        "commands[1].timeout",
        "positive",
    ),
    (
        "name: ok\ncommands:\n  - run: y\n    timeout: 5 min",
        4,
        "commands[0].timeout",
        "invalid duration",
    ),
    ("name: ok\ncommands:\n  - run: y\n    timeout: yes", 4, "commands[0].timeout", "boolean"),
    ("name: ok\ncommands:\n  - run: y\n    name: 'a b'", 4, "commands[0].name", "letters, digits"),
    (
        "name: ok\ncommands:\n  - name: t\n    run: a\n  - name: t\n    run: b",
        5,
        "commands[1].name",
        "'t' is used by commands[0] and commands[1]",
    ),
    ("name: ok\ncommands:\n  - {name: cmd-2, run: a}\n  - x", 4, "commands[1].name", "used by"),
    # sync
    ("name: ok\nsync: [a]", 2, "sync", "expected a mapping, got a list"),
    ("name: ok\nsync:\n  exlude: []", 3, "sync.exlude", "did you mean 'exclude'"),
    ("name: ok\nsync:\n  exclude: ['']", 3, "sync.exclude[0]", "exclude rule is empty"),
    ("name: ok\nsync:\n  exclude: '*.pyc'", 3, "sync.exclude", "expected a list"),
    (
        "name: ok\nsync:\n  back:\n    - out\n    - ../up",
        5,
        "sync.back[1]",
        "must not contain '..'",
    ),
    ("name: ok\nsync:\n  back: [/etc]", 3, "sync.back[0]", "relative to /workspace"),
    ("name: ok\nsync:\n  back: [./]", 3, "sync.back[0]", "name something inside"),
    ('name: ok\nsync:\n  back: ["a\\nb"]', 3, "sync.back[0]", "control characters"),
    ("name: ok\nsync:\n  back: [5]", 3, "sync.back[0]", "expected a string"),
    (
        "name: ok\nsync:\n  back: [out/]\n  back_delete: 'true'",
        4,
        "sync.back_delete",
        "expected true or false, got a string",
    ),
    ("name: ok\nsync:\n  back_delete: 1", 3, "sync.back_delete", "got a number (1)"),
    ("name: ok\nsync:\n  back_delete:", 3, "sync.back_delete", "got an empty value (null)"),
    ("name: ok\nsync:\n  back_delete: [true]", 3, "sync.back_delete", "got a list"),
    ("name: ok\nsync:\n  back_delet: true", 3, "sync.back_delet", "did you mean 'back_delete'"),
    ("name: ok\nsync:\n  mirror: true", 3, "sync.mirror", "allowed: exclude, back, back_delete"),
    # env
    ("name: ok\nenv:\n  PORT: 8080", 3, "env.PORT", 'quote it (write "8080")'),
    ("name: ok\nenv:\n  DEBUG: yes", 3, "env.DEBUG", "yes/no/on/off/true/false are booleans"),
    ("name: ok\nenv:\n  RATIO: 1.5", 3, "env.RATIO", "quote it"),
    ("name: ok\nenv:\n  A: [x]", 3, "env.A", "expected a string, got a list"),
    ("name: ok\nenv:\n  bad-name: x", 3, "env.bad-name", "not a valid environment variable name"),
    ("name: ok\nenv:\n  1X: x", 3, "env.1X", "not a valid environment variable name"),
    ("name: ok\nenv: [A]", 2, "env", "expected a mapping"),
    # secret_env
    ("name: ok\nsecret_env:\n  TOKEN: my-var", 3, "secret_env.TOKEN", "not the secret itself"),
    ("name: ok\nsecret_env:\n  TOKEN: 5", 3, "secret_env.TOKEN", "expected a string"),
    ("name: ok\nenv: {A: x, B: y}\nsecret_env: {B: Z}", 3, "secret_env.B", "B set in both env"),
    # memory_mb
    ("name: ok\nmemory_mb: 8", 2, "memory_mb", "between 16 and 8192 (MiB), got 8"),
    ("name: ok\nmemory_mb: 9000", 2, "memory_mb", "got 9000"),
    ("name: ok\nmemory_mb: '1024'", 2, "memory_mb", "expected a whole number, got a string"),
    ("name: ok\nmemory_mb: 1024.0", 2, "memory_mb", "expected a whole number"),
    ("name: ok\nmemory_mb: true", 2, "memory_mb", "expected a whole number, got a boolean"),
    ("name: ok\nmemory_mb: 0755", 2, "memory_mb", "YAML 1.1 meaning"),
    # workspace
    ("name: ok\nworkspace: {volume: 100GiB}", 2, "workspace.volume", "from 1MiB to 64GiB"),
    ("name: ok\nworkspace: {volume: 2 apples}", 2, "workspace.volume", "invalid size"),
    ("name: ok\nworkspace: {volume: true}", 2, "workspace.volume", "got a boolean"),
    ("name: ok\nworkspace: {size: 2GiB}", 2, "workspace.size", "unknown field 'size'"),
    ("name: ok\nworkspace: 2GiB", 2, "workspace", "expected a mapping"),
    # ttl
    ("name: ok\nttl: 0", 2, "ttl", "positive"),
    ("name: ok\nttl: -5", 2, "ttl", "positive"),
    ("name: ok\nttl: 2 hours", 2, "ttl", "invalid duration"),
    ("name: ok\nttl: 1:30", 2, "ttl", "YAML 1.1 meaning"),
    # exec
    ("name: ok\nexec: bash", 2, "exec", "must be 'ssh', 'http' or 'plugin', got 'bash'"),
    ("name: ok\nexec: no", 2, "exec", "got a boolean (false)"),
    # unknown keys and the document itself
    ("name: ok\nimages: x", 2, "images", "did you mean 'image'"),
    ("name: ok\nzzz: 1", 2, "zzz", "allowed: name, image"),
]


@pytest.mark.parametrize(("text", "line", "field", "fragment"), REFUSALS)
def test_each_invalid_value_is_refused_at_its_file_line_and_field(
    tmp_path: Path, text: str, line: int, field: str, fragment: str
) -> None:
    err = spec_error(tmp_path, text + "\n")
    file = str(tmp_path / "s.yaml")
    assert (err.file, err.line, err.field) == (file, line, field)
    assert str(err).startswith(f"{file}:{line}: {field}: ")
    assert fragment in str(err)
    assert "\n" not in str(err)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n"])
def test_a_document_that_is_not_a_mapping_is_refused(tmp_path: Path, text: str) -> None:
    err = spec_error(tmp_path, text)
    assert "must be a mapping" in str(err)
    assert err.line == 1


def test_all_problems_of_a_file_are_reported_in_one_line_starting_with_the_first(
    tmp_path: Path,
) -> None:
    err = spec_error(tmp_path, "name: Bad\nmemory_mb: 1\n---\nname: ok\nexec: x\n")
    assert (err.line, err.field) == (1, "name")
    assert "and 2 more problem(s): line 2 memory_mb: " in str(err)
    assert "line 5 exec: " in str(err)
    assert "\n" not in str(err)


class TestAccepted:
    def test_the_full_contract_example_loads_with_every_value(self, tmp_path: Path) -> None:
        text = """\
name: hello
image: my/sandbox:latest
metro: local
directory: ./work
commands:
  - echo hi > out/hi.txt
  - name: test
    run: pytest -q
    timeout: 5m
sync:
  exclude: [".git/", "*.pyc"]
  back: ["out/"]
env: {GREETING: hi}
secret_env: {API_KEY: MY_API_KEY}
memory_mb: 1024
ttl: 2h
exec: ssh
"""
        (session,) = load_one(tmp_path, text)
        assert session.spec == SessionSpec(
            name="hello",
            image="my/sandbox:latest",
            metro="local",
            directory="./work",
            commands=(
                CommandSpec(name="cmd-1", run="echo hi > out/hi.txt"),
                CommandSpec(name="test", run="pytest -q", timeout=Duration(300)),
            ),
            sync=SyncSpec(exclude=(".git/", "*.pyc"), back=("out/",)),
            env={"GREETING": "hi"},
            secret_env={"API_KEY": "MY_API_KEY"},
            memory_mb=1024,
            ttl=Duration(7200),
            exec="ssh",
        )
        assert session.directory == tmp_path / "work"
        assert session.spec.commands[0].timeout == 30 * 60

    def test_only_a_name_is_needed_on_the_local_metro(self, tmp_path: Path) -> None:
        (session,) = load_one(tmp_path, "name: a\n")
        spec = session.spec
        assert (spec.image, spec.metro, spec.directory, spec.exec) == (
            DEFAULT_LOCAL_IMAGE,
            "local",
            ".",
            "ssh",
        )
        assert (spec.commands, spec.env, spec.secret_env, spec.memory_mb, spec.ttl) == (
            (),
            {},
            {},
            None,
            None,
        )
        assert session.directory == tmp_path

    def test_empty_collections_written_as_null_mean_empty(self, tmp_path: Path) -> None:
        text = "name: a\ncommands:\nenv:\nsecret_env:\nsync:\n  exclude:\n  back:\n"
        (session,) = load_one(tmp_path, text)
        assert session.spec.commands == ()
        assert session.spec.sync == SyncSpec()

    @pytest.mark.parametrize(("text", "value"), [("true", True), ("false", False), ("yes", True)])
    def test_back_delete_accepts_a_boolean_and_is_off_by_default(
        self, tmp_path: Path, text: str, value: bool
    ) -> None:
        (session,) = load_one(tmp_path / "1", f"name: a\nsync:\n  back_delete: {text}\n")
        assert session.spec.sync.back_delete is value
        (plain,) = load_one(tmp_path / "2", "name: a\nsync:\n  back: [out/]\n")
        assert plain.spec.sync.back_delete is False

    def test_a_mapping_command_without_a_name_is_named_by_its_position(
        self, tmp_path: Path
    ) -> None:
        (session,) = load_one(tmp_path, "name: a\ncommands:\n  - x\n  - run: y\n")
        assert [c.name for c in session.spec.commands] == ["cmd-1", "cmd-2"]

    @pytest.mark.parametrize(
        "metro", ["local", "fra", "was1", "sin", "https://api.example.com", "http://127.0.0.1:8080"]
    )
    def test_metro_codes_and_urls_are_accepted(self, tmp_path: Path, metro: str) -> None:
        # a url is accepted once the environment trusts it (see the token routing tests)
        env = {"UKC_METRO_ALLOW": metro} if "://" in metro else {}
        (session,) = load_one(tmp_path, f"name: a\nimage: i\nmetro: '{metro}'\n", env)
        assert session.spec.metro == metro

    def test_an_absolute_directory_is_kept_and_may_not_exist(self, tmp_path: Path) -> None:
        (session,) = load_one(tmp_path, f"name: a\ndirectory: {tmp_path}/not/yet\n")
        assert session.directory == tmp_path / "not" / "yet"
        assert not session.directory.exists()

    def test_quoted_yaml_1_1_words_stay_strings(self, tmp_path: Path) -> None:
        (session,) = load_one(tmp_path, "name: 'no'\nenv: {A: 'yes', B: '0755', C: 'on'}\n")
        assert session.spec.name == "no"
        assert session.spec.env == {"A": "yes", "B": "0755", "C": "on"}

    def test_ttl_and_timeout_accept_plain_seconds(self, tmp_path: Path) -> None:
        (session,) = load_one(tmp_path, "name: a\nttl: 90\ncommands:\n  - run: x\n    timeout: 5\n")
        assert session.spec.ttl == 90
        assert session.spec.commands[0].timeout == 5

    def test_models_are_frozen(self, tmp_path: Path) -> None:
        (session,) = load_one(tmp_path, "name: a\n")
        with pytest.raises(ValueError, match="frozen"):
            session.spec.name = "b"  # type: ignore[misc]
