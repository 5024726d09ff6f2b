"""Real backup jobs of an in-process hub without a node: the test plays the node's part through the hub's
own calls (progress reports, completion), so points, samples, stages and failures are the hub's real ones."""

from __future__ import annotations

import asyncio
import time

from sendense_nbd.backup.records import Mode
from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.hub.jobs import Job
from sendense_nbd.hub.repository import Point
from sendense_nbd.hub.requests import BackupRequest, Completion, DiskSpec, Progress
from sendense_nbd.hub.service import Hub

DISK = 2000
SIZE = 4 << 20
MIB = 1 << 20


async def start(hub: Hub, vm_path: str) -> Job:
    """A running backup job of one disk (its export listening, no node told)."""
    return await hub.create_backup(BackupRequest(vm_path, Mode.AUTO, (DiskSpec(DISK, SIZE),)))


async def report(hub: Hub, job: Job, sent: int, *, stage: str = "copying") -> None:
    """A node's progress report: ``sent`` of :data:`SIZE` bytes."""
    body = {"status": "running", "stage": stage, "bytes_transferred": sent, "total_bytes": SIZE,
            "percent": 100.0 * sent / SIZE, "throughput_bps": float(MIB)}  # fmt: skip
    await hub.progress(job.id, Progress.from_json(body))


async def backed_up(hub: Hub, clock: ManualClock, vm_path: str, sent: tuple[int, ...] = (MIB, 3 * MIB)) -> Job:
    """A completed backup whose node reported ``sent`` bytes two seconds apart; its retention has run."""
    job = await start(hub, vm_path)
    for value in sent:
        await clock.advance(2)
        await report(hub, job, value)
    await clock.advance(2)
    disk = {"disk_key": DISK, "change_id": f"52 {job.id}/1", "bytes_transferred": sent[-1], "bytes_changed": SIZE}
    done = {"status": "completed", "disks": [disk]}
    await hub.complete(job.id, Completion.from_json(done))
    await hub.settled()
    return await hub.job(job.id)


async def failed(hub: Hub, vm_path: str, message: str, stage: str = "snapshot") -> Job:
    """A backup its node reported failed, with ``message``."""
    job = await start(hub, vm_path)
    report = {"status": "failed", "error": {"stage": stage, "message": message}}
    await hub.complete(job.id, Completion.from_json(report))
    return await hub.job(job.id)


async def ended(hub: Hub, job_id: str) -> Job:
    """The job once it is over (within a minute)."""
    deadline = time.monotonic() + 60
    while not (job := await hub.job(job_id)).state.terminal:
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.05)
    return job


async def with_digests(hub: Hub, vm_path: str) -> list[Point]:
    """The VM's points once each has its digest sidecar (computed in the background after its backup)."""
    deadline = time.monotonic() + 60
    while True:
        points = await hub.points(vm_path)
        if all(point.digests is not None for point in points):
            return points
        assert time.monotonic() < deadline, points
        await asyncio.sleep(0.05)
