"""Backup policies in the hub's store, with their schedules' state and their runs.

A policy (:class:`~sendense_nbd.policy.model.Policy`) is kept as its JSON.
Each of its schedules (``backup``, and ``verify`` when it has one) has a row
of state: the last slot the scheduler took, when it last started a run, the
next run, and a note saying what it did (a run, a missed slot, a closed
window). A run is one slot's work: the VMs it resolved, each queued, started
(with its job) or done.
"""

from __future__ import annotations

import enum
import json
import logging
import uuid
from typing import Any

import attrs

from sendense_nbd.errors import BadRequest, Conflict, UnknownPolicy
from sendense_nbd.hub.db import Connection, Database, rows
from sendense_nbd.policy.model import Policy

log = logging.getLogger(__name__)

#: How many runs a policy keeps in the store (older ones are pruned when a run is opened).
RUN_HISTORY = 200


class Purpose(enum.Enum):
    """What a schedule of a policy runs."""

    BACKUP = "backup"
    VERIFY = "verify"


class RunState(enum.Enum):
    """A run is open while it has VMs queued or started."""

    OPEN = "open"
    DONE = "done"


class ItemState(enum.Enum):
    """One VM of a run."""

    QUEUED = "queued"
    STARTED = "started"
    DONE = "done"
    SKIPPED = "skipped"


@attrs.frozen
class StoredPolicy:
    """A policy as the store keeps it: its spec and when it was made and last changed."""

    policy: Policy
    created: float
    updated: float


@attrs.frozen
class ScheduleState:
    """Where one schedule of a policy is."""

    policy: str
    purpose: Purpose
    last_slot: float
    next_run: float | None = None
    last_run: float | None = None
    note: str | None = None

    def to_json(self) -> dict[str, object]:
        """As the API shows it (times as epoch seconds)."""
        return {"next_run": self.next_run, "last_run": self.last_run, "last_slot": self.last_slot, "note": self.note}


@attrs.frozen
class RunItem:
    """One VM of a run and its job."""

    run_id: str
    vm_path: str
    state: ItemState
    job_id: str | None = None
    note: str | None = None

    def to_json(self) -> dict[str, object]:
        """``{"vm_path", "state", "job_id", "note"}``."""
        return {"vm_path": self.vm_path, "state": self.state.value, "job_id": self.job_id, "note": self.note}


@attrs.frozen
class Run:
    """One slot's work of a policy's schedule."""

    id: str
    policy: str
    purpose: Purpose
    slot: float | None
    started: float
    window_end: float | None
    state: RunState
    ended: float | None = None
    note: str | None = None
    items: tuple[RunItem, ...] = ()

    def to_json(self) -> dict[str, object]:
        """The run with its VMs."""
        return {
            "id": self.id,
            "policy": self.policy,
            "purpose": self.purpose.value,
            "slot": self.slot,
            "started": self.started,
            "window_end": self.window_end,
            "ended": self.ended,
            "state": self.state.value,
            "note": self.note,
            "items": [item.to_json() for item in self.items],
        }


def _run_from_row(row: dict[str, Any], items: list[dict[str, Any]]) -> Run:
    return Run(
        row["id"], row["policy"], Purpose(row["purpose"]), row["slot"], row["started"], row["window_end"],
        RunState(row["state"]), row["ended"], row["note"],
        tuple(RunItem(i["run_id"], i["vm_path"], ItemState(i["state"]), i["job_id"], i["note"]) for i in items),
    )  # fmt: skip


class PolicyStore:
    """The ``policies``, ``schedule_state``, ``runs`` and ``run_items`` tables."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # -- policies ----------------------------------------------------------------

    async def add(self, policy: Policy, now: float) -> StoredPolicy:
        """Store a new policy; its schedules start after ``now``. :class:`Conflict` if the name is taken."""

        def insert(connection: Connection) -> None:
            added = connection.execute(
                "INSERT INTO policies (name, spec, created, updated) VALUES (?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                (policy.name, json.dumps(policy.to_json()), now, now),
            )
            if added.rowcount != 1:
                raise Conflict(f"a policy named {policy.name} exists", "exists")
            for purpose in Purpose:  # a fresh state (a deleted policy's may be left)
                connection.execute(
                    "INSERT INTO schedule_state (policy, purpose, last_slot) VALUES (?, ?, ?) "
                    "ON CONFLICT (policy, purpose) DO UPDATE SET last_slot = excluded.last_slot, "
                    "next_run = NULL, last_run = NULL, note = NULL",
                    (policy.name, purpose.value, now),
                )

        await self.db.run(insert)
        return StoredPolicy(policy, now, now)

    async def replace(self, policy: Policy, now: float) -> StoredPolicy:
        """Store an edited policy (its schedules' state stays)."""

        def update(connection: Connection) -> float:
            created = _read_policy(connection, policy.name).created
            connection.execute(
                "UPDATE policies SET spec = ?, updated = ? WHERE name = ?",
                (json.dumps(policy.to_json()), now, policy.name),
            )
            return created

        return StoredPolicy(policy, await self.db.run(update), now)

    async def delete(self, name: str) -> None:
        """Remove a policy, its schedules' state and its runs (the jobs stay)."""

        def delete(connection: Connection) -> None:
            _read_policy(connection, name)
            run_ids = [r[0] for r in connection.execute("SELECT id FROM runs WHERE policy = ?", (name,))]
            connection.executemany("DELETE FROM run_items WHERE run_id = ?", [(i,) for i in run_ids])
            for table, column in (("runs", "policy"), ("schedule_state", "policy"), ("policies", "name")):
                connection.execute(f"DELETE FROM {table} WHERE {column} = ?", (name,))

        await self.db.run(delete)

    async def get(self, name: str) -> StoredPolicy:
        """One policy; :class:`UnknownPolicy` if there is none."""
        return await self.db.run(lambda connection: _read_policy(connection, name))

    async def all(self) -> list[StoredPolicy]:
        """Every policy, by name; one whose stored spec no longer parses (a time zone gone from tzdata, say)
        is left out and logged, so the others still run."""

        def read(connection: Connection) -> list[StoredPolicy]:
            found = []
            for row in rows(connection.execute("SELECT * FROM policies ORDER BY name")):
                try:
                    found.append(_policy(row))
                except BadRequest as exc:
                    log.error("policy %s is left out: its stored spec no longer parses: %s", row["name"], exc)
            return found

        return await self.db.run(read)

    # -- schedule state ----------------------------------------------------------

    async def state(self, name: str, purpose: Purpose) -> ScheduleState:
        """A schedule's state (:meth:`add` wrote it); :class:`UnknownPolicy` if there is none."""

        def read(connection: Connection) -> list[dict[str, Any]]:
            return rows(
                connection.execute(
                    "SELECT * FROM schedule_state WHERE policy = ? AND purpose = ?", (name, purpose.value)
                )
            )

        found = await self.db.run(read)
        if not found:
            raise UnknownPolicy(f"no policy {name}")
        row = found[0]
        return ScheduleState(name, purpose, row["last_slot"], row["next_run"], row["last_run"], row["note"])

    async def save_state(self, state: ScheduleState) -> None:
        """Record where a schedule is."""

        def update(connection: Connection) -> None:
            connection.execute(
                "UPDATE schedule_state SET last_slot = ?, next_run = ?, last_run = ?, note = ? "
                "WHERE policy = ? AND purpose = ?",
                (state.last_slot, state.next_run, state.last_run, state.note, state.policy, state.purpose.value),
            )

        await self.db.run(update)

    # -- runs --------------------------------------------------------------------

    async def open_run(
        self, policy: str, purpose: Purpose, vm_paths: list[str], *, slot: float | None, now: float,
        window_end: float | None, note: str | None,
    ) -> Run:  # fmt: skip
        """A new run with its VMs queued (none: the run is done at once); old runs past the history go."""
        run = Run(
            f"run-{uuid.uuid4().hex[:12]}", policy, purpose, slot, now, window_end,
            RunState.OPEN if vm_paths else RunState.DONE, None if vm_paths else now, note,
            tuple(RunItem("", path, ItemState.QUEUED) for path in vm_paths),
        )  # fmt: skip

        def insert(connection: Connection) -> None:
            connection.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run.id, policy, purpose.value, slot, now, window_end, run.ended, run.state.value, note),
            )
            connection.executemany(
                "INSERT INTO run_items VALUES (?, ?, ?, NULL, NULL)",
                [(run.id, path, ItemState.QUEUED.value) for path in vm_paths],
            )
            _prune(connection, policy)

        await self.db.run(insert)
        return attrs.evolve(run, items=tuple(attrs.evolve(item, run_id=run.id) for item in run.items))

    async def run(self, run_id: str) -> Run:
        """One run with its VMs as stored now."""

        def read(connection: Connection) -> Run:
            found = rows(connection.execute("SELECT * FROM runs WHERE id = ?", (run_id,)))
            if not found:
                raise UnknownPolicy(f"no run {run_id[:80]!r}")
            items = rows(connection.execute("SELECT * FROM run_items WHERE run_id = ?", (run_id,)))
            return _run_from_row(found[0], items)

        return await self.db.run(read)

    async def runs(self, *, policy: str | None = None, state: RunState | None = None, limit: int = 50) -> list[Run]:
        """Runs, newest first (of one policy, in one state, when given)."""

        def read(connection: Connection) -> list[Run]:
            sql, args = "SELECT * FROM runs WHERE 1 = 1", []
            for column, value in (("policy", policy), ("state", None if state is None else state.value)):
                if value is not None:
                    sql += f" AND {column} = ?"
                    args.append(value)
            found = rows(connection.execute(sql + " ORDER BY started DESC LIMIT ?", [*args, limit]))
            return [
                _run_from_row(r, rows(connection.execute("SELECT * FROM run_items WHERE run_id = ?", (r["id"],))))
                for r in found
            ]

        return await self.db.run(read)

    async def set_item(self, item: RunItem) -> None:
        """Record a VM's new state in its run."""

        def update(connection: Connection) -> None:
            connection.execute(
                "UPDATE run_items SET state = ?, job_id = ?, note = ? WHERE run_id = ? AND vm_path = ?",
                (item.state.value, item.job_id, item.note, item.run_id, item.vm_path),
            )

        await self.db.run(update)

    async def end_run(self, run_id: str, state: RunState, now: float, note: str | None = None) -> None:
        """Close a run; ``note`` is added to what its note says."""

        def update(connection: Connection) -> None:
            connection.execute(
                "UPDATE runs SET state = ?, ended = ?, note = CASE WHEN note IS NULL THEN ? ELSE note || '; ' || ? END "
                "WHERE id = ?",
                (state.value, now, note, note, run_id),
            )

        await self.db.run(update)


def _policy(row: dict[str, Any]) -> StoredPolicy:
    return StoredPolicy(Policy.from_json(json.loads(row["spec"])), row["created"], row["updated"])


def _read_policy(connection: Connection, name: str) -> StoredPolicy:
    found = rows(connection.execute("SELECT * FROM policies WHERE name = ?", (name,)))
    if not found:
        raise UnknownPolicy(f"no policy {name[:80]!r}")
    return _policy(found[0])


def _prune(connection: Connection, policy: str) -> None:
    """Forget a policy's closed runs past :data:`RUN_HISTORY`."""
    closed = connection.execute(
        "SELECT id FROM runs WHERE policy = ? AND state != ? ORDER BY started DESC", (policy, RunState.OPEN.value)
    )
    old = [r[0] for r in closed.fetchall()[RUN_HISTORY:]]
    connection.executemany("DELETE FROM run_items WHERE run_id = ?", [(i,) for i in old])
    connection.executemany("DELETE FROM runs WHERE id = ?", [(i,) for i in old])
