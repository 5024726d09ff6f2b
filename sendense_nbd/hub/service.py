"""The hub: ports, exports, repository and jobs wired together (the REST API is a thin layer on this).

A backup job: lease one port per disk, create the disk's new point (a full
qcow2, or an overlay on the latest completed point), serve it on the
leased socket, and ask the node to push the disk there. The node reports
progress and completion through the hub API (docs/HUB_API.md). On
completion the exports are stopped (which flushes), the points are marked
completed with their change IDs, the ports are released and retention runs.
A failed, cancelled or timed-out job discards its points. A restarted hub
fails the jobs its predecessor left running, frees their ports, and removes
the images no point knows of.

Requests arrive parsed (:mod:`~sendense_nbd.hub.requests`), and each call
checks what it can before changing any state, so a refused request leaves
no job running, no port leased and no image behind. Converted restores go
only into the restore directory, under a plain file name.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import time
import uuid
from typing import Any

import attrs

from sendense_nbd.errors import BadRequest, JobStateError, NodeError, SendenseError
from sendense_nbd.hub import requests as req
from sendense_nbd.hub.db import Database
from sendense_nbd.hub.exports import ExportManager
from sendense_nbd.hub.jobs import TERMINAL, Job, JobStore
from sendense_nbd.hub.node_client import NodeClient
from sendense_nbd.hub.ports import DEFAULT_POOL, PortAllocator
from sendense_nbd.hub.repository import Point, Repository
from sendense_nbd.storage.files import is_temporary, link_new, remove_quietly, temporary_name
from sendense_nbd.storage.modes import ImageFormat

log = logging.getLogger(__name__)


@attrs.frozen
class HubConfig:
    repo: str
    nbd_ports: range = DEFAULT_POOL
    #: Address the NBD exports listen on.
    nbd_bind: str = "127.0.0.1"
    #: Host name the node uses to reach the exports (default: nbd_bind).
    nbd_advertise: str | None = None
    #: The node API (None: jobs wait for a node that is told some other way).
    node_url: str | None = None
    node_token: str | None = None
    #: The hub API URL as the node reaches it (passed to the node with each job).
    public_url: str = "http://127.0.0.1:8082"
    job_timeout: float = 24 * 3600.0
    keep_points: int = 7
    shared: int = 10
    lease_ttl: float = 600.0
    #: Where converted restores go (default REPO/restores); callers name only a file in it.
    restore_dir: str | None = None


class Hub:
    def __init__(self, config: HubConfig) -> None:
        self.config = config
        os.makedirs(config.repo, mode=0o700, exist_ok=True)  # a new repository is the hub user's alone
        lock = os.path.join(config.repo, "hub.lock")
        self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise BadRequest(f"another hub is running on {config.repo}", "busy") from None
        try:
            self.restore_dir = _open_restore_dir(config.restore_dir or os.path.join(config.repo, "restores"))
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.db = Database(os.path.join(config.repo, "hub.db"))
        self.holder = f"hub-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.ports = PortAllocator(self.db, config.nbd_ports, bind_address=config.nbd_bind, ttl=config.lease_ttl)
        self.exports = ExportManager(shared=config.shared)
        self.repository = Repository(config.repo, self.db)
        self.jobs = JobStore(self.db)
        self.node = NodeClient(config.node_url, token=config.node_token) if config.node_url else None
        self._tasks: list[asyncio.Task[None]] = []
        self._locks: dict[str, asyncio.Lock] = {}

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> dict[str, list[Any]]:
        """Clean up after a crashed predecessor, then start the lease and timeout watchers."""
        failed = []
        for job in await self.jobs.list(state="running") + await self.jobs.list(state="pending"):
            await self.jobs.transition(job.id, "failed", error={"stage": "hub", "message": "the hub restarted"})
            failed.append(job.id)
        released = [lease.port for lease in await self.ports.release_stale(self.holder)]
        discarded, merged = await self.repository.recover()
        removed, unexpected = await self.repository.sweep_orphans()
        removed += await asyncio.to_thread(_sweep_temporaries, self.restore_dir)
        if failed or released or discarded or merged:
            log.warning(
                "recovered after a restart: jobs failed %s, ports released %s, points discarded %s, merges finished %s",
                failed, released, discarded, merged,
            )  # fmt: skip
        self._tasks = [asyncio.ensure_future(self._renew_leases()), asyncio.ensure_future(self._expire_jobs())]
        return {
            "failed_jobs": failed,
            "released_ports": released,
            "discarded_points": discarded,
            "removed_orphans": removed,
            "unexpected_files": unexpected,
        }

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.exports.stop_all()
        if self.node is not None:
            await self.node.close()
        self.db.close()
        os.close(self._lock_fd)

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self.config.lease_ttl / 3)
            try:
                await self.ports.renew(self.holder)
            except Exception as exc:  # noqa: BLE001 - keep renewing
                log.error("renewing port leases failed: %s", exc)

    async def _expire_jobs(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.config.job_timeout / 4))
            now = time.time()
            for job in await self.jobs.list(state="running"):
                if job.deadline < now:
                    async with await self._lock(job.id):
                        if (await self.jobs.get(job.id)).state not in TERMINAL:
                            await self._fail(job.id, "timeout", f"no completion within {self.config.job_timeout:.0f} s")

    async def _lock(self, job_id: str) -> asyncio.Lock:
        """The lock of an existing job (:class:`UnknownJob` otherwise, so junk IDs make no locks)."""
        if job_id not in self._locks:
            await self.jobs.get(job_id)
        return self._locks.setdefault(job_id, asyncio.Lock())

    # -- backups -----------------------------------------------------------------

    async def create_backup(self, request: req.BackupRequest) -> Job:
        vm_path, mode = request.vm_path, request.mode.value
        disks = request.disks
        if disks is None:
            if self.node is None:
                raise BadRequest("give disks ([{key, capacity}]): no node is configured to list them")
            disks = await self._node_disks(vm_path)
        for disk in disks:
            if disk.capacity is None and (mode == "full" or await self.repository.latest(vm_path, disk.key) is None):
                raise BadRequest(f"disk {disk.key}: give its capacity (no completed point to build an incremental on)")
        job = await self.jobs.create("backup", vm_path, mode, {"disks": []}, lifetime=self.config.job_timeout)
        entries: list[dict[str, Any]] = []
        try:
            for disk in disks:
                entries.append(await self._prepare_disk(job.id, vm_path, disk.key, disk.capacity, mode))
            targets = {e["disk_key"]: e["uri"] for e in entries}
            job = await self.jobs.transition(job.id, "running", detail={"disks": entries})
            if self.node is not None:
                await self.node.start_backup(job.id, vm_path, mode, targets, self.config.public_url)
        except BaseException as exc:
            await self._cleanup(job.id, entries)
            with contextlib.suppress(JobStateError):
                await self.jobs.transition(job.id, "failed", error={"stage": "starting", "message": str(exc)})
            raise
        return job

    async def _node_disks(self, vm_path: str) -> tuple[req.DiskSpec, ...]:
        assert self.node is not None
        listed = await self.node.disks(vm_path)
        try:
            return req.parse_disks(
                [{"key": d.get("key"), "capacity": d.get("capacity")} if isinstance(d, dict) else d for d in listed],
                "the node's disk list",
            )
        except BadRequest as exc:
            raise NodeError(f"the node's disk list for {vm_path} is malformed: {exc}") from exc

    async def _prepare_disk(
        self, job_id: str, vm_path: str, key: int, capacity: int | None, mode: str
    ) -> dict[str, Any]:
        point = await self.repository.new_point(vm_path, key, job_id, incremental=mode != "full", capacity=capacity)
        try:
            allocation = await self.ports.allocate(self.holder, job_id, key)
            try:
                name = f"{job_id}-{key}"
                running = await self.exports.start(job_id, key, name, point.path, allocation.socket)
            except BaseException:
                allocation.socket.close()
                await self.ports.release(port=allocation.lease.port)
                raise
        except BaseException:
            await self.repository.discard(point.id)
            raise
        return {
            "disk_key": key,
            "port": running.port,
            "export": name,
            "uri": self._uri(running.port, name),
            "point_id": point.id,
            "sync_type": point.kind,
            "base_point": point.backing,
        }

    def _uri(self, port: int, export: str) -> str:
        """The NBD URI of an export as nodes reach it."""
        host = self.config.nbd_advertise or self.config.nbd_bind
        return f"nbd://{f'[{host}]' if ':' in host else host}:{port}/{export}"

    async def _cleanup(self, job_id: str, entries: list[dict[str, Any]]) -> None:
        """Stop a failed job's exports (flushing), release its ports, discard its points."""
        await self.exports.stop_job(job_id)
        await self.ports.release(job_id=job_id)
        for entry in entries:
            await self.repository.discard(entry["point_id"])

    async def progress(self, job_id: str, report: dict[str, Any]) -> Job:
        return await self.jobs.set_progress(job_id, report)

    async def complete(self, job_id: str, report: req.Completion) -> Job:
        """Record a job's end. Everything is checked before anything changes; a failure after the
        exports stopped fails the job, so no job stays running without its exports."""
        async with await self._lock(job_id):
            job = await self.jobs.get(job_id)
            if job.kind != "backup":
                raise BadRequest(f"{job_id} is not a backup job", "not_found")
            if job.state in TERMINAL:
                raise JobStateError(f"job {job_id} is already {job.state}")
            if report.vm_path is not None and report.vm_path != job.vm_path:
                raise BadRequest(f"the completion is for {report.vm_path}, job {job_id} backs up {job.vm_path}")
            if report.status == "failed":
                return await self._fail(job_id, report.stage, report.message)
            entries = {e["disk_key"]: e for e in job.detail["disks"]}
            reported = {d.disk_key: d for d in report.disks}
            if set(reported) != set(entries):
                raise BadRequest(f"the completion names disks {sorted(reported)}, the job has {sorted(entries)}")
            try:
                await self.exports.stop_job(job_id)  # flushes every point before it counts
                results = [(e["point_id"], reported[k].change_id, reported[k].disk_uuid) for k, e in entries.items()]
                await self.repository.complete(results)
                await self.ports.release(job_id=job_id)
                job = await self.jobs.transition(job_id, "completed")
            except Exception as exc:
                log.error("completing %s failed: %s", job_id, exc)
                await self._fail(job_id, "complete", f"recording the completion failed: {exc}")
                raise
        for key in entries:
            try:
                await self.repository.apply_retention(job.vm_path, key, self.config.keep_points)
            except (SendenseError, OSError) as exc:
                log.error("retention of %s disk %s failed: %s", job.vm_path, key, exc)
        return job

    async def _fail(self, job_id: str, stage: str, message: str, state: str = "failed") -> Job:
        job = await self.jobs.get(job_id)
        await self._cleanup(job_id, job.detail.get("disks", []))
        try:
            return await self.jobs.transition(job_id, state, error={"stage": stage, "message": message})
        except JobStateError:
            return await self.jobs.get(job_id)

    async def cancel(self, job_id: str) -> Job:
        async with await self._lock(job_id):
            job = await self.jobs.get(job_id)
            if job.state in TERMINAL:
                raise JobStateError(f"job {job_id} is already {job.state}")
            if self.node is not None and job.kind == "backup":
                try:
                    await self.node.cancel(job_id)
                except SendenseError as exc:
                    log.warning("the node did not take the cancel of %s: %s", job_id, exc)
            return await self._fail(job_id, "cancelled", "cancelled by the API", state="cancelled")

    async def change_id(self, vm_path: str, disk_key: int) -> dict[str, Any] | None:
        point = await self.repository.latest(vm_path, disk_key)
        if point is None or not point.change_id:
            return None
        return {
            "change_id": point.change_id,
            "disk_uuid": point.disk_uuid,
            "capacity": point.size,
            "point_id": point.id,
        }

    # -- restores ----------------------------------------------------------------

    async def restore(self, request: req.RestoreRequest) -> Job:
        point = await self.repository.point(request.point_id)
        if point.status != "completed":
            raise BadRequest(f"point {point.id} is not a completed restore point", "not_restorable")
        if request.action is req.RestoreAction.EXPORT:
            return await self._export_point(point)
        assert request.name is not None
        path = os.path.join(self.restore_dir, request.name)
        if await asyncio.to_thread(os.path.lexists, path):
            raise BadRequest(f"{request.name} exists in the restore directory {self.restore_dir}", "exists")
        detail = {"point_id": point.id, "path": path, "format": request.fmt.value}
        job = await self.jobs.create("restore", point.vm_path, "convert", detail, lifetime=self.config.job_timeout)
        await self.jobs.transition(job.id, "running")
        try:
            await convert_point(point, path, request.fmt)
        except (SendenseError, OSError) as exc:
            return await self.jobs.transition(job.id, "failed", error={"stage": "convert", "message": str(exc)})
        return await self.jobs.transition(job.id, "completed")

    async def _export_point(self, point: Point) -> Job:
        job = await self.jobs.create("restore", point.vm_path, "export", {}, lifetime=self.config.job_timeout)
        try:
            allocation = await self.ports.allocate(self.holder, job.id, point.disk_key, purpose="restore")
            try:
                running = await self.exports.start(
                    job.id, point.disk_key, f"restore-{point.id}", point.path, allocation.socket, readonly=True
                )
            except BaseException:
                allocation.socket.close()
                raise
        except BaseException as exc:
            await self.ports.release(job_id=job.id)
            await self.jobs.transition(job.id, "failed", error={"stage": "export", "message": str(exc)})
            raise
        detail = {"point_id": point.id, "port": running.port, "export": running.name,
                  "uri": self._uri(running.port, running.name)}  # fmt: skip
        return await self.jobs.transition(job.id, "running", detail=detail)

    async def stop_restore(self, job_id: str) -> Job:
        job = await self.jobs.get(job_id)
        if job.kind != "restore":
            raise BadRequest(f"{job_id} is not a restore job", "not_found")
        await self.exports.stop_job(job_id)
        await self.ports.release(job_id=job_id)
        with contextlib.suppress(JobStateError):
            return await self.jobs.transition(job_id, "completed")
        return await self.jobs.get(job_id)


async def convert_point(point: Point, path: str, fmt: ImageFormat) -> None:
    """Write a point (its whole chain) to a new standalone raw or qcow2 file with the copy engine.

    The copy goes to a fresh temporary file next to ``path``, is verified, and
    is then linked to ``path``, which is never replaced (a symlink there is
    not followed); nothing is left behind on failure.
    """
    from sendense_nbd.copy import copy, open_source, open_target

    temporary = temporary_name(path)
    try:
        source = await open_source(point.path)
        try:
            target = await open_target(temporary, fmt=fmt, size=source.size)
            try:
                await copy(source, target, verify=True)
            finally:
                await target.close()
        finally:
            await source.close()
        await asyncio.to_thread(link_new, temporary, path)
    finally:
        await asyncio.to_thread(remove_quietly, temporary)


def _open_restore_dir(path: str) -> str:
    """Create the restore directory (0700) if needed; refuse one that is a symlink or not a directory."""
    path = os.path.abspath(path)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise BadRequest(f"restore directory {path}: {exc.strerror or exc} (give a real directory)", "config") from exc
    os.close(fd)
    return path


def _sweep_temporaries(folder: str) -> list[str]:
    """Remove the temporary files interrupted converts left in ``folder``."""
    removed = []
    for entry in os.scandir(folder):
        if is_temporary(entry.name) and entry.is_file(follow_symlinks=False):
            remove_quietly(entry.path)
            log.warning("removed %s: an interrupted restore", entry.path)
            removed.append(entry.path)
    return removed
