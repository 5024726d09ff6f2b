"""Finding a VM by inventory path and listing its virtual disks."""

from __future__ import annotations

from typing import Any

import attrs

from sendense_nbd.errors import VSphereError


@attrs.frozen
class Disk:
    """One virtual disk, as the VM (or one of its snapshots) sees it.

    ``key`` (the device key, e.g. 2000) and ``uuid`` identify the disk;
    nothing is ever parsed from a job ID.
    """

    key: int
    label: str
    capacity: int
    #: Datastore path, ``[datastore] folder/name.vmdk``: vddk's ``file=``.
    file_name: str
    #: The CBT change ID at this point (None with CBT off).
    change_id: str | None
    uuid: str | None

    def to_json(self) -> dict[str, object]:
        return attrs.asdict(self)


@attrs.frozen
class VirtualMachine:
    """The handle of a VM and the facts a backup needs about it."""

    ref: Any
    path: str
    moref: str
    name: str
    cbt_enabled: bool


def find_vm(si: Any, path: str) -> VirtualMachine:
    """The VM at inventory path ``/Datacenter/vm/[folder/...]name`` (blocking)."""
    from pyVmomi import vim

    if not path.startswith("/") or path.count("/") < 3:
        raise VSphereError(f"{path!r} is not a VM inventory path such as /DC/vm/folder/name")
    ref = si.content.searchIndex.FindByInventoryPath(path.lstrip("/"))
    if ref is None:
        raise VSphereError(f"no VM at inventory path {path}")
    if not isinstance(ref, vim.VirtualMachine):
        raise VSphereError(f"{path} is a {type(ref).__name__}, not a virtual machine")
    config = ref.config
    if config is None:
        raise VSphereError(f"{path}: the VM has no configuration (inaccessible or orphaned)")
    return VirtualMachine(ref, path, ref._moId, ref.name, bool(config.changeTrackingEnabled))


def list_disks(hardware_devices: Any) -> list[Disk]:
    """The virtual disks among ``config.hardware.device`` (of a VM or a snapshot), by key."""
    from pyVmomi import vim

    disks = []
    for device in hardware_devices or []:
        if not isinstance(device, vim.vm.device.VirtualDisk):
            continue
        backing = device.backing
        capacity = device.capacityInBytes or (device.capacityInKB or 0) * 1024
        disks.append(
            Disk(
                key=int(device.key),
                label=device.deviceInfo.label if device.deviceInfo else f"disk {device.key}",
                capacity=int(capacity),
                file_name=getattr(backing, "fileName", "") or "",
                change_id=getattr(backing, "changeId", None) or None,
                uuid=getattr(backing, "uuid", None) or None,
            )
        )
    return sorted(disks, key=lambda d: d.key)


def vm_disks(vm: VirtualMachine) -> list[Disk]:
    """The VM's current disks (blocking)."""
    return list_disks(vm.ref.config.hardware.device)
