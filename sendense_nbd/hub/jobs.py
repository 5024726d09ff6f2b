"""Jobs in the hub's store: backup and restore jobs with a small state machine.

::

    pending -> running -> completed
                  |   \\-> failed      (the node reported it, a timeout, or a hub restart)
                  \\----> cancelled   (DELETE /backups/{job})

The moves are data (:data:`TRANSITIONS`), checked atomically in the store.
Terminal states never change again; a second completion is refused. A job's
``detail`` says what it serves or wrote: a backup's disks with their exports
(:class:`BackupDetail`), a restore's export (:class:`ExportDetail`) or file
(:class:`ConvertDetail`).
"""

from __future__ import annotations

import enum
import json
import sqlite3
import time
import uuid
from typing import Any

import attrs

from sendense_nbd.backup.records import Mode, SyncType
from sendense_nbd.errors import JobStateError, UnknownJob
from sendense_nbd.hub.db import Database, rows
from sendense_nbd.hub.requests import Failure, Progress, RestoreAction
from sendense_nbd.storage.modes import ImageFormat


class JobState(enum.Enum):
    """Where a job is in its life (see the module diagram)."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """The job is over: its state never changes again."""
        return self not in TRANSITIONS


#: The states each state may move to; a state that is no key here is terminal.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED}),
}


class JobKind(enum.Enum):
    """What a job does: back a VM's disks up, or restore a point."""

    BACKUP = "backup"
    RESTORE = "restore"


@attrs.frozen
class DiskExport:
    """One disk of a backup job: the export its node writes to and the point behind it."""

    disk_key: int
    port: int
    export: str
    uri: str
    point_id: str
    sync_type: SyncType
    base_point: str | None
    #: What the node reported at completion (None before, or when it did not say).
    bytes_changed: int | None = None
    bytes_transferred: int | None = None


@attrs.frozen
class BackupDetail:
    """A backup job's disks (none while it is pending)."""

    disks: tuple[DiskExport, ...] = ()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BackupDetail:
        """From the store's JSON."""
        return cls(
            tuple(DiskExport(**{**disk, "sync_type": SyncType(disk["sync_type"])}) for disk in data.get("disks", ()))
        )

    def to_json(self) -> dict[str, Any]:
        """``{"disks": [...]}``."""
        return {"disks": [{**attrs.asdict(disk), "sync_type": disk.sync_type.value} for disk in self.disks]}


@attrs.frozen
class ExportDetail:
    """A restore job serving a point over NBD (read-only)."""

    point_id: str
    port: int
    export: str
    uri: str

    def to_json(self) -> dict[str, Any]:
        """``{"point_id", "port", "export", "uri"}``."""
        return attrs.asdict(self)


@attrs.frozen
class ConvertDetail:
    """A restore job writing a point to a file in the restore directory."""

    point_id: str
    path: str
    fmt: ImageFormat

    def to_json(self) -> dict[str, Any]:
        """``{"point_id", "path", "format"}``."""
        return {"point_id": self.point_id, "path": self.path, "format": self.fmt.value}


#: What a job serves or wrote; None for a restore export that never started serving.
Detail = BackupDetail | ExportDetail | ConvertDetail | None


def _load_detail(kind: JobKind, mode: Mode | RestoreAction, data: dict[str, Any]) -> Detail:
    """A job's detail from the store's JSON (written by this module, so trusted)."""
    if kind is JobKind.BACKUP:
        return BackupDetail.from_json(data)
    if not data:
        return None
    if mode is RestoreAction.EXPORT:
        return ExportDetail(**data)
    return ConvertDetail(data["point_id"], data["path"], ImageFormat(data["format"]))


@attrs.frozen
class Job:
    """One backup or restore job as the store keeps it."""

    id: str
    kind: JobKind
    vm_path: str
    #: A backup's :class:`Mode`, or a restore's :class:`RestoreAction`.
    mode: Mode | RestoreAction
    state: JobState
    created: float
    updated: float
    deadline: float
    detail: Detail
    progress: Progress | None
    error: Failure | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Job:
        """A job from its row in the store."""
        kind = JobKind(row["kind"])
        mode = Mode(row["mode"]) if kind is JobKind.BACKUP else RestoreAction(row["mode"])
        progress, error = (json.loads(row[name]) if row[name] else None for name in ("progress", "error"))
        return cls(
            row["id"], kind, row["vm_path"], mode, JobState(row["state"]), row["created"], row["updated"],
            row["deadline"], _load_detail(kind, mode, json.loads(row["detail"]) if row["detail"] else {}),
            None if progress is None else Progress.from_json(progress),
            None if error is None else Failure(**error),
        )  # fmt: skip

    @property
    def disks(self) -> tuple[DiskExport, ...]:
        """A backup job's disks (none for a restore job)."""
        return self.detail.disks if isinstance(self.detail, BackupDetail) else ()

    def to_json(self) -> dict[str, object]:
        """The job as the API shows it."""
        return {
            "id": self.id,
            "kind": self.kind.value,
            "vm_path": self.vm_path,
            "mode": self.mode.value,
            "state": self.state.value,
            "created": self.created,
            "updated": self.updated,
            "deadline": self.deadline,
            "detail": {} if self.detail is None else self.detail.to_json(),
            "progress": None if self.progress is None else self.progress.to_json(),
            "error": None if self.error is None else self.error.to_json(),
        }


def new_job_id() -> str:
    """A fresh job ID: the UTC time and a random suffix (sorts by creation)."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def _dump(value: Failure | Progress | BackupDetail | ExportDetail | ConvertDetail | None) -> str | None:
    return None if value is None else json.dumps(value.to_json())


class JobStore:
    """The jobs table: create, read, and move jobs through their states."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(
        self, kind: JobKind, vm_path: str, mode: Mode | RestoreAction, detail: Detail, *, lifetime: float
    ) -> Job:
        """A new pending job that must end within ``lifetime`` seconds."""
        now = time.time()
        job = Job(new_job_id(), kind, vm_path, mode, JobState.PENDING, now, now, now + lifetime, detail, None, None)

        def insert(connection: sqlite3.Connection) -> None:
            connection.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, kind.value, vm_path, mode.value, job.state.value, now, now, job.deadline,
                 _dump(detail) or "{}", None, None),
            )  # fmt: skip

        await self.db.run(insert)
        return job

    async def get(self, job_id: str) -> Job:
        """The job ``job_id``; :class:`UnknownJob` if there is none."""

        def read(connection: sqlite3.Connection) -> list[dict[str, Any]]:
            return rows(connection.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)))

        found = await self.db.run(read)
        if not found:
            raise UnknownJob(f"no job {job_id}")
        return Job.from_row(found[0])

    async def list(
        self, *, vm_path: str | None = None, kind: JobKind | None = None, state: JobState | None = None
    ) -> list[Job]:
        """The jobs that match every filter given, oldest first."""
        filters = (
            ("vm_path", vm_path),
            ("kind", None if kind is None else kind.value),
            ("state", None if state is None else state.value),
        )

        def read(connection: sqlite3.Connection) -> list[dict[str, Any]]:
            sql, args = "SELECT * FROM jobs WHERE 1", []
            for column, value in filters:
                if value is not None:
                    sql += f" AND {column} = ?"
                    args.append(value)
            return rows(connection.execute(sql + " ORDER BY created", args))

        return [Job.from_row(r) for r in await self.db.run(read)]

    async def transition(
        self, job_id: str, state: JobState, *, error: Failure | None = None, detail: Detail = None
    ) -> Job:
        """Move a job to ``state`` (atomically checked); :class:`JobStateError` if it cannot."""

        def move(connection: sqlite3.Connection) -> None:
            current = self._state(connection, job_id)
            if state not in TRANSITIONS.get(current, frozenset()):
                raise JobStateError(f"job {job_id} is {current.value}; it cannot become {state.value}")
            connection.execute(
                "UPDATE jobs SET state = ?, updated = ?, error = COALESCE(?, error), detail = COALESCE(?, detail) "
                "WHERE id = ?",
                (state.value, time.time(), _dump(error), _dump(detail), job_id),
            )

        await self.db.run(move)
        return await self.get(job_id)

    async def set_progress(self, job_id: str, progress: Progress) -> Job:
        """Record a job's latest progress; a running report on a finished job is refused."""

        def update(connection: sqlite3.Connection) -> None:
            current = self._state(connection, job_id)
            if current.terminal and progress.running:
                raise JobStateError(f"job {job_id} is {current.value}; running progress is refused")
            connection.execute(
                "UPDATE jobs SET progress = ?, updated = ? WHERE id = ?", (_dump(progress), time.time(), job_id)
            )

        await self.db.run(update)
        return await self.get(job_id)

    @staticmethod
    def _state(connection: sqlite3.Connection, job_id: str) -> JobState:
        found = rows(connection.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)))
        if not found:
            raise UnknownJob(f"no job {job_id}")
        return JobState(found[0]["state"])
