"""One VMware backup job: snapshot, copy each disk (full or CBT-incremental), flush, record.

Order of a job (each step's failure leaves the previous change IDs as they were):

1. find the VM with its disks and snapshot tree (two vSphere round trips); read every disk's previous
   change ID (hub API or state file), all at once and while vSphere answers;
2. remove stale ``sbak-*`` snapshots; switch CBT on if it is off;
3. take ``sbak-<job>``; read the disks it froze (one round trip for all);
4. per disk, in parallel: decide full or incremental (the changed areas) while nbdkit (vddk) starts on
   the snapshot and the source and target connections are opened; copy, ending with a FLUSH;
5. remove the snapshot (always, also on error or cancellation);
6. only then record the snapshot's change IDs.

The number of vSphere and hub round trips of a job does not grow with its disks, except for
``QueryChangedDiskAreas`` (per disk and page). Progress goes to the hub from its own task
(:class:`~sendense_nbd.backup.progress.JobProgress`): nothing on the copy path waits for the hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

import attrs

from sendense_nbd.backup.progress import JobProgress
from sendense_nbd.backup.records import DiskResult, FullReason, Mode, PreviousBackup, SyncType
from sendense_nbd.copy import CopyOptions, Endpoint, Progress, copy, merge_areas, open_source, open_target
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
from sendense_nbd.vmware.inventory import Disk, VirtualMachine, find_vm
from sendense_nbd.vmware.session import VSphere
from sendense_nbd.vmware.snapshots import (
    BACKUP_PREFIX,
    Snapshot,
    create_snapshot,
    remove_snapshot,
    remove_stale,
    snapshot_disks,
)
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
    #: Changed areas closer than this many bytes are copied as one. 0 (the default, for a WAN): only
    #: changed bytes cross. A larger gap sends unchanged bytes to save requests (1 MiB suits a LAN).
    merge_gap: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    #: Data bytes between the copy's checkpoint FLUSHes: after a dropped connection, at most this much
    #: (plus the requests in flight) is sent again, since writes no FLUSH covered may be lost.
    checkpoint_bytes: int = attrs.field(default=64 << 20, validator=attrs.validators.ge(1))


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
    sync_type: SyncType
    areas: list[tuple[int, int]] | None
    full_reason: FullReason | None
    full_reason_detail: str | None


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
    # The hub answers while vSphere does; the only disk's key (a None target) is known only after.
    keys = [k for k in spec.targets if k is not None]
    lookup = None if None in spec.targets else asyncio.ensure_future(_previous(job, keys))
    try:
        vm = await vsphere.call(find_vm, vsphere.content, spec.vm_path)
        selected = _select(vm.disks, spec.targets, spec.vm_path)
        if lookup is None:
            lookup = asyncio.ensure_future(_previous(job, [selected[0][0].key]))
        previous = await lookup

        stage = "cleaning old snapshots"
        progress.set_stage(stage)
        for name in await vsphere.call(remove_stale, vsphere.content, vm, BACKUP_PREFIX):
            job.on_note(f"removed stale snapshot {name}")

        cbt_just_enabled = False
        if not vm.cbt_enabled:
            stage = "enabling CBT"
            progress.set_stage(stage)
            job.on_note(f"{spec.vm_path}: CBT was off; enabling it (every disk gets a full copy this time)")
            await vsphere.call(enable_cbt, vsphere.content, vm, f"{BACKUP_PREFIX}{spec.job_id}-cbt")
            cbt_just_enabled = True

        stage = "creating snapshot"
        progress.set_stage(stage)
        snapshot = await _create_snapshot(job, vm)
    except SendenseError as exc:
        raise BackupError(str(exc), stage, reason=exc) from exc
    finally:
        if lookup is not None:
            lookup.cancel()  # a no-op once it is done
            await asyncio.gather(lookup, return_exceptions=True)

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


async def _previous(job: _Job, keys: list[int]) -> dict[int, PreviousBackup | None]:
    """The previous change ID of every disk in ``keys``, asked for all at once (none for a full job)."""
    if job.spec.mode == Mode.FULL or not keys:
        return {}
    try:
        async with asyncio.TaskGroup() as group:
            asked = {key: group.create_task(job.store.previous(job.spec.vm_path, key)) for key in keys}
    except BaseExceptionGroup as group_error:
        raise first_error(group_error, prefer=SendenseError) from None
    return {key: task.result() for key, task in asked.items()}


async def _create_snapshot(job: _Job, vm: VirtualMachine) -> Snapshot:
    """Take the job's snapshot; if the job is cancelled meanwhile, wait for it and remove it."""
    vsphere, name = job.vsphere, f"{BACKUP_PREFIX}{job.spec.job_id}"
    creating = asyncio.get_running_loop().create_task(
        vsphere.call(create_snapshot, vsphere.content, vm, name, quiesce=job.spec.quiesce)
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
        await job.vsphere.call(remove_snapshot, job.vsphere.content, vm, snapshot)
    except SendenseError as exc:
        message = f"{exc}; the next run removes it as a stale {BACKUP_PREFIX}* snapshot"
        raise SnapshotNotRemoved(message, "finalizing", reason=exc) from exc


def _select(disks: Sequence[Disk], targets: Mapping[int | None, str], vm_path: str) -> list[tuple[Disk, str]]:
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


@attrs.frozen
class _DiskWork:
    """One disk of a job, as its snapshot froze it: where it goes and what its last backup was."""

    vm: VirtualMachine
    snapshot: Snapshot
    disk: Disk
    target: str
    previous: PreviousBackup | None
    cbt_just_enabled: bool


async def _plan(job: _Job, work: _DiskWork) -> _DiskPlan:
    """Full or incremental for one disk, and why a full copy (a code and the same in words)."""
    disk, previous = work.disk, work.previous

    def full(reason: FullReason, detail: str) -> _DiskPlan:
        return _DiskPlan(SyncType.FULL, None, reason, detail)

    if job.spec.mode == Mode.FULL:
        return full(FullReason.REQUESTED, "a full backup was asked for")
    if work.cbt_just_enabled:
        return full(FullReason.CBT_RESET, "CBT was just enabled")
    if previous is None:
        return full(FullReason.FIRST_BACKUP, "no previous change ID is known for this disk")
    if previous.disk_uuid and disk.uuid and previous.disk_uuid != disk.uuid:
        return full(FullReason.CBT_RESET, f"the disk's identity changed (UUID {previous.disk_uuid} -> {disk.uuid})")
    if previous.capacity is not None and previous.capacity != disk.capacity:
        return full(FullReason.CBT_RESET, f"the disk's size changed ({previous.capacity} -> {disk.capacity} bytes)")
    try:
        areas = await job.vsphere.call(changed_areas, work.vm, work.snapshot, disk, previous.change_id)
    except ChangeIdError as exc:
        return full(FullReason.CBT_RESET, f"CBT was reset: {exc}")
    return _DiskPlan(SyncType.INCREMENTAL, areas, None, None)


async def _planned(job: _Job, work: _DiskWork) -> _DiskPlan:
    """:func:`_plan`, noted and shown in the disk's progress; a failure is the ``preparing`` stage's."""
    disk = work.disk
    try:
        plan = await _plan(job, work)
    except SendenseError as exc:
        raise BackupError(f"disk {disk.key}: {exc}", "preparing", reason=exc) from exc
    if plan.full_reason_detail and job.spec.mode != Mode.FULL:
        job.on_note(f"disk {disk.key}: full copy: {plan.full_reason_detail}")
    figures = job.progress.disk(disk.key)
    figures.sync_type = plan.sync_type.value
    if plan.areas is not None:
        figures.bytes_changed = _changed_bytes(plan.areas, disk.capacity)
    return plan


def _changed_bytes(areas: list[tuple[int, int]], capacity: int) -> int:
    """The bytes the changed areas cover (overlaps counted once)."""
    return sum(length for _, length in merge_areas(areas, size=capacity, merge_gap=0))


async def _copy_disks(
    job: _Job,
    vm: VirtualMachine,
    snapshot: Snapshot,
    selected: list[tuple[Disk, str]],
    previous: Mapping[int, PreviousBackup | None],
    cbt_just_enabled: bool,
) -> list[DiskResult]:
    """Read the disks the snapshot froze (one round trip for all), then plan and copy every disk in parallel."""
    job.progress.set_stage("preparing")
    try:
        frozen = {d.key: d for d in await job.vsphere.call(snapshot_disks, job.vsphere.content, snapshot)}
    except SendenseError as exc:
        raise BackupError(str(exc), "preparing", reason=exc) from exc
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(
                    _copy_disk(
                        job,
                        _DiskWork(vm, snapshot, frozen.get(d.key, d), target, previous.get(d.key), cbt_just_enabled),
                    )
                )
                for d, target in selected
            ]
    except BaseExceptionGroup as group_error:
        raise first_error(group_error, prefer=BackupError) from None
    return [task.result() for task in tasks]


async def _copy_disk(job: _Job, work: _DiskWork) -> DiskResult:
    """One disk: its plan while its nbdkit starts and both endpoints open, then the copy; all closed after."""
    disk = work.disk
    job.progress.set_stage("setting up NBD")
    async with contextlib.AsyncExitStack() as opened:
        try:
            async with asyncio.TaskGroup() as group:
                planned = group.create_task(_planned(job, work))
                opening = group.create_task(_open_disk(job, work, opened))
        except BaseExceptionGroup as group_error:
            raise first_error(group_error, prefer=BackupError) from None
        plan, (source, target) = planned.result(), opening.result()
        job.progress.set_stage("transferring")

        def on_progress(event: Progress) -> None:
            job.progress.copy_event(disk.key, event)

        options = CopyOptions(
            connections=job.spec.connections,
            requests=job.spec.requests,
            verify=job.spec.verify,
            flush=True,
            retries=job.spec.retries,
            merge_gap=job.spec.merge_gap,
            checkpoint_bytes=job.spec.checkpoint_bytes,
        )
        try:
            result = await copy(source, target, options, changed_areas=plan.areas, progress=on_progress)
        except (CopyError, EndpointError) as exc:
            raise BackupError(f"disk {disk.key}: {exc}", "transferring", reason=exc) from exc
        if not result.flushed:
            raise BackupError(f"disk {disk.key}: the target was not flushed", "transferring")
    changed = result.copied if plan.areas is None else _changed_bytes(plan.areas, disk.capacity)
    return DiskResult(
        disk_key=disk.key,
        disk_uuid=disk.uuid,
        capacity=disk.capacity,
        change_id=disk.change_id,
        sync_type=plan.sync_type,
        bytes_transferred=result.copied,
        bytes_zeroed=result.zeroed,
        target=work.target,
        full_reason=plan.full_reason,
        full_reason_detail=plan.full_reason_detail,
        bytes_changed=changed,
    )


async def _open_disk(job: _Job, work: _DiskWork, opened: contextlib.AsyncExitStack) -> tuple[Endpoint, Endpoint]:
    """Start the disk's nbdkit and open the copy's source, and meanwhile its target; ``opened`` closes whatever
    was opened (shielded). nbdkit's unix socket gets one handshake first (each is a VDDK open), the others
    only with multi-conn; a TCP target gets them all at once (ConnectionPool)."""
    connections, disk = job.spec.connections, work.disk

    async def source() -> Endpoint:
        process = VddkSource(
            job.source.vddk,
            job.source.password,
            vm_moref=work.vm.moref,
            disk_file=disk.file_name,
            snapshot_moref=work.snapshot.moref,
        )
        opened.push_async_callback(_shielded, process.stop)  # also after a start cut short
        await process.start()
        endpoint = await open_source(process.uri, connections=connections)
        opened.push_async_callback(_shielded, endpoint.close)
        return endpoint

    async def target() -> Endpoint:
        endpoint = await open_target(work.target, size=disk.capacity, connections=connections)
        opened.push_async_callback(_shielded, endpoint.close)
        return endpoint

    try:
        async with asyncio.TaskGroup() as group:
            reading, writing = group.create_task(source()), group.create_task(target())
    except BaseExceptionGroup as group_error:
        error = first_error(group_error, prefer=(SendenseError, OSError))
        if isinstance(error, (SendenseError, OSError)):
            raise BackupError(f"disk {disk.key}: {error}", "setting up NBD", reason=error) from error
        raise error from None
    if reading.result().size != disk.capacity:
        raise BackupError(
            f"disk {disk.key}: the source serves {reading.result().size} bytes, vSphere says {disk.capacity}",
            "setting up NBD",
        )
    return reading.result(), writing.result()


async def _shielded(close: Callable[[], Awaitable[None]]) -> None:
    """Close, and wait until it is done even if the job is cancelled meanwhile (then re-raise the
    cancellation): a job never ends before its nbdkit is stopped and its connections are closed. Every
    close is bounded (nbdkit: SIGTERM, 10 s, SIGKILL; a connection: its request timeout)."""
    closing = asyncio.ensure_future(close())
    cancelled = False
    while not closing.done():
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError()
    closing.result()
