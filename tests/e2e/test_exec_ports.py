"""Public ports follow `exec`, end to end: older instances keep working and are named in a
warning, a changed `exec` replaces the instance, and `ukc plan` says what `exec: http` means."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.support.ukc import Ukc

pytestmark = pytest.mark.metro

SPEC = """\
name: ports
directory: ./work
commands:
  - name: build
    run: mkdir -p out && tr a-z A-Z < input.txt > out/upper.txt
sync:
  back: ["out/"]
"""


def _project(ukc: Ukc, spec: str = SPEC) -> None:
    (ukc.project / "work").mkdir()
    (ukc.project / "work" / "input.txt").write_text("hello\n")
    ukc.write_spec(spec)


def _instance(ukc: Ukc) -> dict[str, Any]:
    (inst,) = [i for i in ukc.instances() if i["name"].endswith("-ports")]
    return inst


def _ports(inst: dict[str, Any]) -> list[int]:
    return [s["port"] for s in inst["service_group"]["services"]]


def _older_ukcs_instance(ukc: Ukc, like: dict[str, Any]) -> str:
    """Replace `like` by what an older ukc created: same name, key and owner tags, no
    `ukc.exec` tag, and both 2222 and 443."""
    pubkey = (ukc.project / ".ukc" / "keys" / "ports.pub").read_text().strip()
    with ukc.api() as api:
        # without retention, so the name comes free (the DELETE answers once it has)
        gone = [{"name": like["name"], "timeout_s": 30, "dont_retain": True}]
        api.request("DELETE", "/v1/instances", json=gone)
        deadline = time.monotonic() + 60
        while like["name"] in [i["name"] for i in ukc.instances()]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        body = {
            "name": like["name"],
            "image": like["image"],
            "env": {"PUBKEY": pubkey},
            "tags": [t for t in like["tags"] if not t.startswith("ukc.exec=")],
            "service_group": {
                "services": [
                    {"port": 2222, "destination_port": 2222, "handlers": ["tls"]},
                    {"port": 443, "destination_port": 8080, "handlers": ["tls", "http"]},
                ]
            },
            "scale_to_zero": {"policy": "on", "stateful": True, "cooldown_time_ms": 5000},
            "autostart": True,
            "timeout_s": 60,
        }
        created = api.post("/v1/instances", json=body).json()
    (item,) = created["data"]["instances"]
    assert item["state"] == "running", created
    return str(item["uuid"])


def test_an_instance_made_by_an_older_ukc_keeps_serving_its_ssh_session_with_a_warning(
    ukc: Ukc,
) -> None:
    _project(ukc)
    ukc.run("apply", ".", check=0)
    inst = _instance(ukc)
    assert _ports(inst) == [2222] and "ukc.exec=ssh" in inst["tags"]
    old_uuid = _older_ukcs_instance(ukc, inst)
    assert _ports(_instance(ukc)) == [2222, 443]

    plan = json.loads(ukc.run("plan", ".", "--output", "json", check=0).stdout)
    (group,) = plan["groups"]
    (entry,) = group["sessions"]
    kinds = [a["type"] for a in entry["actions"]]
    assert entry["name"] == "ports" and entry["verdict"] == "update"
    assert "delete_instance" not in kinds and "create_instance" not in kinds
    (warning,) = group["warnings"]
    assert f"{inst['name']} was created by an older ukc" in warning

    (ukc.project / "work" / "input.txt").write_text("again\n")
    applied = ukc.run("apply", ".", check=0)
    assert f"warning: session ports: instance {inst['name']} was created" in applied.stderr
    assert _instance(ukc)["uuid"] == old_uuid
    assert (ukc.project / "work" / "out" / "upper.txt").read_text() == "AGAIN\n"


def test_switching_to_exec_http_replaces_the_instance_with_one_that_publishes_443(
    ukc: Ukc,
) -> None:
    _project(ukc)
    ukc.run("apply", ".", check=0)
    first = _instance(ukc)
    ukc.write_spec(SPEC + "exec: http\n")
    (ukc.project / "work" / "input.txt").write_text("over http\n")

    plan = ukc.run("plan", ".", check=0).stdout
    assert "exec changed from ssh to http (its public ports)" in plan
    assert "warning: session ports: exec: http runs commands through the image's" in plan
    assert "anyone who knows the instance's FQDN" in plan

    ukc.run("apply", ".", check=0)
    second = _instance(ukc)
    assert second["uuid"] != first["uuid"]
    assert _ports(second) == [2222, 443] and "ukc.exec=http" in second["tags"]
    assert (ukc.project / "work" / "out" / "upper.txt").read_text() == "OVER HTTP\n"


def test_plan_of_an_ssh_session_warns_about_nothing(ukc: Ukc) -> None:
    _project(ukc)
    out = ukc.run("plan", ".", "--output", "json", check=0)
    (group,) = json.loads(out.stdout)["groups"]
    assert group["warnings"] == []
