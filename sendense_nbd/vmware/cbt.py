"""Changed Block Tracking: switching it on, and the changed areas since a change ID."""

from __future__ import annotations

from typing import Any

from sendense_nbd.errors import ChangeIdError, VSphereError
from sendense_nbd.vmware.inventory import Disk, VirtualMachine
from sendense_nbd.vmware.snapshots import Snapshot, create_snapshot, remove_snapshot
from sendense_nbd.vmware.tasks import fault_message, wait_for_task

#: The change ID that asks for every allocated area of a disk.
ALL_ALLOCATED = "*"


def enable_cbt(content: Any, vm: VirtualMachine, cycle_snapshot: str) -> None:
    """Switch CBT on, then take and remove a snapshot so that it takes effect (blocking)."""
    from pyVmomi import vim

    spec = vim.vm.ConfigSpec(changeTrackingEnabled=True)
    wait_for_task(content, vm.ref.ReconfigVM_Task(spec=spec), f"{vm.path}: enabling CBT")
    snapshot = create_snapshot(content, vm, cycle_snapshot)
    remove_snapshot(content, vm, snapshot)


def changed_areas(vm: VirtualMachine, snapshot: Snapshot, disk: Disk, change_id: str) -> list[tuple[int, int]]:
    """``(offset, length)`` areas of ``disk`` changed between ``change_id`` and ``snapshot``.

    Pages through ``QueryChangedDiskAreas`` until the whole disk is covered.
    A change ID the host no longer accepts (a CBT reset, a moved or
    recreated disk) raises :class:`ChangeIdError`.
    """
    from pyVmomi import vim, vmodl

    areas: list[tuple[int, int]] = []
    offset = 0
    while offset < disk.capacity:
        try:
            info = vm.ref.QueryChangedDiskAreas(
                snapshot=snapshot.ref, deviceKey=disk.key, startOffset=offset, changeId=change_id
            )
        except (vim.fault.FileFault, vmodl.fault.InvalidArgument) as exc:
            if change_id == ALL_ALLOCATED:
                raise VSphereError(
                    f"{vm.path} disk {disk.key}: querying allocated areas failed: {fault_message(exc)}"
                ) from exc
            raise ChangeIdError(
                f"{vm.path} disk {disk.key}: change ID {change_id!r} is no longer valid "
                f"(CBT was reset): {fault_message(exc)}"
            ) from exc
        except (vim.fault.VimFault, vmodl.MethodFault) as exc:
            raise VSphereError(
                f"{vm.path} disk {disk.key}: QueryChangedDiskAreas failed: {fault_message(exc)}"
            ) from exc
        for area in info.changedArea or []:
            start, length = int(area.start), int(area.length)
            if length <= 0 or start < offset or start + length > disk.capacity:
                raise VSphereError(
                    f"{vm.path} disk {disk.key}: the host reported a changed area [{start}, +{length}) "
                    f"outside [{offset}, {disk.capacity})"
                )
            areas.append((start, length))
        end = int(info.startOffset) + int(info.length)
        if end <= offset:
            raise VSphereError(f"{vm.path} disk {disk.key}: QueryChangedDiskAreas made no progress at {offset}")
        offset = end
    return areas
