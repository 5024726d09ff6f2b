"""Backup snapshots: ``sbak-<job>``, created, listed, and always removed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import attrs

from sendense_nbd.errors import VSphereError
from sendense_nbd.vmware.inventory import Disk, VirtualMachine, list_disks, properties
from sendense_nbd.vmware.tasks import fault_message, wait_for_task

#: Every snapshot this tool takes starts with this; older ones are stale.
BACKUP_PREFIX = "sbak-"


@attrs.frozen
class Snapshot:
    """A VM snapshot: the managed object and its name."""

    ref: Any
    name: str
    moref: str


def snapshot_disks(content: Any, snapshot: Snapshot) -> list[Disk]:
    """Every disk as frozen in ``snapshot``, with its change ID: one round trip for all (blocking)."""
    from pyVmomi import vim

    devices = properties(content, snapshot.ref, vim.vm.Snapshot, ("config.hardware.device",))
    return list_disks(devices.get("config.hardware.device"))


def snapshot_tree(info: Any) -> list[Snapshot]:
    """The snapshots in a VM's ``snapshot`` property (``vim.vm.SnapshotInfo`` or None), parents first."""

    def walk(trees: Any) -> Iterator[Snapshot]:
        for tree in trees or []:
            yield Snapshot(tree.snapshot, tree.name, tree.snapshot._moId)
            yield from walk(tree.childSnapshotList)

    return list(walk(info.rootSnapshotList)) if info is not None else []


def snapshots(vm: VirtualMachine) -> list[Snapshot]:
    """All snapshots of the VM now, parents first (blocking; one round trip)."""
    return snapshot_tree(vm.ref.snapshot)


def create_snapshot(content: Any, vm: VirtualMachine, name: str, *, quiesce: bool = False) -> Snapshot:
    """Take a snapshot without memory (blocking)."""
    try:
        task = vm.ref.CreateSnapshot_Task(
            name=name, description="sendense backup; removed when the backup ends", memory=False, quiesce=quiesce
        )
    except Exception as exc:  # noqa: BLE001 - a vim fault raised by the call itself
        raise VSphereError(f"{vm.path}: creating snapshot {name} failed: {fault_message(exc)}") from exc
    ref = wait_for_task(content, task, f"{vm.path}: creating snapshot {name}")
    if ref is None:
        found = [s for s in snapshots(vm) if s.name == name]
        if not found:
            raise VSphereError(f"{vm.path}: snapshot {name} was created but cannot be found")
        return found[-1]
    return Snapshot(ref, name, ref._moId)


def remove_snapshot(content: Any, vm: VirtualMachine, snapshot: Snapshot) -> None:
    """Remove one snapshot, consolidating its delta disks (blocking)."""
    try:
        task = snapshot.ref.RemoveSnapshot_Task(removeChildren=False, consolidate=True)
    except Exception as exc:  # noqa: BLE001
        raise VSphereError(f"{vm.path}: removing snapshot {snapshot.name} failed: {fault_message(exc)}") from exc
    wait_for_task(content, task, f"{vm.path}: removing snapshot {snapshot.name}")


def remove_stale(content: Any, vm: VirtualMachine, prefix: str = BACKUP_PREFIX) -> list[str]:
    """Remove every snapshot named ``prefix*`` (left by an earlier, interrupted run) that the VM had when
    :func:`~sendense_nbd.vmware.inventory.find_vm` read it; their names."""
    removed = []
    for snapshot in reversed(snapshot_tree(vm.snapshot_info)):  # children first
        if snapshot.name.startswith(prefix):
            remove_snapshot(content, vm, snapshot)
            removed.append(snapshot.name)
    return removed
