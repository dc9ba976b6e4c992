"""`SshShell`, `wait_ssh_ready` and `generate_keypair` against a real sshd behind TLS."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import paramiko
import pytest

from reconciler.errors import KeyRejectedError, RemoteError, SandboxNotReadyError
from reconciler.transport.keys import generate_keypair
from reconciler.transport.sshclient import (
    KEY_RETRY_STEP_S,
    SshShell,
    _accepted_on_a_grid,
    wait_ssh_ready,
)
from reconciler.transport.tls import Dialer
from tests.support.tls_sshd import (
    FQDN,
    CaFiles,
    Sshd,
    TlsForwarder,
    dialer_to,
    free_port,
    running_sshd,
)


def connect(dialer: Dialer, sshd: Sshd, **kw: object) -> SshShell:
    return SshShell.connect(dialer, FQDN, key_path=sshd.client_key, user=sshd.user, **kw)  # type: ignore[arg-type]


def run(shell: SshShell, command: str, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    proc = shell.start(command)
    out, err = bytearray(), bytearray()

    def drain_err() -> None:
        while data := proc.read_stderr():
            err.extend(data)

    t = threading.Thread(target=drain_err)
    t.start()
    if stdin:
        proc.write(stdin)
    proc.close_stdin()
    while data := proc.read():
        out.extend(data)
    t.join(30)
    return proc.wait(30), bytes(out), bytes(err)


class TestKeypair:
    def test_the_private_key_is_0600_and_the_public_line_is_openssh(self, tmp_path: Path) -> None:
        path = tmp_path / "k"
        line = generate_keypair(path, "sess-1")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        kind, blob, comment = line.split(" ")
        assert (kind, comment) == ("ssh-ed25519", "sess-1")
        assert blob.startswith("AAAA")
        loaded = paramiko.PKey.from_path(path)
        assert loaded.get_base64() == blob

    def test_an_existing_key_file_is_never_overwritten(self, tmp_path: Path) -> None:
        path = tmp_path / "k"
        path.write_text("keep me")
        with pytest.raises(FileExistsError):
            generate_keypair(path)
        assert path.read_text() == "keep me"

    def test_the_file_is_private_even_with_a_permissive_umask(self, tmp_path: Path) -> None:
        old = os.umask(0)
        try:
            generate_keypair(tmp_path / "k")
        finally:
            os.umask(old)
        assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600


class TestShell:
    def test_exit_codes_and_both_streams_come_back(self, dialer: Dialer, sshd: Sshd) -> None:
        with connect(dialer, sshd) as shell:
            assert run(shell, "echo out; echo err >&2; exit 3") == (3, b"out\n", b"err\n")
            assert run(shell, "true")[0] == 0
            assert shell.bytes_in >= 8

    def test_the_host_key_fingerprint_is_the_one_ssh_keygen_shows(
        self, dialer: Dialer, sshd: Sshd
    ) -> None:
        shown = subprocess.run(
            ["ssh-keygen", "-l", "-f", str(sshd.host_key_path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()[1]
        with connect(dialer, sshd) as shell:
            assert shell.host_key_fingerprint == shown

    def test_an_unexpected_host_key_is_an_error(self, dialer: Dialer, sshd: Sshd) -> None:
        with pytest.raises(RemoteError, match=r"host key SHA256:.* differs") as err:
            connect(dialer, sshd, expected_host_key="SHA256:not-this-one")
        assert err.value.retryable is False

    def test_a_key_the_server_does_not_know_is_rejected_for_good(
        self, dialer: Dialer, sshd: Sshd, tmp_path: Path
    ) -> None:
        generate_keypair(tmp_path / "stranger")
        with pytest.raises(RemoteError, match="public key of stranger rejected") as err:
            SshShell.connect(dialer, FQDN, key_path=tmp_path / "stranger", user=sshd.user)
        assert err.value.retryable is False

    def test_stdin_reaches_the_process(self, dialer: Dialer, sshd: Sshd) -> None:
        with connect(dialer, sshd) as shell:
            assert run(shell, "wc -c", b"x" * 100_000)[1].strip() == b"100000"

    def test_wait_with_a_timeout_raises_timeout_error_and_kill_is_idempotent(
        self, dialer: Dialer, sshd: Sshd
    ) -> None:
        with connect(dialer, sshd) as shell:
            proc = shell.start("sleep 5")
            with pytest.raises(TimeoutError):
                proc.wait(0.2)
            proc.kill()
            proc.kill()

    def test_8_mib_round_trips_through_the_bridge_20_times(
        self, dialer: Dialer, sshd: Sshd
    ) -> None:
        payload = random.Random(1).randbytes(8 * 1024 * 1024)
        for _ in range(20):
            with connect(dialer, sshd) as shell:
                code, out, _ = run(shell, "cat", payload)
                assert code == 0
                assert out == payload
        assert not [t for t in threading.enumerate() if t.name == "tls-bridge"]


class TestWaitReady:
    def test_a_refused_then_accepted_connection_is_a_wake_up(
        self, test_ca: CaFiles, sshd: Sshd
    ) -> None:
        port = free_port()
        late = TlsForwarder(test_ca, sshd.port, port=port)
        timer = threading.Timer(0.8, late.start)
        timer.start()
        try:
            started = time.monotonic()
            shell = wait_ssh_ready(
                dialer_to(test_ca, port),
                FQDN,
                key_path=sshd.client_key,
                user=sshd.user,
                deadline_s=20,
            )
            with shell:
                assert time.monotonic() - started >= 0.7
                assert run(shell, "echo up")[1] == b"up\n"
        finally:
            timer.join()
            late.stop()

    def test_the_deadline_gives_sandbox_not_ready_naming_fqdn_seconds_and_attempts(
        self, test_ca: CaFiles, sshd: Sshd
    ) -> None:
        now = [0.0]
        sleeps: list[float] = []

        def sleep(s: float) -> None:
            sleeps.append(s)
            now[0] += s

        with pytest.raises(
            SandboxNotReadyError, match=r"box1.sbx.test .* within 3 s \((\d+) attempts"
        ) as err:
            wait_ssh_ready(
                dialer_to(test_ca, free_port()),
                FQDN,
                key_path=sshd.client_key,
                deadline_s=3,
                sleep=sleep,
                monotonic=lambda: now[0],
                rng=random.Random(0),
            )
        assert "connect failed" in str(err.value)
        assert sum(sleeps) <= 3
        assert len(sleeps) >= 3
        assert isinstance(err.value, TimeoutError)

    def test_an_edge_that_hangs_up_is_retried_like_a_refusal(
        self, test_ca: CaFiles, sshd: Sshd
    ) -> None:
        fwd = TlsForwarder(test_ca, free_port()).start()  # TLS accepted, no sshd behind it
        now = [0.0]
        try:
            with pytest.raises(SandboxNotReadyError, match="handshake failed"):
                wait_ssh_ready(
                    dialer_to(test_ca, fwd.port),
                    FQDN,
                    key_path=sshd.client_key,
                    deadline_s=1,
                    sleep=lambda s: now.__setitem__(0, now[0] + s),
                    monotonic=lambda: now[0],
                )
            assert fwd.connections >= 2
        finally:
            fwd.stop()


class TestKeyGrace:
    def test_a_key_installed_after_sshd_listens_is_waited_for(
        self, dialer: Dialer, sshd: Sshd, tmp_path: Path
    ) -> None:
        late_key = tmp_path / "late"
        line = generate_keypair(late_key, "late")
        authorized = sshd.client_key.parent / "authorized_keys"
        before = authorized.read_text()
        timer = threading.Timer(1.0, lambda: authorized.write_text(before + line + "\n"))
        timer.start()
        try:
            started = time.monotonic()
            with wait_ssh_ready(
                dialer, FQDN, key_path=late_key, user=sshd.user, deadline_s=20
            ) as shell:
                assert time.monotonic() - started >= 0.9
                assert run(shell, "echo in")[1] == b"in\n"
        finally:
            timer.join()
            authorized.write_text(before)

    def test_a_key_installed_while_connected_is_accepted_on_that_same_connection(
        self, test_ca: CaFiles, sshd: Sshd, tmp_path: Path
    ) -> None:
        """A rejection while the image may still be installing the key is tried again on the
        connection it came on: no new sshd process, TLS and SSH handshake per try."""
        late_key = tmp_path / "late"
        line = generate_keypair(late_key, "late")
        authorized = sshd.client_key.parent / "authorized_keys"
        before = authorized.read_text()
        fwd = TlsForwarder(test_ca, sshd.port).start()
        waits: list[float] = []

        def sleep(s: float) -> None:
            if not waits:  # the first wait follows the first rejection: install the key now
                authorized.write_text(before + line + "\n")
            waits.append(s)
            time.sleep(s)

        try:
            with wait_ssh_ready(
                dialer_to(test_ca, fwd.port),
                FQDN,
                key_path=late_key,
                user=sshd.user,
                deadline_s=20,
                sleep=sleep,
            ) as shell:
                assert run(shell, "echo in")[1] == b"in\n"
            assert waits, "the key was accepted at once: nothing was retried"
            assert fwd.connections == 1, f"{fwd.connections} connections for one late key"
        finally:
            authorized.write_text(before)
            fwd.stop()

    def test_a_key_still_rejected_after_the_grace_is_a_key_rejected_error(
        self, dialer: Dialer, sshd: Sshd, tmp_path: Path
    ) -> None:
        generate_keypair(tmp_path / "stranger")
        now = [0.0]

        def sleep(s: float) -> None:
            now[0] += s

        with pytest.raises(KeyRejectedError, match="public key of stranger rejected") as err:
            wait_ssh_ready(
                dialer,
                FQDN,
                key_path=tmp_path / "stranger",
                user=sshd.user,
                deadline_s=60,
                auth_grace_s=5,
                sleep=sleep,
                monotonic=lambda: now[0],
            )
        assert err.value.retryable is False
        assert 5 <= now[0] < 10, "rejected keys were retried past the grace, or not at all"
        assert "still" in str(err.value)

    def test_a_server_allowing_fewer_key_tries_than_ours_still_ends_in_a_key_rejection(
        self, test_ca: CaFiles, tmp_path: Path
    ) -> None:
        """An image's sshd may cut the connection after fewer rejections than ukc retries on
        it: that is still a rejected key (after the grace), not a sandbox that never came up."""
        generate_keypair(tmp_path / "stranger")
        (tmp_path / "strict").mkdir()
        now = [0.0]

        def sleep(s: float) -> None:
            now[0] += s

        with running_sshd(tmp_path / "strict", extra_config="MaxAuthTries 2\n") as strict:
            fwd = TlsForwarder(test_ca, strict.port).start()
            try:
                with pytest.raises(KeyRejectedError, match="public key of stranger") as err:
                    wait_ssh_ready(
                        dialer_to(test_ca, fwd.port),
                        FQDN,
                        key_path=tmp_path / "stranger",
                        user=strict.user,
                        deadline_s=60,
                        auth_grace_s=5,
                        sleep=sleep,
                        monotonic=lambda: now[0],
                    )
            finally:
                fwd.stop()
        assert err.value.retryable is False
        assert 5 <= now[0] < 10, "rejections were taken for a sandbox still starting"


class FakeKeyedServer:
    """A server whose key becomes valid at `valid_from` on a fake clock, each of whose
    answers takes `answer_s` (sshd's failure delay); records when each try began."""

    def __init__(self, valid_from: float, answer_s: float) -> None:
        self.now = 0.0
        self.valid_from = valid_from
        self.answer_s = answer_s
        self.began: list[float] = []

    def sleep(self, s: float) -> None:
        assert s >= 0
        self.now += s

    def monotonic(self) -> float:
        return self.now

    def attempt(self) -> bool:
        self.began.append(self.now)
        valid = self.now >= self.valid_from
        self.now += self.answer_s
        return valid


class TestKeyRetryGrid:
    def test_a_key_valid_from_a_known_time_is_accepted_by_the_first_try_a_step_after_it(
        self,
    ) -> None:
        """The tries keep their step from one start to the next: the answers' own time
        (10 ms each here) does not push each later try further back."""
        server = FakeKeyedServer(valid_from=0.25, answer_s=0.01)
        assert _accepted_on_a_grid(
            server.attempt, 5, sleep=server.sleep, monotonic=server.monotonic
        )
        assert server.began == pytest.approx([0.0, 0.1, 0.2, 0.3])
        assert server.now == pytest.approx(0.31)

    def test_tries_never_begin_closer_than_a_step_nor_more_often_than_allowed(self) -> None:
        server = FakeKeyedServer(valid_from=99.0, answer_s=0.003)
        assert not _accepted_on_a_grid(
            server.attempt, 5, sleep=server.sleep, monotonic=server.monotonic
        )
        assert len(server.began) == 5
        gaps = [b - a for a, b in zip(server.began, server.began[1:], strict=False)]
        assert min(gaps) >= KEY_RETRY_STEP_S - 1e-9

    def test_a_try_answered_later_than_a_step_is_followed_at_once(self) -> None:
        """A slow answer (a distant sandbox) is no reason to wait a further step."""
        server = FakeKeyedServer(valid_from=0.3, answer_s=0.15)
        assert _accepted_on_a_grid(
            server.attempt, 5, sleep=server.sleep, monotonic=server.monotonic
        )
        assert server.began == pytest.approx([0.0, 0.15, 0.3])


class TestHangUpAfterKex:
    def test_a_server_that_hangs_up_right_after_the_key_exchange_is_retried_not_a_crash(
        self, test_ca: CaFiles, tmp_path: Path
    ) -> None:
        """An sshd still starting (or over its start-up limit) may end the session right
        after the key exchange: that is a booting sandbox, never an unmapped paramiko error."""
        host_key = paramiko.RSAKey.generate(2048)

        class Silent(paramiko.ServerInterface):
            """Never answers an authentication: it hangs up first."""

            def get_allowed_auths(self, username: str) -> str:
                time.sleep(1.0)
                return "publickey"

            def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
                time.sleep(1.0)
                return paramiko.AUTH_FAILED

        listener = socket.create_server(("127.0.0.1", 0))
        stop = threading.Event()

        def serve() -> None:
            listener.settimeout(0.2)
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                t = paramiko.Transport(conn)
                t.add_server_key(host_key)
                with contextlib.suppress(Exception):
                    t.start_server(server=Silent())
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                t.close()
                conn.close()

        client_key = tmp_path / "client"
        generate_keypair(client_key)
        server = threading.Thread(target=serve, daemon=True)
        server.start()
        front = TlsForwarder(test_ca, listener.getsockname()[1]).start()
        try:
            with pytest.raises(SandboxNotReadyError):
                wait_ssh_ready(
                    dialer_to(test_ca, front.port),
                    FQDN,
                    key_path=client_key,
                    deadline_s=4,
                    auth_grace_s=0,
                    connect_timeout=0.5,
                )
            assert front.connections >= 3
        finally:
            stop.set()
            server.join(5)
            front.stop()
            listener.close()
