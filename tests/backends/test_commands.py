"""`run_command` through a real SshShell (sshd behind the TLS forwarder)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.errors import SpecError
from reconciler.transport.base import CommandResult
from reconciler.transport.commands import BOOTSTRAP, build_script, run_command
from reconciler.transport.sshclient import SshShell
from reconciler.transport.tls import Dialer
from tests.support.tls_sshd import FQDN, Sshd

SECRET = "s3cr3t-CANARY-91d2"


@pytest.fixture(scope="module")
def shell(
    test_ca: object, ssh_front: object, sshd: Sshd, request: pytest.FixtureRequest
) -> Iterator[SshShell]:
    from tests.support.tls_sshd import dialer_to

    dialer: Dialer = dialer_to(test_ca, ssh_front.port)  # type: ignore[arg-type,attr-defined]
    with SshShell.connect(dialer, FQDN, key_path=sshd.client_key, user=sshd.user) as sh:
        yield sh


class Recorder:
    """Collects both streams, in arrival order, with a lock (callbacks come from 2 threads)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.first = threading.Event()

    def out(self, data: bytes) -> None:
        with self.lock:
            self.events.append(("out", data))
        self.first.set()

    def err(self, data: bytes) -> None:
        with self.lock:
            self.events.append(("err", data))
        self.first.set()

    def text(self, stream: str) -> str:
        return b"".join(d for s, d in self.events if s == stream).decode()


def run(
    shell: SshShell,
    command: str,
    rec: Recorder | None = None,
    *,
    env: dict[str, str] | None = None,
    cwd: str = "/tmp",
    timeout_s: float | None = 30,
    **kw: object,
) -> CommandResult:
    rec = rec or Recorder()
    return run_command(
        shell,
        command,
        env=env or {},
        cwd=cwd,
        timeout_s=timeout_s,
        on_stdout=rec.out,
        on_stderr=rec.err,
        **kw,  # type: ignore[arg-type]
    )


def host_cmdlines() -> list[str]:
    lines = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                lines.append(
                    Path(f"/proc/{pid}/cmdline")
                    .read_bytes()
                    .replace(b"\0", b" ")
                    .decode(errors="replace")
                )
            except OSError:
                continue
    return lines


class TestExitAndOutput:
    def test_exit_codes_are_reported(self, shell: SshShell) -> None:
        assert run(shell, "true").exit_code == 0
        result = run(shell, "echo bad >&2; exit 7")
        assert result.exit_code == 7
        assert result.timed_out is False
        assert result.stderr_tail == "bad\n"
        assert result.duration_s > 0

    def test_the_command_runs_in_the_given_directory(self, shell: SshShell, tmp_path: Path) -> None:
        assert run(shell, "pwd", cwd=str(tmp_path)).stdout_tail == f"{tmp_path}\n"

    def test_a_missing_directory_fails_the_command(self, shell: SshShell) -> None:
        result = run(shell, "echo never", cwd="/nonexistent/dir")
        assert result.exit_code != 0
        assert "never" not in result.stdout_tail

    def test_the_stderr_marker_line_never_reaches_the_caller(self, shell: SshShell) -> None:
        rec = Recorder()
        run(shell, "echo e1 >&2", rec)
        assert rec.text("err") == "e1\n"


class TestEnvironment:
    def test_values_with_quotes_newlines_and_dollars_arrive_verbatim(self, shell: SshShell) -> None:
        env = {
            "A": 'it\'s "quoted"',
            "B": "line1\nline2\n",
            "C": "$HOME `id` $(id) \\ ;|&",
            "EMPTY": "",
            "UNICODE": "grüße ✓",
        }
        for name, value in env.items():
            result = run(shell, f'printf %s "${name}"', env=env)
            assert result.stdout_tail == value, name

    def test_an_invalid_name_is_refused_before_anything_runs(self, shell: SshShell) -> None:
        with pytest.raises(SpecError, match="env name '1BAD'"):
            run(shell, "true", env={"1BAD": "x"})
        with pytest.raises(SpecError, match="env name 'A B'"):
            build_script("true", {"A B": "x"}, "/")

    def test_the_secret_is_in_no_command_line_on_the_host(self, shell: SshShell) -> None:
        rec = Recorder()
        seen: list[str] = []
        done = threading.Event()

        def scan() -> None:
            rec.first.wait(20)
            while not done.is_set():
                seen.extend(c for c in host_cmdlines() if "sleep 2.5" in c or SECRET in c)
                time.sleep(0.05)

        scanner = threading.Thread(target=scan)
        scanner.start()
        try:
            result = run(shell, 'printf %s "$TOKEN" | wc -c; sleep 2.5', rec, env={"TOKEN": SECRET})
        finally:
            done.set()
            scanner.join()
        assert result.stdout_tail.strip() == str(len(SECRET))
        assert any("sleep 2.5" in c for c in seen)  # we did look while it ran
        assert not [c for c in seen if SECRET in c]


class TestStreaming:
    def test_output_arrives_while_the_command_runs_in_order(self, shell: SshShell) -> None:
        rec = Recorder()
        arrivals: list[tuple[str, float]] = []
        started = time.monotonic()

        def out(data: bytes) -> None:
            arrivals.append((data.decode(), time.monotonic() - started))
            rec.out(data)

        def err(data: bytes) -> None:
            arrivals.append((data.decode(), time.monotonic() - started))
            rec.err(data)

        result = run_command(
            shell,
            "echo a; sleep 0.4; echo b >&2; sleep 0.4; echo c",
            env={},
            cwd="/tmp",
            timeout_s=30,
            on_stdout=out,
            on_stderr=err,
        )
        assert [a for a, _ in arrivals] == ["a\n", "b\n", "c\n"]
        assert arrivals[0][1] < result.duration_s - 0.6  # "a" came long before the end
        assert arrivals[1][1] < result.duration_s - 0.2

    def test_10_mb_of_output_streams_without_deadlock_and_tails_are_bounded(
        self, shell: SshShell
    ) -> None:
        total = {"out": 0, "err": 0}

        def out(data: bytes) -> None:
            total["out"] += len(data)

        def err(data: bytes) -> None:
            total["err"] += len(data)

        result = run_command(
            shell,
            "head -c 10000000 /dev/zero | tr '\\0' x; head -c 3000000 /dev/zero | tr '\\0' e >&2",
            env={},
            cwd="/tmp",
            timeout_s=60,
            on_stdout=out,
            on_stderr=err,
            tail_bytes=1000,
        )
        assert result.exit_code == 0
        assert total == {"out": 10_000_000, "err": 3_000_000}
        assert result.stdout_tail == "x" * 1000
        assert result.stderr_tail == "e" * 1000

    def test_invalid_utf8_in_the_tail_is_replaced(self, shell: SshShell) -> None:
        assert run(shell, "printf 'ok\\377'").stdout_tail == "ok\ufffd"


class TestTimeout:
    def test_a_timeout_kills_the_whole_remote_process_group(self, shell: SshShell) -> None:
        rec = Recorder()
        result = run(shell, "sleep 3117 & sleep 3118; echo after", rec, timeout_s=1.0)
        assert result.timed_out is True
        assert result.exit_code is None
        assert "after" not in result.stdout_tail
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            alive = [c for c in host_cmdlines() if "sleep 311" in c]
            if not alive:
                break
            time.sleep(0.05)
        assert alive == []
        assert 1.0 <= result.duration_s < 8

    def test_the_shell_stays_usable_after_a_timeout(self, shell: SshShell) -> None:
        run(shell, "sleep 30", timeout_s=0.3)
        assert run(shell, "echo still here").stdout_tail == "still here\n"


class TestOverLocalShell:
    """The same bootstrap works through `LocalShell` (tests of other parts rely on it), and a
    timeout there kills only the command's own process group, never the test runner."""

    def test_env_output_and_timeout_through_a_local_shell(self, tmp_path: Path) -> None:
        from reconciler.transport.local_shell import LocalShell

        local = LocalShell()
        try:
            ok = run(local, 'printf %s "$V"', env={"V": "a'b"}, cwd=str(tmp_path))  # type: ignore[arg-type]
            assert (ok.exit_code, ok.stdout_tail) == (0, "a'b")
            slow = run(local, "sleep 3119", timeout_s=0.5)  # type: ignore[arg-type]
            assert slow.timed_out is True
            deadline = time.monotonic() + 10
            while any("sleep 3119" in c for c in host_cmdlines()) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not any("sleep 3119" in c for c in host_cmdlines())
        finally:
            local.close()

    def test_the_shell_runs_the_command_and_its_name_is_never_shell_code(
        self, tmp_path: Path
    ) -> None:
        from reconciler.transport.local_shell import LocalShell

        local = LocalShell()
        try:
            bash = run(local, "echo ${BASH_VERSION:+bash}", cwd=str(tmp_path), shell_name="bash")  # type: ignore[arg-type]
            assert (bash.exit_code, bash.stdout_tail) == (0, "bash\n")
            # the spec refuses such a name; the launch line quotes it all the same
            hostile = run(local, "true", cwd=str(tmp_path), shell_name="sh; touch pwned; sh")  # type: ignore[arg-type]
            assert hostile.exit_code != 0
            assert not (tmp_path / "pwned").exists()
        finally:
            local.close()


class _Nested:
    """A `RemoteShell` whose processes are the children of the process its channel starts,
    so they lead no process group (as under a transport that gives none)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.started: list[object] = []

    def start(self, command: str) -> object:
        import shlex

        proc = self.inner.start(f"sh -c {shlex.quote(command)}; exit $?")  # type: ignore[attr-defined]
        self.started.append(proc)
        return proc


class TestFewPrograms:
    """The bootstrap runs the command with no program between the channel's shell and the
    command's login shell: no `head` for the script, no `setsid` where the channel's process
    already leads its own group (sshd, the plugin and `LocalShell` each start one so)."""

    def test_a_command_needs_no_program_in_the_sandbox_but_its_shell(self, tmp_path: Path) -> None:
        from reconciler.transport.local_shell import LocalShell

        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "sh").symlink_to("/bin/sh")
        local = LocalShell(env={"PATH": str(bin_dir)})
        try:
            result = run(local, "echo ran", env={"V": "1"}, cwd=str(tmp_path))  # type: ignore[arg-type]
        finally:
            local.close()
        assert result.stdout_tail == "ran\n"

    def test_a_command_runs_in_the_process_group_its_channel_already_leads(
        self, tmp_path: Path
    ) -> None:
        from reconciler.transport.local_shell import LocalShell

        local = LocalShell()
        started: list[int] = []

        class Recording:
            def start(self, command: str) -> object:
                proc = local.start(command)
                started.append(proc.pid)
                return proc

        try:
            result = run(Recording(), "ps -o pgid= -p $$", cwd=str(tmp_path))  # type: ignore[arg-type]
        finally:
            local.close()
        assert result.exit_code == 0
        assert int(result.stdout_tail) == started[0]

    def test_where_the_channel_leads_no_group_a_timeout_still_kills_the_whole_command(
        self, tmp_path: Path
    ) -> None:
        from reconciler.transport.local_shell import LocalShell

        local = LocalShell()
        try:
            nested = _Nested(local)
            ok = run(nested, 'printf %s "$V"; echo err >&2; exit 3', env={"V": "a b"})  # type: ignore[arg-type]
            assert (ok.exit_code, ok.stdout_tail, ok.stderr_tail) == (3, "a b", "err\n")
            slow = run(nested, "sleep 3121 & sleep 3122; echo after", timeout_s=0.5)  # type: ignore[arg-type]
            assert slow.timed_out is True
            assert "after" not in slow.stdout_tail
            deadline = time.monotonic() + 10
            while any("sleep 312" in c for c in host_cmdlines()) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not any("sleep 312" in c for c in host_cmdlines())
        finally:
            local.close()

    def test_a_script_cut_short_runs_nothing(self, tmp_path: Path) -> None:
        from reconciler.transport.local_shell import LocalShell

        script = build_script(f"touch {tmp_path}/ran", {"A": "x"}, str(tmp_path))
        local = LocalShell()
        try:
            proc = local.start(BOOTSTRAP)
            proc.write(script[: script.rindex(b"}")])
            proc.close_stdin()
            code = proc.wait(10)
        finally:
            local.close()
        assert code != 0
        assert not (tmp_path / "ran").exists()

    def test_a_command_killed_by_a_signal_exits_with_128_plus_its_number(
        self, shell: SshShell
    ) -> None:
        assert run(shell, "kill -9 $$").exit_code == 137

    def test_a_channel_whose_shell_is_its_pid_namespaces_first_process_still_names_a_group_to_kill(
        self, tmp_path: Path
    ) -> None:
        import re
        import shutil

        from reconciler.transport.local_shell import LocalShell

        if os.geteuid() != 0 or shutil.which("unshare") is None:
            pytest.skip("needs root and unshare for a pid namespace")
        local = LocalShell()
        try:
            # another process in the namespace: `kill -0 -1` would find it
            inner = f"sleep 30 & {BOOTSTRAP}"
            proc = local.start(f"exec unshare --pid --fork --kill-child sh -c {inner!r}")
            proc.write(build_script("echo ran", {}, str(tmp_path)))
            proc.close_stdin()
            assert proc.wait(10) == 0
            err = proc.read_stderr(1 << 16)
        finally:
            local.close()
        found = re.match(rb"__UKC_KILL__ -?([0-9]+)\n", err)
        assert found is not None, err
        assert int(found.group(1)) > 1  # a group or process of its own, never "every process"
