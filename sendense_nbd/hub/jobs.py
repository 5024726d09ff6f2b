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

A job also says why it did what it did: its node and policy, why it was a
full copy (``full_reason``, a :class:`~sendense_nbd.backup.records.FullReason`
code), the bytes that changed and were sent, and its ``stages`` with their
times (``queued``, then each stage its node reports, then the hub's
``completing`` and ``retention``), read from the hub's clock, and its bytes
sent over time (:mod:`~sendense_nbd.hub.samples`). :class:`JobQuery` filters
the jobs for a list, newest first.
"""

from __future__ import annotations

import enum
import json
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

import attrs

from sendense_nbd import fields
from sendense_nbd.backup.records import FullReason, Mode, SyncType
from sendense_nbd.errors import BadRequest, Conflict, JobStateError, UnknownJob
from sendense_nbd.hub.clock import Clock, SystemClock
from sendense_nbd.hub.db import Connection, Database, rows
from sendense_nbd.hub.requests import Failure, NodeStage, Progress, RestoreAction
from sendense_nbd.hub.samples import Sample, add_sample, delete_samples, read_samples
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
    """What a job does: back a VM's disks up, restore a point, or verify points."""

    BACKUP = "backup"
    RESTORE = "restore"
    VERIFY = "verify"


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
    #: Why this disk gets a full copy (a :class:`FullReason` value): the hub's decision before the
    #: job starts, else the node's at completion; None for an incremental.
    full_reason: str | None = None
    #: The node's words on why it copied the disk in full (also for a code this hub does not know).
    full_reason_detail: str | None = None


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
    #: The client certificate name the export admits (None: any client the hub's TLS admits).
    reader: str | None = None

    def to_json(self) -> dict[str, Any]:
        """``{"point_id", "port", "export", "uri", "reader"}``."""
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


class VerifyScope(enum.Enum):
    """What a verify job covers (its ``mode``): every point of a VM, or one point's chain."""

    VM = "vm"
    POINT = "point"


@attrs.frozen
class PointVerdict:
    """What a verify found of one point: ``state`` verified or damaged, the first bad offset and why."""

    point_id: str
    disk_key: int
    state: str
    bad_offset: int | None
    error: str | None
    #: The point's digest sidecar; None: verified by structure only.
    digests: str | None


@attrs.frozen
class VerifyDetail:
    """A verify job: the point asked for (None: the VM's points), and each point's verdict, oldest first."""

    point_id: str | None = None
    points: tuple[PointVerdict, ...] = ()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VerifyDetail:
        """From the store's JSON."""
        return cls(data.get("point_id"), tuple(PointVerdict(**p) for p in data.get("points", ())))

    def to_json(self) -> dict[str, Any]:
        """``{"point_id", "points": [...], "verified", "damaged"}``."""
        states = [p.state for p in self.points]
        return {
            "point_id": self.point_id,
            "points": [attrs.asdict(p) for p in self.points],
            "verified": states.count("verified"),
            "damaged": states.count("damaged"),
        }


#: What a job serves or wrote; None for a restore export that never started serving.
Detail = BackupDetail | ExportDetail | ConvertDetail | VerifyDetail | None
#: A backup's mode, a restore's action, or what a verify covers.
JobMode = Mode | RestoreAction | VerifyScope


def _load_detail(kind: JobKind, mode: JobMode, data: dict[str, Any]) -> Detail:
    """A job's detail from the store's JSON (written by this module, so trusted)."""
    if kind is JobKind.BACKUP:
        return BackupDetail.from_json(data)
    if kind is JobKind.VERIFY:
        return VerifyDetail.from_json(data)
    if not data:
        return None
    if mode is RestoreAction.EXPORT:
        return ExportDetail(**data)
    return ConvertDetail(data["point_id"], data["path"], ImageFormat(data["format"]))


#: A job keeps at most this many stages (a node naming more has its extra stages folded into
#: the current one); a stage's name is cut to :data:`MAX_STAGE_NAME` characters.
MAX_STAGES = 64
MAX_STAGE_NAME = 64
#: Stages kept back for the hub's own (``completing``, ``retention``) when a node names many.
_HUB_STAGES = 2


@attrs.frozen
class Stage:
    """One stage of a job: its name and when it started and ended (None while it runs)."""

    name: str
    started: float
    ended: float | None = None
    #: The hub's own stage (``queued``, ``completing``, ``retention``), not one its node reported.
    by_hub: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Stage:
        """From the store's JSON."""
        return cls(data["name"], data["started"], data.get("ended"), bool(data.get("hub")))

    @property
    def seconds(self) -> float | None:
        """How long it took (never negative); None while it runs."""
        return None if self.ended is None else max(0.0, self.ended - self.started)

    def to_json(self) -> dict[str, object]:
        """``{"name", "started", "ended", "seconds"}``."""
        return {"name": self.name, "started": self.started, "ended": self.ended, "seconds": self.seconds}


def _stages(raw: str | None) -> tuple[Stage, ...]:
    return tuple(Stage.from_json(item) for item in json.loads(raw)) if raw else ()


def _dump_stages(stages: list[Stage] | tuple[Stage, ...]) -> str:
    return json.dumps([{"name": s.name, "started": s.started, "ended": s.ended, "hub": s.by_hub} for s in stages])


def with_node_stages(
    stages: tuple[Stage, ...], reported: tuple[NodeStage, ...], *, origin: float, now: float, terminal: bool
) -> list[Stage]:
    """``stages`` with its node part replaced by the node's history (``reported``: each stage's start in
    seconds after ``origin``, the node's job start on the hub's clock).

    The node part stays between the hub's ``queued`` and its own stages after it (``completing``...),
    or the job's end; its times are clamped into that span and never go backwards. The last node
    stage runs on (ended None) while the job runs and the hub has not taken over.
    """
    head = [stage for stage in stages[:1] if stage.by_hub]
    tail = [stage for stage in stages[len(head) :] if stage.by_hub]
    names = [(item.name[:MAX_STAGE_NAME], item.elapsed) for item in reported[: MAX_STAGES - 1 - _HUB_STAGES]]
    if not names:
        return list(stages)
    low = head[0].started if head else origin
    closed = bool(tail) or terminal
    high = tail[0].started if tail else (stages[-1].ended if terminal and stages else None) or now
    starts: list[float] = []
    for _, elapsed in names:
        starts.append(min(max(origin + elapsed, low, *starts[-1:]), high))
    ends: list[float | None] = [*starts[1:], high if closed else None]
    node = [Stage(name, start, end) for (name, _), start, end in zip(names, starts, ends, strict=True)]
    return [*(attrs.evolve(stage, ended=starts[0]) for stage in head), *node, *tail]


def _ended(stages: tuple[Stage, ...], now: float) -> list[Stage]:
    """``stages`` with the running one (the last, if open) ended at ``now``."""
    out = list(stages)
    if out and out[-1].ended is None:
        out[-1] = attrs.evolve(out[-1], ended=max(now, out[-1].started))
    return out


@attrs.frozen
class Job:
    """One backup or restore job as the store keeps it."""

    id: str
    kind: JobKind
    vm_path: str
    #: A backup's :class:`Mode`, a restore's :class:`RestoreAction`, or a verify's :class:`VerifyScope`.
    mode: JobMode
    state: JobState
    created: float
    updated: float
    deadline: float
    detail: Detail
    progress: Progress | None
    error: Failure | None
    node: str | None = None
    policy: str | None = None
    full_reason: FullReason | None = None
    stages: tuple[Stage, ...] = ()
    #: Sums of the disks' reports at completion (None: some disk's node did not report it).
    bytes_changed: int | None = None
    bytes_sent: int | None = None
    #: The hub that runs the job (its exports and ports; None: a job from before hubs had IDs).
    hub: str | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Job:
        """A job from its row in the store."""
        kind = JobKind(row["kind"])
        mode: JobMode = (
            Mode(row["mode"])
            if kind is JobKind.BACKUP
            else VerifyScope(row["mode"])
            if kind is JobKind.VERIFY
            else RestoreAction(row["mode"])
        )
        progress, error = (json.loads(row[name]) if row[name] else None for name in ("progress", "error"))
        return cls(
            row["id"], kind, row["vm_path"], mode, JobState(row["state"]), row["created"], row["updated"],
            row["deadline"], _load_detail(kind, mode, json.loads(row["detail"]) if row["detail"] else {}),
            None if progress is None else Progress.from_json(progress),
            None if error is None else Failure(**error),
            row.get("node"), row.get("policy"), _full_reason(row.get("full_reason")), _stages(row.get("stages")),
            row.get("bytes_changed"), row.get("bytes_sent"), row.get("hub"),
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
            "node": self.node,
            "policy": self.policy,
            "full_reason": None if self.full_reason is None else self.full_reason.value,
            "stages": [stage.to_json() for stage in self.stages],
            "bytes_changed": self.bytes_changed,
            "bytes_sent": self.bytes_sent,
            "hub": self.hub,
        }


def _full_reason(value: str | None) -> FullReason | None:
    """A stored reason code (one a later version wrote and this one does not know reads as None)."""
    try:
        return None if value is None else FullReason(value)
    except ValueError:
        return None


def new_job_id() -> str:
    """A fresh job ID: the UTC time and a random suffix (sorts by creation)."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def _dump(value: Failure | Progress | Detail) -> str | None:
    return None if value is None else json.dumps(value.to_json())


#: Finished jobs kept per VM and kind (the newest); older ones are pruned every hour.
JOB_HISTORY = 500
#: Most jobs one query lists.
MAX_QUERY = 1000
#: ``limit`` as given: 1-4 ASCII digits.
_LIMIT = re.compile(r"[0-9]{1,4}")
#: A time as given: epoch seconds, ASCII digits with an optional fraction.
_EPOCH = re.compile(r"[0-9]{1,11}(\.[0-9]{1,9})?")
_QUERY_FIELDS = ("kind", "state", "vm_path", "policy", "node", "since", "before", "limit")


@attrs.frozen(kw_only=True)
class JobQuery:
    """Which jobs to list: every filter given must match (``since`` <= created < ``before``), newest first,
    at most ``limit``."""

    kind: JobKind | None = None
    state: JobState | None = None
    vm_path: str | None = None
    policy: str | None = None
    node: str | None = None
    #: Epoch seconds (the job's ``created``).
    since: float | None = None
    before: float | None = None
    limit: int = attrs.field(default=100, validator=[attrs.validators.ge(1), attrs.validators.le(MAX_QUERY)])

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> JobQuery:
        """Parse a query string (an empty value is no filter, as a form's blank field); :class:`BadRequest`
        naming the parameter on anything else."""
        unknown = sorted(set(query) - set(_QUERY_FIELDS))
        if unknown:
            raise BadRequest(f"unknown query parameter {unknown[0][:40]!r} (known: {', '.join(_QUERY_FIELDS)})")
        given = {name: value for name, value in query.items() if value != ""}
        limit = given.get("limit", "100")
        if not _LIMIT.fullmatch(limit) or not 1 <= int(limit) <= MAX_QUERY:
            raise BadRequest(f"limit must be an integer from 1 to {MAX_QUERY}")
        return cls(
            kind=None if "kind" not in given else fields.choice(given["kind"], "kind", JobKind),
            state=None if "state" not in given else fields.choice(given["state"], "state", JobState),
            vm_path=None if "vm_path" not in given else fields.vm_path(given["vm_path"]),
            policy=None if "policy" not in given else _name(given["policy"], "policy"),
            node=None if "node" not in given else _name(given["node"], "node"),
            since=None if "since" not in given else _epoch(given["since"], "since"),
            before=None if "before" not in given else _epoch(given["before"], "before"),
            limit=int(limit),
        )

    def to_query(self) -> dict[str, str]:
        """The query string's parameters (the filters given; ``limit`` always)."""
        values = {"kind": self.kind and self.kind.value, "state": self.state and self.state.value,
                  "vm_path": self.vm_path, "policy": self.policy, "node": self.node,
                  "since": None if self.since is None else repr(self.since),
                  "before": None if self.before is None else repr(self.before)}  # fmt: skip
        return {**{name: value for name, value in values.items() if value is not None}, "limit": str(self.limit)}

    def where(self) -> tuple[str, list[object]]:
        """The SQL condition and its arguments."""
        sql, args = "1 = 1", list[object]()
        for column, value in (
            ("kind", self.kind and self.kind.value), ("state", self.state and self.state.value),
            ("vm_path", self.vm_path), ("policy", self.policy), ("node", self.node),
        ):  # fmt: skip
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(value)
        if self.since is not None:
            sql, args = sql + " AND created >= ?", [*args, self.since]
        if self.before is not None:
            sql, args = sql + " AND created < ?", [*args, self.before]
        return sql, args


def _name(value: str, name: str) -> str:
    """A policy's or node's name (1-128 of ``A-Z a-z 0-9 . _ : -``)."""
    checked = fields.identifier(value)
    if checked is None:
        raise BadRequest(
            f"{name} must be 1-128 of letters, digits, '.', '_', ':', '-' (starting with a letter or digit)"
        )
    return checked


def _epoch(value: str, name: str) -> float:
    """Epoch seconds as a query gives them."""
    if not _EPOCH.fullmatch(value):
        raise BadRequest(f"{name} must be a time in epoch seconds (digits, an optional fraction)")
    return float(value)


class JobStore:
    """The jobs table: create, read, and move jobs through their states; jobs made here are hub ``hub``'s."""

    def __init__(self, db: Database, clock: Clock | None = None, *, hub: str | None = None) -> None:
        self.db = db
        #: The hub this store's new jobs run on (None: jobs without one).
        self.hub = hub
        #: Where stage times are read.
        self.clock: Clock = clock or SystemClock()

    async def create(
        self,
        kind: JobKind,
        vm_path: str,
        mode: JobMode,
        detail: Detail,
        *,
        lifetime: float,
        node: str | None = None,
        policy: str | None = None,
        full_reason: FullReason | None = None,
        exclusive: bool = False,
        expected_bytes: int | None = None,
    ) -> Job:
        """A new pending job that must end within ``lifetime`` seconds; a backup starts ``queued``.
        ``exclusive``: refused (``Conflict`` ``vm_busy``) while the VM has a backup job pending or running.
        ``expected_bytes``: what a backup is expected to write (held back from later jobs' space checks)."""
        now = time.time()
        stages = (Stage("queued", self.clock.now(), by_hub=True),) if kind is JobKind.BACKUP else ()
        job = Job(
            new_job_id(), kind, vm_path, mode, JobState.PENDING, now, now, now + lifetime, detail, None, None,
            node, policy, full_reason, stages, hub=self.hub,
        )  # fmt: skip
        row = {
            "id": job.id, "kind": kind.value, "vm_path": vm_path, "mode": mode.value, "state": job.state.value,
            "created": now, "updated": now, "deadline": job.deadline, "detail": _dump(detail) or "{}",
            "node": node, "policy": policy, "full_reason": None if full_reason is None else full_reason.value,
            "stages": _dump_stages(stages), "expected_bytes": expected_bytes, "hub": self.hub,
        }  # fmt: skip

        def insert(connection: Connection) -> None:
            if exclusive:
                _refuse_busy(connection, vm_path)
            names, marks = ", ".join(row), ", ".join("?" * len(row))
            connection.execute(f"INSERT INTO jobs ({names}) VALUES ({marks})", tuple(row.values()))

        await self.db.run(insert)
        return job

    async def prune(self, keep: int = JOB_HISTORY) -> int:
        """Forget the finished jobs of each VM (and kind) past its newest ``keep``, with their samples; how
        many went."""
        ended = [state.value for state in JobState if state.terminal]
        marks = ", ".join("?" * len(ended))

        def delete(connection: Connection) -> int:
            found = connection.execute(
                "SELECT id FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY vm_path, kind "
                f"ORDER BY created DESC, seq DESC) AS n FROM jobs WHERE state IN ({marks})) AS ranked WHERE n > ?",
                (*ended, keep),
            )
            gone = [row[0] for row in found]
            delete_samples(connection, gone)
            connection.executemany("DELETE FROM jobs WHERE id = ?", [(job_id,) for job_id in gone])
            return len(gone)

        return await self.db.run(delete)

    async def expected(self) -> dict[str, int]:
        """The expected bytes of each backup job pending or running (by job ID; jobs without a figure left out)."""

        def read(connection: Connection) -> dict[str, int]:
            found = connection.execute(
                "SELECT id, expected_bytes FROM jobs WHERE kind = ? AND state IN (?, ?) AND expected_bytes IS NOT NULL",
                (JobKind.BACKUP.value, JobState.PENDING.value, JobState.RUNNING.value),
            )
            return {row[0]: int(row[1]) for row in found}

        return await self.db.run(read)

    async def refuse_busy(self, vm_path: str) -> None:
        """``Conflict`` (``vm_busy``) if the VM has a backup job pending or running."""
        await self.db.run(lambda connection: _refuse_busy(connection, vm_path))

    async def backed_up(self, vm_path: str, disk_key: int) -> bool:
        """Whether a backup job of the VM that included this disk ever completed."""

        def read(connection: Connection) -> bool:
            found = connection.execute(
                "SELECT detail FROM jobs WHERE vm_path = ? AND kind = ? AND state = ? ORDER BY created DESC, seq DESC",
                (vm_path, JobKind.BACKUP.value, JobState.COMPLETED.value),
            )
            return any(disk_key in {d["disk_key"] for d in json.loads(row[0]).get("disks", ())} for row in found)

        return await self.db.run(read)

    async def get(self, job_id: str) -> Job:
        """The job ``job_id``; :class:`UnknownJob` if there is none."""

        def read(connection: Connection) -> list[dict[str, Any]]:
            return rows(connection.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)))

        found = await self.db.run(read)
        if not found:
            raise UnknownJob(f"no job {job_id}")
        return Job.from_row(found[0])

    async def query(self, query: JobQuery) -> list[Job]:
        """The jobs that match ``query``, newest first, at most ``query.limit``."""
        where, args = query.where()
        sql = f"SELECT * FROM jobs WHERE {where} ORDER BY created DESC, seq DESC LIMIT ?"
        found = await self.db.run(lambda connection: rows(connection.execute(sql, (*args, query.limit))))
        return [Job.from_row(r) for r in found]

    async def samples(self, job_id: str) -> list[Sample]:
        """A job's bytes sent over time, oldest first; :class:`UnknownJob` if there is no such job."""

        def read(connection: Connection) -> list[Sample]:
            self._state(connection, job_id)
            return read_samples(connection, job_id)

        return await self.db.run(read)

    async def list(
        self, *, vm_path: str | None = None, kind: JobKind | None = None, state: JobState | None = None,
        hub: str | None = None,
    ) -> list[Job]:  # fmt: skip
        """The jobs that match every filter given, oldest first; ``hub``: that hub's (and those without one)."""
        filters = (
            ("vm_path", vm_path),
            ("kind", None if kind is None else kind.value),
            ("state", None if state is None else state.value),
        )

        def read(connection: Connection) -> list[dict[str, Any]]:
            sql, args = "SELECT * FROM jobs WHERE 1 = 1", []
            for column, value in filters:
                if value is not None:
                    sql += f" AND {column} = ?"
                    args.append(value)
            if hub is not None:
                sql += " AND (hub = ? OR hub IS NULL)"
                args.append(hub)
            return rows(connection.execute(sql + " ORDER BY created, seq", args))

        return [Job.from_row(r) for r in await self.db.run(read)]

    async def transition(
        self,
        job_id: str,
        state: JobState,
        *,
        error: Failure | None = None,
        detail: Detail = None,
        outcome: Outcome | None = None,
    ) -> Job:
        """Move a job to ``state`` (atomically checked); :class:`JobStateError` if it cannot. A terminal
        state ends the running stage; ``outcome`` records the completion's reason and byte counts (the
        bytes sent also as the job's last sample)."""
        now = self.clock.now()

        def move(connection: Connection) -> None:
            current = self._state(connection, job_id)
            if state not in TRANSITIONS.get(current, frozenset()):
                raise JobStateError(f"job {job_id} is {current.value}; it cannot become {state.value}")
            connection.execute(
                "UPDATE jobs SET state = ?, updated = ?, error = COALESCE(?, error), detail = COALESCE(?, detail) "
                "WHERE id = ?",
                (state.value, time.time(), _dump(error), _dump(detail), job_id),
            )
            if state.terminal:
                ended = _ended(_read_stages(connection, job_id), now)
                connection.execute("UPDATE jobs SET stages = ? WHERE id = ?", (_dump_stages(ended), job_id))
            if outcome is not None:
                connection.execute(
                    "UPDATE jobs SET full_reason = ?, bytes_changed = ?, bytes_sent = ? WHERE id = ?",
                    (None if outcome.full_reason is None else outcome.full_reason.value, outcome.bytes_changed,
                     outcome.bytes_sent, job_id),
                )  # fmt: skip
                if outcome.bytes_sent is not None:
                    add_sample(connection, job_id, now, outcome.bytes_sent)

        await self.db.run(move)
        return await self.get(job_id)

    async def set_progress(self, job_id: str, progress: Progress) -> Job:
        """Record a job's latest progress (and its bytes sent as a sample); a running report on a finished
        job is refused.

        A report with the node's stage history (``stages``, ``elapsed_seconds``) sets the job's node
        stages (:func:`with_node_stages`; also the final report, after the hub completed the job). An
        older node's report names only its current stage: one other than the running one's ends that
        stage and starts this one (not once the job is over)."""
        now = self.clock.now()

        def update(connection: Connection) -> None:
            current = self._state(connection, job_id)
            if current.terminal and progress.running:
                raise JobStateError(f"job {job_id} is {current.value}; running progress is refused")
            connection.execute(
                "UPDATE jobs SET progress = ?, updated = ? WHERE id = ?", (_dump(progress), time.time(), job_id)
            )
            if progress.bytes_transferred is not None:
                add_sample(connection, job_id, now, int(progress.bytes_transferred))
            if progress.stages is not None and progress.elapsed_seconds is not None:
                origin = now - progress.elapsed_seconds
                stages = with_node_stages(
                    _read_stages(connection, job_id), progress.stages, origin=origin, now=now, terminal=current.terminal
                )
                connection.execute("UPDATE jobs SET stages = ? WHERE id = ?", (_dump_stages(stages), job_id))
            elif progress.stage and not current.terminal:
                _enter(connection, job_id, progress.stage, now, limit=MAX_STAGES - _HUB_STAGES)

        await self.db.run(update)
        return await self.get(job_id)

    async def enter_stage(self, job_id: str, name: str) -> None:
        """The hub's own stage (e.g. ``completing``): the running stage ends, ``name`` starts."""
        now = self.clock.now()
        await self.db.run(lambda connection: _enter(connection, job_id, name, now, limit=MAX_STAGES, by_hub=True))

    async def add_stage(self, job_id: str, name: str, started: float) -> None:
        """A stage that ran from ``started`` until now, recorded after the job ended (``retention``)."""
        now = self.clock.now()

        def add(connection: Connection) -> None:
            stages = _read_stages(connection, job_id)
            if len(stages) < MAX_STAGES:
                stage = Stage(name[:MAX_STAGE_NAME], started, max(now, started), by_hub=True)
                connection.execute("UPDATE jobs SET stages = ? WHERE id = ?", (_dump_stages((*stages, stage)), job_id))

        await self.db.run(add)

    @staticmethod
    def _state(connection: Connection, job_id: str) -> JobState:
        found = rows(connection.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)))
        if not found:
            raise UnknownJob(f"no job {job_id}")
        return JobState(found[0]["state"])


@attrs.frozen
class Outcome:
    """What a completed backup job records besides its state: why it was full and the bytes it moved."""

    full_reason: FullReason | None
    bytes_changed: int | None
    bytes_sent: int | None


def _read_stages(connection: Connection, job_id: str) -> tuple[Stage, ...]:
    found = rows(connection.execute("SELECT stages FROM jobs WHERE id = ?", (job_id,)))
    if not found:
        raise UnknownJob(f"no job {job_id}")
    return _stages(found[0]["stages"])


def _enter(connection: Connection, job_id: str, name: str, now: float, *, limit: int, by_hub: bool = False) -> None:
    """End the running stage and start ``name``, unless it is the running one or ``limit`` stages exist."""
    name = name[:MAX_STAGE_NAME]
    stages = _read_stages(connection, job_id)
    if (stages and stages[-1].name == name and stages[-1].ended is None) or len(stages) >= limit:
        return
    updated = [*_ended(stages, now), Stage(name, now, by_hub=by_hub)]
    connection.execute("UPDATE jobs SET stages = ? WHERE id = ?", (_dump_stages(updated), job_id))


def _refuse_busy(connection: Connection, vm_path: str) -> None:
    found = connection.execute(
        "SELECT id, state FROM jobs WHERE vm_path = ? AND kind = ? AND state IN (?, ?) ORDER BY created, seq LIMIT 1",
        (vm_path, JobKind.BACKUP.value, JobState.PENDING.value, JobState.RUNNING.value),
    ).fetchone()
    if found is not None:
        raise Conflict(
            f"{vm_path} already has job {found[0]} {found[1]}: one backup of a VM at a time (wait for it, or "
            f"cancel it: DELETE /backups/{found[0]})",
            "vm_busy",
        )
