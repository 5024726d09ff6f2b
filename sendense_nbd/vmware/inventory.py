"""Finding a VM by inventory path, listing its virtual disks, and listing every VM with its path.

Every attribute of a pyvmomi managed object (``vm.config``, ``vm.name``,
``vm.snapshot``) is one round trip to vCenter. :func:`find_vm` reads all a
job needs in one ``RetrievePropertiesEx`` call (:func:`properties`) after the
path lookup: two round trips for any number of disks.
"""

from __future__ import annotations

from typing import Any

import attrs

from sendense_nbd.errors import VSphereError
from sendense_nbd.vmware.session import fault_text


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
    """The handle of a VM and the facts a backup needs about it, as read by :func:`find_vm`."""

    ref: Any
    path: str
    moref: str
    name: str
    cbt_enabled: bool
    #: Its disks when it was looked up.
    disks: tuple[Disk, ...] = ()
    #: Its ``snapshot`` property (``vim.vm.SnapshotInfo``) when it was looked up; None: no snapshots.
    snapshot_info: Any = None


#: What :func:`find_vm` reads of a VM, in one call.
VM_PROPERTIES = ("name", "config.changeTrackingEnabled", "config.hardware.device", "snapshot")


def properties(content: Any, ref: Any, kind: Any, paths: tuple[str, ...]) -> dict[str, Any]:
    """``paths`` of the managed object ``ref`` (of type ``kind``) in one ``RetrievePropertiesEx`` round trip.

    Unset properties are absent from the result (blocking). A property vCenter could not read (its
    ``missingSet``: no permission, no such property) is a :class:`VSphereError` naming it and the fault.
    """
    from pyVmomi import vmodl

    collector = vmodl.query.PropertyCollector
    spec = collector.FilterSpec(
        objectSet=[collector.ObjectSpec(obj=ref)], propSet=[collector.PropertySpec(type=kind, pathSet=list(paths))]
    )
    try:
        result = content.propertyCollector.RetrievePropertiesEx([spec], collector.RetrieveOptions())
    except vmodl.MethodFault as exc:
        raise VSphereError(f"reading {', '.join(paths)} of {ref._moId} failed: {fault_text(exc)}") from exc
    if result is None or not result.objects:
        return {}
    found = result.objects[0]
    if found.missingSet:
        missing = "; ".join(f"{item.path}: {_fault_name(item.fault)}" for item in found.missingSet)
        raise VSphereError(f"reading {ref._moId} failed: {missing}")
    return {prop.name: prop.val for prop in found.propSet or []}


def _fault_name(fault: Any) -> str:
    """A missing property's fault (pyvmomi unwraps the ``LocalizedMethodFault``) as its type and detail,
    e.g. ``NoPermission (System.Read)``."""
    inner = getattr(fault, "fault", None) or fault
    name = type(inner).__name__.rsplit(".", 1)[-1]
    detail = getattr(inner, "msg", None) or getattr(inner, "privilegeId", None) or ""
    return f"{name} ({detail})" if detail else name


def find_vm(content: Any, path: str) -> VirtualMachine:
    """The VM at inventory path ``/Datacenter/vm/[folder/...]name`` with its disks and snapshot tree
    (blocking; two round trips). ``content`` is the session's ``ServiceContent``."""
    from pyVmomi import vim

    if not path.startswith("/") or path.count("/") < 3:
        raise VSphereError(f"{path!r} is not a VM inventory path such as /DC/vm/folder/name")
    ref = content.searchIndex.FindByInventoryPath(path.lstrip("/"))
    if ref is None:
        raise VSphereError(f"no VM at inventory path {path}")
    if not isinstance(ref, vim.VirtualMachine):
        raise VSphereError(f"{path} is a {type(ref).__name__}, not a virtual machine")
    facts = properties(content, ref, vim.VirtualMachine, VM_PROPERTIES)
    if "config.hardware.device" not in facts:
        raise VSphereError(f"{path}: the VM has no configuration (inaccessible or orphaned)")
    return VirtualMachine(
        ref,
        path,
        ref._moId,
        str(facts.get("name", "")),
        bool(facts.get("config.changeTrackingEnabled")),
        tuple(list_disks(facts["config.hardware.device"])),
        facts.get("snapshot"),
    )


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


#: Most VMs :func:`list_vms` lists; a larger inventory is refused rather than listed in part.
MAX_VMS = 100_000
#: Objects per page of the listing (one round trip for inventories up to this size).
_PAGE = 10_000
#: Deepest folder nesting followed from a VM up to the root folder.
_MAX_DEPTH = 64


@attrs.frozen
class VmEntry:
    """One VM of the inventory listing: its inventory path (``/DC/vm/folder/name``), name and BIOS UUID."""

    path: str
    name: str
    uuid: str | None

    def to_json(self) -> dict[str, object]:
        """``{"path", "name", "uuid"}``."""
        return attrs.asdict(self)


def list_vms(content: Any, *, limit: int = MAX_VMS) -> list[VmEntry]:
    """Every VM under the root folder with its inventory path, sorted by path (blocking).

    One ``RetrievePropertiesEx`` round trip (more only past :data:`_PAGE` objects) over a container
    view of the VMs, folders and datacenters reads each one's name and parent; paths are built from
    the parent chains, with no call per VM. VMs whose chain does not reach the root folder (a vApp's
    VMs) are left out. More than ``limit`` VMs is a :class:`VSphereError`.
    """
    from pyVmomi import vim, vmodl

    view = content.viewManager.CreateContainerView(
        content.rootFolder, [vim.VirtualMachine, vim.Folder, vim.Datacenter], True
    )
    try:
        found = _retrieve_view(content, view, limit)
    except vmodl.MethodFault as exc:
        raise VSphereError(f"listing the VMs failed: {fault_text(exc)}") from exc
    finally:
        try:
            view.DestroyView()
        except vmodl.MethodFault:
            pass  # the session's end removes it anyway
    root = content.rootFolder._moId
    entries = []
    for moref, (kind, props) in found.items():
        if kind is vim.VirtualMachine:
            path = _path_of(moref, found, root)
            if path is not None:
                uuid = props.get("config.uuid")
                entries.append(VmEntry(path, str(props.get("name", "")), str(uuid) if uuid else None))
    return sorted(entries, key=lambda entry: entry.path)


def _retrieve_view(content: Any, view: Any, limit: int) -> dict[str, tuple[Any, dict[str, Any]]]:
    """The view's objects: moref -> (type, {property: value}), paged, at most ``limit`` VMs."""
    from pyVmomi import vim, vmodl

    collector = vmodl.query.PropertyCollector
    traverse = collector.TraversalSpec(name="view", path="view", skip=False, type=vim.view.ContainerView)
    spec = collector.FilterSpec(
        objectSet=[collector.ObjectSpec(obj=view, skip=True, selectSet=[traverse])],
        propSet=[
            collector.PropertySpec(type=vim.VirtualMachine, pathSet=["name", "parent", "config.uuid"]),
            collector.PropertySpec(type=vim.Folder, pathSet=["name", "parent"]),
            collector.PropertySpec(type=vim.Datacenter, pathSet=["name", "parent"]),
        ],
    )
    pc = content.propertyCollector
    result = pc.RetrievePropertiesEx([spec], collector.RetrieveOptions(maxObjects=_PAGE))
    found: dict[str, tuple[Any, dict[str, Any]]] = {}
    vms = 0
    while result is not None:
        for item in result.objects or []:
            kind = type(item.obj)
            vms += kind is vim.VirtualMachine
            found[item.obj._moId] = (kind, {prop.name: prop.val for prop in item.propSet or []})
        if vms > limit:
            if result.token:
                pc.CancelRetrievePropertiesEx(result.token)
            raise VSphereError(f"the inventory holds more than {limit} VMs: too many to list at once")
        result = pc.ContinueRetrievePropertiesEx(result.token) if result.token else None
    return found


def _path_of(moref: str, found: dict[str, tuple[Any, dict[str, Any]]], root: str) -> str | None:
    """``/DC/vm/.../name`` of ``moref`` from the parent chain; None if it does not reach ``root``."""
    names: list[str] = []
    current: str | None = moref
    for _ in range(_MAX_DEPTH):
        if current == root:
            return "/" + "/".join(reversed(names))
        if current is None or current not in found:
            return None
        props = found[current][1]
        names.append(str(props.get("name", "")))
        parent = props.get("parent")
        current = parent._moId if parent is not None else None
    return None
