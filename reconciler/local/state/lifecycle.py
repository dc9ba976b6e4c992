"""The local metro's instances and the transitions between their states.

`LocalMetro` owns every instance of the emulated metro: it admits creates (`validation`),
drives the timed transitions (`starting` → `running`, `stopping` → `stopped`, scale-to-zero →
`standby`, restarts by policy) by calling the sandbox runtime, and has `instances.json` saved
after every change (`store`). All methods run on the daemon's event loop, except `on_exit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from reconciler.errors import LocalMetroError
from reconciler.local.behaviour import DEFAULT_PRESET, PRESETS, Behaviour
from reconciler.local.sandbox.layout import Mount, SandboxLayout
from reconciler.local.state.index import InstanceIndex
from reconciler.local.state.policy import Activity, RestartBackoff, wants_restart
from reconciler.local.state.quotas import check_live_memory
from reconciler.local.state.records import (
    DEFAULT_APP_DOMAIN,
    STATES,
    STOP_CODE_NOMEDIUM,
    STOP_CODE_OUT_OF_MEMORY,
    STOP_REASON_APP_EXIT,
    STOP_REASON_KERNEL,
    STOP_REASON_PLATFORM,
    STOP_REASON_PLATFORM_ONLY,
    STOP_REASON_SCALE_TO_ZERO,
    STOP_REASON_USER,
    UP_STATES,
    LocalInstance,
    LocalVolume,
    rfc3339,
)
from reconciler.local.state.sandboxes import Runtime
from reconciler.local.state.store import InstanceStore
from reconciler.local.state.tasks import Transitions
from reconciler.local.state.validation import MetroLimits, admit, apply_update
from reconciler.local.state.volumes import VolumeIndex

__all__ = ["LocalMetro"]

_LOG_MAX = 65536
_IDLE_TICK_S = 0.1
_MAX_DRAIN_MS = 60000


class LocalMetro:
    """The instances of one emulated metro and the transitions between their states.

    Transitions that take time run as tasks; a per-instance lock orders them so a stop never
    overtakes the start it follows.
    """

    def __init__(
        self,
        state_dir: Path,
        runtime: Runtime | None = None,
        *,
        app_domain: str = DEFAULT_APP_DOMAIN,
        limits: MetroLimits | None = None,
        on_ports: Callable[[set[int]], Awaitable[None]] | None = None,
        save_delay_s: float = 0.2,
        behaviour: Behaviour | None = None,
    ) -> None:
        self.state_dir = state_dir
        #: how hard the metro is (`local.behaviour`); changed at runtime by the admin API
        self.behaviour = behaviour or PRESETS[DEFAULT_PRESET]
        self.runtime: Runtime | None = runtime
        self.app_domain = app_domain
        self.limits = limits or MetroLimits()
        self.on_ports = on_ports
        self.index = InstanceIndex()
        self.volumes = VolumeIndex(state_dir)
        self._layout = SandboxLayout(state_dir)
        self.store = InstanceStore(
            state_dir, lambda: self.index.records.values(), save_delay_s=save_delay_s
        )
        self.activity = Activity()
        self._restarts = RestartBackoff()
        self._locks: dict[str, asyncio.Lock] = {}
        self._changed = asyncio.Condition()
        self._transitions = Transitions()
        self._stopping_by_us: set[str] = set()
        self._monitor: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def records(self) -> dict[str, LocalInstance]:
        """Every instance by uuid (read only: changes go through the metro)."""
        return self.index.records

    # ---------------------------------------------------------------- start and end

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop `on_exit` hands exits to when it is called from another thread."""
        self._loop = loop

    def load(self) -> None:
        """Read instances.json (missing = empty metro)."""
        for rec in self.store.load():
            if rec.state == "deleted":
                continue  # torn down already; its files are pruned at start
            self.index.add(rec)
        self.volumes.load()
        # why: an instance whose delete the daemon did not see to its end lets go of its
        # volumes now (the directories of inline ones are removed by `prune_volumes`)
        for uuid in {v.attached_to for v in self.volumes.records.values()} - set(self.records):
            if uuid is not None:
                self.volumes.release(uuid)

    async def prune_volumes(self) -> None:
        """Remove volume directories no volume names (an inline volume whose instance went
        while the daemon was down)."""
        base = self.state_dir / "volumes"
        if self.runtime is None or not base.is_dir():
            return
        for path in base.iterdir():
            if path.name not in self.volumes.records:
                await self.runtime.remove_volume(path)

    async def resume(self) -> None:
        """After `load()`: run again what was starting/running; start the idle monitor."""
        for rec in list(self.records.values()):
            if rec.state in ("starting", "running", "draining"):
                rec.state = "stopped"
                self._begin_start(rec, reason="metro restarted")
            elif rec.state == "stopping":
                rec.state = "stopped"
            elif rec.state == "standby":
                # why: a frozen sandbox did not survive the daemon; waking must boot it cold
                rec.frozen = False
        if self._monitor is None:
            self._monitor = asyncio.get_running_loop().create_task(self._idle_monitor())
        await self._notify()

    async def close(self) -> None:
        """Finish deletes, cancel other transitions and the monitor, persist.

        The runtime is closed by the daemon. A delete already answered must not leave its
        workspace behind, so its teardown runs to the end.
        """
        self._closed = True
        if self._monitor is not None:
            self._monitor.cancel()
        await self._transitions.close()
        await self.store.close()

    # ---------------------------------------------------------------- reads

    def console(self, rec: LocalInstance) -> bytes:
        """Lifecycle lines plus what the sandbox printed (agent + sshd stderr)."""
        out = rec.log.encode()
        if self.runtime is not None:
            # a sandbox that never ran may have no console at all
            with contextlib.suppress(Exception):
                out += self.runtime.console(rec.uuid)
        return out

    async def wait_for(self, pred: Callable[[], bool], timeout_s: float | None) -> bool:
        """Block until `pred()` holds (re-checked on every state change) or the timeout lapses."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(pred), timeout_s)
            except TimeoutError:
                return pred()
        return True

    # ---------------------------------------------------------------- create and update

    def create(self, body: object) -> LocalInstance:
        """Validate a create body and add the record (stopped, or starting with autostart)."""
        req = admit(body, self.limits, self.index, tag_rules=self.behaviour.tag_rules)
        vols = self.volumes.resolve_for(req.volumes, req.name)
        rec = req.to_instance(seq=self.index.next_seq(), app_domain=self.app_domain)
        self.volumes.attach(vols, req.volumes, rec.uuid, rec.name)
        rec.volumes = [v.mount() for v in vols]
        self.index.add(rec)
        self._log(rec, f"created image {req.image}")
        self.store.mark_dirty()
        if req.autostart:
            self._begin_start(rec, reason="autostart")
        return rec

    async def publish_ports(self, rec: LocalInstance) -> None:
        """Have the edge listen on the instance's public ports (and metro.json name them).

        Awaited before the create is answered, so a client that reads metro.json after
        its create finds every port it declared.
        """
        if rec.services and self.on_ports is not None:
            await self.on_ports({s.port for s in rec.services})

    def update(self, rec: LocalInstance, opts: dict[str, Any]) -> None:
        """Apply one PATCH operation to the record."""
        apply_update(rec, opts, self.limits, tag_rules=self.behaviour.tag_rules)
        self.store.mark_dirty()

    # ---------------------------------------------------------------- start / stop

    def _require_runtime(self) -> Runtime:
        if self.runtime is None:
            raise LocalMetroError("local metro has no sandbox runtime")
        return self.runtime

    def _begin_start(self, rec: LocalInstance, *, reason: str) -> None:
        """Enter `starting` now and boot (or thaw) in a task."""
        was_frozen = rec.frozen and rec.state == "standby"
        rec.suspended = False
        self._set_state(rec, "starting")
        self._log(rec, f"start ({reason})")
        self._transitions.spawn(self._boot(rec, was_frozen))

    async def _boot(self, rec: LocalInstance, thaw: bool) -> None:
        runtime = self._require_runtime()
        async with self._lock(rec.uuid):
            if rec.state != "starting" or rec.uuid not in self.index:
                return
            if not thaw and not self.behaviour.image_known(rec.image):
                # as UKC: the image cannot be pulled, no kernel ever runs
                self._log(rec, f"boot failed: image {rec.image} not found (NOMEDIUM)")
                rec.stop_reason = STOP_REASON_PLATFORM_ONLY
                rec.stop_code = STOP_CODE_NOMEDIUM
                rec.exit_code = None
                self._set_state(rec, "stopped")
                return
            try:
                if thaw:
                    await runtime.thaw(rec.uuid)
                else:
                    await runtime.start(
                        rec.uuid,
                        env=dict(rec.env),
                        memory_mb=rec.memory_mb,
                        boot=self.behaviour.boot_options(rec.image),
                        volumes=self._mounts(rec),
                    )
            except Exception as exc:  # any runtime failure ends this boot as a platform stop
                self._log(rec, f"boot failed: {str(exc).splitlines()[0] if str(exc) else exc!r}")
                rec.stop_reason = STOP_REASON_PLATFORM
                rec.frozen = False
                if rec.state == "starting":
                    self._set_state(rec, "stopped")
                return
            if rec.state != "starting" or rec.uuid not in self.index:
                return
            rec.frozen = False
            if not thaw or self.behaviour.wake_moves_start_count:
                rec.start_count += 1
            rec.stop_reason = None
            rec.stop_code = None
            rec.exit_code = None
            self._set_state(rec, "running")

    def _mounts(self, rec: LocalInstance) -> list[Mount]:
        return [
            Mount(self._layout.volume(v.uuid), v.at or "", v.readonly, v.size_mb)
            for v in self.volumes.attached(rec.uuid)
        ]

    def start(self, rec: LocalInstance) -> str:
        """PUT start: no-op unless stopped/standby. Returns the previous state."""
        prev = rec.state
        if prev in ("stopped", "standby"):
            check_live_memory(self.records.values(), rec.memory_mb, self.limits.max_live_memory_mb)
            self._restarts.reset(rec.uuid)
            self._begin_start(rec, reason="user start")
        return prev

    def wakes_on_traffic(self, rec: LocalInstance) -> bool:
        """Whether traffic wakes this standby instance: a scaled-to-zero one always, a
        suspended one as the behaviour says (else only a start request does)."""
        return not rec.suspended or self.behaviour.suspend_woken_by_traffic

    def wake(self, rec: LocalInstance) -> None:
        """Traffic or a plugin request reached a standby instance."""
        if rec.state == "standby" and self.wakes_on_traffic(rec):
            self._begin_start(rec, reason="woken by traffic")

    def stop(self, rec: LocalInstance, *, drain_timeout_ms: int = 0) -> str:
        """PUT stop: enter draining/stopping now, stop the sandbox in a task."""
        prev = rec.state
        if prev in ("stopped", "stopping", "draining"):
            return prev
        if prev == "standby":
            # why: a standby sandbox holds frozen processes (stateful); they must go too
            self._transitions.spawn(self._halt(rec, STOP_REASON_USER, 0, to_state="stopped"))
            return prev
        self._set_state(rec, "draining" if drain_timeout_ms > 0 else "stopping")
        self._transitions.spawn(
            self._halt(rec, STOP_REASON_USER, drain_timeout_ms, to_state="stopped")
        )
        return prev

    def suspend(
        self, rec: LocalInstance, *, drain_timeout_ms: int = 0, after: asyncio.Event | None = None
    ) -> str:
        """PUT suspend: running → standby (frozen when stateful); the work begins once `after`
        is set (the request's answer was written)."""
        prev = rec.state
        if prev not in ("running", "starting"):
            return prev
        if drain_timeout_ms > 0:
            self._set_state(rec, "draining")
        self._transitions.spawn(
            self._halt(
                rec,
                STOP_REASON_USER,
                drain_timeout_ms,
                to_state="standby",
                manual=True,
                after=after,
            )
        )
        return prev

    async def _halt(
        self,
        rec: LocalInstance,
        reason: int,
        drain_ms: int,
        *,
        to_state: str,
        manual: bool = False,
        after: asyncio.Event | None = None,
    ) -> None:
        runtime = self._require_runtime()
        if after is not None:
            await after.wait()
        if drain_ms > 0:
            await asyncio.sleep(min(drain_ms, _MAX_DRAIN_MS) / 1000)
        async with self._lock(rec.uuid):
            if rec.uuid not in self.index or rec.state == "deleted":
                return
            if to_state == "standby" and rec.state == "standby":
                # a second suspend (a retry whose answer was lost) queued behind the first:
                # its work is done, and stopping the sandbox now would lose what it froze
                rec.suspended = rec.suspended or manual
                return
            self._stopping_by_us.add(rec.uuid)
            # a user's suspend snapshots the instance whatever its scale-to-zero says
            keep = rec.stateful_standby or (manual and self.behaviour.suspend_keeps_memory)
            try:
                if to_state == "standby" and keep and rec.state != "standby":
                    await runtime.freeze(rec.uuid)
                    rec.frozen = True
                else:
                    if to_state == "stopped" and rec.state != "stopping":
                        self._set_state(rec, "stopping")
                    await runtime.stop(rec.uuid)
                    rec.frozen = False
            except Exception as exc:  # the sandbox is gone or broken: record and move on
                self._log(rec, f"halt error: {exc}")
            finally:
                self._stopping_by_us.discard(rec.uuid)
            if rec.uuid not in self.index or rec.state == "deleted":
                # why: a delete does not wait for this lock; one that came while the sandbox
                # was stopped or frozen owns the record now (a `standby` set here brought it
                # back: listed after `ukc delete`, never released)
                return
            rec.stop_reason = reason
            rec.stop_code = None
            rec.suspended = manual and to_state == "standby"
            self._set_state(rec, to_state)
            if to_state == "stopped" and "delete-on-stop" in rec.features:
                await self._destroy_locked(rec)

    # ---------------------------------------------------------------- delete

    async def delete(self, rec: LocalInstance, *, dont_retain: bool = False) -> asyncio.Task[None]:
        """Force-stop and remove. Kind: the record disappears at once, the sandbox when the
        task ends. Realistic (`delete_hold_s`, `retention_s`): the record stays in state
        `deleted`, name taken, while the sandbox is torn down and for the hold; then it is
        retained (unless `dont_retain`). The task ends when the name is free or retained."""
        hold = self.behaviour.delete_hold_s
        retain = 0.0 if dont_retain else self.behaviour.retention_s
        if rec.state == "deleted":
            # deleted again: only `dont_retain` changes anything (the retention ends)
            if dont_retain and rec.retained_until is not None:
                rec.retained_until = min(rec.retained_until, time.time() + hold)
            return self._transitions.spawn(self._release_at(rec))
        if hold <= 0 and retain <= 0:
            self._unindex(rec)
            self.store.mark_dirty()
            await self._notify()
            return self._transitions.spawn_teardown(self._destroy_unindexed(rec))
        self.activity.forget(rec.uuid)
        rec.retained_until = time.time() + hold + retain
        self._set_state(rec, "deleted")
        await self._notify()
        torn_down = self._transitions.spawn_teardown(self._destroy_unindexed(rec))
        held_until = time.time() + hold

        async def free_name() -> None:
            await asyncio.shield(torn_down)
            if retain > 0:
                await asyncio.sleep(max(0.0, held_until - time.time()))
            else:
                await self.wait_for(lambda: rec.uuid not in self.index, None)

        self._transitions.spawn(self._release_at(rec))
        return self._transitions.spawn(free_name())

    async def delete_volume(self, vol: LocalVolume) -> None:
        """Drop an unattached volume and remove its files."""
        self.volumes.remove(vol)
        await self._require_runtime().remove_volume(self._layout.volume(vol.uuid))

    async def _release_at(self, rec: LocalInstance) -> None:
        """Drop a `deleted` record when its retention ends."""
        while rec.state == "deleted" and rec.uuid in self.index:
            left = (rec.retained_until or 0.0) - time.time()
            if left <= 0:
                self._unindex(rec)
                self.store.mark_dirty()
                await self._notify()
                return
            await asyncio.sleep(min(left, 1.0))

    async def _destroy_unindexed(self, rec: LocalInstance) -> None:
        runtime = self._require_runtime()
        self._stopping_by_us.add(rec.uuid)
        try:
            await runtime.destroy(rec.uuid)
            # why after the sandbox is gone: nothing writes to its volumes any more
            for vol in self.volumes.release(rec.uuid):
                await runtime.remove_volume(self._layout.volume(vol.uuid))
        except Exception as exc:  # nothing left to report to: the record is already gone
            self._log(rec, f"destroy error: {exc}")
        finally:
            self._stopping_by_us.discard(rec.uuid)

    async def _destroy_locked(self, rec: LocalInstance) -> None:
        self._unindex(rec)
        self.store.mark_dirty()
        await self._destroy_unindexed(rec)
        await self._notify()

    def _unindex(self, rec: LocalInstance) -> None:
        self.index.remove(rec)
        self._locks.pop(rec.uuid, None)
        self.activity.forget(rec.uuid)

    # ---------------------------------------------------------------- exits and restarts

    def on_exit(self, uuid: str, exit_code: int, out_of_memory: bool = False) -> None:
        """The runtime says a sandbox died on its own (may be called from any thread)."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            loop.call_soon(self._handle_exit, uuid, exit_code, out_of_memory)
        elif self._loop is not None:
            self._loop.call_soon_threadsafe(self._handle_exit, uuid, exit_code, out_of_memory)

    def _handle_exit(self, uuid: str, exit_code: int, out_of_memory: bool) -> None:
        rec = self.records.get(uuid)
        if self._closed or rec is None or uuid in self._stopping_by_us:
            return
        if rec.state not in ("running", "starting", "draining"):
            return
        if out_of_memory:
            self._log(rec, f"out of memory: more than memory_mb {rec.memory_mb} in use")
            rec.exit_code = None
            rec.stop_reason = STOP_REASON_KERNEL
            rec.stop_code = STOP_CODE_OUT_OF_MEMORY
        else:
            self._log(rec, f"sandbox exited with code {exit_code}")
            rec.exit_code = exit_code
            rec.stop_reason = STOP_REASON_APP_EXIT
            rec.stop_code = None
        healthy_for = time.time() - (rec.started_at or time.time())
        self._set_state(rec, "stopped")
        if "delete-on-stop" in rec.features:
            self._transitions.spawn_teardown(self._destroy_locked(rec))
            return
        if wants_restart(rec.restart_policy, failed=out_of_memory or exit_code != 0):
            delay = self._restarts.next_delay(uuid, healthy_for)
            self._transitions.spawn(self._restart_later(rec, delay))

    async def _restart_later(self, rec: LocalInstance, delay: float) -> None:
        await asyncio.sleep(delay)
        if rec.uuid in self.index and rec.state == "stopped":
            rec.restart_count += 1
            self._begin_start(rec, reason=f"restart_policy {rec.restart_policy}")

    # ---------------------------------------------------------------- traffic / scale-to-zero

    def on_activity(self, uuid: str, delta: int) -> None:
        """Edge (or plugin proxy) connection opened (+1) or closed (-1)."""
        if uuid in self.index:
            self.activity.report(uuid, delta)

    async def ensure_running(self, rec: LocalInstance, timeout_s: float) -> bool:
        """Wake a standby instance and wait until it runs; False when it does not in time
        (or traffic does not wake it: a suspended instance waits for a start request)."""
        if rec.state == "standby" and not self.wakes_on_traffic(rec):
            return False
        self.wake(rec)
        return (
            await self.wait_for(
                lambda: (
                    rec.state in ("running", "stopped", "deleted") or rec.uuid not in self.index
                ),
                timeout_s,
            )
            and rec.state == "running"
        )

    async def route_for(
        self, fqdn: str, public_port: int, wake_timeout_s: float = 30.0
    ) -> tuple[str, int] | None:
        """(uuid, destination port) behind an edge connection; wakes a standby instance.

        None when no instance has that FQDN, it publishes no such port, or it is not running
        (and could not be woken) in time.
        """
        found = self.index.route(fqdn, public_port)
        if found is None:
            return None
        rec, destination_port = found
        if rec.state != "running" and not await self.ensure_running(rec, wake_timeout_s):
            return None
        return rec.uuid, destination_port

    def autokill_due(self, rec: LocalInstance, now: float) -> bool:
        """Whether the platform deletes `rec` now: down (`stopped`, and `standby` when the
        behaviour counts it) for its autokill `time_ms`."""
        if rec.autokill_ms <= 0:
            return False
        down = rec.state == "stopped" or (
            rec.state == "standby" and self.behaviour.autokill_counts_standby
        )
        since = rec.down_since if rec.down_since is not None else rec.created_at
        return down and (now - since) * 1000 >= rec.autokill_ms

    async def _idle_monitor(self) -> None:
        while True:
            await asyncio.sleep(_IDLE_TICK_S)
            now = time.time()
            for rec in list(self.records.values()):
                if rec.uuid in self.index and self.autokill_due(rec, now):
                    self._log(rec, f"autokill: {rec.state} for {rec.autokill_ms} ms, deleting")
                    await self.delete(rec)
                    continue
                if self.activity.idle_due(rec):
                    self._log(rec, "scale-to-zero: idle for the cooldown")
                    self._transitions.spawn(
                        self._halt(rec, STOP_REASON_SCALE_TO_ZERO, 0, to_state="standby")
                    )

    # ---------------------------------------------------------------- state changes

    def _lock(self, uuid: str) -> asyncio.Lock:
        lock = self._locks.get(uuid)
        if lock is None:
            lock = self._locks[uuid] = asyncio.Lock()
        return lock

    def _log(self, rec: LocalInstance, line: str) -> None:
        rec.log += f"[{rfc3339(time.time())}] {line}\n"
        # why: a chatty restart loop must not grow the record (and instances.json) forever
        if len(rec.log) > _LOG_MAX:
            rec.log = rec.log[-_LOG_MAX // 2 :]

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _set_state(self, rec: LocalInstance, state: str) -> None:
        assert state in STATES, state
        now = time.time()
        was_up = rec.state in UP_STATES
        if state in ("stopped", "standby") and rec.state not in ("stopped", "standby"):
            rec.down_since = now
        if state == "running":
            rec.started_at = now
            self.activity.touch(rec.uuid)
        if was_up and state in ("stopped", "standby") and rec.started_at is not None:
            rec.uptime_ms_total += int((now - rec.started_at) * 1000)
            rec.stopped_at = now
        elif state in ("stopped", "standby") and rec.stopped_at is None:
            rec.stopped_at = now
        rec.state = state
        self._log(rec, f"state {state}")
        self.store.mark_dirty()
        self._transitions.spawn(self._notify())
