"""Jobs in the hub's store: backup and restore jobs with a small state machine.

::

    pending -> running -> completed
                  |   \\-> failed      (the node reported it, a timeout, or a hub restart)
                  \\----> cancelled   (DELETE /backups/{job})

Terminal states never change again; a second completion is refused.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from typing import Any

import attrs

from sendense_nbd.errors import JobStateError, UnknownJob
from sendense_nbd.hub.db import Database, rows

STATES = ("pending", "running", "completed", "failed", "cancelled")
TERMINAL = frozenset({"completed", "failed", "cancelled"})
_NEXT = {"pending": {"running", "failed", "cancelled"}, "running": {"completed", "failed", "cancelled"}}


@attrs.frozen
class Job:
    id: str
    kind: str  # backup | restore
    vm_path: str
    mode: str
    state: str
    created: float
    updated: float
    deadline: float
    detail: dict[str, Any]
    progress: dict[str, Any] | None
    error: dict[str, Any] | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Job:
        for name in ("detail", "progress", "error"):
            row[name] = json.loads(row[name]) if row[name] else None
        row["detail"] = row["detail"] or {}
        return cls(**row)

    def to_json(self) -> dict[str, object]:
        return attrs.asdict(self)


def new_job_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


class JobStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(
        self, kind: str, vm_path: str, mode: str, detail: dict[str, Any], *, lifetime: float, job_id: str | None = None
    ) -> Job:
        now = time.time()
        job = Job(job_id or new_job_id(), kind, vm_path, mode, "pending", now, now, now + lifetime, detail, None, None)

        def insert(connection: sqlite3.Connection) -> None:
            connection.execute(
                "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, kind, vm_path, mode, job.state, now, now, job.deadline, json.dumps(detail), None, None),
            )

        await self.db.run(insert)
        return job

    async def get(self, job_id: str) -> Job:
        def read(connection: sqlite3.Connection) -> list[dict[str, Any]]:
            return rows(connection.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)))

        found = await self.db.run(read)
        if not found:
            raise UnknownJob(f"no job {job_id}")
        return Job.from_row(found[0])

    async def list(self, *, vm_path: str | None = None, kind: str | None = None, state: str | None = None) -> list[Job]:
        def read(connection: sqlite3.Connection) -> list[dict[str, Any]]:
            sql, args = "SELECT * FROM jobs WHERE 1", []
            for column, value in (("vm_path", vm_path), ("kind", kind), ("state", state)):
                if value is not None:
                    sql += f" AND {column} = ?"
                    args.append(value)
            return rows(connection.execute(sql + " ORDER BY created", args))

        return [Job.from_row(r) for r in await self.db.run(read)]

    async def transition(
        self, job_id: str, state: str, *, error: dict[str, Any] | None = None, detail: dict[str, Any] | None = None
    ) -> Job:
        """Move a job to ``state`` (atomically checked); :class:`JobStateError` if it cannot."""

        def move(connection: sqlite3.Connection) -> None:
            found = rows(connection.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)))
            if not found:
                raise UnknownJob(f"no job {job_id}")
            current = found[0]["state"]
            if state not in _NEXT.get(current, set()):
                raise JobStateError(f"job {job_id} is {current}; it cannot become {state}")
            connection.execute(
                "UPDATE jobs SET state = ?, updated = ?, error = COALESCE(?, error), detail = COALESCE(?, detail) "
                "WHERE id = ?",
                (
                    state,
                    time.time(),
                    json.dumps(error) if error else None,
                    json.dumps(detail) if detail else None,
                    job_id,
                ),
            )

        await self.db.run(move)
        return await self.get(job_id)

    async def set_progress(self, job_id: str, progress: dict[str, Any]) -> Job:
        def update(connection: sqlite3.Connection) -> None:
            found = rows(connection.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)))
            if not found:
                raise UnknownJob(f"no job {job_id}")
            if found[0]["state"] in TERMINAL and progress.get("status") == "running":
                raise JobStateError(f"job {job_id} is {found[0]['state']}; running progress is refused")
            connection.execute(
                "UPDATE jobs SET progress = ?, updated = ? WHERE id = ?", (json.dumps(progress), time.time(), job_id)
            )

        await self.db.run(update)
        return await self.get(job_id)
