"""The node: runs backup jobs the hub posts, in-process, a bounded number at a time."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

import attrs

from sendense_nbd.backup import BackupSpec, HubApi, JobProgress, Mode, run_backup
from sendense_nbd.errors import BackupError, BadRequest, NodeBusy, SendenseError
from sendense_nbd.node.config import NodeConfig
from sendense_nbd.node.requests import BackupRequest
from sendense_nbd.vmware.inventory import find_vm, vm_disks
from sendense_nbd.vmware.session import Endpoint, VSphere, connect
from sendense_nbd.vmware.vddk import vddk_config

log = logging.getLogger(__name__)

#: Finished jobs the node remembers for ``GET /backups``.
JOB_HISTORY = 1000


@attrs.define(eq=False)
class NodeJob:
    job_id: str
    vm_path: str
    mode: str
    targets: dict[int, str]
    state: str = "queued"  # queued | running | completed | failed | cancelled
    created: float = attrs.Factory(time.time)
    finished: float | None = None
    error: dict[str, str] | None = None
    task: asyncio.Task[None] | None = None
    progress: JobProgress | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "job_id": self.job_id,
            "vm_path": self.vm_path,
            "mode": self.mode,
            "targets": {str(k): v for k, v in self.targets.items()},
            "state": self.state,
            "created": self.created,
            "finished": self.finished,
            "error": self.error,
            "progress": self.progress.report() if self.progress else None,
        }


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.endpoint = Endpoint.parse(config.endpoint, thumbprint=config.thumbprint, ca_file=config.ca_file)
        self.jobs: dict[str, NodeJob] = {}
        self._slots = asyncio.Semaphore(config.max_jobs)
        self._tasks: set[asyncio.Task[None]] = set()

    async def _session(self) -> VSphere:
        return await connect(self.endpoint, self.config.username, self.config.password)

    async def disks(self, vm_path: str) -> list[dict[str, Any]]:
        async with await self._session() as vsphere:
            vm = await vsphere.call(find_vm, vsphere.si, vm_path)
            disks = await vsphere.call(vm_disks, vm)
        return [{"key": d.key, "capacity": d.capacity, "label": d.label, "uuid": d.uuid} for d in disks]

    def start_backup(self, request: BackupRequest) -> NodeJob:
        """Queue a parsed job; at most ``max_jobs`` run and ``max_queued`` wait, or :class:`NodeBusy`."""
        current = self.jobs.get(request.job_id)
        if current is not None and current.task is not None and not current.task.done():
            raise BadRequest(f"job {request.job_id} is already running here", "conflict")
        waiting = sum(1 for job in self.jobs.values() if job.state == "queued")
        if waiting >= self.config.max_queued:
            raise NodeBusy(f"{waiting} jobs are already waiting here; try again later")
        job = NodeJob(request.job_id, request.vm_path, request.mode.value, dict(request.targets))
        self.jobs.pop(job.job_id, None)
        self.jobs[job.job_id] = job
        self._forget_old_jobs()
        job.task = asyncio.ensure_future(self._run(job, request.api_url))
        job.task.add_done_callback(functools.partial(_settle, job))
        self._tasks.add(job.task)
        job.task.add_done_callback(self._tasks.discard)
        return job

    def _forget_old_jobs(self) -> None:
        """Keep at most :data:`JOB_HISTORY` finished jobs (the oldest go first)."""
        finished = [job_id for job_id, job in self.jobs.items() if job.task is not None and job.task.done()]
        for job_id in finished[: max(0, len(finished) - JOB_HISTORY)]:
            del self.jobs[job_id]

    async def _run(self, job: NodeJob, api_url: str) -> None:
        hub = HubApi(api_url, token=self.config.hub_token)
        try:
            async with self._slots:
                job.state = "running"
                vddk = self.config.vddk
                targets: dict[int | None, str] = {key: uri for key, uri in job.targets.items()}
                spec = BackupSpec(
                    job_id=job.job_id,
                    vm_path=job.vm_path,
                    targets=targets,
                    vddk=await vddk_config(
                        self.endpoint,
                        self.config.username,
                        thumbprint=vddk.get("thumbprint"),
                        libdir=vddk.get("libdir"),
                        transports=vddk.get("transports", ""),
                        compression=vddk.get("compression"),
                        nbdkit=vddk.get("nbdkit", "nbdkit"),
                        plugin=vddk.get("plugin", "vddk"),
                        extra=tuple((str(k), str(v)) for k, v in vddk.get("options", {}).items()),
                    ),
                    password=self.config.password,
                    mode=Mode(job.mode),
                    connections=self.config.connections,
                )
                job.progress = JobProgress(job.job_id, functools.partial(hub.progress, job.job_id))
                async with await self._session() as vsphere:
                    await run_backup(spec, vsphere, hub, job.progress)
            job.state = "completed"
        except asyncio.CancelledError:
            job.state = "cancelled"
            raise
        except BackupError as exc:
            job.state, job.error = "failed", {"stage": exc.stage, "message": str(exc)}
        except SendenseError as exc:  # before the job started (login, thumbprint): the hub must hear of it
            job.state, job.error = "failed", {"stage": "initializing", "message": str(exc)}
            try:
                await hub.failed(job.job_id, job.vm_path, "initializing", str(exc))
            except SendenseError as report:
                log.warning("telling the hub that job %s failed did not work: %s", job.job_id, report)
        finally:
            job.finished = time.time()
            await hub.close()
            log.info("job %s %s%s", job.job_id, job.state, f": {job.error['message']}" if job.error else "")

    async def cancel(self, job_id: str) -> NodeJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise BadRequest(f"no job {job_id[:80]!r}", "not_found")
        if job.task is not None and not job.task.done():
            job.task.cancel()
            await asyncio.gather(job.task, return_exceptions=True)
        return job

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _settle(job: NodeJob, task: asyncio.Task[None]) -> None:
    """A job whose task ended without settling it (cancelled before it ran, or a defect) leaves the queue."""
    if job.state not in ("queued", "running"):
        return
    job.finished = job.finished or time.time()
    if task.cancelled():
        job.state = "cancelled"
    else:
        job.state, job.error = "failed", {"stage": "initializing", "message": f"node defect: {task.exception()!r}"}
