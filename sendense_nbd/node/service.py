"""The node: runs backup jobs the hub posts, in-process, a bounded number at a time."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

import attrs

from sendense_nbd.backup import BackupSpec, HubApi, JobProgress, Mode, run_backup
from sendense_nbd.errors import BackupError, SendenseError
from sendense_nbd.http_api import BadRequest
from sendense_nbd.node.config import NodeConfig
from sendense_nbd.vmware.inventory import find_vm, vm_disks
from sendense_nbd.vmware.session import Endpoint, VSphere, connect
from sendense_nbd.vmware.vddk import vddk_config

log = logging.getLogger(__name__)


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

    async def _session(self) -> VSphere:
        return await connect(self.endpoint, self.config.username, self.config.password)

    async def disks(self, vm_path: str) -> list[dict[str, Any]]:
        async with await self._session() as vsphere:
            vm = await vsphere.call(find_vm, vsphere.si, vm_path)
            disks = await vsphere.call(vm_disks, vm)
        return [{"key": d.key, "capacity": d.capacity, "label": d.label, "uuid": d.uuid} for d in disks]

    def start_backup(self, body: dict[str, Any]) -> NodeJob:
        job_id, vm_path, api_url = body.get("job_id"), body.get("vm_path"), body.get("api_url")
        mode, targets = body.get("mode", "auto"), body.get("targets")
        if not all(isinstance(v, str) and v for v in (job_id, vm_path, api_url, mode)):
            raise BadRequest("job_id, vm_path, api_url and mode are required strings")
        if mode not in ("full", "incremental", "auto"):
            raise BadRequest("mode is full, incremental or auto")
        if not isinstance(targets, dict) or not targets:
            raise BadRequest("targets maps disk keys to NBD URIs")
        try:
            parsed = {int(k): str(v) for k, v in targets.items()}
        except ValueError:
            raise BadRequest("target keys are VMware disk keys") from None
        if job_id in self.jobs and self.jobs[job_id].state in ("queued", "running"):
            raise BadRequest(f"job {job_id} is already running here", "conflict")
        job = NodeJob(str(job_id), str(vm_path), str(mode), parsed)
        self.jobs[job.job_id] = job
        job.task = asyncio.ensure_future(self._run(job, str(api_url)))
        return job

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
            raise BadRequest(f"no job {job_id}", "not_found")
        if job.task is not None and not job.task.done():
            job.task.cancel()
            await asyncio.gather(job.task, return_exceptions=True)
        return job

    async def close(self) -> None:
        tasks = [j.task for j in self.jobs.values() if j.task is not None and not j.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
