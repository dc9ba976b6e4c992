"""Waking an instance in `standby` before a connection needs it.

A scaled-to-zero instance wakes on traffic; a suspended one (what a converged `ukc apply`
leaves) may not: the vendor's JS SDK has users start it and wait for `running` first. So a
connection to an instance in standby is preceded by a start request (a no-op for one that
woke meanwhile) and a wait.
"""

from __future__ import annotations

from reconciler.cloud.model import CloudApi, Instance

__all__ = ["WAKE_TIMEOUT_S", "wake"]

#: how long a woken instance may take to run again
WAKE_TIMEOUT_S = 60.0


def wake(api: CloudApi, inst: Instance, timeout_s: float = WAKE_TIMEOUT_S) -> Instance:
    """`inst` as it runs once woken (unchanged when it is not in standby)."""
    if inst.state != "standby":
        return inst
    api.start_instance(inst.name)
    return api.wait_instance(inst.name, "running", timeout_s)
