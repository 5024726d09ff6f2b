"""The vSphere test peer: our vcsim build (with CBT, disk data and snapshots) and the vddk stand-in.

Both are real peers: a failed build or a missing tool fails these tests, it never skips them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim, vmodl

from sendense_nbd.errors import VSphereError
from sendense_nbd.vmware.inventory import properties
from tests.vmware.vsphere import STANDIN_PLUGIN, running_vcsim, vmdisk

pytestmark = pytest.mark.peer

MIB = 1 << 20
DISK_SIZE = 16 * MIB
PAGE = 4 * MIB
CHANGE_ID = re.compile(r"^52( [0-9a-f]{2}){7}-[0-9a-f]{2}( [0-9a-f]{2}){7}/(\d+)$")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"peer {name!r} is not installed", pytrace=False)
    return path


@pytest.fixture(scope="session")
def vcsim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    state = tmp_path_factory.mktemp("vcsim-state")
    with running_vcsim(state, "-vm-disks", "2", "-disk-size-mb", "16", "-cbt-page-bytes", str(PAGE)) as info:
        yield info


@pytest.fixture(scope="session")
def si(vcsim: dict) -> Iterator[vim.ServiceInstance]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = SmartConnect(host=vcsim["host"], port=vcsim["port"], user="user", pwd="pass", sslContext=ctx)
    try:
        yield conn
    finally:
        Disconnect(conn)


def find_vm(si: vim.ServiceInstance, path: str) -> vim.VirtualMachine:
    vm = si.content.searchIndex.FindByInventoryPath(path)
    assert vm is not None, path
    return vm


def disks_of(obj: vim.VirtualMachine | vim.vm.Snapshot) -> dict[int, vim.vm.device.VirtualDisk]:
    return {d.key: d for d in obj.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)}


def snapshot(vm: vim.VirtualMachine, name: str) -> vim.vm.Snapshot:
    task = vm.CreateSnapshot_Task(name=name, description="", memory=False, quiesce=False)
    WaitForTask(task)
    return task.info.result


def remove(snap: vim.vm.Snapshot) -> None:
    WaitForTask(snap.RemoveSnapshot_Task(removeChildren=False))


def enable_cbt(vm: vim.VirtualMachine) -> None:
    WaitForTask(vm.ReconfigVM_Task(vim.vm.ConfigSpec(changeTrackingEnabled=True)))
    remove(snapshot(vm, "cbt-activate"))


def changed_areas(vm: vim.VirtualMachine, snap: vim.vm.Snapshot, key: int, change_id: str) -> tuple[list, int]:
    """All areas of one QueryChangedDiskAreas walk over the disk, merged; and the number of calls."""
    areas: list[tuple[int, int]] = []
    offset, calls = 0, 0
    while offset < DISK_SIZE:
        info = vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=key, startOffset=offset, changeId=change_id)
        calls += 1
        assert info.startOffset == offset and info.length > 0
        for a in info.changedArea:
            assert offset <= a.start and a.start + a.length <= offset + info.length
            if areas and areas[-1][0] + areas[-1][1] == a.start:
                areas[-1] = (areas[-1][0], areas[-1][1] + a.length)
            else:
                areas.append((a.start, a.length))
        offset = info.startOffset + info.length
    return areas, calls


def data_extents(path: Path) -> list[tuple[int, int]]:
    out = []
    with open(path, "rb") as f:
        fd, size, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            out.append((data, hole - data))
            pos = hole
    return out


# --- vcsim ------------------------------------------------------------------------------------------


def test_json_line_and_thumbprints(vcsim: dict, si: vim.ServiceInstance) -> None:
    assert vcsim["url"] == f"https://127.0.0.1:{vcsim['port']}/sdk"
    assert vcsim["username"] == "user" and vcsim["password"] == "pass"
    der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate((vcsim["host"], vcsim["port"])))
    fp = [":".join(f"{b:02X}" for b in hashlib.new(a, der).digest()) for a in ("sha1", "sha256")]
    assert vcsim["thumbprint"] == fp[0]
    assert vcsim["thumbprintSha256"] == fp[1]
    hosts = si.content.viewManager.CreateContainerView(si.content.rootFolder, [vim.HostSystem], True).view
    assert hosts and {h.summary.config.sslThumbprint for h in hosts} == {fp[0]}
    vm = next(v for v in vcsim["vms"] if v["path"] == "/DC0/vm/DC0_H0_VM0")
    assert vm["moref"].startswith("vm-")
    assert [d["key"] for d in vm["disks"]] == [2000, 2001]
    for d in vm["disks"]:
        assert d["fileName"].startswith("[LocalDS_0] DC0_H0_VM0/")
        assert Path(d["path"]).stat().st_size == DISK_SIZE


def test_bad_password_is_rejected(vcsim: dict) -> None:
    with pytest.raises(vim.fault.InvalidLogin):
        SmartConnect(host=vcsim["host"], port=vcsim["port"], user="user", pwd="wrong", disableSslCertValidation=True)


def test_inventory_disks_and_unset_snapshot(si: vim.ServiceInstance, vcsim: dict) -> None:
    vm = find_vm(si, "/DC0/vm/DC0_H0_VM0")
    assert vm.snapshot is None
    disks = disks_of(vm)
    assert sorted(disks) == [2000, 2001]
    listed = {d["key"]: d for d in next(v for v in vcsim["vms"] if v["moref"] == vm._moId)["disks"]}
    for key, d in disks.items():
        assert d.capacityInBytes == DISK_SIZE
        assert d.backing.fileName == listed[key]["fileName"]
        assert d.backing.uuid
        assert d.deviceInfo.label.startswith("Hard disk ")


def test_properties_vcenter_could_not_read_are_an_error_with_their_fault(si: vim.ServiceInstance) -> None:
    # vcsim answers an unknown property path with its missingSet (InvalidProperty), as vCenter answers a
    # property the user may not read (NoPermission): never "absent", which would read as "not set".
    vm = find_vm(si, "/DC0/vm/DC0_H0_VM0")
    paths = ("name", "config.noSuchProperty")
    with pytest.raises(VSphereError, match=r"reading vm-\d+ failed: config\.noSuchProperty: InvalidProperty"):
        properties(si.content, vm, vim.VirtualMachine, paths)
    assert properties(si.content, vm, vim.VirtualMachine, ("name", "snapshot")) == {"name": "DC0_H0_VM0"}


def test_cbt_snapshots_and_changed_areas(si: vim.ServiceInstance, vcsim: dict) -> None:
    state = vcsim["state"]
    vm = find_vm(si, "/DC0/vm/DC0_H0_VM0")
    enable_cbt(vm)
    assert vm.config.changeTrackingEnabled

    vmdisk.write(state, vm._moId, 2000, 0, b"a" * 4096)  # before the base snapshot: not a change after it
    base = snapshot(vm, "sbak-1")
    base_ids = {k: d.backing.changeId for k, d in disks_of(base).items()}
    for cid in base_ids.values():
        assert CHANGE_ID.match(cid), cid
    assert base_ids[2000].endswith("/1") and base_ids[2001].endswith("/0")
    assert vm.snapshot.currentSnapshot == base
    assert vmdisk.snapshot_path(state, base._moId, 2000).exists()

    written = {
        2000: [(MIB, 5000), (PAGE - 512, 1024), (10 * MIB, 100), (10 * MIB + 50, 200)],
        2001: [(DISK_SIZE - 4096, 4096)],
    }
    for key, areas in written.items():
        for off, length in areas:
            vmdisk.write(state, "/DC0/vm/DC0_H0_VM0", key, off, os.urandom(length))
    vmdisk.zero(state, "DC0_H0_VM0", 2001, 2 * MIB, 8192)
    incr = snapshot(vm, "sbak-2")
    incr_ids = {k: d.backing.changeId for k, d in disks_of(incr).items()}
    assert incr_ids[2000] == base_ids[2000].rsplit("/", 1)[0] + "/5"
    assert incr_ids[2001] == base_ids[2001].rsplit("/", 1)[0] + "/2"

    areas, calls = changed_areas(vm, incr, 2000, base_ids[2000])
    assert areas == [(MIB, 5000), (PAGE - 512, 1024), (10 * MIB, 250)]
    assert calls >= DISK_SIZE // PAGE - 1  # paged
    areas, _ = changed_areas(vm, incr, 2001, base_ids[2001])
    assert areas == [(2 * MIB, 8192), (DISK_SIZE - 4096, 4096)]
    assert changed_areas(vm, incr, 2000, incr_ids[2000])[0] == []

    # '*': the allocated areas of the snapshot's disk.
    frozen = vmdisk.snapshot_path(state, incr._moId, 2000)
    assert changed_areas(vm, incr, 2000, "*")[0] == data_extents(frozen)
    live = vmdisk.read(state, vm._moId, 2000)
    assert frozen.read_bytes() == live
    assert vmdisk.snapshot_path(state, base._moId, 2000).read_bytes() != live

    # Invalid change IDs.
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snapshot=base, deviceKey=2000, startOffset=0, changeId=incr_ids[2000])
    with pytest.raises(vmodl.fault.InvalidArgument):
        vm.QueryChangedDiskAreas(snapshot=incr, deviceKey=2000, startOffset=0, changeId="garbage")
    with pytest.raises(vmodl.fault.InvalidArgument):
        vm.QueryChangedDiskAreas(snapshot=incr, deviceKey=4242, startOffset=0, changeId="*")

    # A CBT reset makes the old change IDs invalid; new snapshots carry the new id.
    new_id = vmdisk.reset_cbt(state, vm._moId, 2000)
    with pytest.raises(vim.fault.FileFault):
        vm.QueryChangedDiskAreas(snapshot=incr, deviceKey=2000, startOffset=0, changeId=base_ids[2000])
    remove(base)
    assert not vmdisk.snapshot_path(state, base._moId, 2000).exists()
    after = snapshot(vm, "sbak-3")
    assert disks_of(after)[2000].backing.changeId == f"{new_id}/5"
    assert disks_of(after)[2001].backing.changeId == incr_ids[2001]

    for s in (incr, after):
        remove(s)
        assert not (state / "snapshots" / s._moId).exists()
    assert vm.snapshot is None


def test_changed_areas_need_cbt(si: vim.ServiceInstance, vcsim: dict) -> None:
    vm = find_vm(si, "/DC0/vm/DC0_H0_VM1")
    snap = snapshot(vm, "no-cbt")
    try:
        assert all(d.backing.changeId is None for d in disks_of(snap).values())
        with pytest.raises(vim.fault.FileFault):
            vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=2000, startOffset=0, changeId="*")
    finally:
        remove(snap)
    assert vm.snapshot is None


def test_injected_fault_keeps_the_snapshot(si: vim.ServiceInstance, vcsim: dict) -> None:
    state = vcsim["state"]
    vm = find_vm(si, "/DC0/vm/DC0_H0_VM1")
    snap = snapshot(vm, "fault-remove")
    frozen = vmdisk.snapshot_path(state, snap._moId, 2000)
    fault_file = vmdisk.inject_fault(state, "RemoveSnapshot_Task", times=1)
    assert fault_file.read_text() == "1\n"
    with pytest.raises(vim.fault.FileFault) as failed:
        remove(snap)
    assert "injected" in failed.value.msg and failed.value.file == str(fault_file)
    assert not fault_file.exists()  # used up
    assert vm.snapshot.currentSnapshot == snap
    assert frozen.exists() and vmdisk.snapshot_meta(state, snap._moId)["vm"] == vm._moId
    remove(snap)
    assert vm.snapshot is None and not frozen.exists()


def test_injected_faults(si: vim.ServiceInstance, vcsim: dict) -> None:
    state = vcsim["state"]
    vm = find_vm(si, "/DC0/vm/DC0_C0_RP0_VM1")
    vmdisk.inject_fault(state, "CreateSnapshot_Task", fault="TaskInProgress")  # every call until cleared
    for _ in range(2):
        with pytest.raises(vim.fault.TaskInProgress):
            snapshot(vm, "never")
    assert vm.snapshot is None
    vmdisk.clear_fault(state, "CreateSnapshot_Task")
    vmdisk.clear_fault(state, "CreateSnapshot_Task")  # no error when already gone

    vmdisk.inject_fault(state, "ReconfigVM_Task", times=1, fault="SystemError")
    with pytest.raises(vmodl.fault.SystemError, match="injected"):
        enable_cbt(vm)
    assert not vm.config.changeTrackingEnabled
    enable_cbt(vm)
    snap = snapshot(vm, "fault-query")
    try:
        fault_file = vmdisk.inject_fault(state, "QueryChangedDiskAreas", times=2)
        for left in ("1\n", None):
            with pytest.raises(vim.fault.FileFault, match="injected"):
                vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=2000, startOffset=0, changeId="*")
            assert (fault_file.read_text() if fault_file.exists() else None) == left
        assert changed_areas(vm, snap, 2000, "*")[0] == []
        fault_file.write_text("twice\n")
        with pytest.raises(vmodl.fault.SystemError, match="malformed"):
            vm.QueryChangedDiskAreas(snapshot=snap, deviceKey=2000, startOffset=0, changeId="*")
        vmdisk.clear_fault(state, "QueryChangedDiskAreas")
    finally:
        remove(snap)


# --- the vddk stand-in ------------------------------------------------------------------------------


@contextlib.contextmanager
def standin(tmp_path: Path, params: list[str]) -> Iterator[tuple[subprocess.Popen, str]]:
    sock = str(tmp_path / "nbd.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    proc = subprocess.Popen(
        [
            _tool("nbdkit"),
            "-f",
            "-U",
            sock,
            "--exit-with-parent",
            "-r",
            "python",
            str(STANDIN_PLUGIN),
            *params,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock) and proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail("nbdkit did not create its socket", pytrace=False)
            time.sleep(0.02)
        yield proc, f"nbd+unix:///?socket={sock}"
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(10)


def vddk_params(vcsim: dict, vm: dict, file: str, snapshot: str | None = None, /, **over: str) -> list[str]:
    p = {
        "server": vcsim["host"],
        "port": str(vcsim["port"]),
        "user": "user",
        "password": "pass",
        "thumbprint": vcsim["thumbprint"],
        "vm": f"moref={vm['moref']}",
        "file": file,
        "transports": "nbdssl:nbd",
        "compression": "none",
        "libdir": "/opt/vmware-vix-disklib-distrib",
    }
    if snapshot:
        p["snapshot"] = snapshot
    p.update(over)
    return [f"{k}={v}" for k, v in p.items()]


@pytest.fixture(scope="module")
def backup_vm(si: vim.ServiceInstance, vcsim: dict) -> Iterator[tuple[dict, vim.vm.Snapshot]]:
    info = next(v for v in vcsim["vms"] if v["path"] == "/DC0/vm/DC0_C0_RP0_VM0")
    vm = find_vm(si, info["path"])
    for off in (0, 3 * MIB, 9 * MIB + 123):
        vmdisk.write(vcsim["state"], info["moref"], 2000, off, os.urandom(70000))
    snap = snapshot(vm, "sbak-nbd")
    vmdisk.write(vcsim["state"], info["moref"], 2000, 5 * MIB, b"after the snapshot" * 100)
    yield info, snap
    remove(snap)


def test_standin_serves_the_snapshot(tmp_path: Path, vcsim: dict, backup_vm: tuple[dict, vim.vm.Snapshot]) -> None:
    info, snap = backup_vm
    disk = info["disks"][0]
    pw = tmp_path / "pw"
    pw.write_text("pass\n")
    params = vddk_params(vcsim, info, disk["fileName"], snap._moId, password=f"+{pw}")
    with standin(tmp_path, params) as (proc, uri):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        out = tmp_path / "copy.raw"
        subprocess.run([_tool("nbdcopy"), uri, str(out)], check=True, timeout=30)
        frozen = vmdisk.snapshot_path(vcsim["state"], snap._moId, 2000)
        assert out.read_bytes() == frozen.read_bytes()
        assert out.read_bytes() != Path(disk["path"]).read_bytes()
        mapping = subprocess.run(
            [_tool("nbdinfo"), "--map", "--json", uri], check=True, timeout=30, capture_output=True, text=True
        )
        data: list[tuple[int, int]] = []
        for e in json.loads(mapping.stdout):
            if e["type"] & 1:
                continue
            if data and sum(data[-1]) == e["offset"]:
                data[-1] = (data[-1][0], data[-1][1] + e["length"])
            else:
                data.append((e["offset"], e["length"]))
        assert data == data_extents(frozen)
        size = subprocess.run([_tool("nbdinfo"), "--size", uri], check=True, capture_output=True, text=True)
        assert int(size.stdout) == DISK_SIZE
        can = subprocess.run([_tool("nbdinfo"), "--can", "multi-conn", uri], check=False, timeout=30)
        assert can.returncode == 0


def test_standin_without_snapshot_serves_the_live_disk(
    tmp_path: Path, vcsim: dict, backup_vm: tuple[dict, vim.vm.Snapshot]
) -> None:
    info, _ = backup_vm
    disk = info["disks"][0]
    with standin(tmp_path, vddk_params(vcsim, info, disk["fileName"])) as (_, uri):
        out = tmp_path / "live.raw"
        subprocess.run([_tool("nbdcopy"), uri, str(out)], check=True, timeout=30)
        assert out.read_bytes() == Path(disk["path"]).read_bytes()


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("thumbprint", "thumbprint mismatch"),
        ("password", "InvalidLogin"),
        ("vm", "no such virtual machine"),
        ("snapshot", "no such snapshot"),
        ("foreign-snapshot", "no such snapshot"),
        ("file", "not a disk of"),
    ],
)
def test_standin_rejects(
    tmp_path: Path, vcsim: dict, backup_vm: tuple[dict, vim.vm.Snapshot], case: str, expect: str
) -> None:
    info, snap = backup_vm
    other = next(v for v in vcsim["vms"] if v["path"] == "/DC0/vm/DC0_C0_RP0_VM1")
    file, snap_id = info["disks"][0]["fileName"], snap._moId
    over: dict[str, str] = {}
    vm = info
    if case == "thumbprint":
        over["thumbprint"] = ":".join(["AB"] * 20)
    elif case == "password":
        over["password"] = "wrong"
    elif case == "vm":
        over["vm"] = "moref=vm-99999"
    elif case == "snapshot":
        snap_id = "snapshot-99999"
    elif case == "foreign-snapshot":
        vm = other
        file = other["disks"][0]["fileName"]
    elif case == "file":
        file = other["disks"][0]["fileName"]
    with standin(tmp_path, vddk_params(vcsim, vm, file, snap_id, **over)) as (proc, uri):
        res = subprocess.run([_tool("nbdinfo"), "--size", uri], capture_output=True, text=True, timeout=30)
        assert res.returncode != 0
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None
        assert expect in proc.stderr.read()


@pytest.mark.parametrize("bad", ["bogus=1", "compression=lz77", "transports=hotadd", "vm=vm-1"])
def test_standin_rejects_bad_parameters(
    tmp_path: Path, vcsim: dict, backup_vm: tuple[dict, vim.vm.Snapshot], bad: str
) -> None:
    info, snap = backup_vm
    key = bad.split("=", 1)[0]
    params = [
        p for p in vddk_params(vcsim, info, info["disks"][0]["fileName"], snap._moId) if not p.startswith(key + "=")
    ]
    with standin(tmp_path, [*params, bad]) as (proc, _):
        assert proc.wait(10) != 0
