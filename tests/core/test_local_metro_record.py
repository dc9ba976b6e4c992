"""A command finds a running local metro by the record its daemon wrote (metro.json, naming a
live process started for that state dir) and sends it nothing before its first real request;
a record whose daemon is gone, or whose pid is now another process, is not trusted."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.cloud.metros import MetroRegistry
from reconciler.local import daemon
from reconciler.local.ca import CertificateAuthority


@dataclass
class FakeDaemon:
    """A process that looks like the metro daemon of `state_dir` (by its command line) and a
    listener at the address its record names, which nothing ever answers."""

    state_dir: Path
    proc: subprocess.Popen[bytes]
    listener: socket.socket

    def record(self, pid: int) -> None:
        ca = CertificateAuthority.load_or_create(self.state_dir / "ca", "local.test")
        port = self.listener.getsockname()[1]
        meta = {
            "pid": pid,
            "api_url": f"http://127.0.0.1:{port}",
            "ca": str(ca.cert_path),
            "app_domain": "local.test",
            "edge_host": "127.0.0.1",
            "edge_ports": {},
        }
        (self.state_dir / "metro.json").write_text(json.dumps(meta))
        (self.state_dir / "token").write_text("t0ken\n")

    def asked(self) -> bool:
        """Whether anyone connected to the daemon's API address."""
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return False
        conn.close()
        return True


def _daemon_like(state_dir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; time.sleep(120)",
            "reconciler.local",
            "serve",
            "--state-dir",
            str(state_dir),
        ]
    )


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeDaemon]:
    state_dir = (tmp_path / "metro").resolve()
    state_dir.mkdir(mode=0o700)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    proc = _daemon_like(state_dir)
    try:
        yield FakeDaemon(state_dir, proc, listener)
    finally:
        proc.kill()
        proc.wait()
        listener.close()
        found = daemon.running(state_dir)
        if found is not None and found.pid != proc.pid:
            daemon.stop(state_dir)  # a real one, started by a command that asked and waited


def test_a_command_reaches_a_running_local_metro_by_its_record_asking_it_nothing(
    fake: FakeDaemon,
) -> None:
    fake.record(fake.proc.pid)
    registry = MetroRegistry({}, local_state_dir=fake.state_dir)
    try:
        conn = registry.get("local")
        assert conn.local
        assert conn.api.base_url.startswith(f"http://127.0.0.1:{fake.listener.getsockname()[1]}")
        assert not fake.asked(), "the daemon was asked before the command's first request"
    finally:
        registry.close()


def test_a_record_whose_daemon_is_gone_is_not_trusted(fake: FakeDaemon) -> None:
    fake.record(fake.proc.pid)
    fake.proc.kill()
    fake.proc.wait()
    assert daemon.running(fake.state_dir) is None


def test_a_record_whose_pid_is_another_process_is_not_trusted(fake: FakeDaemon) -> None:
    fake.record(fake.proc.pid)
    assert daemon.running(fake.state_dir) is not None
    fake.record(os.getpid())  # alive, and no metro
    assert daemon.running(fake.state_dir) is None


def test_a_record_naming_the_metro_of_another_state_dir_is_not_trusted(
    fake: FakeDaemon, tmp_path: Path
) -> None:
    other = _daemon_like((tmp_path / "elsewhere").resolve())
    try:
        fake.record(other.pid)
        assert daemon.running(fake.state_dir) is None
    finally:
        other.kill()
        other.wait()


def test_a_command_whose_metro_record_names_a_gone_daemon_goes_the_way_that_starts_one(
    fake: FakeDaemon,
) -> None:
    """It does not use the record: it asks, and (none answering) starts a daemon under the
    state dir's lock, here made unusable so that the attempt shows as its error."""
    fake.record(fake.proc.pid)
    fake.proc.kill()
    fake.proc.wait()
    (fake.state_dir / "daemon.lock").mkdir()
    registry = MetroRegistry({}, local_state_dir=fake.state_dir)
    try:
        with pytest.raises(IsADirectoryError):
            registry.get("local")
    finally:
        registry.close()
