"""A one-shot apply's prefetch greets the helper it started (`loop._Greetings`): the push then
reads that answer instead of asking, and an answer no push read is read and dropped before the
apply lets go of its status lock, never used by a later push."""

from __future__ import annotations

import shutil

from reconciler.reconcile.loop import _Greetings
from reconciler.sync.engine import push
from tests.support.countingshell import CountingShell
from tests.support.synctree import Site, snapshot, write


def test_a_push_after_a_prefetchs_greeting_reads_its_answer_and_says_no_hello_of_its_own(
    site: Site,
) -> None:
    shell = CountingShell()
    write(site.local / "a.txt", "a")
    push(shell, site.opts(), instance_uuid="u1")
    greetings = _Greetings()
    write(site.local / "a.txt", "edited")
    greetings.greet(shell, site.opts(), "u1")
    assert shell.hellos == 2
    assert push(shell, site.opts(), instance_uuid="u1").files_sent == 1
    assert shell.hellos == 2
    greetings.close()  # the push read it: nothing to read
    assert snapshot(site.remote) == snapshot(site.local)
    write(site.local / "b.txt", "b")
    assert push(shell, site.opts(), instance_uuid="u1").files_sent == 1
    assert shell.hellos == 3
    shell.close()


def test_a_prefetchs_greeting_no_push_read_is_dropped_at_close_and_the_next_push_asks(
    site: Site,
) -> None:
    # the sandbox changes after the apply ended: a push that trusted the old answer would
    # write into the deleted root and say it succeeded
    shell = CountingShell()
    write(site.local / "a.txt", "a")
    push(shell, site.opts(), instance_uuid="u1")
    greetings = _Greetings()
    greetings.greet(shell, site.opts(), "u1")
    greetings.close()
    shutil.rmtree(site.remote)
    site.remote.mkdir()
    write(site.local / "b.txt", "b")
    assert push(shell, site.opts(), instance_uuid="u1").files_sent == 1
    assert (site.remote / "b.txt").read_text() == "b"
    assert shell.hellos == 3
    shell.close()


def test_no_greeting_is_sent_once_the_apply_closed_them(site: Site) -> None:
    shell = CountingShell()
    write(site.local / "a.txt", "a")
    push(shell, site.opts(), instance_uuid="u1")
    greetings = _Greetings()
    greetings.close()
    greetings.greet(shell, site.opts(), "u1")
    assert shell.hellos == 1
    shell.close()
