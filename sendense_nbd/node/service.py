"""The node: runs backup jobs the hub posts, in-process, a bounded number at a time.

Each job is a task in the node's task group, which :meth:`Node.start` opens:
:meth:`Node.close` cancels the group, and so every job (their snapshots are
still removed), and :meth:`Node.wait_closed` waits until they have ended. A job
catches its own errors, so one job failing never cancels the others. The node
remembers every queued or running job and the last
:data:`~sendense_nbd.node.jobs.JOB_HISTORY` finished ones.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import attrs

from sendense_nbd import __version__
from sendense_nbd.backup import BackupJob, BackupSettings, BackupSpec, HubSettings, prepare
from sendense_nbd.client.uri import parse_uri
from sendense_nbd.errors import BackupError, Conflict, NodeBusy, SendenseError
from sendense_nbd.node.config import NodeConfig
from sendense_nbd.node.jobs import JobState, JobTable, NodeJob
from sendense_nbd.node.requests import BackupRequest
from sendense_nbd.vmware.inventory import Disk, VmEntry, find_vm, list_vms
from sendense_nbd.vmware.session import Endpoint, connect

log = logging.getLogger(__name__)


class Node:
    """Runs the jobs the hub posts: at most ``max_jobs`` at once, at most ``max_queued`` waiting.

    :meth:`start` opens the node's task group; :meth:`close` cancels it and :meth:`wait_closed` awaits it.
    """

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.endpoint = Endpoint.parse(config.endpoint, thumbprint=config.thumbprint, ca_file=config.ca_file)
        self._jobs = JobTable()
        self._slots = asyncio.Semaphore(config.max_jobs)
        #: ``[tls]``'s client context (the hub API over HTTPS), loaded once.
        self._tls = config.tls_context()
        #: Holds the task group open until :meth:`close` cancels it.
        self._holder: asyncio.Task[None] | None = None
        self._group: asyncio.TaskGroup | None = None
        self._closing = False

    async def start(self) -> None:
        """Open the task group the node's jobs run in (once, before :meth:`start_backup` and :meth:`close`)."""
        assert self._holder is None, "the node was started already"
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[None] = loop.create_future()
        self._holder = loop.create_task(self._hold(opened), name="node-jobs")
        await asyncio.wait([opened, self._holder], return_when=asyncio.FIRST_COMPLETED)  # closed meanwhile: done

    async def _hold(self, opened: asyncio.Future[None]) -> None:
        """Hold the task group open until :meth:`close` cancels this; the group then awaits every job."""
        async with asyncio.TaskGroup() as self._group:
            opened.set_result(None)
            await asyncio.Event().wait()  # only a cancellation ends this

    async def disks(self, vm_path: str) -> list[Disk]:
        """The VM's virtual disks, as vCenter lists them."""
        async with await connect(self.endpoint, self.config.username, self.config.password) as vsphere:
            vm = await vsphere.call(find_vm, vsphere.content, vm_path)
            return list(vm.disks)

    async def vms(self) -> list[VmEntry]:
        """Every VM of the vCenter with its inventory path (one listing call; see :func:`list_vms`)."""
        async with await connect(self.endpoint, self.config.username, self.config.password) as vsphere:
            return await vsphere.call(list_vms, vsphere.content)

    def health(self) -> dict[str, object]:
        """The node's version and load, for the hub's health checks (no vCenter call)."""
        jobs = list(self._jobs)
        return {
            "version": __version__,
            "running_jobs": sum(1 for job in jobs if job.state is JobState.RUNNING),
            "queued_jobs": sum(1 for job in jobs if job.state is JobState.QUEUED),
            "max_jobs": self.config.max_jobs,
        }

    def jobs(self) -> list[NodeJob]:
        """Every job the node knows: queued, running, and the last finished ones."""
        return list(self._jobs)

    def job(self, job_id: str) -> NodeJob:
        """The job of this ID, or :class:`~sendense_nbd.errors.UnknownJob`."""
        return self._jobs.get(job_id)

    def start_backup(self, request: BackupRequest) -> NodeJob:
        """Queue a job; :class:`Conflict` if its ID still runs here, :class:`NodeBusy` if the queue is full."""
        if self._closing:
            raise NodeBusy("the node is shutting down")
        assert self._group is not None, "Node.start() first"
        current = self._jobs.find(request.job_id)
        if current is not None and current.active:
            raise Conflict(f"job {request.job_id} is already running here")
        waiting = self._jobs.waiting()
        if waiting >= self.config.max_queued:
            raise NodeBusy(f"{waiting} jobs are already waiting here; try again later")
        job = NodeJob(request)
        self._jobs.add(job)
        job.task = self._group.create_task(self._run(job), name=f"node-job-{job.job_id}")
        job.task.add_done_callback(functools.partial(self._ended, job))
        return job

    async def cancel(self, job_id: str) -> NodeJob:
        """Cancel the job (its snapshot is still removed) and wait until it has ended."""
        job = self._jobs.get(job_id)
        if job.task is not None and job.active:
            job.task.cancel()
            await asyncio.gather(job.task, return_exceptions=True)
        return job

    def close(self) -> None:
        """Refuse new jobs and cancel every queued or running one, and the task group."""
        self._closing = True
        for job in self._jobs:  # now, so that none takes a step first (the group cancels them a step later)
            if job.task is not None:
                job.task.cancel()
        if self._holder is not None:
            self._holder.cancel()

    async def wait_closed(self) -> None:
        """After :meth:`close`: wait until every job the node started has ended."""
        if self._holder is not None:
            await asyncio.wait([self._holder])

    def _settings(self, request: BackupRequest) -> BackupSettings:
        """The job's settings: the request's VM, disks and hub, with this node's vCenter and vddk."""
        config = self.config
        targets: dict[int | None, str] = {key: self.with_tls(uri) for key, uri in request.targets}
        spec = BackupSpec(
            job_id=request.job_id,
            vm_path=request.vm_path,
            targets=targets,
            mode=request.mode,
            connections=config.connections,
            requests=config.requests,
            merge_gap=config.merge_gap,
            checkpoint_bytes=config.checkpoint,
        )
        hub = HubSettings(
            request.api_url, token=config.hub_token, tls=self._tls, tls_fingerprint=config.tls_fingerprint
        )
        return BackupSettings(spec, self.endpoint, config.username, config.password, vddk=config.vddk, hub=hub)

    def with_tls(self, uri: str) -> str:
        """An ``nbds://`` target with this node's ``[tls]`` credentials and pin (a target names no TLS settings
        of its own: the request parser refuses them); any other as it is."""
        address = parse_uri(uri)
        config = self.config
        if not address.tls:
            return uri
        return attrs.evolve(address, tls_certificates=config.tls_creds, tls_fingerprint=config.tls_fingerprint).uri

    async def _run(self, job: NodeJob) -> None:
        """The job's task. It lets only a cancellation out: any other error would make the task group cancel
        the node's other jobs, so a defect fails this job alone."""
        try:
            await self._run_backup(job, prepare(self._settings(job.request)))
        except Exception as exc:
            log.error("job %s: node defect: %r", job.job_id, exc, exc_info=exc)
            if job.state in (JobState.QUEUED, JobState.RUNNING):
                job.fail("initializing", f"node defect: {exc!r}")
            job.finished = job.finished or time.time()

    async def _run_backup(self, job: NodeJob, backup: BackupJob) -> None:
        """Wait for a slot, run the job, record how it ended (and tell the hub of a failure before it began)."""
        try:
            async with self._slots:
                job.state, job.backup = JobState.RUNNING, backup
                await backup.run()
            job.state = JobState.COMPLETED
        except asyncio.CancelledError:
            job.state = JobState.CANCELLED
            raise
        except BackupError as exc:
            job.fail(exc.stage, str(exc))
        except SendenseError as exc:  # before the job started (login, thumbprint): the hub must hear of it
            job.fail("initializing", str(exc))
            await _report_early_failure(backup, job)
        finally:
            job.finished = time.time()
            await backup.close()
            log.info("job %s %s%s", job.job_id, job.state, f": {job.error.message}" if job.error else "")

    def _ended(self, job: NodeJob, task: asyncio.Task[None]) -> None:
        """The job's task is done: settle a job cancelled before it ran, and keep it in the bounded history."""
        if job.state is JobState.QUEUED:  # cancelled before its coroutine began: no handler of _run ran
            job.state, job.finished = JobState.CANCELLED, time.time()
        self._jobs.finished(job)


async def _report_early_failure(backup: BackupJob, job: NodeJob) -> None:
    """Tell the hub that ``job`` failed before it started (best effort: it is logged if the hub is away)."""
    assert job.error is not None
    try:
        await backup.store.failed(job.job_id, job.request.vm_path, job.error.stage, job.error.message)
    except SendenseError as report:
        log.warning("telling the hub that job %s failed did not work: %s", job.job_id, report)
