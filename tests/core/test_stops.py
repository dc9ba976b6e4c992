"""Stop reasons and codes read as UKC documents them, and host keys pinned per boot."""

from __future__ import annotations

from dataclasses import replace

import pytest

from reconciler.cloud.stops import decode
from reconciler.reconcile import identity
from reconciler.status.schema import InstanceRecord
from tests.support.planning import desired, instance


def test_a_missing_image_is_a_failed_boot_named_nomedium() -> None:
    info = decode(4, 1, None)
    assert info.failed and info.cause == "NOMEDIUM"
    assert "image not found" in info.text and "stop_reason 4 ---P--" in info.text


def test_out_of_memory_is_a_kernel_page_fault_with_enomem() -> None:
    info = decode(1, 0x000C7F04, None)
    assert info.failed and info.cause == "out of memory"
    assert "PGFAULT" in info.text and "errno 12" in info.text


def test_an_app_exit_names_its_exit_code() -> None:
    info = decode(3, None, 137)
    assert info.failed and info.cause == "exit 137"


def test_a_platform_stop_without_a_known_code_is_still_a_failure() -> None:
    info = decode(7, None, None)
    assert info.failed and "platform" in info.text


@pytest.mark.parametrize(
    ("reason", "cause"), [(15, "user stop"), (31, "user stop"), (39, "scale-to-zero")]
)
def test_user_stops_and_scale_to_zero_are_not_failures(reason: int, cause: str) -> None:
    info = decode(reason, 0, 0)
    assert not info.failed and info.cause == cause


def test_no_stop_reason_says_so_and_is_not_a_failure() -> None:
    assert not decode(None, None, None).failed


def test_a_pin_is_carried_within_one_boot_and_dropped_on_a_new_one() -> None:
    inst = instance(desired(), start_count=3)
    record = InstanceRecord(name=inst.name, uuid=inst.uuid, start_count=3, pin="SHA256:a")
    assert identity.boot_pin(record, inst) == "SHA256:a"
    assert identity.boot_pin(record, replace(inst, start_count=4)) is None
    # the instance's own pin still proves an old instance ours whatever its boot
    assert identity.recorded_pin(record, replace(inst, start_count=4)) == "SHA256:a"


def test_a_pin_stands_when_the_platform_reports_no_boot_count() -> None:
    inst = instance(desired(), start_count=None)
    record = InstanceRecord(name=inst.name, uuid=inst.uuid, start_count=3, pin="SHA256:a")
    assert identity.boot_pin(record, inst) == "SHA256:a"
    other = replace(inst, uuid="u-2")
    assert identity.boot_pin(record, other) is None
