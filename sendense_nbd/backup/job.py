"""One VMware backup job: snapshot, copy each disk (full or CBT-incremental), flush, record.

Order of a job (each step's failure leaves the previous change IDs as they were):

1. find the VM and its disks; read each disk's previous change ID (hub API or state file);
2. remove stale ``sbak-*`` snapshots; switch CBT on if it is off;
3. take ``sbak-<job>``; decide full or incremental per disk;
4. per disk, in parallel: nbdkit (vddk) on the snapshot -> copy engine -> the disk's NBD target,
   ending with a FLUSH;
5. remove the snapshot (always, also on error or cancellation);
6. only then record the snapshot's change IDs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

import attrs

from sendense_nbd.backup.progress import JobProgress
from sendense_nbd.backup.records import DiskResult, Mode, PreviousBackup, SyncType
from sendense_nbd.copy import CopyOptions, Endpoint, Progress, copy, open_source, open_target
from sendense_nbd.errors import (
    BackupError,
    ChangeIdError,
    CopyError,
    EndpointError,
    SendenseError,
    SnapshotNotRemoved,
    first_error,
)
from sendense_nbd.vmware.cbt import changed_areas, enable_cbt
from sendense_nbd.vmware.inventory import Disk, VirtualMachine, find_vm, vm_disks
from sendense_nbd.vmware.session import VSphere
from sendense_nbd.vmware.snapshots import BACKUP_PREFIX, Snapshot, create_snapshot, remove_snapshot, remove_stale
from sendense_nbd.vmware.vddk import VddkConfig, VddkSource

log = logging.getLogger(__name__)


class ChangeIdStore(Protocol):
    """Where change IDs live: the hub API or a local state file."""

    async def previous(self, vm_path: str, disk_key: int) -> PreviousBackup | None:
        """The disk's last recorded change ID; None when none is known."""

    async def complete(self, job_id: str, vm_path: str, disks: Sequence[DiskResult]) -> None:
        """Record the job's new change IDs: only after every disk was flushed and the snapshot removed."""

    async def failed(self, job_id: str, vm_path: str, stage: str, message: str) -> None:
        """The job failed at ``stage``: the previous change IDs stay."""

    async def progress(self, job_id: str, report: dict[str, object]) -> None:
        """A progress report (best effort)."""


@attrs.frozen
class BackupSpec:
    """What one job backs up, where to, and how hard it pushes."""

    job_id: str
    vm_path: str
    #: NBD URI per disk key; a single ``None`` key means "the VM's only disk".
    targets: Mapping[int | None, str]
    mode: Mode = Mode.AUTO
    quiesce: bool = False
    #: Connections per disk and side.
    connections: int = 4
    #: Requests in flight per connection.
    requests: int = 16
    verify: bool = False
    #: Reconnects of a copy endpoint after a transient failure.
    retries: int = 5


@attrs.frozen
class DiskSource:
    """How a job reads its disks: nbdkit-vddk with ``vddk``, logged in with ``password``."""

    vddk: VddkConfig
    password: str = attrs.field(repr=False)


@attrs.frozen
class BackupResult:
    """A completed job: its snapshot (removed by now) and every disk's result."""

    job_id: str
    vm_path: str
    snapshot: str
    disks: tuple[DiskResult, ...]


@attrs.frozen
class _Job:
    """What every step of a running job uses."""

    spec: BackupSpec
    source: DiskSource
    vsphere: VSphere
    store: ChangeIdStore
    progress: JobProgress
    on_note: Callable[[str], None]


@attrs.define
class _DiskPlan:
    disk: Disk
    target: str
    sync_type: SyncType
    areas: list[tuple[int, int]] | None
    full_reason: str | None


async def run_backup(
    spec: BackupSpec,
    *,
    source: DiskSource,
    vsphere: VSphere,
    store: ChangeIdStore,
    progress: JobProgress,
    on_note: Callable[[str], None] = log.info,
) -> BackupResult:
    """Run one backup job; raises :class:`BackupError` (with its stage) on failure.

    The job's snapshot is removed on every path, including cancellation;
    the new change IDs are recorded only after every disk was flushed and
    the snapshot is gone.
    """
    job = _Job(spec, source, vsphere, store, progress, on_note)
    progress.start()
    try:
        result = await _run(job)
    except asyncio.CancelledError:
        await _report_failure(job, "the job was cancelled", progress.stage, cancelled=True)
        raise
    except BackupError as exc:
        await _report_failure(job, str(exc), exc.stage)
        raise
    except Exception as exc:  # a defect: still report the job as failed, with its stage
        error = BackupError(f"unexpected {type(exc).__name__}: {exc}", progress.stage, reason=exc)
        await _report_failure(job, str(error), error.stage)
        raise error from exc
    progress.set_stage("finalizing")
    try:
        await store.complete(spec.job_id, spec.vm_path, result.disks)
    except SendenseError as exc:
        message = f"the backup was copied and flushed, but recording its change IDs failed: {exc}"
        await _report_failure(job, message, "finalizing")
        raise BackupError(message, "finalizing", reason=exc) from exc
    await progress.finish("completed")
    return result


async def _report_failure(job: _Job, message: str, stage: str, *, cancelled: bool = False) -> None:
    """The final progress report and the failure report, naming ``stage``: where the job failed or was
    cancelled (the snapshot's removal after a failure is cleanup, not a stage the job reached)."""
    status = "cancelled" if cancelled else "failed"
    job.progress.set_stage(stage)
    await asyncio.shield(job.progress.finish(status, {"stage": stage, "message": message}))
    try:
        await asyncio.shield(job.store.failed(job.spec.job_id, job.spec.vm_path, stage, message))
    except SendenseError as exc:
        log.warning("telling the hub that job %s failed did not work: %s", job.spec.job_id, exc)


async def _run(job: _Job) -> BackupResult:
    """Steps 1 to 5 of the module's order; the caller records the change IDs."""
    spec, vsphere, progress = job.spec, job.vsphere, job.progress
    stage = "initializing"
    progress.set_stage(stage)
    try:
        vm = await vsphere.call(find_vm, vsphere.si, spec.vm_path)
        selected = _select(await vsphere.call(vm_disks, vm), spec.targets, spec.vm_path)
        previous = {}
        if spec.mode != Mode.FULL:
            for disk, _ in selected:
                previous[disk.key] = await job.store.previous(spec.vm_path, disk.key)

        stage = "cleaning old snapshots"
        progress.set_stage(stage)
        for name in await vsphere.call(remove_stale, vsphere.si, vm, BACKUP_PREFIX):
            job.on_note(f"removed stale snapshot {name}")

        cbt_just_enabled = False
        if not vm.cbt_enabled:
            stage = "enabling CBT"
            progress.set_stage(stage)
            job.on_note(f"{spec.vm_path}: CBT was off; enabling it (every disk gets a full copy this time)")
            await vsphere.call(enable_cbt, vsphere.si, vm, f"{BACKUP_PREFIX}{spec.job_id}-cbt")
            cbt_just_enabled = True

        stage = "creating snapshot"
        progress.set_stage(stage)
        snapshot = await _create_snapshot(job, vm)
    except SendenseError as exc:
        raise BackupError(str(exc), stage, reason=exc) from exc

    try:
        disk_results = await _copy_disks(job, vm, snapshot, selected, previous, cbt_just_enabled)
    except BaseException:
        try:
            await asyncio.shield(_remove_snapshot(job, vm, snapshot, cleanup=True))
        except BackupError as cleanup:  # the copy's error is the one to report
            job.on_note(str(cleanup))
        raise
    await asyncio.shield(_remove_snapshot(job, vm, snapshot))
    return BackupResult(spec.job_id, spec.vm_path, snapshot.name, tuple(disk_results))


async def _create_snapshot(job: _Job, vm: VirtualMachine) -> Snapshot:
    """Take the job's snapshot; if the job is cancelled meanwhile, wait for it and remove it."""
    vsphere = job.vsphere
    creating = asyncio.get_running_loop().create_task(
        vsphere.call(create_snapshot, vsphere.si, vm, f"{BACKUP_PREFIX}{job.spec.job_id}", quiesce=job.spec.quiesce)
    )
    try:
        return await asyncio.shield(creating)
    except asyncio.CancelledError:
        try:
            snapshot = await creating
        except SendenseError:
            raise asyncio.CancelledError() from None
        try:
            await _remove_snapshot(job, vm, snapshot, cleanup=True)
        except BackupError as exc:
            log.warning("%s", exc)
        raise


async def _remove_snapshot(job: _Job, vm: VirtualMachine, snapshot: Snapshot, *, cleanup: bool = False) -> None:
    """Remove the job's snapshot; ``cleanup`` (after a failure) keeps the stage the job failed at."""
    if not cleanup:
        job.progress.set_stage("finalizing")
    try:
        await job.vsphere.call(remove_snapshot, job.vsphere.si, vm, snapshot)
    except SendenseError as exc:
        message = f"{exc}; the next run removes it as a stale {BACKUP_PREFIX}* snapshot"
        raise SnapshotNotRemoved(message, "finalizing", reason=exc) from exc


def _select(disks: list[Disk], targets: Mapping[int | None, str], vm_path: str) -> list[tuple[Disk, str]]:
    """Each disk to back up with its target (a ``None`` key: the VM's only disk)."""
    if not disks:
        raise BackupError(f"{vm_path} has no virtual disks", "initializing")
    if None in targets:
        if len(disks) != 1:
            keys = ", ".join(str(d.key) for d in disks)
            raise BackupError(
                f"{vm_path} has {len(disks)} disks ({keys}): give one target per disk with --nbd-targets KEY=URI",
                "initializing",
            )
        return [(disks[0], targets[None])]
    by_key = {d.key: d for d in disks}
    unknown = [k for k in targets if k not in by_key]
    if unknown:
        keys = ", ".join(str(d.key) for d in disks)
        raise BackupError(f"{vm_path} has no disk with key {unknown[0]} (its disks: {keys})", "initializing")
    return [(by_key[k], uri) for k, uri in sorted(targets.items(), key=lambda item: item[0] or 0) if k is not None]


async def _plan(
    job: _Job,
    vm: VirtualMachine,
    snapshot: Snapshot,
    disk: Disk,
    target: str,
    previous: PreviousBackup | None,
    cbt_just_enabled: bool,
) -> _DiskPlan:
    """Full or incremental for one disk, and why a full copy."""

    def full(reason: str) -> _DiskPlan:
        return _DiskPlan(disk, target, SyncType.FULL, None, reason)

    if job.spec.mode == Mode.FULL:
        return full("a full backup was asked for")
    if cbt_just_enabled:
        return full("CBT was just enabled")
    if previous is None:
        return full("no previous change ID is known for this disk")
    if previous.disk_uuid and disk.uuid and previous.disk_uuid != disk.uuid:
        return full(f"the disk's identity changed (UUID {previous.disk_uuid} -> {disk.uuid})")
    if previous.capacity is not None and previous.capacity != disk.capacity:
        return full(f"the disk's size changed ({previous.capacity} -> {disk.capacity} bytes)")
    try:
        areas = await job.vsphere.call(changed_areas, job.vsphere.si, vm, snapshot, disk, previous.change_id)
    except ChangeIdError as exc:
        return full(f"CBT was reset: {exc}")
    return _DiskPlan(disk, target, SyncType.INCREMENTAL, areas, None)


async def _copy_disks(
    job: _Job,
    vm: VirtualMachine,
    snapshot: Snapshot,
    selected: list[tuple[Disk, str]],
    previous: Mapping[int, PreviousBackup | None],
    cbt_just_enabled: bool,
) -> list[DiskResult]:
    """Plan every disk at the snapshot, then copy them all in parallel."""
    stage = "preparing"
    job.progress.set_stage(stage)
    try:
        frozen = {d.key: d for d in await job.vsphere.call(snapshot.disks)}
        plans = []
        for disk, target in selected:
            at_snapshot = frozen.get(disk.key, disk)
            plan = await _plan(job, vm, snapshot, at_snapshot, target, previous.get(disk.key), cbt_just_enabled)
            if plan.full_reason and job.spec.mode != Mode.FULL:
                job.on_note(f"disk {disk.key}: full copy: {plan.full_reason}")
            job.progress.disk(disk.key).sync_type = plan.sync_type.value
            plans.append(plan)
    except SendenseError as exc:
        raise BackupError(str(exc), stage, reason=exc) from exc

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_copy_disk(job, vm, snapshot, plan)) for plan in plans]
    except BaseExceptionGroup as group_error:
        raise first_error(group_error, prefer=BackupError) from None
    return [task.result() for task in tasks]


async def _copy_disk(job: _Job, vm: VirtualMachine, snapshot: Snapshot, plan: _DiskPlan) -> DiskResult:
    """One disk: its nbdkit source on the snapshot, both endpoints, the copy; everything closed after."""
    disk = plan.disk
    job.progress.set_stage("setting up NBD")
    async with contextlib.AsyncExitStack() as opened:
        source, target = await _open_disk(job, vm, snapshot, plan, opened)
        job.progress.set_stage("transferring")

        def on_progress(event: Progress) -> None:
            job.progress.copy_event(disk.key, event)

        try:
            options = CopyOptions(
                connections=job.spec.connections,
                requests=job.spec.requests,
                verify=job.spec.verify,
                flush=True,
                retries=job.spec.retries,
            )
            result = await copy(source, target, options, changed_areas=plan.areas, progress=on_progress)
        except (CopyError, EndpointError) as exc:
            raise BackupError(f"disk {disk.key}: {exc}", "transferring", reason=exc) from exc
        if not result.flushed:
            raise BackupError(f"disk {disk.key}: the target was not flushed", "transferring")
    return DiskResult(
        disk_key=disk.key,
        disk_uuid=disk.uuid,
        capacity=disk.capacity,
        change_id=disk.change_id,
        sync_type=plan.sync_type,
        bytes_transferred=result.copied,
        bytes_zeroed=result.zeroed,
        target=plan.target,
        full_reason=plan.full_reason,
    )


async def _open_disk(
    job: _Job, vm: VirtualMachine, snapshot: Snapshot, plan: _DiskPlan, opened: contextlib.AsyncExitStack
) -> tuple[Endpoint, Endpoint]:
    """Start the disk's nbdkit and open the copy's source and target; ``opened`` closes them (shielded)."""
    disk = plan.disk
    try:
        process = await VddkSource(
            job.source.vddk,
            job.source.password,
            vm_moref=vm.moref,
            disk_file=disk.file_name,
            snapshot_moref=snapshot.moref,
        ).start()
        opened.push_async_callback(_shielded, process.stop)
        source = await open_source(process.uri, connections=job.spec.connections)
        opened.push_async_callback(_shielded, source.close)
        target = await open_target(plan.target, size=disk.capacity, connections=job.spec.connections)
        opened.push_async_callback(_shielded, target.close)
    except (SendenseError, OSError) as exc:
        raise BackupError(f"disk {disk.key}: {exc}", "setting up NBD", reason=exc) from exc
    if source.size != disk.capacity:
        raise BackupError(
            f"disk {disk.key}: the source serves {source.size} bytes, vSphere says {disk.capacity}", "setting up NBD"
        )
    return source, target


async def _shielded(close: Callable[[], Awaitable[None]]) -> None:
    """Closing goes on even if the job is cancelled meanwhile."""
    await asyncio.shield(close())
