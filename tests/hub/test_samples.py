"""A job's throughput samples: each progress report's ``bytes_transferred`` at the hub's clock, the final
bytes at completion (``GET /backups/{job}/samples``); at most :data:`MAX_SAMPLES` per job, thinned so the
first and newest stay and the whole job stays covered; gone when the job is pruned."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sendense_nbd.backup.records import Mode
from sendense_nbd.errors import UnknownJob
from sendense_nbd.hub.clock import ManualClock
from sendense_nbd.hub.db import Connection, Database
from sendense_nbd.hub.jobs import JobKind, JobState, JobStore, Outcome
from sendense_nbd.hub.requests import Failure, Progress
from sendense_nbd.hub.samples import MAX_SAMPLES, Sample
from tests.hub.operating import START, LocalHub, local_hub
from tests.hub.test_retention import _AcceptingNode

pytestmark = pytest.mark.peer

VM = "/DC0/vm/web01"
DISKS = [{"key": 2000, "capacity": 4 << 20}, {"key": 2001, "capacity": 4 << 20}]


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[LocalHub]:
    node = _AcceptingNode()
    await node.start()
    try:
        async with local_hub(tmp_path / "repo", clock=ManualClock(START), node_url=node.url) as running:
            yield running
    finally:
        await node.close()


@pytest.fixture
def store(tmp_path: Path, store_target: str) -> Iterator[tuple[JobStore, ManualClock, Database]]:
    db = Database(store_target)
    clock = ManualClock(START)
    yield JobStore(db, clock), clock, db
    db.close()


async def test_each_report_and_the_completion_is_a_sample_on_the_hubs_clock(hub: LocalHub) -> None:
    job = await hub.ok("POST", "/backups", {"vm_path": VM, "disks": DISKS})
    job_id = job["job_id"]
    assert await hub.ok("GET", f"/backups/{job_id}/samples") == {"samples": []}
    sent = [0, 1 << 20, 3 << 20, 6 << 20]
    for index, count in enumerate(sent):
        await hub.clock.advance(2.5)
        await hub.ok("POST", f"/backups/{job_id}/progress", {"status": "running", "bytes_transferred": count})
        if index == 1:  # a report without a byte count is no sample
            await hub.ok("POST", f"/backups/{job_id}/progress", {"status": "running", "stage": "transferring"})
    await hub.clock.advance(4)
    disks = [{"disk_key": 2000, "bytes_transferred": 4 << 20}, {"disk_key": 2001, "bytes_transferred": 3 << 20}]
    await hub.ok("POST", f"/backups/{job_id}/complete", {"status": "completed", "disks": disks})
    expected = [[START + 2.5 * (i + 1), count] for i, count in enumerate(sent)] + [[START + 14, 7 << 20]]
    assert (await hub.ok("GET", f"/backups/{job_id}/samples"))["samples"] == expected
    assert [s.to_json() for s in await hub.hub.job_samples(job_id)] == expected
    await hub.ok("POST", f"/backups/{job_id}/progress", {"status": "completed", "bytes_transferred": 7 << 20})
    assert len((await hub.ok("GET", f"/backups/{job_id}/samples"))["samples"]) == len(expected) + 1


async def test_a_job_without_byte_counts_has_no_final_sample(hub: LocalHub) -> None:
    job = await hub.ok("POST", "/backups", {"vm_path": VM, "disks": DISKS[:1]})
    report = {"status": "completed", "disks": [{"disk_key": 2000}]}
    await hub.ok("POST", f"/backups/{job['job_id']}/complete", report)
    assert await hub.ok("GET", f"/backups/{job['job_id']}/samples") == {"samples": []}


@pytest.mark.parametrize("job_id", ["20260302-080000-deadbeef", "no%20such", ".x"])
async def test_an_unknown_job_has_no_samples_404(hub: LocalHub, job_id: str) -> None:
    status, answer = await hub.call("GET", f"/backups/{job_id}/samples")
    assert status == 404 and answer["error"]["code"] == "not_found", answer
    with pytest.raises(UnknownJob):
        await hub.hub.job_samples("20260302-080000-deadbeef")


async def test_a_long_job_keeps_its_first_and_newest_sample_and_stays_covered(
    store: tuple[JobStore, ManualClock, Database],
) -> None:
    jobs, clock, _ = store
    job = await jobs.create(JobKind.BACKUP, VM, Mode.FULL, None, lifetime=3600)
    await jobs.transition(job.id, JobState.RUNNING)
    reports = 700
    for index in range(reports):
        await clock.advance(2)
        await jobs.set_progress(job.id, Progress(status="running", bytes_transferred=index * 1000))
        count = len(await jobs.samples(job.id))
        assert count == index + 1 if index < MAX_SAMPLES - 1 else MAX_SAMPLES // 2 <= count <= MAX_SAMPLES
    samples = await jobs.samples(job.id)
    assert samples[0] == Sample(START + 2, 0)
    assert samples[-1] == Sample(START + 2 * reports, (reports - 1) * 1000)
    times = [s.t for s in samples]
    assert times == sorted(times) and len(set(times)) == len(times)
    gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
    span = times[-1] - times[0]
    assert max(gaps) <= 2 * span / len(samples)  # thinned evenly: no part of the job left bare
    assert all(s.bytes == (s.t - START - 2) / 2 * 1000 for s in samples)  # each is a real report's pair


async def test_samples_on_one_clock_moment_are_thinned_too(store: tuple[JobStore, ManualClock, Database]) -> None:
    jobs, _, _ = store
    job = await jobs.create(JobKind.BACKUP, VM, Mode.FULL, None, lifetime=3600)
    await jobs.transition(job.id, JobState.RUNNING)
    for index in range(MAX_SAMPLES + 5):
        await jobs.set_progress(job.id, Progress(status="running", bytes_transferred=index))
    samples = await jobs.samples(job.id)
    assert len(samples) <= MAX_SAMPLES and samples[0].bytes == 0 and samples[-1].bytes == MAX_SAMPLES + 4


async def test_pruned_jobs_take_their_samples_with_them(store: tuple[JobStore, ManualClock, Database]) -> None:
    jobs, clock, db = store
    made = []
    for vm_path in (VM, "/DC0/vm/db01"):
        for _ in range(3):
            job = await jobs.create(JobKind.BACKUP, vm_path, Mode.AUTO, None, lifetime=60)
            await jobs.transition(job.id, JobState.RUNNING)
            for count in (10, 20):
                await clock.advance(1)
                await jobs.set_progress(job.id, Progress(status="running", bytes_transferred=count))
            await jobs.transition(job.id, JobState.COMPLETED, outcome=Outcome(None, 30, 30))
            made.append(job.id)
    running = await jobs.create(JobKind.BACKUP, VM, Mode.AUTO, None, lifetime=60)
    await jobs.transition(running.id, JobState.RUNNING)
    await jobs.set_progress(running.id, Progress(status="running", bytes_transferred=5))
    assert await jobs.prune(keep=1) == 4
    kept = {made[2], made[5], running.id}
    for job_id in made:
        if job_id in kept:
            assert [s.bytes for s in await jobs.samples(job_id)] == [10, 20, 30]
        else:
            with pytest.raises(UnknownJob):
                await jobs.samples(job_id)

    def left(connection: Connection) -> set[str]:
        return {row[0] for row in connection.execute("SELECT DISTINCT job_id FROM job_samples")}

    assert await db.run(left) == kept
    assert [s.bytes for s in await jobs.samples(running.id)] == [5]
    assert (await jobs.transition(running.id, JobState.FAILED, error=Failure("node", "x"))).state is JobState.FAILED
    assert [s.bytes for s in await jobs.samples(running.id)] == [5]  # a failure adds no final sample
