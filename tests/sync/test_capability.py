"""Sync path selection: the python helper where the image has python3, shell+tar elsewhere,
learned once per instance and recorded."""

from __future__ import annotations

import pytest

from reconciler.errors import MissingToolError, RemoteError
from reconciler.sync.capability import (
    describe,
    is_missing_interpreter,
    probe_tools,
    record_tools,
    recorded_tools,
    remote_tools,
)
from tests.support.synctree import Site


class TestProbe:
    def test_an_image_with_python3_is_probed_as_the_python_path(self, site: Site) -> None:
        assert probe_tools(site.shell, site.opts()) == "python"

    def test_an_image_without_the_interpreter_is_probed_as_the_shell_path(self, site: Site) -> None:
        opts = site.opts(remote_python="ukc-no-such-python3")
        assert probe_tools(site.shell, opts) == "shell"

    def test_an_interpreter_that_cannot_run_is_probed_as_the_shell_path(self, site: Site) -> None:
        fake = site.base / "python3"
        fake.write_text("not a program\n")
        fake.chmod(0o644)  # found, not runnable: the shell answers 126
        assert probe_tools(site.shell, site.opts(remote_python=str(fake))) == "shell"

    def test_an_interpreter_older_than_the_helpers_floor_is_the_shell_path(
        self, site: Site
    ) -> None:
        old = site.base / "python3"
        old.write_text("#!/bin/sh\nexit 3\n")  # what the probe makes of a 3.6
        old.chmod(0o755)
        assert probe_tools(site.shell, site.opts(remote_python=str(old))) == "shell"

    def test_any_other_answer_is_an_error_not_a_guess(self, site: Site) -> None:
        odd = site.base / "python3"
        odd.write_text("#!/bin/sh\nexit 9\n")
        odd.chmod(0o755)
        with pytest.raises(RemoteError, match="exited with code 9"):
            probe_tools(site.shell, site.opts(remote_python=str(odd)))


class TestRecord:
    def test_the_finding_is_recorded_per_instance_and_not_probed_again(self, site: Site) -> None:
        opts = site.opts(remote_python="ukc-no-such-python3")
        assert remote_tools(site.shell, opts, "u1") == "shell"
        started = len(site.shell.started)
        assert remote_tools(site.shell, opts, "u1") == "shell"
        assert len(site.shell.started) == started  # no second round trip
        assert recorded_tools(opts, "u1") == "shell"

    def test_a_new_instance_starts_unknown(self, site: Site) -> None:
        opts = site.opts()
        record_tools(opts, "u1", "shell")
        assert recorded_tools(opts, "u2") is None
        assert remote_tools(site.shell, opts, "u2") == "python"
        assert recorded_tools(opts, "u1") is None  # one instance per session

    def test_an_unreadable_record_reads_as_unknown(self, site: Site) -> None:
        opts = site.opts()
        site.state.mkdir(parents=True)
        (site.state / "tools.json").write_text('{"uuid": "u1", "tools": "perl"}')
        assert recorded_tools(opts, "u1") is None
        (site.state / "tools.json").write_text("{not json")
        assert recorded_tools(opts, "u1") is None

    def test_plan_words_name_each_path(self) -> None:
        assert describe("python") == "python helper"
        assert describe("shell") == "shell+tar"
        assert describe(None) == "not known until first contact"


def test_only_the_interpreters_own_absence_selects_the_shell_path(site: Site) -> None:
    opts = site.opts()
    assert is_missing_interpreter(MissingToolError("x", tool=opts.remote_python), opts)
    assert not is_missing_interpreter(MissingToolError("x", tool="tar"), opts)
    assert not is_missing_interpreter(RemoteError("x"), opts)


class _GoneProcess:
    """A sandbox process that already exited with `code`: its stdin is a closed channel,
    reported as the SSH transport reports one (a `RemoteError`, not an `OSError`)."""

    def __init__(self, code: int) -> None:
        self.code = code

    def write(self, data: bytes) -> None:
        raise RemoteError("ssh sandbox: stdin write failed (Socket is closed)")

    def close_stdin(self) -> None:
        pass

    def read(self, n: int = 65536) -> bytes:
        return b""

    def read_stderr(self, n: int = 65536) -> bytes:
        return b""

    def wait(self, timeout: float | None = None) -> int:
        return self.code

    def kill(self) -> None:
        pass


class _GoneShell:
    def __init__(self, code: int) -> None:
        self.code = code

    def start(self, command: str) -> _GoneProcess:
        return _GoneProcess(self.code)

    def close(self) -> None:
        pass


def test_a_helper_whose_channel_closed_before_its_program_was_read_is_still_named(
    site: Site,
) -> None:
    # over SSH the shell's 126 can close the channel while the program is still being sent
    from reconciler.sync.remote import HelperSession

    session = HelperSession(_GoneShell(126), site.opts())
    with pytest.raises(MissingToolError) as caught:
        session.flush()
    assert is_missing_interpreter(caught.value, site.opts())
    session.close(abort=True)
