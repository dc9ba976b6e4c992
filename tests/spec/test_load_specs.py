"""`load_specs`: files and directories, documents, defaults from the environment, identity."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import Field

from reconciler.errors import SpecError
from reconciler.spec.loader import load_spec_file, load_specs
from reconciler.spec.models import (
    DEFAULT_LOCAL_IMAGE,
    CommandSpec,
    SessionSpec,
    SyncSpec,
    resolve_secret_env,
    spec_hash,
)
from tests.support.specfiles import load_one, spec_error, write

REPO = Path(__file__).resolve().parents[2]


class TestFilesAndDirectories:
    def test_a_directory_gives_its_yaml_and_yml_files_sorted_and_skips_the_rest(
        self, tmp_path: Path
    ) -> None:
        write(tmp_path / "b.yml", "name: b\n")
        write(tmp_path / "a.yaml", "name: a\n")
        write(tmp_path / "c.txt", "name: c\n")
        write(tmp_path / ".hidden.yaml", "name: hidden\n")
        write(tmp_path / ".ukc" / "x.yaml", "name: in-state-dir\n")
        write(tmp_path / "sub" / "d.yaml", "name: nested\n")
        specs = load_specs([tmp_path], {})
        assert specs.names == ("a", "b")
        assert specs.files == (tmp_path / "a.yaml", tmp_path / "b.yml")
        assert {s.base_dir for s in specs} == {tmp_path.resolve()}

    def test_a_directory_without_spec_files_gives_an_empty_set(self, tmp_path: Path) -> None:
        specs = load_specs([tmp_path], {})
        assert len(specs) == 0
        assert specs.files == ()

    def test_a_file_belongs_to_its_own_directory_and_directory_resolves_against_it(
        self, tmp_path: Path
    ) -> None:
        path = write(
            tmp_path / "proj" / "s.yaml",
            "name: a\ndirectory: ../work\nallow_directory_outside_spec_dir: true\n",
        )
        (session,) = load_specs([path], {})
        assert session.base_dir == (tmp_path / "proj").resolve()
        assert session.directory == (tmp_path / "work").resolve()
        assert session.file == path

    def test_files_given_from_several_places_keep_their_own_base_dir(self, tmp_path: Path) -> None:
        one = write(tmp_path / "one" / "s.yaml", "name: a\n")
        write(tmp_path / "two" / "s.yaml", "name: b\n")
        specs = load_specs([one, tmp_path / "two"], {})
        assert [s.base_dir.name for s in specs] == ["one", "two"]

    def test_the_same_file_named_twice_is_loaded_once(self, tmp_path: Path) -> None:
        path = write(tmp_path / "s.yaml", "name: a\n")
        assert load_specs([path, tmp_path, tmp_path / "." / "s.yaml"], {}).names == ("a",)

    def test_a_missing_path_is_a_spec_error_naming_it(self, tmp_path: Path) -> None:
        with pytest.raises(SpecError) as info:
            load_specs([tmp_path / "nope.yaml"], {})
        assert info.value.file == str(tmp_path / "nope.yaml")
        assert "no such spec file or directory" in str(info.value)


class TestDocuments:
    def test_each_document_is_a_session_with_its_own_line_and_empty_ones_are_skipped(
        self, tmp_path: Path
    ) -> None:
        text = "# sessions\nname: a\n---\n---\n# only a comment\n---\nname: b\n...\n"
        specs = load_one(tmp_path, text)
        assert [(s.name, s.line) for s in specs] == [("a", 2), ("b", 7)]

    def test_a_comment_only_file_gives_no_session(self, tmp_path: Path) -> None:
        assert len(load_one(tmp_path, "# nothing yet\n")) == 0

    def test_a_name_declared_twice_across_files_names_both_places(self, tmp_path: Path) -> None:
        write(tmp_path / "a.yaml", "name: x\n---\nname: same\n")
        write(tmp_path / "b.yaml", "\n\nname: same\n")
        with pytest.raises(SpecError) as info:
            load_specs([tmp_path], {})
        message = str(info.value)
        assert f"{tmp_path / 'a.yaml'}:3" in message
        assert f"{tmp_path / 'b.yaml'}:3" in message
        assert (info.value.file, info.value.line, info.value.field) == (
            str(tmp_path / "b.yaml"),
            3,
            "name",
        )

    def test_the_first_invalid_file_in_order_is_reported(self, tmp_path: Path) -> None:
        write(tmp_path / "a.yaml", "name: ok\n")
        write(tmp_path / "b.yaml", "name: Bad\n")
        write(tmp_path / "c.yaml", "name: also-bad_\n")
        with pytest.raises(SpecError) as info:
            load_specs([tmp_path], {})
        assert info.value.file == str(tmp_path / "b.yaml")

    def test_load_spec_file_uses_the_given_base_dir(self, tmp_path: Path) -> None:
        path = write(tmp_path / "d" / "s.yaml", "name: a\n")
        (session,) = load_spec_file(path, {}, base_dir=tmp_path)
        assert session.base_dir == tmp_path.resolve()


class TestEnvironmentDefaults:
    def test_ukc_metro_and_ukc_sandbox_image_fill_in_missing_keys(self, tmp_path: Path) -> None:
        env = {"UKC_METRO": "fra", "UKC_SANDBOX_IMAGE": "me/box:1"}
        (session,) = load_one(tmp_path, "name: a\n", env)
        assert (session.spec.metro, session.spec.image) == ("fra", "me/box:1")

    def test_keys_in_the_spec_win_over_the_environment(self, tmp_path: Path) -> None:
        env = {"UKC_METRO": "fra", "UKC_SANDBOX_IMAGE": "me/box:1"}
        (session,) = load_one(tmp_path, "name: a\nmetro: local\nimage: other\n", env)
        assert (session.spec.metro, session.spec.image) == ("local", "other")

    def test_a_remote_metro_without_any_image_names_ukc_sandbox_image(self, tmp_path: Path) -> None:
        err = spec_error(tmp_path, "name: a\nmetro: fra\n")
        assert err.field == "image"
        assert "UKC_SANDBOX_IMAGE" in str(err)

    def test_an_invalid_ukc_metro_says_where_the_value_came_from(self, tmp_path: Path) -> None:
        err = spec_error(tmp_path, "name: a\n", {"UKC_METRO": "Not A Metro"})
        assert err.field == "metro"
        assert "(from $UKC_METRO)" in str(err)

    def test_the_process_environment_is_never_read(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("UKC_SANDBOX_IMAGE", "from/os-environ")
        monkeypatch.setenv("UKC_METRO", "fra")
        (session,) = load_one(tmp_path, "name: a\n", {})
        assert (session.spec.metro, session.spec.image) == ("local", DEFAULT_LOCAL_IMAGE)


class TestIdentity:
    def test_the_hash_is_sha256_hex_and_ignores_yaml_layout_and_duration_spelling(
        self, tmp_path: Path
    ) -> None:
        a = load_one(tmp_path / "1", "name: a\nttl: 90s\nenv: {X: '1', Y: '2'}\n").sessions[0]
        b = load_one(tmp_path / "2", "# c\nenv:\n  Y: '2'\n  X: '1'\nttl: 1m30s\nname: a\n")
        assert re.fullmatch(r"[0-9a-f]{64}", spec_hash(a.spec))
        assert spec_hash(a.spec) == spec_hash(b.sessions[0].spec)

    @pytest.mark.parametrize(
        "change",
        [
            "name: b",
            "commands: [x]",
            "env: {X: '2'}",
            "image: other",
            "exec: http",
            "ttl: 91",
            "sync: {back_delete: true}",
        ],
    )
    def test_the_hash_changes_with_any_declared_value(self, tmp_path: Path, change: str) -> None:
        base = {"name": "name: a", "env": "env: {X: '1'}", "ttl": "ttl: 90"}
        key = change.split(":")[0]
        changed = {**base, key: change}
        one = load_one(tmp_path / "1", "\n".join(base.values()) + "\n").sessions[0]
        two = load_one(tmp_path / "2", "\n".join(changed.values()) + "\n").sessions[0]
        assert spec_hash(one.spec) != spec_hash(two.spec)

    @pytest.mark.parametrize(
        "sync", ["sync: {back: [out/]}", "sync: {back: [out/], back_delete: false}"]
    )
    def test_a_spec_without_back_delete_keeps_the_hash_it_had_before_the_field_existed(
        self, tmp_path: Path, sync: str
    ) -> None:
        # why: the hash decides whether an expired session may come back; upgrading ukc must
        # not change it. The value was computed by the ukc that had no back_delete.
        (session,) = load_one(tmp_path, f"name: a\n{sync}\n")
        assert spec_hash(session.spec) == (
            "d0dc9d802d524cd1e0cbf62a1001f0d69d028df73c1c0f60628f43dc4a1a333a"
        )

    def test_a_field_added_later_leaves_the_hash_of_specs_that_do_not_use_it_unchanged(
        self, tmp_path: Path
    ) -> None:
        # A future ukc with one more defaulted field at each level, declared the way every
        # field is declared (nothing else to remember): existing specs keep their hash.
        class LaterCommand(CommandSpec):
            retries: int = 0

        class LaterSync(SyncSpec):
            verify: bool = False

        class LaterSession(SessionSpec):
            commands: tuple[LaterCommand, ...] = ()
            sync: LaterSync = Field(default_factory=LaterSync)
            cpus: int | None = None

        text = "name: a\ncommands: [make, {name: t, run: test, timeout: 5m}]\n"
        text += "sync: {back: [out/], timeout: 10m}\nenv: {X: '1'}\n"
        (session,) = load_one(tmp_path, text)
        data = session.spec.model_dump()
        later = LaterSession.model_validate(data)
        assert spec_hash(later) == spec_hash(session.spec)
        for changed in (
            {**data, "cpus": 2},
            {**data, "sync": {**data["sync"], "verify": True}},
            {**data, "commands": [{**data["commands"][0], "retries": 1}, data["commands"][1]]},
        ):
            assert spec_hash(LaterSession.model_validate(changed)) != spec_hash(session.spec)

    def test_secret_values_never_reach_the_hash(self, tmp_path: Path) -> None:
        (session,) = load_one(tmp_path, "name: a\nsecret_env: {TOKEN: MY_TOKEN}\n")
        before = spec_hash(session.spec)
        assert resolve_secret_env(session.spec, {"MY_TOKEN": "s3cr3t"}) == {"TOKEN": "s3cr3t"}
        assert spec_hash(session.spec) == before
        assert "s3cr3t" not in session.spec.model_dump_json()


class TestSecretEnv:
    def test_a_missing_controller_variable_names_session_and_variable_but_no_value(
        self, tmp_path: Path
    ) -> None:
        text = "name: a\nsecret_env: {TOKEN: MY_TOKEN, OTHER: OTHER_VAR}\n"
        (session,) = load_one(tmp_path, text)
        with pytest.raises(SpecError) as info:
            resolve_secret_env(session.spec, {"OTHER_VAR": "v3ry-s3cret"})
        message = str(info.value)
        assert "'a'" in message
        assert "MY_TOKEN" in message
        assert "v3ry-s3cret" not in message

    def test_an_empty_controller_value_is_a_value(self, tmp_path: Path) -> None:
        (session,) = load_one(tmp_path, "name: a\nsecret_env: {T: V}\n")
        assert resolve_secret_env(session.spec, {"V": ""}) == {"T": ""}


class TestSecretsTypedInTheWrongPlace:
    @pytest.mark.parametrize(
        "value",
        ["sk-live-4f9a8b7c", "'hunter2 with spaces'", "0755123", "123456789", "2026-13-45", "true"],
    )
    def test_a_secret_pasted_as_a_secret_env_value_is_never_echoed(
        self, tmp_path: Path, value: str
    ) -> None:
        err = spec_error(tmp_path, f"name: a\nsecret_env:\n  API_KEY: {value}\n")
        assert (err.line, err.field) == (3, "secret_env.API_KEY")
        shown = value.strip("'")
        assert shown not in str(err)
        assert shown.lower() not in str(err).lower()


class TestShippedExamples:
    def test_the_hello_quickstart_validates_and_its_directory_is_shipped(self) -> None:
        (session,) = load_specs([REPO / "specs" / "hello.yaml"], {})
        assert session.name == "hello"
        assert session.spec.metro == "local"
        assert session.spec.sync.back == ("out/",)
        assert session.directory == (REPO / "specs" / "hello").resolve()
        assert (session.directory / "words.txt").is_file()
        assert (session.directory / "greet.py").is_file()

    def test_the_multi_example_has_two_sessions_with_env_timeouts_and_excludes(self) -> None:
        specs = load_specs([REPO / "specs" / "multi.yaml"], {})
        assert specs.names == ("calc-test", "calc-stats")
        for session in specs:
            assert session.spec.env
            assert session.spec.sync.exclude
            assert any(c.name != f"cmd-{i + 1}" for i, c in enumerate(session.spec.commands))
            assert session.directory.is_dir()

    def test_the_whole_specs_directory_loads_together(self) -> None:
        assert sorted(load_specs([REPO / "specs"], {}).names) == [
            "calc-stats",
            "calc-test",
            "hello",
        ]
