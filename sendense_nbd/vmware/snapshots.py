"""Backup snapshots: ``sbak-<job>``, created, listed, and always removed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs

from sendense_nbd.errors import VSphereError
from sendense_nbd.vmware.inventory import Disk, VirtualMachine, list_disks
from sendense_nbd.vmware.tasks import fault_message, wait_for_task

#: Every snapshot this tool takes starts with this; older ones are stale.
BACKUP_PREFIX = "sbak-"


@attrs.frozen
class Snapshot:
    """A VM snapshot: the managed object and its name."""

    ref: Any
    name: str
    moref: str

    def disks(self) -> list[Disk]:
        """The disks as frozen in this snapshot, with their change IDs (blocking)."""
        return list_disks(self.ref.config.hardware.device)


def snapshots(vm: VirtualMachine) -> list[Snapshot]:
    """All snapshots of the VM, parents first (blocking)."""

    def walk(trees: Any) -> Iterator[Snapshot]:
        for tree in trees or []:
            yield Snapshot(tree.snapshot, tree.name, tree.snapshot._moId)
            yield from walk(tree.childSnapshotList)

    info = vm.ref.snapshot
    return list(walk(info.rootSnapshotList)) if info is not None else []


def create_snapshot(si: Any, vm: VirtualMachine, name: str, *, quiesce: bool = False) -> Snapshot:
    """Take a snapshot without memory (blocking)."""
    try:
        task = vm.ref.CreateSnapshot_Task(
            name=name, description="sendense backup; removed when the backup ends", memory=False, quiesce=quiesce
        )
    except Exception as exc:  # noqa: BLE001 - a vim fault raised by the call itself
        raise VSphereError(f"{vm.path}: creating snapshot {name} failed: {fault_message(exc)}") from exc
    ref = wait_for_task(si, task, f"{vm.path}: creating snapshot {name}")
    if ref is None:
        found = [s for s in snapshots(vm) if s.name == name]
        if not found:
            raise VSphereError(f"{vm.path}: snapshot {name} was created but cannot be found")
        return found[-1]
    return Snapshot(ref, name, ref._moId)


def remove_snapshot(si: Any, vm: VirtualMachine, snapshot: Snapshot) -> None:
    """Remove one snapshot, consolidating its delta disks (blocking)."""
    try:
        task = snapshot.ref.RemoveSnapshot_Task(removeChildren=False, consolidate=True)
    except Exception as exc:  # noqa: BLE001
        raise VSphereError(f"{vm.path}: removing snapshot {snapshot.name} failed: {fault_message(exc)}") from exc
    wait_for_task(si, task, f"{vm.path}: removing snapshot {snapshot.name}")


def remove_stale(si: Any, vm: VirtualMachine, prefix: str = BACKUP_PREFIX) -> list[str]:
    """Remove every snapshot named ``prefix*`` (left by an earlier, interrupted run); their names."""
    removed = []
    for snapshot in reversed(snapshots(vm)):  # children first
        if snapshot.name.startswith(prefix):
            remove_snapshot(si, vm, snapshot)
            removed.append(snapshot.name)
    return removed
