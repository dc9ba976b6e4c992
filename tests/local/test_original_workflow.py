"""The original workflow's own scripts, step by step, against the local metro daemon.

create-sandbox.sh (curl POST with env.PUBKEY and the 2222/443 service group), sync-to-sandbox.sh
(rsync --delete through an `openssl s_client` ProxyCommand), exec-sandbox.js (POST /exec, no
auth), sync-from-sandbox.sh (rsync back) and delete-sandbox.sh (curl DELETE with a JSON body),
each run with the real client tool. Only the addresses differ from the cloud: the FQDN is
reached at the metro's edge port (`-connect 127.0.0.1:P -servername FQDN`, `curl --connect-to`).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from reconciler.local.daemon import MetroInfo
from tests.support.inproc_metro import unique
from tests.support.workflow import curl_api, curl_argv, make_key, rsync_argv

pytestmark = pytest.mark.metro


def test_the_original_scripts_work_unchanged_against_the_local_metro(
    daemon: MetroInfo, tmp_path: Path
) -> None:
    name = unique("sandbox")
    key = make_key(tmp_path)
    pubkey = key.with_suffix(".pub").read_text().strip()

    # create-sandbox.sh: the name must be free, then POST exactly the workflow's body.
    listed = curl_api(daemon, "GET", "/v1/instances")
    assert name not in [i["name"] for i in listed["data"]["instances"]]
    created = curl_api(
        daemon,
        "POST",
        "/v1/instances",
        {
            "name": name,
            "image": "ukc/local-minimal:latest",
            "memory_mb": 4096,
            "env": {"PUBKEY": pubkey},
            "service_group": {
                "services": [
                    {"port": 2222, "destination_port": 2222, "handlers": ["tls"]},
                    {"port": 443, "destination_port": 8080, "handlers": ["tls", "http"]},
                ]
            },
            "scale_to_zero": {"policy": "on", "stateful": True, "cooldown_time_ms": 5000},
            "autostart": True,
        },
    )
    assert created["status"] == "success"
    fqdn = created["data"]["instances"][0]["service_group"]["domains"][0]["fqdn"]
    ca, p2222, p443 = daemon.ca_path, daemon.edge_ports[2222], daemon.edge_ports[443]

    # sync-to-sandbox.sh: rsync -az --delete into /workspace (retrying while it boots, as the
    # workflow's "connection refused: retry after a few seconds" says).
    src = tmp_path / "session"
    (src / "pkg").mkdir(parents=True)
    # why a shell script: the minimal image, like a standard Debian one, has no python3
    (src / "pkg" / "main.sh").write_text("echo 'hi from the sandbox'\n")
    (src / "data.txt").write_text("1 2 3\n")
    argv = rsync_argv(key, p2222, fqdn, ca, f"{src}/", f"root@{fqdn}:/workspace/")
    for _ in range(20):
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode == 0:
            break
        time.sleep(0.5)
    assert proc.returncode == 0, proc.stderr
    (src / "data.txt").unlink()
    subprocess.run(argv, check=True, capture_output=True)  # --delete removes it remotely

    # exec-sandbox.js: POST https://FQDN/exec {"cmd": ...}, no Authorization header.
    def exec_(cmd: str) -> tuple[dict, int]:  # type: ignore[type-arg]
        out = subprocess.run(
            curl_argv(ca, p443, fqdn, "/exec", "-X", "POST", "-H", "Content-Type: application/json",
                      "--data", json.dumps({"cmd": cmd})),
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        body, _, code = out.rpartition("\n")
        return json.loads(body), int(code)

    body, code = exec_("cd /workspace && ls && sh pkg/main.sh > out.txt && cat out.txt")
    assert code == 200 and body["code"] == 0
    assert body["stdout"] == "pkg\nhi from the sandbox\n"
    body, code = exec_("echo oops >&2; exit 7")
    assert (code, body["code"], body["stderr"]) == (200, 7, "oops\n")

    # sync-from-sandbox.sh: rsync back, no --delete.
    back = tmp_path / "back"
    back.mkdir()
    (back / "local-only.txt").write_text("kept\n")
    pull = rsync_argv(key, p2222, fqdn, ca, f"root@{fqdn}:/workspace/", f"{back}/")
    pull.remove("--delete") if "--delete" in pull else None
    subprocess.run(pull, check=True, capture_output=True)
    assert (back / "out.txt").read_text() == "hi from the sandbox\n"
    assert (back / "local-only.txt").exists()
    assert not (back / "data.txt").exists()

    # delete-sandbox.sh: curl --fail -X DELETE with [{"name": ...}]
    deleted = curl_api(daemon, "DELETE", "/v1/instances", [{"name": name}])
    assert deleted["data"]["instances"][0]["status"] == "success"
    # deletes are asynchronous and the account retains deleted instances: it is `deleted`
    gone = curl_api(daemon, "GET", "/v1/instances")
    assert [i["state"] for i in gone["data"]["instances"] if i["name"] == name] == ["deleted"]
