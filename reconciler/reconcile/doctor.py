"""The doctor's probe: one tiny instance made as a session's would be, asked what `ukc` relies
on, then deleted; each assumption is one named check with its figures.

Everything goes through the controller's own seams (`CloudApi`, the TLS `Dialer`, the ssh
transport), so a check that holds here holds for `ukc apply`. The instance is always deleted,
and it carries a TTL tag so that a doctor killed halfway leaves nothing for long.
"""

from __future__ import annotations

import contextlib
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from reconciler import errors
from reconciler.cloud.model import CloudApi, CreateRequest, Instance
from reconciler.cloud.trust import Reach
from reconciler.reconcile import bootmark, identity
from reconciler.reconcile.doctor_report import Figure, Redactor, Result, report_document
from reconciler.reconcile.execute import SESSION_SCALE_TO_ZERO
from reconciler.transport.base import Credentials, Target, Transport
from reconciler.transport.select import edge_handshake, kind_for

__all__ = ["CHECKS", "Budgets", "Pageable", "Probe"]

#: the checks in the order they run (docs/PLATFORM.md, "Verified or assumed", names each)
CHECKS = (
    "auth",
    "quotas",
    "create",
    "states",
    "fqdn",
    "ssh",
    "tools",
    "edge_tls",
    "wake",
    "wait",
    "tag_filter",
    "pagination",
    "delete",
    "name_free",
)
#: the states a booting instance may pass through, in their order
BOOT_ORDER = ("stopped", "starting", "running")
#: the probe instance's autokill: as long as its ttl tag (a killed doctor leaves nothing)
DOCTOR_AUTOKILL_MS = 600_000
#: what `ukc apply` checks a fan-out against (`reconcile.quota`)
QUOTA_FIGURES = ("instances", "live_memory_mb", "volumes")
#: the tools `ukc` looks for in an image: python3 runs the sync helper; without it sync takes
#: shell+tar, which needs tar, find and sha256sum (`sync/capability.py`)
TOOLS = ("python3", "rsync", "tar", "find", "sha256sum")
#: what the shell+tar sync path needs besides sh and coreutils' head, mv, rm
SHELL_PATH_TOOLS = ("tar", "find", "sha256sum")
_POLL_S = 0.05
_SSH_PORT = 2222


@runtime_checkable
class Pageable(Protocol):
    """An API that can list with another page size (to cross page boundaries on purpose)."""

    def paged(self, page_size: int) -> CloudApi: ...


@dataclass(frozen=True)
class Budgets:
    """How long each wait of the probe may last (seconds)."""

    boot_s: float = 60.0
    #: after `running`, until ssh first accepts the key (the controller's own grace)
    ssh_s: float = 30.0
    #: a wait for a state already reached must answer within this
    wait_answer_s: float = 2.0
    #: the timeout of a wait for a state that does not come
    wait_lapse_s: float = 1.0
    #: how long a replace waits for a deleted instance's name (the executor's default)
    name_free_s: float = 60.0
    #: a TLS handshake through the edge, retried while the sandbox wakes
    edge_s: float = 10.0
    #: idle until the instance scales to zero (the session's cooldown plus the platform's
    #: reaction); 0 skips the wake check
    wake_s: float = 30.0


@dataclass
class _Run:
    """What the checks learn and pass on."""

    name: str
    run_tag: str
    tags: list[str]
    inst: Instance | None = None
    running_at: float | None = None
    shell: Transport | None = None
    deleted_at: float | None = None
    #: the delete check saw the instance gone (else the cleanup deletes it again)
    gone: bool = False
    extra_uuids: list[str] = field(default_factory=list)


class Probe:
    """Runs the checks against one metro; `run()` returns one `Result` per name in `CHECKS`."""

    def __init__(
        self,
        api: CloudApi,
        reach: Reach,
        *,
        image: str,
        memory_mb: int | None = None,
        budgets: Budgets | None = None,
        on_result: Callable[[Result], None] = lambda r: None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.api = api
        self.reach = reach
        self.image = image
        self.memory_mb = memory_mb
        self.budgets = budgets or Budgets()
        self.on_result = on_result
        self.clock = monotonic
        self.sleep = sleep
        suffix = secrets.token_hex(4)
        self.run = _Run(
            name=f"ukc-doctor-{suffix}",
            run_tag=f"ukc.doctor={suffix}",
            tags=[
                *identity.owner_tags("doctor", "doctor", "doctor", f"doctor-{suffix}"),
                identity.transport_tag("ssh"),
                identity.ttl_tag(600),
                f"ukc.doctor={suffix}",
            ],
        )
        self.results: list[Result] = []

    @property
    def instance_name(self) -> str:
        return self.run.name

    def report(
        self, results: Sequence[Result], *, about: Mapping[str, Figure], secrets: Iterable[str]
    ) -> dict[str, object]:
        """The shareable report of `results`: redacted of `secrets` (the token), of what names
        the probe's instances, and of anything shaped like an identity."""
        redact = Redactor(secrets)
        redact.add(*self.identifying())
        return report_document(results, about=about, redact=redact)

    def identifying(self) -> list[str]:
        """What names the probe's instances (for the report's redactor)."""
        inst = self.run.inst
        found = [self.run.name, *self.run.extra_uuids]
        if inst is not None:
            found += [inst.uuid, inst.fqdn or ""]
        return [v for v in found if v]

    # ------------------------------------------------------------------ driver

    def execute(self) -> list[Result]:
        with tempfile.TemporaryDirectory(prefix="ukc-doctor-") as keys:
            credentials = Credentials(Path(keys) / "doctor_key")
            try:
                self._all(credentials)
            finally:
                self._cleanup()
        done = {r.name for r in self.results}
        for name in CHECKS:
            if name not in done:
                self._add(Result(name, "SKIP", "not reached: an earlier check failed"))
        order = {n: i for i, n in enumerate(CHECKS)}
        return sorted(self.results, key=lambda r: order[r.name])

    def _add(self, result: Result) -> Result:
        self.results.append(result)
        self.on_result(result)
        return result

    def _all(self, credentials: Credentials) -> None:
        if self._auth().outcome == "FAIL":
            return
        self._quotas()
        if self._create(credentials).outcome == "FAIL":
            return
        if self._states().outcome == "FAIL":
            return
        if self._fqdn().outcome == "PASS":
            if self._ssh(credentials).outcome == "PASS":
                self._tools()
                self._edge_tls()
                self._wake(credentials)
            else:
                self._edge_tls()
        self._wait()
        self._tag_filter()
        self._pagination()
        if self._delete().outcome == "PASS":
            self._name_free()

    @contextlib.contextmanager
    def _check(self, name: str) -> Iterator[list[Result]]:
        """Runs one check's body; an error it did not expect is that check's FAIL."""
        box: list[Result] = []
        try:
            yield box
        except (errors.UkcError, OSError, TimeoutError) as err:
            # why OSError and TimeoutError too: a sandbox's stream may break or stall; that is
            # the check's verdict, not the end of the probe (its instance must still go)
            box[:] = [Result(name, "FAIL", "failed", {"error_kind": type(err).__name__}, str(err))]
        if not box:
            box.append(Result(name, "FAIL", "the check gave no verdict"))
        self._add(box[0])

    # ------------------------------------------------------------------ checks

    def _auth(self) -> Result:
        with self._check("auth") as out:
            t0 = self.clock()
            found = self.api.list_instances([self.run.run_tag])
            ms = round((self.clock() - t0) * 1000)
            out.append(
                Result(
                    "auth",
                    "PASS",
                    f"the token lists instances ({len(found)} under a fresh tag, {ms} ms)",
                    {"list_ms": ms, "listed": len(found)},
                )
            )
        return self.results[-1]

    def _quotas(self) -> Result:
        """The quota answer holds what `ukc apply` checks a fan-out against: used and hard
        instances, live memory and volumes, each used within its hard limit."""
        with self._check("quotas") as out:
            t0 = self.clock()
            quota = self.api.get_quotas()
            ms = round((self.clock() - t0) * 1000)
            figures: dict[str, Figure] = {"read_ms": ms}
            missing: list[str] = []
            over: list[str] = []
            for name in QUOTA_FIGURES:
                used = getattr(quota.used, name)
                hard = getattr(quota.hard, name)
                if used is None or hard is None:
                    missing.append(name)
                    continue
                figures[f"{name}_left"] = max(hard - used, 0)
                if used > hard:
                    over.append(f"{name} {used} of {hard}")
            if missing or over:
                why = []
                if missing:
                    why.append(f"used/hard missing for {', '.join(missing)}")
                if over:
                    why.append(f"used beyond hard: {', '.join(over)}")
                out.append(Result("quotas", "FAIL", "; ".join(why), figures))
            else:
                left = ", ".join(f"{n} {figures[n + '_left']}" for n in QUOTA_FIGURES)
                out.append(Result("quotas", "PASS", f"read in {ms} ms; left: {left}", figures))
        return self.results[-1]

    def _create(self, credentials: Credentials) -> Result:
        with self._check("create") as out:
            fields = kind_for("ssh").create_fields(credentials)
            request = CreateRequest(
                name=self.run.name,
                image=self.image,
                env=dict(fields.env),
                tags=self.run.tags,
                services=fields.services,
                scale_to_zero=SESSION_SCALE_TO_ZERO,
                memory_mb=self.memory_mb,
                # as a session's: the platform reclaims it should the doctor be killed
                autokill_ms=DOCTOR_AUTOKILL_MS,
            )
            t0 = self.clock()
            inst = self.api.create_instance(request)
            ms = round((self.clock() - t0) * 1000)
            self.run.inst = inst
            out.append(
                Result(
                    "create",
                    "PASS",
                    f"created with the session's service group (2222/tls), autokill and "
                    f"{len(self.run.tags)} tags in {ms} ms, answer state {inst.state}",
                    {"create_ms": ms, "answer_state": inst.state, "tags_sent": len(self.run.tags)},
                )
            )
        return self.results[-1]

    def _states(self) -> Result:
        """Reads the instance until it runs; the states seen must follow the boot order."""
        with self._check("states") as out:
            assert self.run.inst is not None
            seen = [self.run.inst.state]
            t0 = self.clock()
            deadline = t0 + self.budgets.boot_s
            inst: Instance | None = self.run.inst
            while True:
                inst = self.api.get_instance(self.run.name)
                state = inst.state if inst is not None else "absent"
                if state != seen[-1]:
                    seen.append(state)
                if state in ("running", "absent") or (
                    state == "stopped" and inst is not None and inst.stop_reason is not None
                ):
                    break
                if self.clock() >= deadline:
                    break
                self.sleep(_POLL_S)
            boot_s = round(self.clock() - t0, 2)
            order = " > ".join(seen)
            figures: dict[str, float | int | bool | str] = {"states": order, "boot_s": boot_s}
            in_order = [s for s in seen if s in BOOT_ORDER]
            known = len(in_order) == len(seen) and in_order == sorted(
                in_order, key=BOOT_ORDER.index
            )
            if inst is not None and inst.memory_mb is not None:
                figures["memory_mb"] = inst.memory_mb
            if inst is not None and seen[-1] == "running" and known:
                self.run.inst = inst
                self.run.running_at = self.clock()
                out.append(Result("states", "PASS", f"{order} in {boot_s} s", figures))
            else:
                why = f"{order} after {boot_s} s"
                if inst is not None and inst.stop_reason is not None:
                    figures |= {"stop_reason": inst.stop_reason, "stop_code": inst.stop_code or 0}
                    why += f" (stop_reason {inst.stop_reason}, stop_code {inst.stop_code})"
                out.append(Result("states", "FAIL", f"not running in boot order: {why}", figures))
        return self.results[-1]

    def _fqdn(self) -> Result:
        with self._check("fqdn") as out:
            inst = self.run.inst
            fqdn = inst.fqdn if inst is not None else None
            labels = fqdn.split(".") if fqdn else []
            if fqdn and len(labels) >= 2 and all(labels):
                first = labels[0] == self.run.name
                out.append(
                    Result(
                        "fqdn",
                        "PASS",
                        f"service_group.domains[0].fqdn present ({len(labels)} labels, "
                        f"first label {'is' if first else 'is not'} the instance name)",
                        {"labels": len(labels), "name_first": first},
                    )
                )
            else:
                out.append(
                    Result(
                        "fqdn",
                        "FAIL",
                        "no service_group.domains[0].fqdn in the instance read",
                        {"labels": len(labels)},
                    )
                )
        return self.results[-1]

    def _ssh(self, credentials: Credentials) -> Result:
        with self._check("ssh") as out:
            assert self.run.inst is not None and self.run.inst.fqdn
            budget = self.budgets.ssh_s
            target = Target(
                self.run.name, self.run.inst.fqdn, self.reach, self.run.inst.uuid, self.api
            )
            t0 = self.clock()
            try:
                shell = kind_for("ssh").connect(target, credentials, pin=None, deadline_s=budget)
            except (errors.SandboxNotReadyError, errors.RemoteError, errors.TransportError) as e:
                out.append(
                    Result(
                        "ssh",
                        "FAIL",
                        f"ssh on 2222 did not accept the PUBKEY key within {budget:g} s of running",
                        {"budget_s": budget, "error_kind": type(e).__name__},
                        str(e),
                    )
                )
            else:
                after = round(self.clock() - (self.run.running_at or t0), 2)
                self.run.shell = shell
                out.append(
                    Result(
                        "ssh",
                        "PASS",
                        f"key accepted {after} s after running (budget {budget:g} s)",
                        {"after_running_s": after, "budget_s": budget},
                    )
                )
        return self.results[-1]

    def _tools(self) -> Result:
        with self._check("tools") as out:
            shell = self.run.shell
            assert shell is not None
            script = "; ".join(
                f"if command -v {t} >/dev/null 2>&1; then echo {t}=yes; else echo {t}=no; fi"
                for t in TOOLS
            )
            proc = shell.start(script)
            proc.close_stdin()
            data = b""
            while chunk := proc.read():
                data += chunk
                if len(data) > 4096:
                    break
            proc.wait(30.0)
            # why: the sandbox's answer is untrusted; only the exact lines we asked for count
            have = {t: f"{t}=yes" in data.decode(errors="replace").split() for t in TOOLS}
            listed = ", ".join(f"{t} {'yes' if ok else 'no'}" for t, ok in have.items())
            figures: dict[str, float | int | bool | str] = dict(have)
            if have["python3"]:
                out.append(Result("tools", "PASS", f"{listed}: sync path python helper", figures))
            elif all(have[t] for t in SHELL_PATH_TOOLS):
                out.append(Result("tools", "PASS", f"{listed}: sync path shell+tar", figures))
            else:
                out.append(
                    Result(
                        "tools",
                        "FAIL",
                        f"{listed}: sync needs python3, or {' + '.join(SHELL_PATH_TOOLS)}",
                        figures,
                    )
                )
        return self.results[-1]

    def _wake(self, credentials: Credentials) -> Result:
        with self._check("wake") as out:
            out.append(self._woken(credentials))
        return self.results[-1]

    def _woken(self, credentials: Credentials) -> Result:
        """Left idle, the instance scales to zero (`standby`, stateful as a session's is); the
        next ssh connection wakes it, and it still presents the host key it had and holds the
        boot marker left before (memory kept). Whether `start_count` moved is measured: ukc
        does not trust it across a wake (`bootmark`), so either way passes."""
        budget = self.budgets.wake_s
        shell = self.run.shell
        assert self.run.inst is not None and self.run.inst.fqdn and shell is not None
        if budget <= 0:
            return Result("wake", "SKIP", "not probed (no wake budget)")
        pin = shell.pin
        token = bootmark.new_token()
        bootmark.leave_mark(shell, token)
        self._close_shell()
        t0 = self.clock()
        state = "unknown"
        count_before: int | None = None
        while self.clock() - t0 < budget:
            inst = self.api.get_instance(self.run.name)
            state = inst.state if inst is not None else "absent"
            if inst is not None and count_before is None:
                count_before = inst.start_count
            if state != "running":
                break
            self.sleep(0.2)
        idle_s = round(self.clock() - t0, 2)
        figures: dict[str, Figure] = {"idle_s": idle_s, "idle_state": state}
        if state != "standby":
            return Result(
                "wake",
                "FAIL",
                f"idle {idle_s} s with scale-to-zero on, the instance was {state}, not standby",
                figures,
            )
        target = Target(self.run.name, self.run.inst.fqdn, self.reach, self.run.inst.uuid, self.api)
        t1 = self.clock()
        try:
            self.run.shell = kind_for("ssh").connect(
                target, credentials, pin=pin, deadline_s=self.budgets.ssh_s
            )
        except (errors.SandboxNotReadyError, errors.RemoteError, errors.TransportError) as e:
            figures["error_kind"] = type(e).__name__
            changed = "differs from the expected" in str(e)
            return Result(
                "wake",
                "FAIL",
                f"standby after {idle_s} s idle; ssh did not wake it with the same host key "
                f"({'host key changed' if changed else 'no connection'})",
                figures,
                str(e),
            )
        wake_s = round(self.clock() - t1, 2)
        figures["wake_s"] = wake_s
        kept = bootmark.read_mark(self.run.shell) == token
        figures["memory_kept"] = kept
        woken = self.api.get_instance(self.run.name)
        count_after = woken.start_count if woken is not None else None
        if count_before is not None and count_after is not None:
            figures["start_count_moved"] = count_after != count_before
            counted = (
                f"start_count {count_before} -> {count_after}"
                if count_after != count_before
                else f"start_count kept ({count_after})"
            )
        else:
            counted = "start_count not reported"
        if not kept:
            return Result(
                "wake",
                "FAIL",
                f"standby after {idle_s} s idle; ssh woke it in {wake_s} s with the same host "
                f"key, but the boot marker left in memory is gone (memory not kept); {counted}",
                figures,
            )
        return Result(
            "wake",
            "PASS",
            f"standby after {idle_s} s idle; ssh woke it in {wake_s} s, host key and memory "
            f"kept; {counted}",
            figures,
        )

    def _edge_tls(self) -> Result:
        with self._check("edge_tls") as out:
            assert self.run.inst is not None and self.run.inst.fqdn
            deadline = self.clock() + self.budgets.edge_s
            attempts = 0
            while True:
                attempts += 1
                t0 = self.clock()
                try:
                    version = edge_handshake(self.reach, self.run.inst.fqdn, _SSH_PORT, 5.0)
                except errors.TransportError as err:
                    if err.retryable and self.clock() < deadline:
                        self.sleep(0.2)
                        continue
                    out.append(
                        Result(
                            "edge_tls",
                            "FAIL",
                            f"no verified TLS to 2222 with SNI after {attempts} attempt(s) "
                            f"(trust store: {self.reach.trust_store})",
                            {"attempts": attempts, "trust_store": self.reach.trust_store},
                            str(err),
                        )
                    )
                    break
                ms = round((self.clock() - t0) * 1000)
                out.append(
                    Result(
                        "edge_tls",
                        "PASS",
                        f"{version} on 2222 with SNI, certificate verified against "
                        f"{self.reach.trust_store} ({ms} ms, {attempts} attempt(s))",
                        {
                            "handshake_ms": ms,
                            "tls_version": version,
                            "attempts": attempts,
                            "trust_store": self.reach.trust_store,
                        },
                    )
                )
                break
        return self.results[-1]

    def _wait(self) -> Result:
        """A wait for the state the instance is in answers at once; one for a state that does
        not come answers "not reached" when its timeout lapses, not much later."""
        with self._check("wait") as out:
            t0 = self.clock()
            got = self.api.wait_instance(self.run.name, "running", self.budgets.boot_s)
            answer_s = round(self.clock() - t0, 2)
            lapse = self.budgets.wait_lapse_s
            t1 = self.clock()
            lapsed = False
            try:
                self.api.wait_instance(self.run.name, "stopped", lapse)
            except errors.SandboxNotReadyError:
                lapsed = True
            lapse_s = round(self.clock() - t1, 2)
            current = self.api.get_instance(self.run.name)
            else_state = current.state if current is not None else "absent"
            figures: dict[str, float | int | bool | str] = {
                "answer_s": answer_s,
                "lapse_s": lapse_s,
                "lapse_timeout_s": lapse,
            }
            problems = []
            if got.state != "running" or answer_s > self.budgets.wait_answer_s:
                problems.append(f"a wait for the current state took {answer_s} s")
            if not lapsed or else_state != "running":
                problems.append(
                    f"a wait for another state answered it was reached (now {else_state})"
                )
            elif not lapse * 0.5 <= lapse_s <= lapse + 5.0:
                problems.append(f"a {lapse:g} s wait for another state answered after {lapse_s} s")
            if problems:
                out.append(Result("wait", "FAIL", "; ".join(problems), figures))
            else:
                out.append(
                    Result(
                        "wait",
                        "PASS",
                        f"current state answered in {answer_s} s; a {lapse:g} s wait for "
                        f"another lapsed after {lapse_s} s",
                        figures,
                    )
                )
        return self.results[-1]

    def _tag_filter(self) -> Result:
        with self._check("tag_filter") as out:
            assert self.run.inst is not None
            uuid = self.run.inst.uuid
            mine = self.api.list_instances([self.run.run_tag])
            other = self.api.list_instances([self.run.run_tag, "ukc.doctor.absent=1"])
            found = [i for i in mine if i.uuid == uuid]
            kept = bool(found) and set(self.run.tags) <= set(found[0].tags)
            figures: dict[str, float | int | bool | str] = {
                "listed": len(mine),
                "listed_with_absent_tag": len(other),
                "tags_kept": kept,
            }
            if len(mine) == 1 and found and kept and not other:
                out.append(
                    Result(
                        "tag_filter",
                        "PASS",
                        "the tag filter lists exactly the instance, tags intact",
                        figures,
                    )
                )
            else:
                out.append(
                    Result(
                        "tag_filter",
                        "FAIL",
                        f"listed {len(mine)} under its tag (instance "
                        f"{'found' if found else 'missing'}, tags "
                        f"{'intact' if kept else 'changed'}), {len(other)} under a tag "
                        "it lacks",
                        figures,
                    )
                )
        return self.results[-1]

    def _pagination(self) -> Result:
        with self._check("pagination") as out:
            assert self.run.inst is not None
            if not isinstance(self.api, Pageable):
                out.append(Result("pagination", "SKIP", "this API cannot change its page size"))
            else:
                out.append(self._paged(self.run.inst.uuid, self.api.paged(1)))
        return self.results[-1]

    def _paged(self, uuid: str, paged: CloudApi) -> Result:
        try:
            before = int(getattr(paged, "request_count", 0))
            mine = paged.list_instances([self.run.run_tag])
            requests = int(getattr(paged, "request_count", 0)) - before
        finally:
            paged.close()
        uuids = [i.uuid for i in mine]
        figures: dict[str, float | int | bool | str] = {
            "page_size": 1,
            "requests": requests,
            "listed": len(uuids),
        }
        if uuids == [uuid]:
            return Result(
                "pagination",
                "PASS",
                f"1 per page: the instance once, in {requests} request(s)",
                figures,
            )
        return Result(
            "pagination",
            "FAIL",
            f"1 per page listed {len(uuids)} instance(s), {len(set(uuids))} distinct, "
            f"in {requests} request(s)",
            figures,
        )

    def _delete(self) -> Result:
        with self._check("delete") as out:
            assert self.run.inst is not None
            self._close_shell()
            t0 = self.clock()
            gone = self.api.delete_instance(self.run.name, uuid=self.run.inst.uuid)
            self.run.deleted_at = self.clock()
            ms = round((self.run.deleted_at - t0) * 1000)
            after = self.api.get_instance(self.run.name)
            if gone and (after is None or after.uuid != self.run.inst.uuid):
                self.run.gone = True
                out.append(Result("delete", "PASS", f"deleted in {ms} ms", {"delete_ms": ms}))
            else:
                out.append(
                    Result(
                        "delete",
                        "FAIL",
                        "the instance still reads as live after its delete"
                        if gone
                        else "the delete found nothing to delete",
                        {"delete_ms": ms},
                    )
                )
        return self.results[-1]

    def _name_free(self) -> Result:
        """How long the name stays taken after the DELETE answered: a create of the same name
        (not started) is tried until it succeeds, then deleted."""
        with self._check("name_free") as out:
            assert self.run.deleted_at is not None
            budget = self.budgets.name_free_s
            tries = 0
            request = CreateRequest(
                name=self.run.name,
                image=self.image,
                env={},
                tags=self.run.tags,
                autostart=False,
            )
            while True:
                tries += 1
                try:
                    again = self.api.create_instance(request)
                except errors.AlreadyExistsError:
                    taken = self.clock() - self.run.deleted_at
                    if taken < budget:
                        self.sleep(0.2)
                        continue
                    out.append(
                        Result(
                            "name_free",
                            "FAIL",
                            f"the name was still taken {taken:.1f} s after the delete "
                            f"answered (a replace waits {budget:g} s)",
                            {"taken_s": round(taken, 2), "tries": tries, "budget_s": budget},
                        )
                    )
                    break
                taken = round(self.clock() - self.run.deleted_at, 2)
                self.run.extra_uuids.append(again.uuid)
                out.append(
                    Result(
                        "name_free",
                        "PASS",
                        f"the name was free {taken} s after the delete answered "
                        f"({tries} create attempt(s))",
                        {"taken_s": taken, "tries": tries, "budget_s": budget},
                    )
                )
                break
        return self.results[-1]

    # ------------------------------------------------------------------ cleanup

    def _close_shell(self) -> None:
        shell, self.run.shell = self.run.shell, None
        if shell is not None:
            with contextlib.suppress(errors.UkcError, OSError):
                shell.close()

    def _cleanup(self) -> None:
        """Delete whatever the probe made that still stands (errors are the metro's; the
        TTL tag reclaims an instance this cannot delete)."""
        self._close_shell()
        inst = self.run.inst
        uuids = list(self.run.extra_uuids)
        if inst is not None and not self.run.gone:
            uuids.insert(0, inst.uuid)
        for uuid in uuids:
            with contextlib.suppress(errors.UkcError):
                self.api.delete_instance(self.run.name, uuid=uuid)
