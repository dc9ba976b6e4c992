"""Volumes on the local metro as on UKC: `/v1/volumes`, attach at create, cold boots, deletes.

The API shape and the refusals are checked on the in-process metro (fake runtime); what a
volume keeps across a cold boot, in real sandboxes of the session's daemon.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.local import daemon as metro_daemon
from reconciler.local.daemon import MetroInfo
from reconciler.local.sandbox import volumefs
from tests.support.inproc_metro import InProcessMetro, unique

IMAGE = "ukc/local-sandbox:latest"
SANDBOX_PLUGIN = [{"name": "sandbox", "image": "plugins/sandbox:latest"}]


def new_volume(api: httpx.Client, **body: Any) -> dict[str, Any]:
    body.setdefault("name", unique("vol"))
    body.setdefault("size_mb", 64)
    r = api.post("/v1/volumes", json=body)
    assert r.status_code == 200, r.text
    item: dict[str, Any] = r.json()["data"]["volumes"][0]
    assert item["status"] == "success", item
    return item


def volume(api: httpx.Client, ref: str) -> dict[str, Any]:
    r = api.get("/v1/volumes", params={"name": ref})
    item: dict[str, Any] = r.json()["data"]["volumes"][0]
    return item


def create(api: httpx.Client, **body: Any) -> httpx.Response:
    body.setdefault("name", unique())
    body.setdefault("image", IMAGE)
    return api.post("/v1/instances", json=body)


def instance(api: httpx.Client, name: str) -> dict[str, Any]:
    r = api.get("/v1/instances", params={"name": name})
    item: dict[str, Any] = r.json()["data"]["instances"][0]
    return item


def delete_instance(api: httpx.Client, name: str) -> None:
    r = api.request("DELETE", "/v1/instances", json=[{"name": name, "timeout_s": 30}])
    assert r.status_code == 200, r.text


class TestVolumeApi:
    def test_a_volume_is_created_listed_read_by_uuid_and_deleted(
        self, inproc: InProcessMetro
    ) -> None:
        with inproc.client() as api:
            made = new_volume(api, size_mb=100, tags=["team"])
            listed = api.get("/v1/volumes", params={"tags": "team"}).json()
            assert [v["uuid"] for v in listed["data"]["volumes"]] == [made["uuid"]]
            got = api.get(f"/v1/volumes/{made['uuid']}").json()["data"]["volumes"][0]
            assert got["state"] == "available"
            assert got["size_mb"] == 100
            assert got["persistent"] is True
            assert got["attached_to"] == []
            r = api.request("DELETE", "/v1/volumes", json=[{"uuid": made["uuid"]}])
            assert r.json()["status"] == "success"
            gone = api.get(f"/v1/volumes/{made['uuid']}").json()
            assert gone["status"] == "error"
            assert gone["data"]["volumes"][0]["error"] == 8

    def test_a_taken_volume_name_is_refused_with_code_23(self, inproc: InProcessMetro) -> None:
        with inproc.client() as api:
            made = new_volume(api)
            r = api.post("/v1/volumes", json={"name": made["name"], "size_mb": 8})
            assert r.status_code == 200
            assert r.json()["data"]["volumes"][0]["error"] == 23

    @pytest.mark.parametrize(
        "body",
        [
            {"size_mb": "big"},
            {"name": "Not_A_Label", "size_mb": 8},
            {"size_mb": 8, "tags": "x"},
        ],
    )
    def test_a_malformed_volume_create_is_a_400(
        self, inproc: InProcessMetro, body: dict[str, Any]
    ) -> None:
        with inproc.client() as api:
            r = api.post("/v1/volumes", json=body)
            assert r.status_code == 400, r.text
            assert r.json()["status"] == "error"

    def test_a_volume_beyond_the_size_quota_is_refused_with_code_19(
        self, inproc: InProcessMetro
    ) -> None:
        with inproc.client() as api:
            r = api.post("/v1/volumes", json={"size_mb": 10**9})
            assert r.json()["data"]["volumes"][0]["error"] == 19


class TestAttachAtCreate:
    def test_an_existing_volume_is_attached_with_its_mount_point_and_reported_on_both_sides(
        self, inproc: InProcessMetro
    ) -> None:
        with inproc.client() as api:
            vol = new_volume(api)
            name = unique()
            r = create(
                api,
                name=name,
                volumes=[{"name": vol["name"], "at": "/workspace"}],
                autostart=True,
                timeout_s=10,
            )
            assert r.json()["status"] == "success", r.text
            inst = instance(api, name)
            assert inst["volumes"] == [
                {"uuid": vol["uuid"], "name": vol["name"], "at": "/workspace", "readonly": False}
            ]
            seen = volume(api, vol["name"])
            assert seen["state"] == "mounted"
            assert seen["attached_to"] == [{"uuid": inst["uuid"], "name": name}]
            mounts = inproc.runtime.mounts[inst["uuid"]]
            assert [(m.at, m.source.name) for m in mounts] == [("/workspace", vol["uuid"])]

    def test_a_volume_attached_to_one_instance_cannot_be_attached_to_another_or_deleted(
        self, inproc: InProcessMetro
    ) -> None:
        with inproc.client() as api:
            vol = new_volume(api)
            assert (
                create(api, volumes=[{"uuid": vol["uuid"], "at": "/data"}]).json()["status"]
                == "success"
            )
            second = unique()
            r = create(api, name=second, volumes=[{"uuid": vol["uuid"], "at": "/data"}])
            assert r.json()["data"]["instances"][0]["error"] == 24
            # why: the refused create must not have taken the name
            assert instance(api, second)["error"] == 8
            r = api.request("DELETE", "/v1/volumes", json=[{"name": vol["name"]}])
            assert r.json()["data"]["volumes"][0]["error"] == 24
            assert volume(api, vol["name"])["status"] == "success"

    def test_a_separate_volume_outlives_its_instance_and_an_inline_one_goes_with_it(
        self, inproc: InProcessMetro
    ) -> None:
        with inproc.client() as api:
            kept = new_volume(api)
            name = unique()
            r = create(
                api,
                name=name,
                volumes=[
                    {"name": kept["name"], "at": "/workspace"},
                    {"size_mb": 32, "at": "/cache"},
                ],
            )
            assert r.json()["status"] == "success", r.text
            inline = instance(api, name)["volumes"][1]
            assert volume(api, inline["name"])["persistent"] is False
            delete_instance(api, name)
            inproc.call(inproc.metro.wait_for(lambda: not inproc.metro.records, 10))
            left = volume(api, kept["name"])
            assert left["state"] == "available"
            assert left["attached_to"] == []
            assert volume(api, inline["name"])["error"] == 8
            removed = [p.name for p in inproc.runtime.removed_volumes]
            assert removed == [inline["uuid"]]
            # the kept one can be attached again
            again = create(api, volumes=[{"name": kept["name"], "at": "/workspace"}])
            assert again.json()["status"] == "success", again.text

    @pytest.mark.parametrize(
        "volumes",
        [
            [{"size_mb": 8}],
            [{"size_mb": 8, "at": "relative"}],
            [{"size_mb": 8, "at": "/"}],
            [{"size_mb": 8, "at": "/data/../etc"}],
            [{"size_mb": 8, "at": "/a:b"}],
            [{"size_mb": 8, "at": "/usr/local"}],
            [{"size_mb": 8, "at": "/etc"}],
            [{"size_mb": 8, "at": "/run/ukc-host"}],
            [{"size_mb": 8, "at": "/x"}, {"size_mb": 8, "at": "/x/"}],
            [{"uuid": "u", "size_mb": 8, "at": "/x"}],
            [{"at": "/x"}],
        ],
    )
    def test_a_volume_entry_without_a_clean_mount_point_or_with_both_forms_is_a_400(
        self, inproc: InProcessMetro, volumes: list[dict[str, Any]]
    ) -> None:
        with inproc.client() as api:
            name = unique()
            r = create(api, name=name, volumes=volumes)
            assert r.status_code == 400, r.text
            assert instance(api, name)["error"] == 8
            assert api.get("/v1/volumes").json()["data"]["volumes"] == []

    def test_a_create_with_one_missing_volume_creates_none_of_its_inline_ones(
        self, inproc: InProcessMetro
    ) -> None:
        with inproc.client() as api:
            r = create(
                api,
                volumes=[{"size_mb": 8, "at": "/a"}, {"name": "no-such-volume", "at": "/b"}],
            )
            assert r.json()["data"]["instances"][0]["error"] == 8
            assert api.get("/v1/volumes").json()["data"]["volumes"] == []

    def test_volumes_and_their_attachments_survive_a_metro_restart(self, tmp_path: Path) -> None:
        first = InProcessMetro(tmp_path)
        try:
            with first.client() as api:
                vol = new_volume(api)
                name = unique()
                create(api, name=name, volumes=[{"name": vol["name"], "at": "/workspace"}])
        finally:
            first.close()
        again = InProcessMetro(tmp_path)
        try:
            with again.client() as api:
                assert volume(api, vol["name"])["attached_to"][0]["name"] == name
                assert instance(api, name)["volumes"][0]["uuid"] == vol["uuid"]
        finally:
            again.close()


def plugin(api: httpx.Client, uuid: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return api.post(f"/v1/instances/{uuid}/plugins/sandbox{path}", json=body)


def wait_state(api: httpx.Client, name: str, want: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while instance(api, name).get("state") != want:
        assert time.monotonic() < deadline, f"{name} never reached {want}"
        time.sleep(0.05)


class TestVolumesInSandboxes:
    def test_files_on_volumes_survive_a_cold_boot_and_a_kept_volume_its_instance(
        self, api: httpx.Client, daemon: MetroInfo
    ) -> None:
        vol = new_volume(api)
        name = unique()
        r = create(
            api,
            name=name,
            plugins=SANDBOX_PLUGIN,
            volumes=[{"name": vol["name"], "at": "/workspace"}, {"size_mb": 16, "at": "/data"}],
            autostart=True,
            timeout_s=30,
        )
        assert r.json()["status"] == "success", r.text
        inst = instance(api, name)
        uuid = inst["uuid"]
        inline = inst["volumes"][1]
        try:
            for path in ("/workspace/w.txt", "/data/d.txt"):
                w = plugin(
                    api,
                    uuid,
                    "/fs/write",
                    {"path": path, "append": False, "encoding": "utf-8", "data": path},
                )
                assert w.status_code == 200, w.text
            api.put("/v1/instances/stop", json=[{"name": name}])
            wait_state(api, name, "stopped")
            r = api.put("/v1/instances/start", json=[{"name": name, "timeout_s": 30}])
            assert r.json()["data"]["instances"][0]["state"] == "running", r.text
            for path in ("/workspace/w.txt", "/data/d.txt"):
                got = plugin(api, uuid, "/fs/read_raw", {"path": path})
                assert got.content == path.encode(), got.text
        finally:
            delete_instance(api, name)
        deadline = time.monotonic() + 30
        while volume(api, inline["name"]).get("error") != 8:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not (daemon.state_dir / "volumes" / inline["uuid"]).exists()
        kept = daemon.state_dir / "volumes" / vol["uuid"]
        assert (kept / "w.txt").read_text() == "/workspace/w.txt"
        # why: the next instance of the kept volume finds its files
        second = unique()
        r = create(
            api,
            name=second,
            plugins=SANDBOX_PLUGIN,
            volumes=[{"uuid": vol["uuid"], "at": "/workspace", "readonly": True}],
            autostart=True,
            timeout_s=30,
        )
        try:
            uuid2 = r.json()["data"]["instances"][0]["uuid"]
            got = plugin(api, uuid2, "/fs/read_raw", {"path": "/workspace/w.txt"})
            assert got.content == b"/workspace/w.txt"
        finally:
            delete_instance(api, second)
        r = api.request("DELETE", f"/v1/volumes/{vol['uuid']}")
        assert r.json()["status"] == "success", r.text
        assert not kept.exists()


def fill(api: httpx.Client, uuid: str, path: str, mib: int) -> tuple[int, str]:
    """Append 1 MiB at a time to `path` in the sandbox; the MiB written before a write failed
    (or `mib`) and the failure's text."""
    chunk = "x" * (1 << 20)
    for done in range(mib):
        body = {"path": path, "append": True, "encoding": "utf-8", "data": chunk}
        w = plugin(api, uuid, "/fs/write", body)
        if w.status_code != 200:
            return done, w.text
    return mib, ""


@pytest.mark.skipif(not volumefs.bounded(), reason="size bounds need a root daemon and mkfs.ext4")
def test_writes_past_a_volumes_size_fail_and_its_files_survive_a_daemon_restart(
    tmp_path: Path,
) -> None:
    state = tmp_path / "metro"
    info = metro_daemon.ensure_running(state)

    def client(info: MetroInfo) -> httpx.Client:
        auth = {"Authorization": f"Bearer {info.token}"}
        return httpx.Client(base_url=info.api_url, headers=auth, timeout=60.0)

    try:
        with client(info) as api:
            vol = new_volume(api, size_mb=8)
            name = unique()
            r = create(
                api,
                name=name,
                plugins=SANDBOX_PLUGIN,
                volumes=[{"name": vol["name"], "at": "/data"}],
                autostart=True,
                timeout_s=30,
            )
            uuid = r.json()["data"]["instances"][0]["uuid"]
            keep = {"path": "/data/kept.txt", "append": False, "encoding": "utf-8", "data": "k"}
            assert plugin(api, uuid, "/fs/write", keep).status_code == 200
            # the attacker fills the volume: the host's disk is not the limit, size_mb is
            written, why = fill(api, uuid, "/data/fill", 16)
            assert written < 8, f"{written} MiB went into an 8 MiB volume"
            assert "No space left on device" in why, why
        assert metro_daemon.stop(state)
        assert not os.path.ismount(state / "volumes" / vol["uuid"])
        info = metro_daemon.ensure_running(state)
        with client(info) as api:
            wait_state(api, name, "running")
            got = plugin(api, uuid, "/fs/read_raw", {"path": "/data/kept.txt"})
            assert got.content == b"k", got.text
            delete_instance(api, name)
            api.request("DELETE", f"/v1/volumes/{vol['uuid']}").raise_for_status()
        assert not (state / "volumes" / vol["uuid"]).exists()
        assert not (state / "volume-images" / f"{vol['uuid']}.ext4").exists()
    finally:
        metro_daemon.stop(state)
