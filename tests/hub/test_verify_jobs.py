"""Verify jobs and digest tasks around their locks, on real qcow2 points (written by qemu-io): a disk
waiting for its lock holds no reader slot, one verify job per VM at a time (``verify_running``), a
sidecar of another chunk size is compared in its own chunks, and any failure ends the job."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import pytest

from sendense_nbd.copy.digests import DigestFile
from sendense_nbd.errors import Conflict
from sendense_nbd.hub import verify
from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.hub.jobs import Job, JobState, JobStore
from sendense_nbd.hub.repository import Point, Repository, VerifyState
from sendense_nbd.hub.requests import ReportedDisk
from sendense_nbd.hub.verify import Verifier, VerifyRequest, record_digests, verify_point
from tests.conftest import require, run

pytestmark = pytest.mark.peer

VM_X, VM_Y = "/DC0/vm/x", "/DC0/vm/y"
DISK = 2000
MIB = 1 << 20
SMALL_CHUNK = 64 << 10


async def _point(repository: Repository, vm_path: str, index: int) -> Point:
    """A completed point (a full, then overlays) with its own data at its own offset."""
    point = await repository.new_point(vm_path, DISK, f"job{index}", incremental=index > 0, capacity=MIB)
    run(require("qemu-io"), "-f", "qcow2", "-c", f"write -P {0x20 + index} {index * SMALL_CHUNK} 70000", point.path)
    await repository.complete([(point.id, ReportedDisk(DISK, f"change-{index}", None))])
    return await repository.point(point.id)


def _raw_digests(point: Point, tmp_path: Path, chunk: int) -> tuple[bytes, ...]:
    raw = tmp_path / f"{point.id}.raw"
    run(require("qemu-img"), "convert", "-O", "raw", point.path, str(raw))
    data = raw.read_bytes()
    return tuple(hashlib.sha256(data[o : o + chunk]).digest() for o in range(0, len(data), chunk))


async def test_a_disk_waiting_for_its_lock_holds_no_reader_slot(repository: Repository) -> None:
    waiting = [await _point(repository, VM_X, i) for i in range(verify.READERS)]
    other = await _point(repository, VM_Y, 0)
    readers = asyncio.Semaphore(verify.READERS)
    async with repository.disk_lock(VM_X, DISK):  # a long verify of disk X
        queued = [asyncio.create_task(record_digests(repository, p.id, readers=readers)) for p in waiting]
        await asyncio.sleep(0.2)  # they reach X's lock and wait there
        await asyncio.wait_for(record_digests(repository, other.id, readers=readers), 30)
        assert (await repository.point(other.id)).digests == f"{other.id}.digests"
        assert not any(task.done() for task in queued)
    await asyncio.wait_for(asyncio.gather(*queued), 60)
    assert [(await repository.point(p.id)).digests for p in waiting] == [f"{p.id}.digests" for p in waiting]


async def _ended(jobs: JobStore, job_id: str) -> Job:
    deadline = time.monotonic() + 60
    while not (job := await jobs.get(job_id)).state.terminal:
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.05)
    return job


async def test_one_verify_job_per_vm_at_a_time(repository: Repository) -> None:
    points = [await _point(repository, VM_X, i) for i in range(2)]
    await _point(repository, VM_Y, 0)
    jobs = JobStore(repository.db)
    verifier = Verifier(repository, jobs, clock=ManualClock(0), job_timeout=600)
    try:
        async with repository.disk_lock(VM_X, DISK):  # the first job waits here, running
            first = await verifier.start(VerifyRequest(vm_path=VM_X))
            for again in (VerifyRequest(vm_path=VM_X), VerifyRequest(point_id=points[0].id)):
                with pytest.raises(Conflict, match=f"verify job {first.id} of {VM_X} has not ended") as refused:
                    await verifier.start(again)
                assert refused.value.code == "verify_running"
            elsewhere = await verifier.start(VerifyRequest(vm_path=VM_Y))  # another VM: no clash
            assert (await _ended(jobs, elsewhere.id)).state is JobState.COMPLETED
        assert (await _ended(jobs, first.id)).state is JobState.COMPLETED
        second = await verifier.start(VerifyRequest(point_id=points[1].id))  # the first one ended
        assert (await _ended(jobs, second.id)).state is JobState.COMPLETED
    finally:
        await verifier.close()


async def test_a_sidecar_of_another_chunk_size_is_compared_in_its_chunks(
    repository: Repository, tmp_path: Path
) -> None:
    await _point(repository, VM_X, 0)
    point = await _point(repository, VM_X, 1)
    sidecar = DigestFile(MIB, SMALL_CHUNK, _raw_digests(point, tmp_path, SMALL_CHUNK))
    sidecar.write(repository.digest_path(point))  # as a hub with another chunk size wrote it
    await repository.set_digests(point.id, Path(repository.digest_path(point)).name)
    readers = asyncio.Semaphore(1)
    verdict = await verify_point(repository, point, ManualClock(0), readers=readers)
    assert verdict is not None and (verdict.state, verdict.error) == (VerifyState.VERIFIED.value, None), verdict
    run(require("qemu-io"), "-f", "qcow2", "-c", f"write -P 0x77 {5 * SMALL_CHUNK + 100} 1", point.path)  # damage
    verdict = await verify_point(repository, point, ManualClock(0), readers=readers)
    assert verdict is not None and verdict.state == VerifyState.DAMAGED.value, verdict
    assert verdict.bad_offset == 5 * SMALL_CHUNK and f"({SMALL_CHUNK} bytes)" in str(verdict.error), verdict


async def test_any_failure_of_a_verify_job_fails_it_and_reports_it(
    repository: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _point(repository, VM_X, 0)
    jobs = JobStore(repository.db)
    reported: list[Job] = []

    async def on_failed(job: Job) -> None:
        reported.append(job)

    async def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("a bug in the verify code")

    monkeypatch.setattr(verify, "verify_point", broken)
    verifier = Verifier(repository, jobs, clock=ManualClock(0), job_timeout=600, on_failed=on_failed)
    try:
        job = await _ended(jobs, (await verifier.start(VerifyRequest(vm_path=VM_X))).id)
    finally:
        await verifier.close()
    assert job.state is JobState.FAILED and job.error is not None and "a bug in the verify code" in job.error.message
    assert [j.id for j in reported] == [job.id]
