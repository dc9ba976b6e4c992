"""Suite-wide settings.

In CI, Hypothesis runs derandomized (the same examples every run) and without per-example
deadlines: a property that fails must fail on every run of the same commit, not by luck on a
busy 2-core machine. Locally it explores new examples each run; a failure found there is kept
in `.hypothesis/` and should become a named regression test.

The throwaway CA, TLS front and sshd (`tests.support.tls_sshd`) are session fixtures here,
started only for the tests that ask for them.

Every `ukc` process a test starts uses this test session's own warm process (in a private
temp dir), stopped when the session ends: nothing from a user's warm process leaks in, and none
outlives the suite.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from reconciler.cli import warm
from reconciler.transport.tls import Dialer
from tests.support.tls_sshd import (
    CaFiles,
    Sshd,
    TlsForwarder,
    dialer_to,
    make_ca,
    running_sshd,
)

settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session", autouse=True)
def warm_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("warm")
    path.chmod(0o700)
    before = os.environ.get("UKC_WARM_DIR")
    os.environ["UKC_WARM_DIR"] = str(path)
    try:
        yield path
    finally:
        for sock in path.glob("warm-*.sock"):
            warm.request_stop(sock)
        if before is None:
            os.environ.pop("UKC_WARM_DIR", None)
        else:
            os.environ["UKC_WARM_DIR"] = before


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> CaFiles:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    if shutil.which("sshd") is None and not Path("/usr/sbin/sshd").exists():
        pytest.skip("openssh-server is not installed")
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture(scope="session")
def ssh_front(test_ca: CaFiles, sshd: Sshd) -> Iterator[TlsForwarder]:
    fwd = TlsForwarder(test_ca, sshd.port).start()
    yield fwd
    fwd.stop()


@pytest.fixture
def dialer(test_ca: CaFiles, ssh_front: TlsForwarder) -> Dialer:
    return dialer_to(test_ca, ssh_front.port)
