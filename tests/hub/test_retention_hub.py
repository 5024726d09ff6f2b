"""Retention as the hub applies it (an in-process hub on a hand-moved clock, real qcow2 points written
over NBD by libnbd, read back by nbdcopy and qemu-img): a VM's points are kept by the rules of every
policy covering it, whatever job made the newest point; ``--keep`` applies only to VMs no policy
covers; a point a restore serves stays (its export reads the same bytes) until the restore ends."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from sendense_nbd.backup.records import Mode
from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.hub.jobs import JobState
from sendense_nbd.hub.requests import BackupRequest, Completion, DiskSpec, ReportedDisk, RestoreAction, RestoreRequest
from sendense_nbd.hub.service import Hub, HubConfig
from sendense_nbd.policy.model import Policy
from sendense_nbd.storage.modes import ImageFormat
from tests.conftest import require, run
from tests.hub.conftest import free_port_range, nbd_write
from tests.hub.test_retention import _AcceptingNode

pytestmark = pytest.mark.peer

VM, OTHER = "/DC0/vm/web01", "/DC1/vm/db01"
DISK = 2000
MIB = 1 << 20
SIZE = 4 * MIB
#: Noon UTC, 2026-03-01.
MARCH = dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC).timestamp()


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    node = _AcceptingNode()
    await node.start()
    config = HubConfig(
        repo=str(tmp_path / "repo"), nbd_ports=free_port_range(6), node_url=node.url, keep_points=1,
        clock=ManualClock(MARCH),
    )  # fmt: skip
    running = Hub(config)
    await running.start()
    try:
        yield running
    finally:
        running.close()
        await running.wait_closed()
        await node.close()


async def _backup(
    hub: Hub, vm_path: str, change: str, writes: Sequence[tuple[int, bytes]] = (), policy: str | None = None
) -> None:
    """One backup an hour after the hub clock's time: its writes go into its export over NBD; then its
    completion, and its retention."""
    clock = hub.clock
    assert isinstance(clock, ManualClock)
    await clock.advance(3600)
    job = await hub.create_backup(BackupRequest(vm_path, Mode.AUTO, (DiskSpec(DISK, SIZE),), policy=policy))
    if writes:
        await asyncio.to_thread(nbd_write, job.detail.disks[0].uri, list(writes))
    await hub.complete(job.id, Completion(vm_path, (ReportedDisk(DISK, change, None),)))
    await hub.settled()


async def test_every_policy_covering_a_vm_keeps_its_points_whatever_job_ran(hub: Hub) -> None:
    clock = hub.clock
    assert isinstance(clock, ManualClock)
    gfs = {"name": "gfs", "vms": {"include": ["/DC0/vm"]}, "retention": {"keep_last": 1, "keep_monthly": 3}}
    last = {"name": "last", "vms": {"include": [VM]}, "retention": {"keep_last": 2}}
    for spec in (gfs, last):  # disabled: no scheduled run, their rules still hold for their VMs
        policy = Policy.from_json({**spec, "schedule": {"every": 3600}, "enabled": False})
        await hub.scheduler.store.add(policy, clock.now())
    days = [0, 31, 62, 62.5, 63]  # March, April, May (three)
    for index, day in enumerate(days):
        await clock.advance(MARCH + day * 86400 - clock.now())
        for vm_path in (VM, OTHER):  # ad hoc jobs (POST /backups), the last one of VM the policy "last"'s
            policy = "last" if vm_path == VM and index == len(days) - 1 else None
            await _backup(hub, vm_path, f"change-{index}", policy=policy)
    # gfs keeps the newest of each month (0, 1, 4), last the newest two (3, 4); --keep 1 is not used for VM
    assert [p.change_id for p in await hub.points(VM)] == ["change-0", "change-1", "change-3", "change-4"]
    assert [p.change_id for p in await hub.points(OTHER)] == ["change-4"]  # no policy covers it: --keep 1
    await hub.scheduler.store.delete("gfs")
    await _backup(hub, VM, "change-5")
    assert [p.change_id for p in await hub.points(VM)] == ["change-4", "change-5"]


async def _nbd_read(uri: str, path: Path) -> bytes:
    await asyncio.to_thread(run, require("nbdcopy"), uri, str(path))
    return await asyncio.to_thread(path.read_bytes)


async def test_a_point_being_served_stays_and_reads_the_same(hub: Hub, tmp_path: Path) -> None:
    first = [(0, os.urandom(MIB)), (3 * MIB, os.urandom(65536))]
    await _backup(hub, VM, "change-0", first)
    [served] = await hub.points(VM)
    export = await hub.restore(RestoreRequest(served.id, RestoreAction.EXPORT, ImageFormat.RAW, None))
    assert export.state is JobState.RUNNING
    uri = export.detail.uri
    before = await _nbd_read(uri, tmp_path / "before.raw")
    expected = bytearray(SIZE)
    for offset, data in first:
        expected[offset : offset + len(data)] = data
    assert before == bytes(expected)

    newer = [[(4096, os.urandom(MIB)), (3 * MIB, os.urandom(4096))], [(0, os.urandom(8192)), (2 * MIB, b"x" * 65536)]]
    for index, writes in enumerate(newer, start=1):  # --keep 1 would drop the served point at each
        await _backup(hub, VM, f"change-{index}", writes)
        for offset, data in writes:
            expected[offset : offset + len(data)] = data
    points = await hub.points(VM)
    assert [p.id for p in points][0] == served.id and len(points) == 2  # the middle one went
    assert await _nbd_read(uri, tmp_path / "after.raw") == before
    run(require("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", str(tmp_path / "before.raw"), served.path)
    # A convert of the served point meanwhile (it holds the disk's lock) reads the same bytes too.
    converted = await hub.restore(RestoreRequest(served.id, RestoreAction.CONVERT, ImageFormat.RAW, "served.raw"))
    assert converted.state is JobState.COMPLETED, converted
    assert await asyncio.to_thread(Path(hub.restore_dir, "served.raw").read_bytes) == before

    await hub.stop_restore(export.id)  # the restore ended: the next backup's retention drops it
    await _backup(hub, VM, "change-3", [(SIZE - 4096, b"y" * 4096)])
    expected[SIZE - 4096 :] = b"y" * 4096
    [newest] = await hub.points(VM)
    assert newest.change_id == "change-3"
    await asyncio.to_thread((tmp_path / "expected.raw").write_bytes, bytes(expected))
    run(require("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", str(tmp_path / "expected.raw"), newest.path)
