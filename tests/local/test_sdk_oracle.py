"""The official SDK (unikraft_cloud 0.3.0), unchanged, against the local metro daemon.

If the SDK cannot tell the emulator from UKC for these calls, the controller's own client
(which follows the same wire protocol) meets the same behaviour offline.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
import unikraft_cloud
from unikraft_cloud import UnikraftCloud

from reconciler.local.daemon import MetroInfo
from tests.support.inproc_metro import unique

T = TypeVar("T")
SANDBOX_PLUGIN = [{"name": "sandbox", "image": "plugins/sandbox:latest"}]


def run(daemon: MetroInfo, body: Callable[[UnikraftCloud], Awaitable[T]]) -> T:
    async def main() -> T:
        async with UnikraftCloud(token=daemon.token, metro=daemon.api_url) as ukc:
            return await body(ukc)

    return asyncio.run(main())


class TestLifecycle:
    def test_create_and_wait_running_then_get_by_name_and_uuid(self, daemon: MetroInfo) -> None:
        name = unique("sdk")

        async def body(ukc: UnikraftCloud) -> tuple[Any, Any, Any]:
            inst = await ukc.instances.create(
                name=name,
                image="ukc/local-sandbox:latest",
                memory_mb=256,
                autostart=True,
                timeout_s=30,
            )
            by_name = await ukc.instances.get(name=name)
            by_uuid = await ukc.instances.get(uuid=inst.uuid)
            await ukc.instances.get(name=name).delete(timeout_seconds=10)
            return inst, by_name, by_uuid

        inst, by_name, by_uuid = run(daemon, body)
        assert str(inst.state.value if hasattr(inst.state, "value") else inst.state) == "running"
        assert by_name.uuid == inst.uuid
        assert by_uuid.name == name
        assert by_uuid.memory_mb == 256

    def test_stop_start_suspend_move_through_real_states(self, daemon: MetroInfo) -> None:
        name = unique("sdk")

        async def body(ukc: UnikraftCloud) -> list[str]:
            seen: list[str] = []
            await ukc.instances.create(
                name=name,
                image="ukc/local-sandbox:latest",
                autostart=True,
                timeout_s=30,
                service_group={
                    "services": [{"port": 2222, "destination_port": 2222, "handlers": ["tls"]}]
                },
                scale_to_zero={"policy": "off", "stateful": True},
            )
            handle = ukc.instances.get(name=name)
            await handle.stop()
            seen.append(await _state_after(ukc, name, "stopped"))
            await handle.start()
            seen.append(await _state_after(ukc, name, "running"))
            await handle.suspend()
            seen.append(await _state_after(ukc, name, "standby"))
            await handle.delete(timeout_seconds=10)
            return seen

        assert run(daemon, body) == ["stopped", "running", "standby"]

    def test_delete_of_a_missing_name_is_forgiven_with_missing_ok(self, daemon: MetroInfo) -> None:
        async def body(ukc: UnikraftCloud) -> None:
            await ukc.instances.get(name="never-created-here").delete(missing_ok=True)

        run(daemon, body)

    def test_delete_of_a_missing_name_raises_not_found_without_missing_ok(
        self, daemon: MetroInfo
    ) -> None:
        async def body(ukc: UnikraftCloud) -> None:
            await ukc.instances.get(name="never-created-here").delete()

        with pytest.raises(unikraft_cloud.NotFoundError):
            run(daemon, body)


async def _state_after(ukc: UnikraftCloud, name: str, want: str) -> str:
    waited = await ukc.instances.get(name=name).wait(state=want, timeout_seconds=30)
    del waited
    inst = await ukc.instances.get(name=name)
    state = inst.state
    return str(getattr(state, "value", state))


class TestWaitAndLogs:
    def test_a_lapsed_wait_raises_the_sdks_wait_timeout_with_the_state(
        self, daemon: MetroInfo
    ) -> None:
        name = unique("sdk")

        async def body(ukc: UnikraftCloud) -> Any:
            await ukc.instances.create(name=name, image="x", autostart=False)
            try:
                await ukc.instances.get(name=name).wait(state="running", timeout_seconds=1)
            except TimeoutError as exc:
                return exc
            finally:
                await ukc.instances.get(name=name).delete()
            return None

        exc = run(daemon, body)
        assert isinstance(exc, unikraft_cloud.WaitTimeoutError)
        assert str(getattr(exc.state, "value", exc.state)) == "stopped"

    def test_logs_come_back_through_the_sdk(self, daemon: MetroInfo) -> None:
        name = unique("sdk")

        async def body(ukc: UnikraftCloud) -> Any:
            await ukc.instances.create(name=name, image="x", autostart=False)
            try:
                return await ukc.instances.get(name=name).logs(offset=-4096, limit=4096)
            finally:
                await ukc.instances.get(name=name).delete()

        logs = run(daemon, body)
        assert b"created" in base64.b64decode(logs.output)


class TestListing:
    def test_pagination_over_more_than_250_instances_sees_each_once(
        self, daemon: MetroInfo
    ) -> None:
        mark = unique("many")
        names = [f"{mark}-{i:03d}" for i in range(260)]

        async def body(ukc: UnikraftCloud) -> tuple[list[str], list[str], list[str]]:
            sem = asyncio.Semaphore(16)

            async def make(n: str) -> None:
                async with sem:
                    await ukc.instances.create(
                        name=n, image="x", autostart=False, tags=[mark, "k=v"]
                    )

            await asyncio.gather(*(make(n) for n in names))
            everything = [i.name async for i in ukc.instances.list()]
            tagged = [i.name async for i in ukc.instances.list(tags=[mark, "k=v"], page_size=50)]
            await ukc.instances.delete([{"name": n} for n in names])
            # deleted instances the account retains are listed in state `deleted`
            after = [
                i.name
                async for i in ukc.instances.list(tags=[mark])
                if getattr(i.state, "value", i.state) != "deleted"
            ]
            return everything, tagged, after

        everything, tagged, after = run(daemon, body)
        # creates ran concurrently, so creation order (the listing order) is theirs to pick
        mine = [n for n in everything if n.startswith(mark)]
        assert sorted(mine) == names
        assert len(everything) == len(set(everything))
        assert tagged == mine
        assert after == []


class TestSandboxPlugin:
    def test_exec_and_file_write_read_through_the_plugin(self, daemon: MetroInfo) -> None:
        name = unique("sdkplug")

        async def body(ukc: UnikraftCloud) -> tuple[Any, bytes]:
            inst = await ukc.instances.create(
                name=name,
                image="ukc/local-sandbox:latest",
                autostart=True,
                timeout_s=30,
                plugins=SANDBOX_PLUGIN,
            )
            sb = ukc.instances.get(uuid=inst.uuid).sandbox()
            await sb.wait_ready(timeout=30)
            result = await sb.exec("echo hello; echo oops >&2; exit 3", cwd="/workspace")
            await sb.fs.write("/workspace/sub/data.bin", b"\x00\x01payload", parents=True)
            data = await sb.fs.read("/workspace/sub/data.bin")
            await ukc.instances.get(uuid=inst.uuid).delete(timeout_seconds=10)
            return result, data

        result, data = run(daemon, body)
        assert result.exit_code == 3
        assert result.stdout == b"hello\n"
        assert result.stderr == b"oops\n"
        assert data == b"\x00\x01payload"


class TestVolumes:
    def test_a_volume_is_created_attached_at_create_read_and_deleted_through_the_sdk(
        self, daemon: MetroInfo
    ) -> None:
        vol_name, name = unique("sdkvol"), unique("sdk")

        async def body(ukc: UnikraftCloud) -> tuple[Any, Any, Any]:
            made = await ukc.volumes.create(name=vol_name, size_mb=32)
            inst = await ukc.instances.create(
                name=name,
                image="ukc/local-sandbox:latest",
                volumes=[{"name": vol_name, "at": "/workspace"}, {"size_mb": 8, "at": "/data"}],
            )
            attached = await ukc.volumes.get(name=vol_name)
            await ukc.instances.get(name=name).delete(timeout_seconds=10)
            await ukc.volumes.get(name=vol_name).delete()
            listed = [v async for v in ukc.volumes.list()]
            return made, inst, (attached, listed)

        made, inst, (attached, listed) = run(daemon, body)
        assert made.size_mb == 32
        assert made.persistent is True
        assert [v.at for v in inst.volumes] == ["/workspace", "/data"]
        assert attached.attached_to[0].name == name
        assert vol_name not in [v.name for v in listed]
