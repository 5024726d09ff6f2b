"""The node's jobs: their states, and a table that keeps a bounded history of finished ones."""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Iterator

import attrs

from sendense_nbd.backup import BackupJob, JobProgress
from sendense_nbd.errors import UnknownJob
from sendense_nbd.node.requests import BackupRequest

#: Finished jobs the node remembers for ``GET /backups``; the oldest finished go first.
JOB_HISTORY = 1000


class JobState(enum.StrEnum):
    """Where a node job is: waiting for a slot, running, or finished one of three ways."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@attrs.frozen
class JobFailure:
    """Why a job failed: the stage it reached, and the message."""

    stage: str
    message: str


@attrs.define(eq=False)
class NodeJob:
    """One job the hub posted: its request, its state, and its progress once it runs."""

    request: BackupRequest
    state: JobState = JobState.QUEUED
    created: float = attrs.Factory(time.time)
    finished: float | None = None
    error: JobFailure | None = None
    task: asyncio.Task[None] | None = None
    #: The wired job, from the moment it has a slot.
    backup: BackupJob | None = None

    @property
    def job_id(self) -> str:
        """The hub's ID of the job."""
        return self.request.job_id

    @property
    def active(self) -> bool:
        """Queued or running: its task has not ended."""
        return self.task is not None and not self.task.done()

    @property
    def progress(self) -> JobProgress | None:
        """The running job's progress (None until it has started)."""
        return self.backup.progress if self.backup is not None else None

    def fail(self, stage: str, message: str) -> None:
        """Record that the job failed at ``stage``."""
        self.state, self.error = JobState.FAILED, JobFailure(stage, message)

    def to_json(self) -> dict[str, object]:
        """The job as the node API shows it (docs/NODE_API.md)."""
        request = self.request
        return {
            "job_id": request.job_id,
            "vm_path": request.vm_path,
            "mode": request.mode.value,
            "targets": {str(key): uri for key, uri in request.targets},
            "state": self.state.value,
            "created": self.created,
            "finished": self.finished,
            "error": attrs.asdict(self.error) if self.error is not None else None,
            "progress": self.progress.report() if self.progress is not None else None,
        }


class JobTable:
    """The node's jobs by ID: every queued or running one, and the last ``history`` finished ones.

    A job that ends is remembered; past ``history`` finished jobs, the one
    that finished first is forgotten. Posting a job ID again replaces the
    finished job of that ID.
    """

    def __init__(self, *, history: int = JOB_HISTORY) -> None:
        self.history = history
        self._jobs: dict[str, NodeJob] = {}
        #: IDs of the finished jobs, the first to finish first.
        self._finished: dict[str, None] = {}

    def __iter__(self) -> Iterator[NodeJob]:
        return iter(list(self._jobs.values()))

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def get(self, job_id: str) -> NodeJob:
        """The job of this ID, or :class:`UnknownJob`."""
        job = self._jobs.get(job_id)
        if job is None:
            raise UnknownJob(f"no job {job_id[:80]!r}")
        return job

    def find(self, job_id: str) -> NodeJob | None:
        """The job of this ID, if the table has it."""
        return self._jobs.get(job_id)

    def waiting(self) -> int:
        """How many jobs wait for a slot."""
        return sum(1 for job in self._jobs.values() if job.state is JobState.QUEUED)

    def add(self, job: NodeJob) -> None:
        """Take a new job (replacing a finished one of the same ID)."""
        self._finished.pop(job.job_id, None)
        self._jobs.pop(job.job_id, None)
        self._jobs[job.job_id] = job

    def finished(self, job: NodeJob) -> None:
        """``job`` has ended: remember it, forgetting the oldest finished jobs past ``history``."""
        if self._jobs.get(job.job_id) is not job:
            return  # replaced meanwhile
        self._finished[job.job_id] = None
        while len(self._finished) > self.history:
            oldest = next(iter(self._finished))
            del self._finished[oldest], self._jobs[oldest]
