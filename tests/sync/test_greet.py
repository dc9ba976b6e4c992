"""A watch pass greets the kept sync helper ahead of its push (`engine.greet`): the push then
reads that answer instead of asking, and an answer no push read is never used by a later one."""

from __future__ import annotations

import shutil

from reconciler.sync.engine import greet, push, ungreet
from reconciler.transport.local_shell import LocalProcess, LocalShell
from tests.support.synctree import Site, snapshot, write


class _CountingProcess:
    """A helper process whose input is counted: how many hellos it was sent."""

    def __init__(self, proc: LocalProcess, shell: CountingShell) -> None:
        self._proc = proc
        self._shell = shell

    def write(self, data: bytes) -> None:
        self._shell.hellos += bytes(data).count(b'"op":"hello"')
        self._proc.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._proc, name)


class CountingShell(LocalShell):
    def __init__(self) -> None:
        super().__init__()
        self.hellos = 0

    def start(self, command: str) -> LocalProcess:
        return _CountingProcess(super().start(command), self)  # type: ignore[return-value]


def test_a_push_after_a_greeting_reads_its_answer_and_says_no_hello_of_its_own(
    site: Site,
) -> None:
    shell = CountingShell()
    write(site.local / "a.txt", "a")
    push(shell, site.opts(), instance_uuid="u1")
    assert shell.hellos == 1
    write(site.local / "a.txt", "edited")
    assert greet(shell, site.opts(), "u1") is True
    assert shell.hellos == 2
    assert push(shell, site.opts(), instance_uuid="u1").files_sent == 1
    assert shell.hellos == 2
    assert len(shell.started) == 1
    assert snapshot(site.remote) == snapshot(site.local)
    shell.close()


def test_nothing_is_greeted_before_a_first_push_left_a_helper(site: Site) -> None:
    shell = CountingShell()
    assert greet(shell, site.opts(), "u1") is False
    assert (shell.hellos, shell.started) == (0, [])


def test_a_greeting_no_push_read_is_not_used_by_the_next_push(site: Site) -> None:
    # the greeted helper opened the root; a command then replaced the whole root. A push
    # that trusted the old answer would write into the deleted directory and say it succeeded
    shell = CountingShell()
    write(site.local / "a.txt", "a")
    push(shell, site.opts(), instance_uuid="u1")
    assert greet(shell, site.opts(), "u1") is True
    ungreet(shell)  # the pass ended without a push
    shutil.rmtree(site.remote)
    site.remote.mkdir()
    write(site.local / "b.txt", "b")
    assert push(shell, site.opts(), instance_uuid="u1").files_sent == 1
    assert (site.remote / "b.txt").read_text() == "b"
    assert shell.hellos == 3
    shell.close()


def test_a_greeting_to_a_helper_that_died_is_refused_and_the_push_starts_another(
    site: Site,
) -> None:
    shell = CountingShell()
    write(site.local / "a.txt", "a")
    push(shell, site.opts(), instance_uuid="u1")
    shell._procs[-1].kill()
    assert greet(shell, site.opts(), "u1") is False
    write(site.local / "b.txt", "b")
    assert push(shell, site.opts(), instance_uuid="u1").files_sent == 1
    assert len(shell.started) == 2
    assert snapshot(site.remote) == snapshot(site.local)
    shell.close()


def test_a_greeting_with_other_sync_options_is_refused(site: Site) -> None:
    shell = CountingShell()
    write(site.local / "a.txt", "a")
    push(shell, site.opts(), instance_uuid="u1")
    assert greet(shell, site.opts(write_threads=4), "u1") is False
    assert shell.hellos == 1
    shell.close()
