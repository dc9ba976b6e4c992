"""The original workflow's client command lines: ssh and rsync through `openssl s_client`
as ProxyCommand, curl through the 443 edge, curl against the platform API."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from reconciler.local.daemon import MetroInfo

__all__ = [
    "SSH_OPTS",
    "curl_api",
    "curl_argv",
    "make_key",
    "proxy_command",
    "rsync_argv",
    "ssh_argv",
]

SSH_OPTS = [
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "ConnectTimeout=10",
    "-o", "BatchMode=yes",
]  # fmt: skip


def proxy_command(edge_port: int, fqdn: str, ca: Path) -> str:
    """The workflow's ProxyCommand, strict: SNI = FQDN, verified against the metro CA."""
    return (
        f"openssl s_client -quiet -verify_return_error -connect 127.0.0.1:{edge_port} "
        f"-servername {fqdn} -CAfile {ca} 2>/dev/null"
    )


def ssh_argv(key: Path, edge_port: int, fqdn: str, ca: Path, *command: str) -> list[str]:
    return [
        "ssh", "-i", str(key), *SSH_OPTS,
        "-o", f"ProxyCommand={proxy_command(edge_port, fqdn, ca)}",
        f"root@{fqdn}", *command,
    ]  # fmt: skip


def rsync_argv(key: Path, edge_port: int, fqdn: str, ca: Path, src: str, dst: str) -> list[str]:
    rsh = " ".join(
        [
            "ssh",
            "-i",
            str(key),
            *SSH_OPTS,
            "-o",
            f"'ProxyCommand={proxy_command(edge_port, fqdn, ca)}'",
        ]
    )
    return ["rsync", "-az", "--delete", "-e", rsh, src, dst]


def curl_argv(ca: Path, edge_port: int, fqdn: str, path: str, *extra: str) -> list[str]:
    return [
        "curl", "-sS", "--max-time", "20", "--cacert", str(ca),
        "--connect-to", f"{fqdn}:443:127.0.0.1:{edge_port}",
        "-o", "-", "-w", "\n%{http_code}", *extra, f"https://{fqdn}{path}",
    ]  # fmt: skip


def make_key(directory: Path) -> Path:
    key = directory / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def curl_api(info: MetroInfo, method: str, path: str, body: object | None = None) -> dict:  # type: ignore[type-arg]
    """A platform API call as the original scripts make it (curl; the token on stdin)."""
    argv = [
        "curl", "-sS", "--fail-with-body", "-X", method,
        "-H", "Content-Type: application/json",
        "-K", "-",  # the token goes through stdin, never argv
    ]  # fmt: skip
    if body is not None:
        argv += ["--data", json.dumps(body)]
    argv.append(f"{info.api_url}{path}")
    config = f'header = "Authorization: Bearer {info.token}"\n'
    proc = subprocess.run(argv, input=config, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)  # type: ignore[no-any-return]
