from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest

from reconciler.errors import SpecError
from reconciler.spec.yamlsafe import Limits, format_path, load_yaml_bytes, load_yaml_file


def load(text: str | bytes, limits: Limits | None = None) -> list[object]:
    data = text.encode() if isinstance(text, str) else text
    return [d.value for d in load_yaml_bytes(data, source="t.yaml", limits=limits or Limits())]


def fails(text: str | bytes, limits: Limits | None = None) -> SpecError:
    with pytest.raises(SpecError) as info:
        load(text, limits)
    assert info.value.file == "t.yaml"
    return info.value


class TestValuesAndLines:
    def test_every_field_path_maps_to_the_line_it_was_written_on(self) -> None:
        text = "# comment\nname: x\ncommands:\n  - echo\n  - name: t\n    run: r\n    timeout: 5m\n"
        (doc,) = load_yaml_bytes(text.encode(), source="t.yaml")
        assert doc.line == 2
        assert doc.lines[("name",)] == 2
        assert doc.lines[("commands", 0)] == 4
        assert doc.lines[("commands", 1)] == 5
        assert doc.lines[("commands", 1, "timeout")] == 7

    def test_a_missing_path_falls_back_to_its_nearest_ancestor(self) -> None:
        (doc,) = load_yaml_bytes(b"a: 1\nsync:\n  back: []\n", source="t.yaml")
        assert doc.line_of(("sync", "exclude")) == 2
        assert doc.line_of(("nothing", 3)) == 1

    def test_plain_values_come_back_as_python_values(self) -> None:
        assert load("a: [1, -2, 1.5, true, ~, x, '0755', 2026-01-02]") == [
            {"a": [1, -2, 1.5, True, None, "x", "0755", datetime.date(2026, 1, 2)]}
        ]

    def test_several_documents_each_give_a_value_and_empty_ones_give_none(self) -> None:
        docs = load_yaml_bytes(b"a: 1\n---\n---\nb: 2\n", source="t.yaml")
        assert [d.value for d in docs] == [{"a": 1}, None, {"b": 2}]
        assert [d.line for d in docs] == [1, 3, 4]

    def test_a_merge_key_fills_in_missing_keys_and_explicit_keys_win(self) -> None:
        (doc,) = load_yaml_bytes(b"base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  y: 3\n", source="t.yaml")
        assert doc.value == {"base": {"x": 1, "y": 2}, "c": {"y": 3, "x": 1}}
        assert doc.lines[("c", "y")] == 4

    def test_a_bom_is_accepted(self) -> None:
        assert load(b"\xef\xbb\xbfname: x\n") == [{"name": "x"}]

    def test_format_path_writes_indexes_in_brackets(self) -> None:
        assert format_path(("commands", 1, "timeout")) == "commands[1].timeout"
        assert format_path(()) == ""


class TestStrictness:
    def test_a_duplicate_key_names_both_lines(self) -> None:
        err = fails("a: 1\nb: 2\na: 3\n")
        assert (err.line, err.field) == (3, "a")
        assert "first on line 1" in str(err)

    @pytest.mark.parametrize("key", ["on", "yes", "no", "1", "~", "1.5", "2026-01-01"])
    def test_a_key_yaml_reads_as_a_non_string_is_refused(self, key: str) -> None:
        err = fails(f"{key}: x\n")
        assert "quote it" in str(err)

    def test_a_collection_as_key_is_refused(self) -> None:
        assert "plain strings" in str(fails("? [a, b]\n: x\n"))

    @pytest.mark.parametrize(
        "text",
        [
            "a: !!python/object/apply:os.system ['true']\n",
            "a: !!python/name:os.system\n",
            "a: !!binary aGk=\n",
            "a: !!set {x, y}\n",
            "a: !!omap [{x: 1}]\n",
            "a: !local x\n",
            "a: !<tag:example.com,2000:x> y\n",
        ],
    )
    def test_non_core_tags_are_refused(self, text: str) -> None:
        err = fails(text)
        assert "is not allowed" in str(err)
        assert err.line == 1

    @pytest.mark.parametrize("number", ["0755", "0x1F", "0b101", "1_000", "1:30", "190:20:30"])
    def test_yaml_1_1_integer_forms_are_refused_not_reinterpreted(self, number: str) -> None:
        err = fails(f"a:\n  b: {number}\n")
        assert (err.line, err.field) == (2, "a.b")
        assert "plain decimal" in str(err)

    @pytest.mark.parametrize("number", [".inf", "-.inf", ".nan", "1:30.5", "1_0.5"])
    def test_non_decimal_floats_are_refused(self, number: str) -> None:
        assert "not a plain decimal" in str(fails(f"a: {number}\n"))

    def test_an_impossible_date_is_a_spec_error_not_a_crash(self) -> None:
        assert "invalid date" in str(fails("a: 2026-13-45\n"))

    def test_a_huge_integer_is_refused_before_python_converts_it(self) -> None:
        assert "too large" in str(fails("a: " + "7" * 5000 + "\n"))

    def test_non_utf8_is_refused_with_the_line_of_the_bad_byte(self) -> None:
        err = fails(b"a: 1\nname: caf\xe9\n")
        assert err.line == 2
        assert "not valid utf-8" in str(err).lower()

    def test_tab_indentation_is_a_yaml_error_with_its_line(self) -> None:
        err = fails("a:\n\tb: 1\n")
        assert err.line == 2
        assert "invalid YAML" in str(err)


class TestLimits:
    def test_nesting_at_the_depth_limit_loads_and_one_more_level_fails(self) -> None:
        limits = Limits(max_depth=64)
        assert load("[" * 64 + "]" * 64, limits)
        err = fails("[" * 65 + "]" * 65, limits)
        assert "nesting deeper than 64" in str(err)

    def test_aliases_over_the_limit_fail(self) -> None:
        text = "a: &a x\nb: [" + ", ".join(["*a"] * 101) + "]\n"
        assert "more than 100 aliases" in str(fails(text))

    def test_the_node_limit_counts_aliases_at_their_expanded_size(self) -> None:
        # 3 aliases of a 40-node list: 1 + 1 + 40 + 1 + 3*40 = 163 expanded nodes
        inner = "[" + ", ".join(["x"] * 39) + "]"
        text = f"a: &a {inner}\nb: [*a, *a, *a]\n"
        assert load(text, Limits(max_nodes=200))
        assert "nodes once aliases are expanded" in str(fails(text, Limits(max_nodes=150)))

    def test_an_alias_to_an_enclosing_node_is_refused(self) -> None:
        assert "no complete anchored node" in str(fails("a: &a [1, *a]\n"))

    def test_an_undefined_alias_is_refused(self) -> None:
        assert "no complete anchored node" in str(fails("a: *nope\n"))

    def test_too_many_documents_fail(self) -> None:
        assert "documents" in str(fails("---\na: 1\n" * 11, Limits(max_documents=10)))

    def test_a_file_over_the_byte_cap_is_refused_without_reading_it_all(
        self, tmp_path: Path
    ) -> None:
        path = tmp_path / "big.yaml"
        path.write_bytes(b"a: " + b"x" * 2000 + b"\n")
        with pytest.raises(SpecError) as info:
            load_yaml_file(path, limits=Limits(max_bytes=1000))
        assert "1000 byte limit" in str(info.value)

    def test_an_unreadable_path_is_a_spec_error(self, tmp_path: Path) -> None:
        with pytest.raises(SpecError) as info:
            load_yaml_file(tmp_path / "missing.yaml")
        assert "cannot read" in str(info.value)


class TestMergeKeys:
    def test_merged_nested_keys_get_the_lines_of_their_source(self) -> None:
        text = "base: &b\n  env:\n    A: x\n  ttl: 5m\nc:\n  env:\n    B: y\n  <<: *b\n"
        (doc,) = load_yaml_bytes(text.encode(), source="t.yaml")
        assert doc.value == {
            "base": {"env": {"A": "x"}, "ttl": "5m"},
            "c": {"env": {"B": "y"}, "ttl": "5m"},
        }
        assert doc.lines[("c", "env", "B")] == 7
        assert ("c", "env", "A") not in doc.lines
        assert doc.lines[("c", "ttl")] == 4

    def test_earlier_merge_sources_win_over_later_ones(self) -> None:
        text = "a: &a {x: 1}\nb: &b {x: 2, y: 2}\nc:\n  <<: [*a, *b]\n"
        assert load(text)[0] == {"a": {"x": 1}, "b": {"x": 2, "y": 2}, "c": {"x": 1, "y": 2}}

    def test_many_inline_merges_stay_linear(self) -> None:
        text = "l:\n" + "".join(f"  - {{<<: {{k{i}: 1}}, z: 2}}\n" for i in range(10_000))
        started = time.perf_counter()
        (value,) = load(text)
        assert time.perf_counter() - started < 5.0  # quadratic would take minutes
        assert isinstance(value, dict)
        assert len(value["l"]) == 10_000
