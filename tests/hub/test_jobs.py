"""The job store on its own: the transition table is what the store enforces, and every typed job
(its detail, progress and error) comes back from the store as it went in."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from sendense_nbd.backup.records import Mode, SyncType
from sendense_nbd.errors import BadRequest, JobStateError, UnknownJob
from sendense_nbd.hub.db import Database
from sendense_nbd.hub.jobs import (
    BackupDetail,
    ConvertDetail,
    Detail,
    DiskExport,
    ExportDetail,
    JobKind,
    JobState,
    JobStore,
)
from sendense_nbd.hub.requests import Completion, Failure, Progress, RestoreAction
from sendense_nbd.storage.modes import ImageFormat

P, R, C, F, X = JobState.PENDING, JobState.RUNNING, JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED
#: The module docstring's diagram, written out: every move a job may make.
ALLOWED = {(P, R), (P, F), (P, X), (R, C), (R, F), (R, X)}
#: How a fresh job reaches each state.
PATHS = {P: [], R: [R], C: [R, C], F: [F], X: [R, X]}


@pytest.fixture
def store(tmp_path: Path, store_target: str) -> Iterator[JobStore]:
    db = Database(store_target)
    yield JobStore(db)
    db.close()


async def test_the_store_allows_exactly_the_moves_of_the_diagram(store: JobStore) -> None:
    for start, target in itertools.product(JobState, JobState):
        job = await store.create(JobKind.BACKUP, "/DC/vm/a", Mode.FULL, BackupDetail(), lifetime=60)
        for state in PATHS[start]:
            await store.transition(job.id, state)
        assert (await store.get(job.id)).state is start
        if (start, target) in ALLOWED:
            assert (await store.transition(job.id, target)).state is target
        else:
            with pytest.raises(JobStateError, match=f"is {start.value}; it cannot become {target.value}"):
                await store.transition(job.id, target)
            assert (await store.get(job.id)).state is start
        assert start.terminal == (start in (C, F, X))
    with pytest.raises(UnknownJob):
        await store.transition("nosuch", R)


async def test_running_progress_is_refused_once_a_job_ended(store: JobStore) -> None:
    job = await store.create(JobKind.BACKUP, "/DC/vm/a", Mode.AUTO, BackupDetail(), lifetime=60)
    await store.set_progress(job.id, Progress(status="running", percent=5))
    await store.transition(job.id, F, error=Failure("transferring", "boom"))
    with pytest.raises(JobStateError, match="running progress is refused"):
        await store.set_progress(job.id, Progress(status="running"))
    final = await store.set_progress(job.id, Progress(status="failed"))
    assert final.progress == Progress(status="failed") and final.error == Failure("transferring", "boom")


DISK = DiskExport(2000, 10100, "j-2000", "nbd://127.0.0.1:10100/j-2000", "p1", SyncType.INCREMENTAL, "p0")
DETAILS: list[tuple[JobKind, Mode | RestoreAction, Detail]] = [
    (JobKind.BACKUP, Mode.FULL, BackupDetail()),
    (JobKind.BACKUP, Mode.INCREMENTAL, BackupDetail((DISK, DISK))),
    (JobKind.RESTORE, RestoreAction.EXPORT, None),
    (JobKind.RESTORE, RestoreAction.EXPORT, ExportDetail("p1", 10101, "restore-p1", "nbd://h:10101/restore-p1")),
    (JobKind.RESTORE, RestoreAction.CONVERT, ConvertDetail("p1", "/srv/restores/a.raw", ImageFormat.RAW)),
]


@pytest.mark.parametrize(("kind", "mode", "detail"), DETAILS)
async def test_a_typed_job_comes_back_from_the_store_as_it_went_in(
    store: JobStore, kind: JobKind, mode: Mode | RestoreAction, detail: Detail
) -> None:
    created = await store.create(kind, "/DC/vm/a", mode, detail, lifetime=60)
    assert await store.get(created.id) == created
    report = Progress.from_json(
        {"job_id": "", "status": "running", "percent": 1.5, "unknown": [1], "error": {"message": "a\x00b"},
         "disks": [{"disk_key": 2000, "done": False, "bytes_zeroed": 7, "extra": None}]}
    )  # fmt: skip
    reported = await store.set_progress(created.id, report)
    assert reported == attrs.evolve(created, progress=report, updated=reported.updated)
    stored = await store.transition(created.id, F, error=Failure("hub", "the hub restarted"))
    assert stored.progress == report and stored.detail == detail and stored.mode is mode
    assert stored.error == Failure("hub", "the hub restarted") and stored.state is F
    shown = stored.to_json()
    assert shown["detail"] == ({} if detail is None else detail.to_json())
    assert shown["progress"] == {
        "job_id": "", "status": "running", "percent": 1.5,
        "disks": [{"disk_key": 2000, "bytes_zeroed": 7, "done": False}],
        "error": {"stage": "node", "message": "a\ufffdb"},
    }  # fmt: skip


def test_completion_values() -> None:
    failed = Completion.from_json({"status": "failed", "error": {"stage": "x" * 100}})
    assert failed.failure == Failure("x" * 64, "the node reported a failure", "node") and failed.disks == ()
    done = Completion.from_json({"status": "completed", "disks": [{"disk_key": 1, "change_id": "c", "new": 1}]})
    assert done.failure is None and [(d.disk_key, d.change_id, d.disk_uuid) for d in done.disks] == [(1, "c", None)]
    with pytest.raises(BadRequest, match="reported twice"):
        Completion.from_json({"status": "completed", "disks": [{"disk_key": 1}, {"disk_key": 1}]})


async def test_prune_keeps_each_vms_newest_finished_jobs_and_every_running_one(store: JobStore) -> None:
    made: dict[str, list[str]] = {"/DC/vm/a": [], "/DC/vm/b": []}
    for vm_path in made:
        for _ in range(5):
            job = await store.create(JobKind.BACKUP, vm_path, Mode.AUTO, BackupDetail(), lifetime=60)
            await store.transition(job.id, JobState.FAILED, error=Failure("node", "x"))
            made[vm_path].append(job.id)
    running = await store.create(JobKind.BACKUP, "/DC/vm/a", Mode.AUTO, BackupDetail(), lifetime=60)
    assert await store.prune(keep=2) == 6
    for vm_path, ids in made.items():
        kept = [job.id for job in await store.list(vm_path=vm_path) if job.state is JobState.FAILED]
        assert kept == ids[-2:]
    assert (await store.get(running.id)).state is JobState.PENDING
    assert await store.prune(keep=2) == 0
